"""`mushcam bench`: where the time of one verdict goes, stage by stage, on this machine.

Stages of one frame: decode (a JPEG from disk, standing in for a capture), preprocess (resize + quantize),
invoke (the interpreter), postprocess (softmax, unknown-species score, verdict) and signal (LEDs on mock
pins and a rendered display frame). Also the raw `invoke()` alone, thread counts, an optional float model,
cold start (a fresh process to its first verdict) and peak RSS. Figures are medians and 95th percentiles;
compare ratios within one run, since this machine is noisy.
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
from device.engine import CpuEngine, make_interpreter
from device.preprocess import load_image, resize, to_tensor
from device.verdict import decide, softmax


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


def stage_times(bundle: Bundle, image: Path, runs: int, threads: int | None) -> dict:
    """Per-stage timings of the device pipeline on one image."""
    from device.display import render, Screen

    clf = Classifier(bundle, engine=CpuEngine(bundle, threads))
    spec = bundle.input
    for _ in range(5):  # warm-up: first invokes pay for allocation and XNNPACK packing
        clf.classify(image)
    t = {k: [] for k in ("decode", "preprocess", "invoke", "postprocess", "signal", "pipeline")}
    for _ in range(runs):
        t0 = time.perf_counter()
        rgb = load_image(image, min_size=2 * max(spec.size))
        t1 = time.perf_counter()
        tensor = to_tensor(resize(rgb, spec.size, spec.resize), spec)
        t2 = time.perf_counter()
        out = clf.engine.run(tensor)
        t3 = time.perf_counter()
        probs = softmax(out.logits)
        ood = clf.ood.score(out.embedding) if clf.ood is not None and out.embedding is not None else None
        d = decide(probs, bundle.labels, bundle.classes, bundle.thresholds, ood)
        t4 = time.perf_counter()
        render(Screen(title=bundle.display_name(d.label or bundle.labels[0]), verdict=d.verdict.value,
                      confidence=d.confidence))
        t5 = time.perf_counter()
        for k, a, b in (("decode", t0, t1), ("preprocess", t1, t2), ("invoke", t2, t3), ("postprocess", t3, t4),
                        ("signal", t4, t5), ("pipeline", t0, t5)):
            t[k].append(b - a)
    raw = _timed(clf.engine.invoke_only, runs)
    result = {k: _stats(v) for k, v in t.items()}
    result["raw_invoke"] = _stats(raw)
    return result


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
    threads = threads or [1, 2, 4]
    stages = stage_times(bundle, image, runs, None)
    per_threads = {str(n): invoke_time(bundle.model_path, runs, n, bundle.file_bytes(MODEL)) for n in threads}
    colds = [cold_start(bundle, image) for _ in range(3)]
    res = {
        "model": bundle.name, "version": bundle.version, "image": str(image), "runs": runs,
        "invoke_ms_p50": stages["invoke"]["p50"],
        "pipeline_ms_p50": stages["pipeline"]["p50"],
        "pipeline_over_invoke": round(stages["pipeline"]["p50"] / max(stages["invoke"]["p50"], 1e-9), 3),
        "cold_start_s": round(float(np.median([c[0] for c in colds])), 3),
        "peak_rss_mb": round(max(c[1] for c in colds), 1),
        "stages_ms": stages,
        "invoke_ms_by_threads": per_threads,
    }
    if float_model is not None:
        res["float_invoke_ms"] = invoke_time(float_model, runs, None)
    return res


def format_table(res: dict) -> str:
    lines = [f"{res['model']} {res['version']}: {res['runs']} runs, medians and p95 in ms", ""]
    lines.append(f"{'stage':<14}{'p50':>10}{'p95':>10}")
    for k, v in res["stages_ms"].items():
        lines.append(f"{k:<14}{v['p50']:>10.2f}{v['p95']:>10.2f}")
    for n, v in res["invoke_ms_by_threads"].items():
        lines.append(f"{'invoke x' + n:<14}{v['p50']:>10.2f}{v['p95']:>10.2f}")
    if "float_invoke_ms" in res:
        lines.append(f"{'float invoke':<14}{res['float_invoke_ms']['p50']:>10.2f}{res['float_invoke_ms']['p95']:>10.2f}")
    lines += ["", f"pipeline/invoke {res['pipeline_over_invoke']:.2f}   cold start {res['cold_start_s']:.2f} s   "
                  f"peak RSS {res['peak_rss_mb']:.0f} MB"]
    return "\n".join(lines)


def to_json(res: dict) -> str:
    return json.dumps(res)
