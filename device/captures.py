"""Optional record of each press: its frames and its result, written atomically, within a disk budget.

Only what this module wrote is ever deleted: folders named like a capture
(`<YYYYmmdd-HHMMSS-NNNNNNNNN>-<VERDICT>`) and its own stale `.tmp-<stamp>` folders, never anything
else a user keeps in the captures folder, and never through a symlink.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import time
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger("mushcam.captures")

_STAMP = r"\d{8}-\d{6}-\d{9}"
CAPTURE_NAME = re.compile(rf"{_STAMP}-[A-Z]+")  # what save_press names a finished capture
TEMP_NAME = re.compile(rf"\.tmp-{_STAMP}")  # and the folder it writes one in


def _size(path: Path) -> int:
    """Bytes under `path`, not following symlinks (lstat: a link counts as itself)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        for name in filenames + dirnames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _usable_root(root: Path) -> bool:
    """The captures folder itself must not be a symlink: pruning through one deleted model releases."""
    if root.is_symlink():
        log.warning("captures folder %s is a symlink; refusing to write or prune through it", root)
        return False
    return True


def _own_folders(root: Path, pattern: re.Pattern) -> list[Path]:
    """Real (not symlinked) folders directly in `root` whose whole name matches `pattern`, oldest first."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    return sorted(Path(e.path) for e in entries
                  if pattern.fullmatch(e.name) and stat.S_ISDIR(e.stat(follow_symlinks=False).st_mode))


def save_press(root: Path, frames: list[np.ndarray], result: dict, max_mb: float) -> Path | None:
    """Write `<root>/<time>-<verdict>/` (frame_N.jpg + result.json); return it, or None if the disk said no.

    result.json is ``result`` plus ``press_id`` (the folder's name) and ``frames`` (the frame files, in
    the order of ``result["frame_sources"]`` when the daemon gives it: where each frame came from).

    The press is written into a hidden temp folder and renamed into place, so a crash or SIGTERM never
    leaves a half-written capture. Oldest captures are removed until the folder fits in `max_mb`.
    A full disk costs the record, never the verdict: errors are logged and swallowed.
    """
    root = Path(root)
    if not _usable_root(root):
        return None
    verdict = str(result.get("verdict", "UNKNOWN"))
    if not re.fullmatch(r"[A-Z]+", verdict):  # the name must stay one prune recognises (and a plain name)
        verdict = "UNKNOWN"
    # One clock reading for both parts: two readings can straddle a second and sort a press before an older one.
    now = time.time_ns()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now // 1_000_000_000)) + f"-{now % 1_000_000_000:09d}"
    final = root / f"{stamp}-{verdict}"
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


def sweep_temporaries(root: Path) -> int:
    """Remove `.tmp-*` folders a crash left behind (run at daemon start, before any press); return how many."""
    root = Path(root)
    if not root.is_dir() or not _usable_root(root):
        return 0
    stale = _own_folders(root, TEMP_NAME)
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    if stale:
        log.info("removed %d unfinished capture(s) left in %s", len(stale), root)
    return len(stale)


def prune(root: Path, max_mb: float) -> None:
    """Delete the oldest captures until the folder holds at most max_mb.

    Only folders named like captures are deleted; stale `.tmp-*` folders count towards the budget until
    sweep_temporaries removes them; anything else in the folder is left alone (and not counted).
    """
    root = Path(root)
    if not _usable_root(root):
        return
    budget = max_mb * 1024 * 1024
    dirs = _own_folders(root, CAPTURE_NAME)
    sizes = {p: _size(p) for p in dirs}
    total = sum(sizes.values()) + sum(_size(p) for p in _own_folders(root, TEMP_NAME))
    for p in dirs[:-1]:  # always keep the newest
        if total <= budget:
            break
        shutil.rmtree(p, ignore_errors=True)
        total -= sizes[p]
