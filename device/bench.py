"""`mushcam bench`: where the time of one verdict goes, stage by stage, on this machine.

Three paths, each timed on its own:
- frame: what the daemon does per camera frame. A camera-sized RGB array (640x480, what the OpenCV
  camera gives; made once from the photo) -> preprocess (resize + quantize) -> invoke -> postprocess
  (softmax, unknown-species score, verdict). No JPEG decode, no display render. The raw `invoke()` is
  timed in the same loop, interleaved, so `pipeline_over_invoke` compares figures of one moment.
- press: one whole button press, `frames_per_press` frames classified together plus one display render.
- jpeg: `mushcam classify` on the photo file (decode + the frame path).
Also `invoke()` by thread count against the default (one per core), cold start (a fresh process to its
first verdict) and peak RSS. Figures are medians and 95th percentiles; compare ratios within one run,
since this machine is noisy.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from device.bundle import MODEL, Bundle
from device.classifier import Classifier
from device.config import Config
from device.engine import CpuEngine, default_threads, make_interpreter
from device.preprocess import load_image, preprocess
from device.verdict import decide, softmax

CAMERA_SIZE = (640, 480)  # (width, height) of a frame from the OpenCV camera's default mode


def _stats(xs: list[float]) -> dict:
    a = np.asarray(xs) * 1000.0
    return {"p50": round(float(np.median(a)), 3), "p95": round(float(np.percentile(a, 95)), 3)}


def _timed(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def camera_frame(image: Path, size: tuple[int, int] = CAMERA_SIZE) -> np.ndarray:
    """The photo as the camera would hand it over: an (h, w, 3) uint8 array of `size` (width, height)."""
    from PIL import Image

    rgb = load_image(image)
    return np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR), dtype=np.uint8)


def frame_times(clf: Classifier, frame: np.ndarray, runs: int) -> dict:
    """The daemon's per-frame path on an RGB array, stage by stage, with the raw invoke interleaved."""
    bundle, spec = clf.bundle, clf.bundle.input
    for _ in range(5):  # warm-up: first invokes pay for allocation and XNNPACK packing
        clf.classify(frame)
    t = {k: [] for k in ("preprocess", "invoke", "postprocess", "pipeline", "raw_invoke")}
    for _ in range(runs):
        t0 = time.perf_counter()
        tensor = preprocess(frame, spec)  # exactly Classifier.scores' call on a camera frame
        t1 = time.perf_counter()
        out = clf.engine.run(tensor)
        t2 = time.perf_counter()
        probs = softmax(out.logits)
        ood = clf.ood.score(out.embedding) if clf.ood is not None and out.embedding is not None else None
        decide(probs, bundle.labels, bundle.classes, bundle.thresholds, ood)
        t3 = time.perf_counter()
        clf.engine.invoke_only()
        t4 = time.perf_counter()
        for k, a, b in (("preprocess", t0, t1), ("invoke", t1, t2), ("postprocess", t2, t3), ("pipeline", t0, t3),
                        ("raw_invoke", t3, t4)):
            t[k].append(b - a)
    return {k: _stats(v) for k, v in t.items()}


def press_times(clf: Classifier, frame: np.ndarray, frames: int, runs: int) -> dict:
    """One press: `frames` frames classified together, then the verdict's display frame rendered."""
    from device.display import Screen, render

    def press():
        r = clf.classify_frames([frame] * frames)
        render(Screen(title=clf.bundle.display_name(r.label or clf.bundle.labels[0]), verdict=r.verdict,
                      confidence=r.confidence, detail=r.decision.reason))

    press()
    return _stats(_timed(press, runs))


def jpeg_times(clf: Classifier, image: Path, runs: int) -> dict:
    """`mushcam classify` on a photo file: decode alone, and decode + the frame path."""
    spec = clf.bundle.input
    decode = _timed(lambda: load_image(image, min_size=2 * max(spec.size)), runs)
    whole = _timed(lambda: clf.classify(image), runs)
    return {"decode": _stats(decode), "classify": _stats(whole)}


