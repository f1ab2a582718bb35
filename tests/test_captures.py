"""device.captures: a press's record is written atomically, and pruning deletes only what it wrote."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from device.captures import prune, save_press, sweep_temporaries

FRAME = np.zeros((32, 32, 3), np.uint8)


def _capture(root, name, mb=1.0):
    d = root / name
    d.mkdir(parents=True)
    (d / "frame_0.jpg").write_bytes(b"\0" * int(mb * 1024 * 1024))
    return d


def test_save_press_writes_a_capture_named_for_prune(tmp_path):
    out = save_press(tmp_path, [FRAME, FRAME], {"verdict": "EDIBLE"}, max_mb=10)
    assert out is not None and out.name.endswith("-EDIBLE")
    assert sorted(p.name for p in out.iterdir()) == ["frame_0.jpg", "frame_1.jpg", "result.json"]
    assert json.loads((out / "result.json").read_text())["verdict"] == "EDIBLE"


def test_prune_deletes_the_oldest_captures_and_nothing_else(tmp_path):
    """Issue 12 item 8: a user's `holiday-2019` folder in the captures dir was pruned."""
    old = _capture(tmp_path, "20260101-000000-000000001-EDIBLE")
    mid = _capture(tmp_path, "20260102-000000-000000001-UNSURE")
    new = _capture(tmp_path, "20260103-000000-000000001-POISONOUS")
    holiday = _capture(tmp_path, "holiday-2019", mb=0.1)
    lookalike = _capture(tmp_path, "20250101-000000-000000001-EDIBLE.bak", mb=0.1)
    prune(tmp_path, max_mb=2)
    assert not old.exists() and mid.exists() and new.exists()
    assert holiday.exists() and lookalike.exists()
    prune(tmp_path, max_mb=1)
    assert not mid.exists() and new.exists() and holiday.exists() and lookalike.exists()


def test_prune_refuses_a_symlinked_captures_root(tmp_path):
    """With the captures dir a symlink to the model releases, pruning deleted a release."""
    releases = tmp_path / "releases"
    release = _capture(releases, "20260101-000000-000000001-EDIBLE")  # named like a capture, even
    _capture(releases, "20260102-000000-000000001-EDIBLE")
    link = tmp_path / "captures"
    link.symlink_to(releases, target_is_directory=True)
    prune(link, max_mb=1)
    assert release.exists()
    assert save_press(link, [FRAME], {"verdict": "EDIBLE"}, max_mb=1) is None
    assert len(list(releases.iterdir())) == 2


def test_a_symlinked_capture_is_not_followed(tmp_path):
    outside = _capture(tmp_path / "elsewhere", "keep")
    root = tmp_path / "captures"
    root.mkdir()
    (root / "20260101-000000-000000001-EDIBLE").symlink_to(outside, target_is_directory=True)
    _capture(root, "20260102-000000-000000001-EDIBLE", mb=2)
    prune(root, max_mb=1)
    assert (outside / "frame_0.jpg").exists()


def test_stale_temporaries_count_until_swept(tmp_path):
    """`.tmp-*` folders left by a crash were never counted nor removed (69 MB under max_mb = 1)."""
    a = _capture(tmp_path, "20260101-000000-000000001-EDIBLE")
    b = _capture(tmp_path, "20260102-000000-000000001-EDIBLE", mb=0.2)
    stale = _capture(tmp_path, ".tmp-20260101-000000-000000002", mb=2)
    hidden = _capture(tmp_path, ".tmp-not-ours", mb=0.1)
    prune(tmp_path, max_mb=2)
    assert not a.exists() and b.exists()  # the stale 2 MB pushed the total over budget
    assert sweep_temporaries(tmp_path) == 1
    assert not stale.exists() and hidden.exists() and b.exists()


def test_an_odd_verdict_still_gives_a_plain_capture_name(tmp_path):
    out = save_press(tmp_path, [FRAME], {"verdict": "../../x"}, max_mb=10)
    assert out.parent == tmp_path and out.name.endswith("-UNKNOWN")


@pytest.mark.parametrize("missing", [True, False])
def test_sweep_on_a_missing_or_empty_root(tmp_path, missing):
    root = tmp_path / "captures"
    if not missing:
        root.mkdir()
    assert sweep_temporaries(root) == 0
    assert os.path.isdir(root) is (not missing)
