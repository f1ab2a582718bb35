"""`mushcam review`: the saved presses as one static HTML page, rendered in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from device.cli import app
from device.config import CapturesConfig
from device.review import BADGE_COLOURS, render_review
from tests.test_daemon import Running, make_cfg, mock_pins  # noqa: F401

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Flags that work as root in a container: no sandbox, no GPU, and nothing that talks to the network.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium; make test installs it)")


@pytest.fixture
def captures(tmp_path, tiny_bundle, rgb_array, mock_pins):  # noqa: F811
    """A captures folder written by a real daemon: EDIBLE, POISONOUS, UNSURE (in that order), and one damaged."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, colour in (("1_red.png", "red"), ("2_blue.png", "blue"), ("3_grey.png", "grey")):
        Image.fromarray(rgb_array(colour, size=(48, 64))).save(photos / name)
    folder = tmp_path / "captures"
    cfg = make_cfg(tmp_path, tiny_bundle, camera=f"fake:{photos}",
                   captures=CapturesConfig(enabled=True, dir=str(folder), max_mb=50))
    r = Running(cfg)
    with r:
        for _ in range(3):
            r.press()
    presses = sorted(folder.iterdir())
    assert [p.name.rsplit("-", 1)[1] for p in presses] == ["EDIBLE", "POISONOUS", "UNSURE"]
    damaged = folder / "20000101-000000-000000000-EDIBLE"  # the oldest: listed last
    damaged.mkdir()
    (damaged / "result.json").write_text("{ not json")
    return folder


def test_the_page_lists_every_press_newest_first_with_what_a_reviewer_needs(captures):
    page = render_review(captures)
    assert re.findall(r'data-verdict="(\w+)"', page) == ["UNSURE", "POISONOUS", "EDIBLE", "none"]
    assert page.count('src="data:image/jpeg;base64,') == 3 * 2  # every frame embedded (2 per press here)
    assert "<script" not in page and "http://" not in page and "https://" not in page  # no JS, no network
    records = [json.loads((p / "result.json").read_text()) for p in sorted(captures.iterdir())[1:]]
    for rec in records:
        assert rec["press_id"] in page and rec["frame_sources"][0] in page
        for t in rec["top"]:
            assert f"<td>{t['display_name']}</td>" in page
    assert "limit 6.000: familiar" in page and "limit 6.000: unlike the training species" in page
    assert "tiny-colours 0.0.1" in page
    assert "result.json unreadable" in page  # a damaged record is shown, not skipped


def test_review_command_writes_one_file_and_fails_in_one_line(captures, tmp_path):
    out = tmp_path / "site" / "review.html"
    r = CliRunner().invoke(app, ["review", str(captures), "--out", str(out), "--limit", "2"])
    assert r.exit_code == 0, r.output
    assert "4 press(es)" in r.stdout and out.is_file()
    assert re.findall(r'data-verdict="(\w+)"', out.read_text()) == ["UNSURE", "POISONOUS"]
    r = CliRunner().invoke(app, ["review", str(tmp_path / "nothing"), "--out", str(out)])
    assert r.exit_code == 1 and r.stderr.startswith("mushcam: error: no captures folder") and r.stderr.count("\n") == 1


def _colour_pixels(image: Image.Image, hex_colour: str, tolerance: int = 12) -> int:
    rgb = np.asarray(image.convert("RGB")).astype(int)
    target = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb - target).max(axis=2) <= tolerance).sum())


@needs_chromium
def test_the_page_renders_in_headless_chromium(captures, tmp_path):
    page = tmp_path / "review.html"
    page.write_text(render_review(captures))
    shot = tmp_path / "shot.png"
    common = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    r = subprocess.run([*common, "--window-size=1000,2000", f"--screenshot={shot}", page.as_uri()],
                       capture_output=True, text=True, timeout=180)
    assert shot.is_file(), r.stderr[-2000:]
    with Image.open(shot) as image:
        assert np.asarray(image.convert("L")).std() > 20, "the screenshot is blank"
        for verdict, colour in BADGE_COLOURS.items():
            # A badge is about 150 x 60 px: thousands of pixels of its colour if it is drawn.
            assert _colour_pixels(image, colour) > 2000, f"no {verdict} badge on the page"
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=180).stdout
    badges = re.findall(r'class="badge"[^>]*>(\w[\w ]*)<', dom)
    assert badges == ["UNSURE", "POISONOUS", "EDIBLE", "NO RECORD"], badges


def test_a_record_with_fields_of_the_wrong_type_is_shown_as_damaged(tmp_path):
    press = tmp_path / "captures" / "20260101-000000-000000000-EDIBLE"
    press.mkdir(parents=True)
    (press / "result.json").write_text(json.dumps({"verdict": "EDIBLE", "thresholds": [1, 2], "top": [{"probability": "x"}]}))
    page = render_review(tmp_path / "captures")
    assert "result.json is damaged" in page and 'data-verdict="none"' in page


def test_the_unknown_species_limit_is_the_one_the_device_decides_at(tmp_path):
    """A card with an ood margin: the device calls a score over ood_max_score - ood_margin unfamiliar, so the
    page must not call a score between the two "familiar" (it showed the raw limit)."""
    press = tmp_path / "captures" / "20261206-035301-751110759-UNSURE"
    press.mkdir(parents=True)
    record = {"verdict": "UNSURE", "ood_score": 0.40, "press_id": "20261206-035301-751110759-UNSURE",
              "thresholds": {"ood_max_score": 0.415, "ood_margin": 0.018}}
    (press / "result.json").write_text(json.dumps(record))
    page = render_review(tmp_path / "captures")
    assert "0.400 (limit 0.397: unlike the training species)" in page


def test_a_record_with_unreadable_thresholds_still_shows_its_score(tmp_path):
    press = tmp_path / "captures" / "20261206-035301-000000001-UNSURE"
    press.mkdir(parents=True)
    record = {"verdict": "UNSURE", "ood_score": 0.40, "press_id": press.name,
              "thresholds": {"ood_max_score": 0.415, "a_future_key": 1}}
    (press / "result.json").write_text(json.dumps(record))
    page = render_review(tmp_path / "captures")
    assert "unknown-species score: 0.400" in page and "limit" not in page.split("unknown-species score: 0.400")[1][:20]