def stage_times(bundle: Bundle, image: Path, runs: int, threads: int | None) -> dict:
    """The three paths (frame, press, jpeg) with one engine of `threads` threads (None: the default)."""
    clf = Classifier(bundle, engine=CpuEngine(bundle, threads))
    frame = camera_frame(image)
    return {
        "frame": frame_times(clf, frame, runs),
        "press": press_times(clf, frame, Config().frames_per_press, max(5, runs // 4)),
        "jpeg": jpeg_times(clf, image, max(5, runs // 2)),
    }


def invoke_time(model: Path, runs: int, threads: int | None, content: bytes | None = None) -> dict:
    """Raw invoke() of any .tflite (e.g. a float model for comparison; `content`: a bundle's verified bytes)
    on a zero input."""
    interp = make_interpreter(model, threads, content=content)
    d = interp.get_input_details()[0]
    interp.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
    for _ in range(3):
        interp.invoke()
    return _stats(_timed(interp.invoke, runs))


def cold_start(bundle: Bundle, image: Path) -> tuple[float, float]:
    """A fresh `mushcam classify` process on one image: wall seconds to its verdict, and its peak RSS in MB."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "device", "classify", "--json", "--model", str(bundle.path), str(image)],
                         capture_output=True, text=True, env=env, timeout=120)
    wall = time.perf_counter() - t
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "cold start failed")
    rss = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024.0  # KiB on Linux
    return wall, rss


def run_bench(bundle: Bundle, image: Path, runs: int = 200, threads: list[int] | None = None,
              float_model: Path | None = None) -> dict:
    """All measurements as one JSON-able dict (the keys `--json` promises are at the top level)."""
    cores = default_threads()
    threads = sorted(set(threads or [1, 2, 4, cores]))
    stages = stage_times(bundle, image, runs, None)
    # The default and each count, measured in turns so that a busy moment does not favour one of them.
    counts = ["default"] + [str(n) for n in threads]
    content = bundle.file_bytes(MODEL)  # the verified bytes, not the file again
    interps = {k: make_interpreter(bundle.model_path, None if k == "default" else int(k), content=content)
               for k in counts}
    samples = {k: [] for k in counts}
    for _ in range(3):
        for k in counts:
            samples[k] += _invoke_samples(interps[k], max(5, runs // 3))
    per_threads = {k: _stats(v) for k, v in samples.items()}
    best = min((k for k in counts if k != "default"), key=lambda k: per_threads[k]["p50"])
    colds = [cold_start(bundle, image) for _ in range(3)]
    frame = stages["frame"]
    res = {
        "model": bundle.name, "version": bundle.version, "image": str(image), "runs": runs,
        "frame_size": list(CAMERA_SIZE), "cores": cores, "frames_per_press": Config().frames_per_press,
        "invoke_ms_p50": frame["raw_invoke"]["p50"],
        "pipeline_ms_p50": frame["pipeline"]["p50"],
        "pipeline_over_invoke": round(frame["pipeline"]["p50"] / max(frame["raw_invoke"]["p50"], 1e-9), 3),
        "press_ms_p50": stages["press"]["p50"],
        "jpeg_classify_ms_p50": stages["jpeg"]["classify"]["p50"],
        "best_threads": int(best),
        "default_over_best": round(per_threads["default"]["p50"] / max(per_threads[best]["p50"], 1e-9), 3),
        "cold_start_s": round(float(np.median([c[0] for c in colds])), 3),
        "peak_rss_mb": round(max(c[1] for c in colds), 1),
        "stages_ms": stages,
        "invoke_ms_by_threads": per_threads,
    }
    if float_model is not None:
        res["float_invoke_ms"] = invoke_time(float_model, runs, None)
    return res


def _invoke_samples(interp, runs: int) -> list[float]:
    for _ in range(3):
        interp.invoke()
    return _timed(interp.invoke, runs)


def format_table(res: dict) -> str:
    st = res["stages_ms"]
    w, h = res["frame_size"]
    lines = [f"{res['model']} {res['version']}: {res['runs']} runs, {res['cores']} cores, medians and p95 in ms", ""]
    lines.append(f"{'stage':<34}{'p50':>9}{'p95':>9}")
    rows = [(f"frame {w}x{h}: preprocess", st["frame"]["preprocess"]),
            ("frame: invoke (set + invoke + get)", st["frame"]["invoke"]),
            ("frame: postprocess", st["frame"]["postprocess"]),
            ("frame: pipeline", st["frame"]["pipeline"]),
            ("frame: raw invoke(), same loop", st["frame"]["raw_invoke"]),
            (f"press: {res['frames_per_press']} frames + render", st["press"]),
            ("jpeg: decode", st["jpeg"]["decode"]),
            ("jpeg: classify (decode + frame)", st["jpeg"]["classify"])]
    for n, v in res["invoke_ms_by_threads"].items():
        rows.append((f"invoke(), {n} thread(s)" if n != "default" else f"invoke(), default ({res['cores']})", v))
    if "float_invoke_ms" in res:
        rows.append(("float invoke()", res["float_invoke_ms"]))
    lines += [f"{k:<34}{v['p50']:>9.2f}{v['p95']:>9.2f}" for k, v in rows]
    lines += ["", f"pipeline/invoke {res['pipeline_over_invoke']:.2f}   default/best threads "
                  f"{res['default_over_best']:.2f} (best {res['best_threads']})   cold start {res['cold_start_s']:.2f} s   "
                  f"peak RSS {res['peak_rss_mb']:.0f} MB"]
    return "\n".join(lines)


def to_json(res: dict) -> str:
    return json.dumps(res)
