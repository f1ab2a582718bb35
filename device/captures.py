"""Optional record of each press: its frames and its result, written atomically, within a disk budget."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger("mushcam.captures")


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def save_press(root: Path, frames: list[np.ndarray], result: dict, max_mb: float) -> Path | None:
    """Write `<root>/<time>-<verdict>/` (frame_N.jpg + result.json); return it, or None if the disk said no.

    result.json is ``result`` plus ``press_id`` (the folder's name) and ``frames`` (the frame files, in
    the order of ``result["frame_sources"]`` when the daemon gives it: where each frame came from).

    The press is written into a hidden temp folder and renamed into place, so a crash or SIGTERM never
    leaves a half-written capture. Oldest captures are removed until the folder fits in `max_mb`.
    A full disk costs the record, never the verdict: errors are logged and swallowed.
    """
    root = Path(root)
    # One clock reading for both parts: two readings can straddle a second and sort a press before an older one.
    now = time.time_ns()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now // 1_000_000_000)) + f"-{now % 1_000_000_000:09d}"
    final = root / f"{stamp}-{result.get('verdict', 'UNKNOWN')}"
    tmp = root / f".tmp-{stamp}"
    try:
        tmp.mkdir(parents=True)
        names = [f"frame_{i}.jpg" for i in range(len(frames))]
        for name, frame in zip(names, frames):
            Image.fromarray(frame).save(tmp / name, quality=90)
        record = {"press_id": final.name, **result, "frames": names}
        (tmp / "result.json").write_text(json.dumps(record, indent=2) + "\n")
        tmp.rename(final)
    except OSError as e:
        log.warning("capture not saved (%s); the verdict was still given", e)
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    prune(root, max_mb)
    return final


def prune(root: Path, max_mb: float) -> None:
    """Delete the oldest captures until the folder holds at most max_mb."""
    budget = max_mb * 1024 * 1024
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    sizes = {p: _size(p) for p in dirs}
    total = sum(sizes.values())
    for p in dirs[:-1]:  # always keep the newest
        if total <= budget:
            break
        shutil.rmtree(p, ignore_errors=True)
        total -= sizes[p]
