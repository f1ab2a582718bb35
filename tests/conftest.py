"""Shared fixtures: the tiny real bundle, a damageable copy of it, and small real image files.

Kept small and general on purpose; a test module that needs something special defines its own fixture.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.make_tiny_bundle import COLOURS, colour_image

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_BUNDLE = REPO_ROOT / "tests" / "data" / "tiny_bundle"

# Colours the tiny model has never seen: its unknown-species score must call them UNSURE.
OOD_COLOURS = {"grey": (128, 128, 128), "yellow": (220, 210, 40)}


@pytest.fixture(scope="session")
def tiny_bundle() -> Path:
    """The committed tiny bundle (read-only: use `bundle_copy` to change anything)."""
    assert (TINY_BUNDLE / "model.json").is_file(), "tests/data/tiny_bundle is missing; run tests/make_tiny_bundle.py"
    return TINY_BUNDLE


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    """A fresh copy of the tiny bundle in tmp_path that a test may damage."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


@pytest.fixture
def edit_card():
    """edit_card(bundle_dir, mutate, rehash=False): apply `mutate(card)` to model.json in place.

    With rehash=True the `files` sha256s are recomputed, so only the change under test is wrong.
    """

    def edit(bundle_dir: Path, mutate, rehash: bool = False) -> dict:
        path = Path(bundle_dir) / "model.json"
        card = json.loads(path.read_text())
        mutate(card)
        if rehash:
            card["files"] = {
                name: hashlib.sha256((Path(bundle_dir) / name).read_bytes()).hexdigest() for name in card["files"]
            }
        path.write_text(json.dumps(card, indent=2))
        return card

    return edit


def _colour(colour) -> tuple[int, int, int]:
    if isinstance(colour, str):
        return {**COLOURS, **{k.removesuffix("_cap"): v for k, v in COLOURS.items()}, **OOD_COLOURS}[colour]
    return tuple(colour)


@pytest.fixture
def rgb_array():
    """rgb_array(colour="red", size=(48, 64), seed=0): a noisy flat-colour H x W x 3 uint8 photo stand-in.

    `colour` is a label (red_cap), a short name (red, green, blue, grey, yellow) or an (r, g, b) tuple.
    """

    def make(colour="red", size=(48, 64), seed=0) -> np.ndarray:
        return np.asarray(colour_image(_colour(colour), size=size, seed=seed))

    return make


@pytest.fixture
def make_image(tmp_path, rgb_array):
    """make_image(name, colour="red", size=(48, 64), mode="RGB", **save_kwargs) -> a real image file in tmp_path.

    The format follows the file name's extension; `mode` converts before saving (L, CMYK, RGBA, P, ...).
    """

    def make(name: str, colour="red", size=(48, 64), mode: str = "RGB", seed: int = 0, **save_kwargs) -> Path:
        img = Image.fromarray(rgb_array(colour, size, seed))
        if mode != "RGB":
            img = img.convert(mode)
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, **save_kwargs)
        return path

    return make


@pytest.fixture
def write_png16_rgb():
    """write_png16_rgb(path, array): save an H x W x 3 uint16 array as a 16-bit RGB PNG (Pillow cannot write one)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    def write(path: Path, a: np.ndarray) -> Path:
        h, w, _ = a.shape
        raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))  # filter type 0 on every row
        ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)  # bit depth 16, colour type 2 (RGB)
        signature = b"\x89PNG\r\n\x1a\n"
        Path(path).write_bytes(signature + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
        return Path(path)

    return write


@pytest.fixture
def tree_state():
    """tree_state(*dirs) -> {path: (size, mtime_ns, sha256)}: compare before/after to prove nothing on disk changed."""

    def state(*dirs: Path) -> dict:
        out = {}
        for d in dirs:
            for p in sorted(Path(d).rglob("*")):
                st = p.stat()
                digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
                out[str(p)] = (st.st_size if p.is_file() else 0, st.st_mtime_ns, digest)
        return out

    return state
