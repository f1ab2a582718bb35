"""Small bundles for the deploy and signing tests, and helpers to derive variants from a real one."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_card(bundle: Path, card: dict[str, Any]) -> None:
    """Write `card` as the bundle's model.json."""
    (Path(bundle) / "model.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")


def read_card(bundle: Path) -> dict[str, Any]:
    """The bundle's model.json as a dict."""
    return json.loads((Path(bundle) / "model.json").read_text(encoding="utf-8"))


def make_plain_bundle(dest: Path, version: str = "2026.01.01-1", model_bytes: int = 64 * 1024) -> Path:
    """A structurally valid bundle directory with an opaque model.tflite (for signing tests).

    Enough for code that only reads the card and the file hashes; not loadable by the interpreter.
    """
    dest = Path(dest)
    dest.mkdir(parents=True)
    # Deterministic per version so two versions differ and their sha12 differ too.
    seed = hashlib.sha256(version.encode()).digest()
    blob = (seed * (model_bytes // len(seed) + 1))[:model_bytes]
    (dest / "model.tflite").write_bytes(blob)
    write_card(
        dest,
        {
            "format": "mushcam-bundle/1",
            "name": "test-bundle",
            "version": version,
            "labels": ["a", "b"],
            "classes": {
                "a": {"edibility": "edible", "display_name": "A"},
                "b": {"edibility": "poisonous", "display_name": "B"},
            },
            "files": {"model.tflite": sha256_file(dest / "model.tflite")},
            "samples": [],
        },
    )
    return dest


def derive_bundle(
    src: Path,
    dest: Path,
    version: str | None = None,
    edit: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Copy bundle `src` to `dest`, optionally with a new version or an edited card.

    The signature, if any, is dropped: an edited card no longer matches it.
    """
    dest = Path(dest)
    shutil.copytree(src, dest)
    (dest / "model.json.sig").unlink(missing_ok=True)
    card = read_card(dest)
    if version is not None:
        card["version"] = version
    if edit is not None:
        edit(card)
    write_card(dest, card)
    return dest


def make_ssh_key(path: Path, comment: str) -> Path:
    """An unencrypted ed25519 key pair at `path` / `path`.pub."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
    )
    return Path(path)


def allowed_signers_line(key: Path, identity: str) -> str:
    """An allowed-signers line trusting `key` for `identity` in the mushcam-bundle namespace."""
    kind, blob = Path(str(key) + ".pub").read_text().split()[:2]
    return f'{identity} namespaces="mushcam-bundle" {kind} {blob}\n'
