"""Bundle signing (train/sign.py) and verification on the device (device/signing.py) with real ssh-keygen."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from device.errors import BundleError, SignatureError
from device.signing import verify_bundle
from tests.deploy_support.bundles import allowed_signers_line, make_ssh_key
from train.sign import sign, sign_bundle


@pytest.fixture
def keys(tmp_path):
    """Two key pairs: alice is trusted (in allowed_signers), mallory is not."""
    kdir = tmp_path / "keys"
    kdir.mkdir()
    alice = make_ssh_key(kdir / "alice", "alice@lab")
    mallory = make_ssh_key(kdir / "mallory", "mallory@elsewhere")
    allowed = kdir / "allowed_signers"
    allowed.write_text(allowed_signers_line(alice, "alice@lab"))
    return alice, mallory, allowed


@pytest.fixture
def bundle(bundle_copy):
    """A real tiny bundle (conftest's copy) that the test may sign and damage."""
    return bundle_copy


def test_signed_bundle_verifies_and_names_its_signer(bundle, keys):
    alice, _, allowed = keys
    sig = sign_bundle(bundle, alice)
    assert sig == bundle / "model.json.sig"
    assert sig.read_text().startswith("-----BEGIN SSH SIGNATURE-----")
    assert verify_bundle(bundle, allowed) == "alice@lab"
    assert verify_bundle(bundle, allowed, identity="alice@lab") == "alice@lab"


def test_resigning_replaces_the_signature(bundle, keys):
    alice, _, allowed = keys
    first = sign_bundle(bundle, alice).read_text()
    card = json.loads((bundle / "model.json").read_text())
    card["version"] = "2026.01.02-1"
    (bundle / "model.json").write_text(json.dumps(card))
    second = sign_bundle(bundle, alice).read_text()
    assert first != second
    assert verify_bundle(bundle, allowed) == "alice@lab"
    assert not [p for p in bundle.iterdir() if p.name.startswith(".model.json.sig")]


def test_unsigned_bundle_is_refused(bundle, keys):
    _, _, allowed = keys
    with pytest.raises(SignatureError, match="unsigned"):
        verify_bundle(bundle, allowed)


def test_edited_card_is_tampered(bundle, keys):
    alice, _, allowed = keys
    sign_bundle(bundle, alice)
    card = json.loads((bundle / "model.json").read_text())
    card["thresholds"] = {"edible_min_confidence": 0.1}
    (bundle / "model.json").write_text(json.dumps(card))
    with pytest.raises(SignatureError, match="tampered") as err:
        verify_bundle(bundle, allowed)
    assert "\n" not in str(err.value)


def test_swapped_model_under_a_genuine_card_is_tampered(bundle, keys):
    alice, _, allowed = keys
    sign_bundle(bundle, alice)
    (bundle / "model.tflite").write_bytes(b"not the model that was signed")
    with pytest.raises(SignatureError, match="model.tflite: tampered"):
        verify_bundle(bundle, allowed)


def test_unknown_key_is_refused(bundle, keys):
    _, mallory, allowed = keys
    sign_bundle(bundle, mallory)
    with pytest.raises(SignatureError, match="not in"):
        verify_bundle(bundle, allowed)


def test_wrong_identity_is_refused(bundle, keys):
    alice, _, allowed = keys
    sign_bundle(bundle, alice)
    with pytest.raises(SignatureError, match="not by the required identity bob@lab"):
        verify_bundle(bundle, allowed, identity="bob@lab")


def test_signature_for_another_namespace_is_refused(bundle, keys, tmp_path):
    """A key trusted only for mushcam-bundle cannot lend a signature made for something else."""
    import subprocess

    alice, _, allowed = keys
    with open(bundle / "model.json", "rb") as card, open(bundle / "model.json.sig", "wb") as out:
        subprocess.run(["ssh-keygen", "-Y", "sign", "-n", "git", "-f", str(alice)], stdin=card, stdout=out,
                       stderr=subprocess.DEVNULL, check=True)
    with pytest.raises(SignatureError, match="another purpose"):
        verify_bundle(bundle, allowed)


def test_garbage_signature_and_missing_allowed_signers(bundle, keys, tmp_path):
    alice, _, allowed = keys
    (bundle / "model.json.sig").write_text("hello\n")
    with pytest.raises(SignatureError, match="not an SSH signature"):
        verify_bundle(bundle, allowed)
    sign_bundle(bundle, alice)
    with pytest.raises(SignatureError, match="allowed-signers file not found"):
        verify_bundle(bundle, tmp_path / "nope")


def test_missing_ssh_keygen_is_one_clear_line(bundle, keys, monkeypatch):
    alice, _, allowed = keys
    sign_bundle(bundle, alice)
    monkeypatch.setenv("PATH", "")
    with pytest.raises(SignatureError, match="ssh-keygen not found"):
        verify_bundle(bundle, allowed)
    with pytest.raises(SignatureError, match="ssh-keygen not found"):
        sign_bundle(bundle, alice)


def test_signature_error_is_a_bundle_error(bundle, keys):
    """Callers catching BundleError (load_bundle's users) also catch signature problems."""
    _, _, allowed = keys
    with pytest.raises(BundleError):
        verify_bundle(bundle, allowed)


def test_refuses_to_sign_a_bundle_that_does_not_match_its_card(bundle, keys):
    alice, _, _ = keys
    (bundle / "model.tflite").write_bytes(b"changed after export")
    with pytest.raises(BundleError, match="refusing to sign"):
        sign_bundle(bundle, alice)
    assert not (bundle / "model.json.sig").exists()


def test_failed_signing_keeps_the_old_signature(bundle, keys, tmp_path):
    alice, _, _ = keys
    old = sign_bundle(bundle, alice).read_text()
    broken_key = tmp_path / "broken"
    broken_key.write_text("not a key\n")
    with pytest.raises(SignatureError, match="failed"):
        sign_bundle(bundle, broken_key)
    assert (bundle / "model.json.sig").read_text() == old


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("sign")(sign)

    @app.callback()
    def _main() -> None:
        """Stand-in for train/cli.py's app (the lead wires `sign` there)."""

    return app


def test_cli_signs_and_prints_the_allowed_signers_line(bundle, keys):
    alice, _, allowed = keys
    result = CliRunner().invoke(_app(), ["sign", str(bundle), "--key", str(alice)])
    assert result.exit_code == 0, result.output
    assert "signed:" in result.output
    assert 'alice@lab namespaces="mushcam-bundle" ssh-ed25519 ' in result.output
    assert verify_bundle(bundle, allowed) == "alice@lab"


def test_cli_error_is_one_line_and_exit_1(bundle, keys):
    alice, _, _ = keys
    (bundle / "model.tflite").write_bytes(b"changed")
    result = CliRunner().invoke(_app(), ["sign", str(bundle), "--key", str(alice)])
    assert result.exit_code == 1
    assert "refusing to sign" in result.output
    assert "Traceback" not in result.output


def test_cli_help_comes_from_the_docstring():
    result = CliRunner().invoke(_app(), ["sign", "--help"])
    assert result.exit_code == 0
    assert "Sign a bundle's model card" in result.output
    assert "--key" in result.output
