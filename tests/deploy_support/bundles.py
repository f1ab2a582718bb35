"""Small bundles for the deploy and signing tests, and helpers to derive variants from a real one."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable


def write_card(bundle: Path, card: dict[str, Any]) -> None:
    """Write `card` as the bundle's model.json."""
    (Path(bundle) / "model.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")


def read_card(bundle: Path) -> dict[str, Any]:
    """The bundle's model.json as a dict."""
    return json.loads((Path(bundle) / "model.json").read_text(encoding="utf-8"))


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
