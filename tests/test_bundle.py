"""device.bundle (and the engine's card/model contract check, and device.selftest): a bad bundle is refused
with one line naming the file or field at fault, and loading never changes anything on disk."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat

import pytest

from device.bundle import Thresholds, load_bundle, sha256_file, write_card
from device.engine import CpuEngine
from device.errors import BundleError
from device.selftest import check_samples, require_samples_pass


def test_the_tiny_bundle_loads(tiny_bundle):
    b = load_bundle(tiny_bundle)
    assert b.labels == ["red_cap", "green_cap", "blue_cap"]
    assert [b.edibility(x) for x in b.labels] == ["edible", "poisonous", "poisonous"]
    assert b.display_name("red_cap") == "red cap"
    assert b.input.size == (16, 16) and b.input.dtype == "int8"
    assert b.logits.size == 3 and b.embedding is not None
    assert b.thresholds == Thresholds(0.9, 0.05, 0.5, 6.0)
    assert [s.label for s in b.samples] == b.labels and all(s.path.is_file() for s in b.samples)
    assert b.edgetpu_path is None and b.ood_path == tiny_bundle / "ood.npz"
    assert b.model_sha256 == sha256_file(tiny_bundle / "model.tflite")
    assert (b.name, b.version) == ("tiny-colours", "0.0.1")


# --- card errors ---------------------------------------------------------------------------------------


def _set(path: str, value):
    """A mutator that sets card[a][b]... = value (or deletes it when value is DELETE)."""

    def mutate(card):
        *parents, last = path.split(".")
        node = card
        for p in parents:
            node = node[p]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value

    return mutate


DELETE = object()


def _add_label(card):
    card["labels"].append("brown_cap")
    card["classes"]["brown_cap"] = {"edibility": "edible", "display_name": "brown cap"}


CARD_ERRORS = {
    "wrong label count": (_add_label, "4 labels but `outputs.logits.size` is 3"),
    "float input dtype": (_set("input.dtype", "float32"), "full-integer"),
    "missing classes entry": (_set("classes.blue_cap", DELETE), "`classes.blue_cap` is missing"),
    "bad edibility": (_set("classes.red_cap.edibility", "probably fine"), "`classes.red_cap.edibility`"),
    "unknown thresholds key": (_set("thresholds.edible_min_confidance", 0.5), "`thresholds.edible_min_confidance`"),
    "threshold out of range": (_set("thresholds.edible_min_confidence", 1.5), "outside 0..1"),
    "threshold not a number": (_set("thresholds.poisonous_max_mass", "0.02"), "must be a number"),
    "threshold a bool": (_set("thresholds.poisonous_min_confidence", True), "must be a number"),
    "negative ood threshold": (_set("thresholds.ood_max_score", -1), "ood_max_score"),
    "ood without its threshold": (_set("thresholds.ood_max_score", DELETE), "needs `thresholds.ood_max_score`"),
    "ood without embedding": (_set("outputs.embedding", DELETE), "needs an `outputs.embedding`"),
    "ood file not listed": (_set("ood.file", "other.npz"), "`ood.file`"),
    "wrong format": (_set("format", "mushcam-bundle/2"), "`format`"),
    "no labels": (_set("labels", []), "`labels`"),
    "duplicate labels": (_set("labels", ["red_cap", "red_cap", "blue_cap"]), "duplicates"),
    "classes not a map": (_set("classes", ["red_cap"]), "`classes`"),
    "no logits output": (_set("outputs.logits", DELETE), "`outputs.logits` is missing"),
    "float logits": (_set("outputs.logits.dtype", "float32"), "`outputs.logits.dtype`"),
    "logits scale missing": (_set("outputs.logits.scale", DELETE), "`outputs.logits.scale` is missing"),
    # (file names contain dots, so these two cannot use _set)
    "files without the model": (lambda c: c["files"].pop("model.tflite"), "`files` must list model.tflite"),
    "file outside the bundle": (lambda c: c["files"].update({"../model.tflite": "0" * 64}), "plain name inside the bundle"),
    "sample with unknown label": (_set("samples", [{"file": "samples/red_cap.jpg", "label": "pink_cap"}]), "`samples[0]`"),
    "unknown role": (_set("classes.red_cap.role", "tasty"), "`classes.red_cap.role`"),
    "role edible on a poisonous class": (_set("classes.blue_cap.role", "edible"), "role edible but edibility poisonous"),
    "role other on an edible class": (_set("classes.red_cap.role", "other"), "role other but edibility edible"),
    "negative ood margin": (_set("thresholds.ood_margin", -0.01), "`thresholds.ood_margin`"),
    "confidence margin out of range": (_set("thresholds.confidence_margin", 2.0), "outside 0..1"),
}


@pytest.mark.parametrize("case", CARD_ERRORS, ids=list(CARD_ERRORS))
def test_bad_card_is_refused_in_one_line(case, bundle_copy, edit_card, tree_state):
    mutate, words = CARD_ERRORS[case]
    edit_card(bundle_copy, mutate)
    before = tree_state(bundle_copy)
    with pytest.raises(BundleError) as e:
        load_bundle(bundle_copy)
    assert words in str(e.value)
    assert "\n" not in str(e.value)
    assert tree_state(bundle_copy) == before


def test_missing_card(bundle_copy):
    (bundle_copy / "model.json").unlink()
    with pytest.raises(BundleError, match="no model.json") as e:
        load_bundle(bundle_copy)
    assert str(bundle_copy) in str(e.value)


def test_missing_bundle_directory(tmp_path):
    with pytest.raises(BundleError, match="no such model bundle directory"):
        load_bundle(tmp_path / "nowhere")


@pytest.mark.parametrize("text", ['{"format": "mushcam-bundle/1", "labels": [', "\xff\xfe garbage", "[1, 2, 3]"])
def test_garbled_card(bundle_copy, text):
    (bundle_copy / "model.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(BundleError) as e:
        load_bundle(bundle_copy)
    msg = str(e.value)
    assert "model.json" in msg and "\n" not in msg
    assert "not valid JSON" in msg or "JSON object" in msg


def test_sha_mismatch(bundle_copy, edit_card):
    edit_card(bundle_copy, lambda c: c["files"].update({"ood.npz": "0" * 64}))
    with pytest.raises(BundleError, match="ood.npz: sha256 does not match"):
        load_bundle(bundle_copy)
    # check_sha=False skips only the hash: the same bundle then loads.
    assert load_bundle(bundle_copy, check_sha=False).labels


def test_truncated_model_fails_the_sha_check(bundle_copy):
    model = bundle_copy / "model.tflite"
    model.write_bytes(model.read_bytes()[:1000])
    with pytest.raises(BundleError, match="model.tflite: sha256 does not match") as e:
        load_bundle(bundle_copy)
    assert "re-copy" in str(e.value)


def test_truncated_model_with_a_matching_sha_cannot_be_loaded_by_the_runtime(bundle_copy, edit_card, capfd):
    model = bundle_copy / "model.tflite"
    model.write_bytes(model.read_bytes()[:1000])
    edit_card(bundle_copy, lambda c: None, rehash=True)
    bundle = load_bundle(bundle_copy)  # the card is consistent with the (broken) file
    with pytest.raises(BundleError, match="cannot load it") as e:
        CpuEngine(bundle)
    assert str(model) in str(e.value) and "\n" not in str(e.value)
    assert capfd.readouterr().err == ""  # the runtime's own complaints go to the log, not the terminal


def test_missing_listed_file(bundle_copy):
    (bundle_copy / "ood.npz").unlink()
    with pytest.raises(BundleError, match="ood.npz: missing"):
        load_bundle(bundle_copy)


def test_empty_listed_file(bundle_copy):
    (bundle_copy / "ood.npz").write_bytes(b"")
    with pytest.raises(BundleError, match="ood.npz: empty file"):
        load_bundle(bundle_copy)


# --- the card must describe the model it ships with (checked when the engine is built) ------------------

CONTRACT_ERRORS = {
    "input size": (_set("input.size", [24, 24]), "`input.size` [24, 24] does not match"),
    "input dtype": (lambda c: c["input"].update(dtype="uint8", zero_point=127), "`input.dtype` is uint8"),
    "input scale": (_set("input.scale", 0.01), "`input.scale`/`zero_point`"),
    "input zero point": (_set("input.zero_point", 0), "`input.scale`/`zero_point`"),
    "outputs swapped": (
        lambda c: c["outputs"].update(logits=c["outputs"]["embedding"] | {"scale": c["outputs"]["logits"]["scale"]},
                                      embedding=c["outputs"]["logits"] | {"scale": c["outputs"]["embedding"]["scale"]}),
        "quantization differs",
    ),
    "logits dtype": (_set("outputs.logits.dtype", "uint8"), "`outputs.logits.dtype` is uint8"),
    "embedding index": (_set("outputs.embedding.index", 5), "`outputs.embedding.index` 5 but the model has 2 outputs"),
    "embedding size": (_set("outputs.embedding.size", 4), "`outputs.embedding.size` is 4"),
}


@pytest.mark.parametrize("case", CONTRACT_ERRORS, ids=list(CONTRACT_ERRORS))
def test_card_model_mismatch_is_caught_by_the_engine(case, bundle_copy, edit_card):
    mutate, words = CONTRACT_ERRORS[case]
    edit_card(bundle_copy, mutate)  # the sha of model.tflite still matches: only the card lies
    bundle = load_bundle(bundle_copy)
    with pytest.raises(BundleError) as e:
        CpuEngine(bundle)
    assert words in str(e.value) and "\n" not in str(e.value)


# --- writing cards -------------------------------------------------------------------------------------


def test_write_card_is_atomic_and_readable(tmp_path):
    write_card(tmp_path, {"a": 1})
    path = tmp_path / "model.json"
    assert json.loads(path.read_text()) == {"a": 1}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    with pytest.raises(TypeError):
        write_card(tmp_path, {"a": object()})  # fails half-way through json.dump
    assert json.loads(path.read_text()) == {"a": 1}  # the old card survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json"]  # no temp file left behind


def test_sha256_file(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"mushroom" * 300_000)  # more than one read chunk
    assert sha256_file(p) == hashlib.sha256(p.read_bytes()).hexdigest()


# --- selftest (library) --------------------------------------------------------------------------------


def test_selftest_passes_on_the_tiny_bundle(tiny_bundle):
    checks = require_samples_pass(load_bundle(tiny_bundle))
    assert [(c.file, c.expected, c.got) for c in checks] == [
        ("samples/red_cap.jpg", "red_cap", "red_cap"),
        ("samples/green_cap.jpg", "green_cap", "green_cap"),
        ("samples/blue_cap.jpg", "blue_cap", "blue_cap"),
    ]
    assert all(c.ok and c.confidence > 0.9 for c in checks)


def test_selftest_fails_on_a_wrong_label(bundle_copy, edit_card):
    edit_card(bundle_copy, lambda c: c["samples"][0].update(label="green_cap"))
    bundle = load_bundle(bundle_copy)
    checks = check_samples(bundle)
    assert [c.ok for c in checks] == [False, True, True]
    with pytest.raises(BundleError, match=r"self-test failed on 1/3 samples \(samples/red_cap.jpg: classified as red_cap"):
        require_samples_pass(bundle)


def test_selftest_reports_an_unreadable_sample(bundle_copy, edit_card):
    (bundle_copy / "samples" / "blue_cap.jpg").write_bytes(b"not a jpeg")
    edit_card(bundle_copy, lambda c: None, rehash=True)  # a card that vouches for the broken sample
    bundle = load_bundle(bundle_copy)
    bad = [c for c in check_samples(bundle) if not c.ok]
    assert len(bad) == 1 and bad[0].got is None and "not an image" in bad[0].error
    with pytest.raises(BundleError, match="samples/blue_cap.jpg"):
        require_samples_pass(bundle)


def test_selftest_without_samples_fails(bundle_copy, edit_card):
    edit_card(bundle_copy, lambda c: c.pop("samples"))
    with pytest.raises(BundleError, match="lists no `samples`"):
        check_samples(load_bundle(bundle_copy))


# --- issue 12: integrity under attack --------------------------------------------------------------------


def test_a_301_mb_card_is_refused_before_it_is_read(bundle_copy, monkeypatch):
    """Item 1: the old code parsed a 301 MB card (660 MB RSS) before refusing it. A sparse file costs no disk."""
    import device.bundle as bundle_mod

    with open(bundle_copy / "model.json", "r+b") as f:
        f.truncate(301 << 20)
    monkeypatch.setattr(bundle_mod.json, "loads", lambda *a, **k: pytest.fail("the card was parsed"))
    with pytest.raises(BundleError, match=r"model.json: 315621376 bytes, over the 1048576-byte limit") as e:
        load_bundle(bundle_copy)
    assert "\n" not in str(e.value)


def test_a_card_just_over_the_cap_is_refused(bundle_copy):
    from device.bundle import CARD_MAX_BYTES

    card = (bundle_copy / "model.json").read_bytes()
    (bundle_copy / "model.json").write_bytes(card + b" " * (CARD_MAX_BYTES + 1 - len(card)))
    with pytest.raises(BundleError, match="limit for a model card"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("depth", [33, 5_000, 100_000])
def test_a_deeply_nested_card_is_one_line(bundle_copy, depth):
    """Item 1: a 100,000-deep JSON gave a RecursionError traceback."""
    (bundle_copy / "model.json").write_text('{"format": "mushcam-bundle/1", "x": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(BundleError, match="nested deeper than 32 levels") as e:
        load_bundle(bundle_copy)
    assert "\n" not in str(e.value)


def test_a_card_symlink_or_fifo_is_refused(bundle_copy, tmp_path):
    card = bundle_copy / "model.json"
    real = tmp_path / "elsewhere.json"
    real.write_bytes(card.read_bytes())
    card.unlink()
    card.symlink_to(real)
    with pytest.raises(BundleError, match="is a symlink"):
        load_bundle(bundle_copy)
    card.unlink()
    os.mkfifo(card)  # would block a plain open() forever
    with pytest.raises(BundleError, match="not a regular file"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("name", ["/etc/passwd", "../../etc/passwd", "samples/../../model.json", "samples//red_cap.jpg",
                                  "samples\\red_cap.jpg", "./samples/red_cap.jpg"])
def test_sample_paths_outside_the_bundle_are_refused_in_one_line(bundle_copy, edit_card, name):
    """Item 2: `../../...` read outside the bundle and `/etc/passwd` gave a traceback in the self-test."""
    edit_card(bundle_copy, lambda c: c["samples"][0].update(file=name))
    with pytest.raises(BundleError, match=r"`samples\[0\].file`") as e:
        load_bundle(bundle_copy)
    assert "plain" in str(e.value) and "\n" not in str(e.value)


def test_a_sample_not_listed_in_files_is_refused(bundle_copy, edit_card):
    edit_card(bundle_copy, lambda c: c["files"].pop("samples/green_cap.jpg"))
    with pytest.raises(BundleError, match=r"`samples\[1\].file` 'samples/green_cap.jpg' is not listed in `files`"):
        load_bundle(bundle_copy)


def test_a_swapped_sample_fails_the_sha_check(bundle_copy):
    (bundle_copy / "samples" / "red_cap.jpg").write_bytes((bundle_copy / "samples" / "blue_cap.jpg").read_bytes())
    with pytest.raises(BundleError, match="samples/red_cap.jpg: sha256 does not match"):
        load_bundle(bundle_copy)


def test_the_bundle_serves_the_bytes_it_hashed(tiny_bundle):
    b = load_bundle(tiny_bundle)
    assert set(b.data) == set(b.card["files"])
    for name, blob in b.data.items():
        assert hashlib.sha256(blob).hexdigest() == b.card["files"][name]


LOOSENED = {
    "edible at any confidence": ("edible_min_confidence", 0.0, "safety floor (>= 0.5"),
    "edible at a coin toss minus": ("edible_min_confidence", 0.49, "safety floor (>= 0.5"),
    "any poisonous mass": ("poisonous_max_mass", 1.0, "safety floor (<= 0.25"),
    "a weak poisonous guess": ("poisonous_min_confidence", 0.1, "safety floor (>= 0.5"),
    "no unknown-species check": ("ood_max_score", 100, "safety ceiling for a mahalanobis score"),
}


@pytest.mark.parametrize("case", LOOSENED, ids=list(LOOSENED))
def test_thresholds_past_the_safety_floors_are_refused(case, bundle_copy, edit_card):
    """Item 3: a card with edible_min_confidence 0, poisonous_max_mass 1 and ood_max_score 100 was served
    silently and answered EDIBLE for a photo with 44.5% on a poisonous species."""
    key, value, words = LOOSENED[case]
    edit_card(bundle_copy, lambda c: c["thresholds"].update({key: value}))
    with pytest.raises(BundleError, match=re.escape(f"`thresholds.{key}` = {value}")) as e:
        load_bundle(bundle_copy)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_the_floors_themselves_are_allowed(bundle_copy, edit_card):
    edit_card(bundle_copy, lambda c: c["thresholds"].update(edible_min_confidence=0.5, poisonous_max_mass=0.25,
                                                            poisonous_min_confidence=0.5, ood_max_score=9.99))
    assert load_bundle(bundle_copy).thresholds == Thresholds(0.5, 0.25, 0.5, 9.99)


def test_a_knn_card_has_its_own_ceiling(bundle_copy, edit_card):
    edit_card(bundle_copy, lambda c: (c["ood"].update(method="knn"), c["thresholds"].update(ood_max_score=1.0)))
    with pytest.raises(BundleError, match="safety ceiling for a knn score"):
        load_bundle(bundle_copy)


def test_a_card_naming_another_score_than_its_ood_file_is_refused(bundle_copy, edit_card):
    from device.classifier import Classifier

    edit_card(bundle_copy, lambda c: (c["ood"].update(method="knn"), c["thresholds"].update(ood_max_score=0.5)))
    with pytest.raises(BundleError, match="holds a 'mahalanobis' score but model.json says 'knn'"):
        Classifier(load_bundle(bundle_copy), backend="cpu")


def test_the_thresholds_in_effect_are_logged_at_load(tiny_bundle, caplog):
    with caplog.at_level("INFO", logger="mushcam.bundle"):
        load_bundle(tiny_bundle)
    assert ("thresholds in effect: edible_min_confidence=0.9, poisonous_max_mass=0.05, "
            "poisonous_min_confidence=0.5, ood_max_score=6.0") in caplog.text


def test_selftest_checks_the_sample_verdicts(bundle_copy, edit_card):
    """Item 3: a card made stricter or looser within the floors changes verdicts; the samples' recorded
    verdicts catch it (the red sample is EDIBLE at 0.9, UNSURE when EDIBLE needs 0.999999)."""
    assert [c.verdict for c in check_samples(load_bundle(bundle_copy))] == ["EDIBLE", "POISONOUS", "POISONOUS"]
    edit_card(bundle_copy, lambda c: c["thresholds"].update(edible_min_confidence=0.999999))
    with pytest.raises(BundleError, match=r"failed on 1/3 samples \(samples/red_cap.jpg: verdict UNSURE, expected EDIBLE\)"):
        require_samples_pass(load_bundle(bundle_copy))


def test_a_bad_sample_verdict_in_the_card_is_refused(bundle_copy, edit_card):
    edit_card(bundle_copy, lambda c: c["samples"][0].update(verdict="SAFE"))
    with pytest.raises(BundleError, match=r"`samples\[0\].verdict` is 'SAFE'"):
        load_bundle(bundle_copy)


def test_selftest_fails_on_a_non_finite_score(bundle_copy, edit_card, monkeypatch):
    """Item 3/9: all-NaN scores passed the self-test and then every verdict was UNSURE."""
    import numpy as np

    from device.classifier import Classifier

    edit_card(bundle_copy, lambda c: [s.pop("verdict") for s in c["samples"]])  # the label check alone
    real = Classifier.scores
    monkeypatch.setattr(Classifier, "scores", lambda self, image: (real(self, image)[0], float("nan")))
    with pytest.raises(BundleError, match="not finite"):
        require_samples_pass(load_bundle(bundle_copy))
    monkeypatch.setattr(Classifier, "scores", lambda self, image: (np.array([np.nan, 0.0, 0.0]), 1.0))
    with pytest.raises(BundleError, match="not finite"):
        require_samples_pass(load_bundle(bundle_copy))


def test_the_bundle_records_the_hashes_of_the_card_and_signature_it_read(bundle_copy):
    """For callers comparing with what was pushed (device.release): no second read of the files."""
    b = load_bundle(bundle_copy)
    assert b.card_sha256 == sha256_file(bundle_copy / "model.json") and b.signature_sha256 is None
    (bundle_copy / "model.json.sig").write_text("-----BEGIN SSH SIGNATURE-----\n")
    assert load_bundle(bundle_copy).signature_sha256 == sha256_file(bundle_copy / "model.json.sig")


def test_card_without_roles_is_served_with_a_warning(bundle_copy, edit_card, caplog):
    # A card written before roles existed: it loads, roles follow from edibility, and the log says so.
    edit_card(bundle_copy, lambda c: [info.pop("role") for info in c["classes"].values()])
    with caplog.at_level("WARNING", logger="mushcam.bundle"):
        b = load_bundle(bundle_copy)
    assert [b.classes[x].kind for x in b.labels] == ["edible", "poisonous", "poisonous"]
    assert any("no `role`" in r.getMessage() for r in caplog.records)


def test_card_with_roles_loads_the_other_role_and_margins(bundle_copy, edit_card, caplog):
    def mutate(card):
        card["classes"]["green_cap"]["role"] = "other"
        card["thresholds"].update(confidence_margin=0.02, ood_margin=0.015)

    edit_card(bundle_copy, mutate)
    with caplog.at_level("WARNING", logger="mushcam.bundle"):
        b = load_bundle(bundle_copy)
    assert not caplog.records
    assert b.classes["green_cap"].kind == "other" and b.classes["red_cap"].kind == "edible"
    assert (b.thresholds.confidence_margin, b.thresholds.ood_margin) == (0.02, 0.015)
