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


# --- issue 12, items 1 and 2: verify the bytes that are used -------------------------------------------


def _evil_card(bundle) -> bytes:
    """The card with the poisonous green cap made edible: what an attacker would swap in."""
    card = json.loads((bundle / "model.json").read_text())
    card["classes"]["green_cap"]["edibility"] = "edible"
    return json.dumps(card, indent=2).encode()


def test_a_card_swapped_during_loads_is_never_served_as_signed(bundle, keys, tmp_path):
    """A thread keeps swapping model.json between the signed card and an evil one while the device loads it:
    every load either refuses or serves the signed card (the old code parsed one read and verified another)."""
    import os
    import threading

    alice, _, allowed = keys
    sign_bundle(bundle, alice)
    good, evil = (bundle / "model.json").read_bytes(), _evil_card(bundle)
    versions = [tmp_path / "good.json", tmp_path / "evil.json"]
    versions[0].write_bytes(good)
    versions[1].write_bytes(evil)
    stop = threading.Event()

    def swap():
        i = 0
        while not stop.is_set():
            tmp = bundle / ".swap.json"
            os.link(versions[i % 2], tmp)
            os.replace(tmp, bundle / "model.json")  # atomic: each read sees one whole card
            i += 1

    from device.bundle import load_bundle

    t = threading.Thread(target=swap, daemon=True)
    t.start()
    served = refused = 0
    try:
        for _ in range(120):
            try:
                b = load_bundle(bundle, require_signature=True, allowed_signers=allowed)
            except SignatureError:
                refused += 1
                continue
            served += 1
            assert b.edibility("green_cap") == "poisonous", "an unsigned card was served as signed"
    finally:
        stop.set()
        t.join()
    assert served and refused  # the race really ran both ways


def test_a_card_swapped_right_after_its_signature_check_is_not_what_is_parsed(bundle, keys, monkeypatch):
    import device.signing as signing
    from device.bundle import load_bundle

    alice, _, allowed = keys
    sign_bundle(bundle, alice)
    evil = _evil_card(bundle)
    real = signing.verify_card

    def verify_then_swap(*args, **kwargs):
        signer = real(*args, **kwargs)
        (bundle / "model.json").write_bytes(evil)  # the attacker wins every race here
        return signer

    monkeypatch.setattr(signing, "verify_card", verify_then_swap)
    b = load_bundle(bundle, require_signature=True, allowed_signers=allowed)
    assert b.signer == "alice@lab" and b.edibility("green_cap") == "poisonous"


def test_files_swapped_after_the_check_are_not_what_runs(bundle, keys, tmp_path):
    """The engine, the unknown-species score and the self-test use the verified bytes, not the files again."""
    from device.bundle import load_bundle
    from device.classifier import Classifier
    from device.selftest import require_samples_pass

    alice, _, allowed = keys
    sign_bundle(bundle, alice)
    b = load_bundle(bundle, require_signature=True, allowed_signers=allowed)
    (bundle / "model.tflite").write_bytes(b"swapped model")
    (bundle / "ood.npz").write_bytes(b"swapped index")
    for s in (bundle / "samples").iterdir():
        s.write_bytes((bundle.parent / "bundle" / "samples" / "blue_cap.jpg").read_bytes())
    clf = Classifier(b, backend="cpu")  # the old code re-opened model.tflite here: "cannot load it"
    assert [c.got for c in require_samples_pass(b, clf)] == ["red_cap", "green_cap", "blue_cap"]


def test_a_swapped_sample_in_a_signed_bundle_is_refused(bundle, keys):
    from device.bundle import load_bundle

    alice, _, allowed = keys
    sign_bundle(bundle, alice)
    (bundle / "samples" / "red_cap.jpg").write_bytes((bundle / "samples" / "blue_cap.jpg").read_bytes())
    with pytest.raises(SignatureError, match="samples/red_cap.jpg: tampered") as e:
        load_bundle(bundle, require_signature=True, allowed_signers=allowed)
    assert "\n" not in str(e.value)


def test_a_signed_card_that_does_not_list_its_samples_is_refused(bundle, keys):
    """The old export's cards left samples out of `files`: the signature then did not cover them, and a
    swapped sample passed the self-test."""
    from device.bundle import load_bundle

    alice, _, allowed = keys
    card = json.loads((bundle / "model.json").read_text())
    card["files"] = {k: v for k, v in card["files"].items() if not k.startswith("samples/")}
    (bundle / "model.json").write_text(json.dumps(card))
    sign_bundle(bundle, alice)
    (bundle / "samples" / "red_cap.jpg").write_bytes((bundle / "samples" / "blue_cap.jpg").read_bytes())
    with pytest.raises(BundleError, match=r"`samples\[0\].file` 'samples/red_cap.jpg' is not listed in `files`"):
        load_bundle(bundle, require_signature=True, allowed_signers=allowed)


def test_an_oversized_signature_is_refused_unread(bundle, keys):
    from device.bundle import SIGNATURE_MAX_BYTES, load_bundle

    _, _, allowed = keys
    with open(bundle / "model.json.sig", "wb") as f:
        f.truncate(SIGNATURE_MAX_BYTES + 1)
    with pytest.raises(BundleError, match="over the .*-byte limit for a signature"):
        load_bundle(bundle, require_signature=True, allowed_signers=allowed)
