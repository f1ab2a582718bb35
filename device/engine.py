"""Inference engines: the TFLite interpreter behind one small seam.

`cpu` runs model.tflite on LiteRT's CPU kernels (XNNPACK); `edgetpu` runs model_edgetpu.tflite through the
Coral delegate. `load_engine(bundle, "auto")` picks the Edge TPU when the bundle has a compiled model and the
delegate loads, else the CPU, and logs why. The interpreter is built once per bundle, never per frame.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import os
import sys
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from device.bundle import EDGETPU_MODEL, MODEL, Bundle, OutputSpec
from device.errors import BundleError, ConfigError, InferenceError

log = logging.getLogger("mushcam.engine")

EDGETPU_LIBRARY = "libedgetpu.so.1"


def _runtime():
    """The interpreter module: ai_edge_litert, else tflite_runtime, else TensorFlow's tf.lite (workstation)."""
    try:
        from ai_edge_litert import interpreter as rt

        return rt
    except ImportError:
        pass
    try:
        from tflite_runtime import interpreter as rt

        return rt
    except ImportError:
        pass
    try:
        # Last resort on a workstation; never installed on the Pi (imported by name: only ever lazily).
        return importlib.import_module("tensorflow").lite
    except ImportError:
        raise InferenceError(
            "no TFLite runtime found: pip install ai-edge-litert (or tflite-runtime) into mushcam's venv"
        ) from None


