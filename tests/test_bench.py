"""`mushcam bench --json` reports the promised keys with plausible values on the tiny bundle."""

import json
from pathlib import Path

from typer.testing import CliRunner

from device.cli import app

TINY = Path(__file__).resolve().parent / "data" / "tiny_bundle"


def test_bench_json_has_the_promised_figures():
    out = CliRunner().invoke(app, ["bench", "--model", str(TINY), "--json", "--runs", "10", "--threads", "1"])
    assert out.exit_code == 0, out.output
    res = json.loads(out.stdout)
    for key in ("invoke_ms_p50", "pipeline_ms_p50", "press_ms_p50", "jpeg_classify_ms_p50", "cold_start_s", "peak_rss_mb",
                "pipeline_over_invoke", "default_over_best"):
        assert res[key] > 0, key
    assert res["peak_rss_mb"] < 150
    st = res["stages_ms"]
    assert set(st) == {"frame", "press", "jpeg"}
    # The per-frame path is a camera array: no decode or render in it; the raw invoke is in the same loop.
    assert set(st["frame"]) == {"preprocess", "invoke", "postprocess", "pipeline", "raw_invoke"}
    assert res["frame_size"] == [640, 480]
    assert st["frame"]["pipeline"]["p50"] >= st["frame"]["invoke"]["p50"]
    # A press classifies several frames: it cannot be quicker than one.
    assert res["press_ms_p50"] >= res["pipeline_ms_p50"]
    assert set(res["invoke_ms_by_threads"]) == {"default", "1"}  # the default beside the counts asked for
    assert res["best_threads"] == 1


def test_bench_table_names_the_paths():
    out = CliRunner().invoke(app, ["bench", "--model", str(TINY), "--runs", "5", "--threads", "1"])
    assert out.exit_code == 0, out.output
    for words in ("frame 640x480: preprocess", "press: 3 frames + render", "jpeg: classify", "invoke(), default",
                  "pipeline/invoke", "default/best threads"):
        assert words in out.stdout, words


def test_numpy_blas_runs_one_thread_in_the_device_unless_told_otherwise():
    # OpenBLAS threads fought the interpreter's: one BLAS thread took postprocess from 6.4 to 0.6 ms here.
    import os
    import subprocess
    import sys

    code = "import device, numpy, os; print(os.environ['OPENBLAS_NUM_THREADS'])"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "1"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**env, "OPENBLAS_NUM_THREADS": "3"})
    assert out.stdout.strip() == "3"
