"""Check that a model bundle was signed by a key we trust, with OpenSSH's `ssh-keygen -Y`.

The signature covers `model.json` only. That is enough because the card records the sha256 of every
file the device reads (`files`: the models, ood.npz and the samples), and `device.bundle.load_bundle`
checks those hashes on the very bytes it then uses: a swapped `model.tflite` under a genuine card is
caught there, not later. The card and its signature are each read once (by load_bundle); `verify_card`
checks those bytes: the card goes to ssh-keygen on stdin, the signature through a private temp file.

How the check works, in two ssh-keygen calls (OpenSSH >= 8.2, on every Raspberry Pi OS since Bullseye):

1. `ssh-keygen -Y find-principals -s model.json.sig -f ALLOWED_SIGNERS` names the identities whose
   public key made the signature. It reads only the signature, so it answers "who", never "is the
   card intact"; no identity means the key is not in the allowed-signers file.
2. `ssh-keygen -Y verify -f ALLOWED_SIGNERS -I IDENTITY -n mushcam-bundle -s SIG < CARD-BYTES`
   checks the card against the signature, the namespace and the key's options in the file
   (`namespaces=`, `valid-before=`...).

The allowed-signers file has one line per trusted key (see ssh-keygen(1), "ALLOWED SIGNERS"):

    alice@lab namespaces="mushcam-bundle" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA...

ssh-keygen (not a Python crypto library) because the Pi already has it, and so do the people who sign.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from device.errors import SignatureError

NAMESPACE = "mushcam-bundle"
CARD = "model.json"
SIGNATURE = "model.json.sig"
_ARMOR = b"-----BEGIN SSH SIGNATURE-----"


def _ssh_keygen() -> str:
    path = shutil.which("ssh-keygen")
    if path is None:
        raise SignatureError(
            "cannot check the bundle's signature: ssh-keygen not found; install openssh-client"
        )
    return path


def verify_card(card_bytes: bytes, sig_bytes: bytes, allowed_signers: Path, *, identity: str | None = None,
                where: Path = Path(".")) -> str:
    """Check `sig_bytes` is a valid signature of `card_bytes` by a key in `allowed_signers`; return the signer.

    Works on bytes already read (once) by the caller, so what was verified is what gets parsed. `where` (the
    bundle directory) only names the files in messages. Raises SignatureError (one line).
    """
    allowed_signers = Path(allowed_signers)
    card, sig = Path(where) / CARD, Path(where) / SIGNATURE
    if not allowed_signers.is_file():
        raise SignatureError(
            f"{allowed_signers}: allowed-signers file not found; create it with the trusted public keys"
        )
    if not sig_bytes.lstrip().startswith(_ARMOR):
        raise SignatureError(f"{sig}: not an SSH signature; sign the bundle again")
    keygen = _ssh_keygen()
    with tempfile.TemporaryDirectory(prefix="mushcam-sig.") as tmp:
        # ssh-keygen reads the signature from a file: ours, private, holding the bytes we were given.
        sig_file = Path(tmp) / SIGNATURE
        sig_file.write_bytes(sig_bytes)
        found = subprocess.run(
            [keygen, "-Y", "find-principals", "-s", str(sig_file), "-f", str(allowed_signers)],
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
                [keygen, "-Y", "verify", "-f", str(allowed_signers), "-I", principal, "-n", NAMESPACE, "-s", str(sig_file)],
                input=card_bytes,
                capture_output=True,
            )
            if checked.returncode == 0:
                return principal
    raise SignatureError(
        f"{card}: tampered, or signed for another purpose: the signature by {', '.join(principals)} "
        f"does not verify (namespace {NAMESPACE}); do not use this bundle"
    )


def verify_bundle(bundle_dir: Path, allowed_signers: Path, identity: str | None = None) -> str:
    """Check `bundle_dir`'s `model.json.sig` against `allowed_signers`; return the signer's identity.

    With `identity`, the signature must be by that identity. The whole bundle is loaded as the device
    would (device.bundle.load_bundle: the card once, every listed file's sha256 on the bytes read).
    Raises `SignatureError` (one line) if the bundle is unsigned, tampered with, signed by an unknown
    key or if ssh-keygen is missing; `BundleError` if the bundle is otherwise invalid.
    """
    from device.bundle import load_bundle

    return load_bundle(bundle_dir, require_signature=True, allowed_signers=allowed_signers, identity=identity).signer