@contextlib.contextmanager
def _runtime_chatter_to_log():
    """The C++ runtime prints INFO lines straight to fd 2; keep them out of the user's one-line output."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (e.g. an embedding host): nothing to hide
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            for line in sink.read().decode(errors="replace").splitlines():
                log.debug("runtime: %s", line)


def default_threads() -> int:
    """One interpreter thread per CPU this process may run on (all of a Pi's 4 cores).

    LiteRT's own default is ONE thread: measured here, invoke took 2.0 ms at its default and 1.04 ms with
    both cores. The affinity mask, not os.cpu_count(), so a container or a pinned unit is respected.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def make_interpreter(model_path: Path, threads: int | None = None, delegates: list | None = None,
                     content: bytes | None = None):
    """Build and allocate an interpreter; a corrupt model becomes a BundleError naming the file.

    With `content` (the bundle's verified bytes) the interpreter is built from those bytes and
    `model_path` only names the model in messages: the file is not opened again after its sha256 was
    checked. `threads` None or 0 means one per available core (`default_threads()`, as config.toml
    documents `threads = 0`); a positive number pins it.
    """
    if threads is not None and threads < 0:
        raise ConfigError(f"threads must be >= 0 (0: one per core), got {threads}")
    rt = _runtime()
    n = threads or default_threads()
    log.debug("interpreter: %d thread(s)%s", n, "" if threads else " (one per core)")
    try:
        with _runtime_chatter_to_log():
            source = {"model_content": content} if content is not None else {"model_path": str(model_path)}
            interp = rt.Interpreter(**source, num_threads=n, experimental_delegates=delegates)
            interp.allocate_tensors()
    except (ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BundleError(f"{model_path}: the TFLite runtime cannot load it ({first}); re-copy or re-export the bundle") from None
    return interp


@dataclass
class EngineOutput:
    """Dequantized model outputs for one image."""

    logits: np.ndarray  # float32, one per label
    embedding: np.ndarray | None  # float32 pooled features, when the bundle exports them


def _dequantize(q: np.ndarray, spec: OutputSpec) -> np.ndarray:
    return (q.astype(np.float32).reshape(-1) - np.float32(spec.zero_point)) * np.float32(spec.scale)


class Engine(ABC):
    """Runs a bundle's model on one preprocessed tensor. Subclasses provide `_build()` -> interpreter."""

    name = "base"

    def __init__(self, bundle: Bundle, threads: int | None = None):
        self.bundle = bundle
        self.threads = threads
        self.interpreter = self._build()
        self._check_contract()
        details = self.interpreter.get_output_details()
        self._input = self.interpreter.get_input_details()[0]["index"]
        self._logits = details[bundle.logits.index]["index"]
        self._embedding = details[bundle.embedding.index]["index"] if bundle.embedding else None

    @abstractmethod
    def _build(self):
        """Return an allocated interpreter for this backend."""

    def _check_contract(self) -> None:
        """The card must describe the model it ships with: input size, dtype, quantization, outputs."""
        b = self.bundle
        inputs = self.interpreter.get_input_details()
        if len(inputs) != 1:
            raise BundleError(f"{b.model_path}: expected 1 input tensor, found {len(inputs)}")
        inp = inputs[0]
        h, w = b.input.size
        if list(inp["shape"]) != [1, h, w, 3]:
            raise BundleError(f"model.json: `input.size` {[h, w]} does not match the model's input {list(inp['shape'])}")
        if np.dtype(inp["dtype"]).name != b.input.dtype:
            raise BundleError(
                f"model.json: `input.dtype` is {b.input.dtype} but the model takes {np.dtype(inp['dtype']).name}"
            )
        scale, zp = inp["quantization"]
        if not np.isclose(scale, b.input.scale, rtol=1e-4) or int(zp) != b.input.zero_point:
            raise BundleError(
                f"model.json: `input.scale`/`zero_point` ({b.input.scale}, {b.input.zero_point}) differ from the "
                f"model's ({scale}, {zp})"
            )
        outs = self.interpreter.get_output_details()
        for name, spec in (("logits", b.logits), ("embedding", b.embedding)):
            if spec is None:
                continue
            if spec.index >= len(outs):
                raise BundleError(f"model.json: `outputs.{name}.index` {spec.index} but the model has {len(outs)} outputs")
            o = outs[spec.index]
            size = int(np.prod(o["shape"][1:]))
            if size != spec.size:
                raise BundleError(f"model.json: `outputs.{name}.size` is {spec.size} but the model's output has {size}")
            if np.dtype(o["dtype"]).name != spec.dtype:
                raise BundleError(f"model.json: `outputs.{name}.dtype` is {spec.dtype}, the model's is {np.dtype(o['dtype']).name}")
            if not np.isclose(o["quantization"][0], spec.scale, rtol=1e-4) or int(o["quantization"][1]) != spec.zero_point:
                raise BundleError(f"model.json: `outputs.{name}` quantization differs from the model's")

    def run(self, tensor: np.ndarray) -> EngineOutput:
        """Invoke the model on one (1, h, w, 3) integer tensor from device.preprocess.preprocess."""
        try:
            self.interpreter.set_tensor(self._input, tensor)
            self.interpreter.invoke()
        except (ValueError, RuntimeError) as e:
            raise InferenceError(f"{self.name} inference failed: {e}") from None
        logits = _dequantize(self.interpreter.get_tensor(self._logits), self.bundle.logits)
        emb = None
        if self._embedding is not None:
            emb = _dequantize(self.interpreter.get_tensor(self._embedding), self.bundle.embedding)
        return EngineOutput(logits, emb)

    def invoke_only(self) -> None:
        """Run the model on whatever input is set (for benchmarks of the raw invoke)."""
        self.interpreter.invoke()


class CpuEngine(Engine):
    """LiteRT on the CPU (XNNPACK kernels for int8)."""

    name = "cpu"

    def _build(self):
        return make_interpreter(self.bundle.model_path, self.threads, content=self.bundle.file_bytes(MODEL))


class EdgeTpuEngine(Engine):
    """A Coral Edge TPU through libedgetpu's delegate; needs the bundle's model_edgetpu.tflite."""

    name = "edgetpu"

    def _build(self):
        if self.bundle.edgetpu_path is None:
            raise InferenceError(
                f"{self.bundle.path}: no model_edgetpu.tflite in the bundle; run `mushcam-train edgetpu` or use engine cpu"
            )
        delegate = load_edgetpu_delegate()
        # The delegate is applied to an interpreter built from bytes just as to one built from a path.
        return make_interpreter(self.bundle.edgetpu_path, self.threads, [delegate],
                                content=self.bundle.file_bytes(EDGETPU_MODEL))


def load_edgetpu_delegate():
    """Load libedgetpu's delegate; a missing library or device becomes one InferenceError line."""
    rt = _runtime()
    # LiteRT's Delegate.__del__ complains on stderr when loading failed; that noise is not the user's problem.
    # The half-built Delegate lives in the original exception's traceback, so that exception must be freed
    # (not kept as our error's __context__) before the quiet hook is put back.
    hook, sys.unraisablehook = sys.unraisablehook, lambda *_: None
    try:
        return rt.load_delegate(EDGETPU_LIBRARY)
    except (OSError, ValueError) as e:
        reason = str(e)
    finally:
        gc.collect()
        sys.unraisablehook = hook
    raise InferenceError(
        f"no Edge TPU detected ({EDGETPU_LIBRARY}: {reason}); plug in the Coral and install libedgetpu1-std, or use engine cpu"
    )


ENGINES: dict[str, type[Engine]] = {"cpu": CpuEngine, "edgetpu": EdgeTpuEngine}


def load_engine(bundle: Bundle, backend: str = "auto", threads: int | None = None) -> Engine:
    """Build the engine named by `backend` (`auto`, or a key of ENGINES)."""
    if backend == "auto":
        if bundle.edgetpu_path is not None:
            try:
                engine = EdgeTpuEngine(bundle, threads)
                log.info("engine: edgetpu (bundle has an Edge TPU model and the delegate loaded)")
                return engine
            except InferenceError as e:
                log.warning("engine: cpu, because the Edge TPU is unavailable: %s", e)
        return CpuEngine(bundle, threads)
    if backend not in ENGINES:
        raise ConfigError(f"unknown engine {backend!r}; valid: auto, {', '.join(ENGINES)}")
    return ENGINES[backend](bundle, threads)
