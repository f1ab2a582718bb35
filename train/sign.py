"""`mushcam-train sign`: sign a bundle's model card with an SSH key (`ssh-keygen -Y sign`).

Only `model.json` is signed: the card holds the sha256 of every model file, so a valid signature on
the card vouches for the whole bundle. `sign_bundle` refuses to sign a card whose hashes do not match
the files beside it, so a signature never blesses a bundle that would fail to load. Devices check the
signature with `device.signing.verify_bundle` against their allowed-signers file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from device.errors import BundleError, MushcamError, SignatureError
from device.bundle import sha256_file
from device.signing import CARD, NAMESPACE, SIGNATURE


def _check_card(bundle: Path) -> None:
    card = bundle / CARD
    if not card.is_file():
        raise BundleError(f"{card}: no model card; is {bundle} a model bundle?")
    try:
        files = json.loads(card.read_text(encoding="utf-8"))["files"]
        items = list(files.items())
    except (ValueError, KeyError, TypeError, AttributeError):
        raise BundleError(f"{card}: no readable 'files' table; re-export the bundle") from None
    if "model.tflite" not in files:
        raise BundleError(f"{card}: 'files' has no model.tflite entry; re-export the bundle")
    for name, expected in items:
        path = bundle / name
        if not path.is_file() or sha256_file(path) != expected:
            raise BundleError(
                f"{path}: missing or its sha256 differs from the card; refusing to sign, re-export the bundle"
            )


def sign_bundle(bundle: Path, key: Path) -> Path:
    """Sign `bundle/model.json` with the SSH private key `key`; write and return `bundle/model.json.sig`.

    `key` may also be a public key whose private half is in ssh-agent. A passphrase, if any, is asked
    on the terminal by ssh-keygen. An existing signature is replaced atomically.
    """
    bundle = Path(bundle)
    key = Path(key)
    _check_card(bundle)
    if not key.is_file():
        raise SignatureError(f"{key}: signing key not found; create one with `ssh-keygen -t ed25519`")
    keygen = shutil.which("ssh-keygen")
    if keygen is None:
        raise SignatureError("cannot sign: ssh-keygen not found; install openssh-client")
    target = bundle / SIGNATURE
    # Signing stdin and catching stdout (rather than `ssh-keygen -Y sign FILE`) because the file form
    # asks on the terminal before overwriting model.json.sig; the temp file + os.replace keeps any old
    # signature intact until the new one is complete.
    fd, tmp_name = tempfile.mkstemp(prefix=".model.json.sig.", dir=bundle)
    try:
        with open(bundle / CARD, "rb") as card, os.fdopen(fd, "wb") as out:
            done = subprocess.run(
                [keygen, "-Y", "sign", "-n", NAMESPACE, "-f", str(key)],
                stdin=card,
                stdout=out,
                stderr=subprocess.PIPE,
                text=False,
            )
        if done.returncode != 0:
            lines = done.stderr.decode(errors="replace").strip().splitlines()
            reason = lines[-1] if lines else f"exit code {done.returncode}"
            raise SignatureError(f"signing {bundle / CARD} with {key} failed: {reason}")
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return target


def _allowed_signers_line(key: Path) -> str | None:
    """The line a device's allowed-signers file needs for `key` (identity = the key's comment)."""
    pub = key if key.suffix == ".pub" else key.with_name(key.name + ".pub")
    try:
        parts = pub.read_text(encoding="utf-8").split()
    except OSError:
        return None
    if len(parts) < 2:
        return None
    identity = parts[2] if len(parts) > 2 else "REPLACE-WITH-AN-IDENTITY"
    return f'{identity} namespaces="{NAMESPACE}" {parts[0]} {parts[1]}'


def sign(
    bundle: Annotated[
        Path,
        typer.Argument(help="Bundle directory (with model.json) to sign.", exists=True, file_okay=False),
    ],
    key: Annotated[
        Path,
        typer.Option(help="SSH private key (or a public key held in ssh-agent) to sign with.", dir_okay=False),
    ],
) -> None:
    """Sign a bundle's model card (model.json -> model.json.sig) so devices can check who made it."""
    try:
        target = sign_bundle(bundle, key)
    except MushcamError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=1) from None
    typer.echo(f"signed: {target}")
    line = _allowed_signers_line(key)
    if line is not None:
        typer.echo(f"devices trust this key with this line in /etc/mushcam/allowed_signers:\n{line}")
