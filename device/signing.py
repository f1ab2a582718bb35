"""Check that a model bundle was signed by a key we trust, with OpenSSH's `ssh-keygen -Y`.

The signature covers `model.json` only. That is enough because the card records the sha256 of every
model file (`files`), so `verify_bundle` also checks those hashes: a swapped `model.tflite` under a
genuine card is caught here, not later.

How the check works, in two ssh-keygen calls (OpenSSH >= 8.2, on every Raspberry Pi OS since Bullseye):

1. `ssh-keygen -Y find-principals -s model.json.sig -f ALLOWED_SIGNERS` names the identities whose
   public key made the signature. It reads only the signature, so it answers "who", never "is the
   card intact"; no identity means the key is not in the allowed-signers file.
2. `ssh-keygen -Y verify -f ALLOWED_SIGNERS -I IDENTITY -n mushcam-bundle -s model.json.sig < model.json`
   checks the card against the signature, the namespace and the key's options in the file
   (`namespaces=`, `valid-before=`...).

The allowed-signers file has one line per trusted key (see ssh-keygen(1), "ALLOWED SIGNERS"):

    alice@lab namespaces="mushcam-bundle" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA...

ssh-keygen (not a Python crypto library) because the Pi already has it, and so do the people who sign.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from device.bundle import sha256_file
from device.errors import SignatureError

NAMESPACE = "mushcam-bundle"
CARD = "model.json"
SIGNATURE = "model.json.sig"
_ARMOR = "-----BEGIN SSH SIGNATURE-----"


def _ssh_keygen() -> str:
    path = shutil.which("ssh-keygen")
    if path is None:
        raise SignatureError(
            "cannot check the bundle's signature: ssh-keygen not found; install openssh-client"
        )
    return path


def _check_files(bundle_dir: Path, card_bytes: bytes) -> None:
    """Refuse a bundle whose model files differ from the hashes in its (signed) card."""
    try:
        files = json.loads(card_bytes)["files"]
        items = list(files.items())
    except (ValueError, KeyError, TypeError, AttributeError):
        raise SignatureError(
            f"{bundle_dir / CARD}: no readable 'files' table to check the model files against; "
            "re-export the bundle"
        ) from None
    if "model.tflite" not in files:
        raise SignatureError(f"{bundle_dir / CARD}: 'files' has no model.tflite entry; re-export the bundle")
    for name, expected in items:
        path = bundle_dir / name
        if not path.is_file():
            raise SignatureError(f"{path}: listed in the signed card but missing; copy the whole bundle again")
        if sha256_file(path) != expected:
            raise SignatureError(
                f"{path}: tampered or corrupt, its sha256 differs from the signed card; "
                "copy the bundle again from a trusted source"
            )


def verify_bundle(bundle_dir: Path, allowed_signers: Path, identity: str | None = None) -> str:
    """Check `bundle_dir`'s `model.json.sig` against `allowed_signers`; return the signer's identity.

    With `identity`, the signature must be by that identity. Also checks every file hash in the card.
    Raises `SignatureError` (one line) if the bundle is unsigned, tampered with, signed by an unknown
    key or if ssh-keygen is missing.
    """
    bundle_dir = Path(bundle_dir)
    allowed_signers = Path(allowed_signers)
    card = bundle_dir / CARD
    sig = bundle_dir / SIGNATURE
    if not card.is_file():
        raise SignatureError(f"{card}: no model card; is {bundle_dir} a model bundle?")
    if not sig.is_file():
        raise SignatureError(
            f"{bundle_dir}: unsigned bundle (no {SIGNATURE}) but a signature is required; "
            "sign it with `mushcam-train sign BUNDLE --key KEY`"
        )
    if not allowed_signers.is_file():
        raise SignatureError(
            f"{allowed_signers}: allowed-signers file not found; create it with the trusted public keys"
        )
    try:
        sig_text = sig.read_text(encoding="ascii")
    except (UnicodeDecodeError, OSError):
        sig_text = ""
    if not sig_text.lstrip().startswith(_ARMOR):
        raise SignatureError(f"{sig}: not an SSH signature; sign the bundle again")
    keygen = _ssh_keygen()
    card_bytes = card.read_bytes()

    found = subprocess.run(
        [keygen, "-Y", "find-principals", "-s", str(sig), "-f", str(allowed_signers)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    principals = [line.strip() for line in found.stdout.splitlines() if line.strip()]
    if found.returncode != 0 or not principals:
        raise SignatureError(
            f"{sig}: signed by a key that is not in {allowed_signers}; "
            "add the signer's public key there or sign with a trusted key"
        )
    if identity is not None:
        if identity not in principals:
            raise SignatureError(
                f"{sig}: signed by {', '.join(principals)}, not by the required identity {identity}"
            )
        principals = [identity]

    for principal in principals:
        checked = subprocess.run(
            [keygen, "-Y", "verify", "-f", str(allowed_signers), "-I", principal, "-n", NAMESPACE, "-s", str(sig)],
            input=card_bytes,
            capture_output=True,
        )
        if checked.returncode == 0:
            _check_files(bundle_dir, card_bytes)
            return principal
    raise SignatureError(
        f"{card}: tampered, or signed for another purpose: the signature by {', '.join(principals)} "
        f"does not verify (namespace {NAMESPACE}); do not use this bundle"
    )
