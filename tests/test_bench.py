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
    for key in ("invoke_ms_p50", "pipeline_ms_p50", "cold_start_s", "peak_rss_mb"):
        assert res[key] > 0, key
    assert res["pipeline_ms_p50"] >= res["invoke_ms_p50"]
    assert set(res["stages_ms"]) >= {"decode", "preprocess", "invoke", "postprocess", "signal", "pipeline"}
    assert res["peak_rss_mb"] < 150
