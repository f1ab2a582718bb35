"""Export's decision rules in isolation: threshold calibration, the bundle swap, the compiler log (no TensorFlow)."""

from __future__ import annotations

import numpy as np
import pytest

from device.bundle import ClassInfo
from device.errors import BundleError
from train.edgetpu import parse_log
from train.export import calibrate_edible, install, verdicts_for
from train.metrics import safety_figures

LABELS = ["edible_a", "poison_b"]
CLASSES = {"edible_a": ClassInfo("edible", "A"), "poison_b": ClassInfo("poisonous", "B")}
BASE = {"poisonous_max_mass": 0.5, "poisonous_min_confidence": 0.5}


def test_calibration_turns_away_the_most_confident_poisonous_photo_and_no_more():
    # Photo 2 is poisonous but looks 93% edible: the threshold must rise just above 0.93.
    probs = np.array([[0.97, 0.03], [0.91, 0.09], [0.93, 0.07], [0.2, 0.8]])
    y = np.array([0, 0, 1, 1])
    chosen, calibrated = calibrate_edible(probs, None, y, LABELS, CLASSES, BASE, target=0.0, floor=0.0)
    assert 0.93 < calibrated < 0.9300001 and chosen == calibrated
    verdicts = verdicts_for(probs, None, LABELS, CLASSES, _th(chosen))
    assert verdicts == ["EDIBLE", "UNSURE", "UNSURE", "POISONOUS"]
    # The floor wins when the data would allow less.
    chosen, calibrated = calibrate_edible(probs[[0, 1, 3]], None, y[[0, 1, 3]], LABELS, CLASSES, BASE, 0.0, 0.95)
    assert calibrated == 0.0 and chosen == 0.95


def test_calibration_gives_up_when_a_poisonous_photo_is_certain():
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert calibrate_edible(probs, None, np.array([1, 1]), LABELS, CLASSES, BASE, 0.0, 0.9) == (None, None)


def test_unknown_species_score_blocks_edible_before_confidence():
    probs = np.array([[0.99, 0.01]])
    assert verdicts_for(probs, np.array([5.0]), LABELS, CLASSES, _th(0.9, ood=1.0)) == ["UNSURE"]
    assert verdicts_for(probs, np.array([0.5]), LABELS, CLASSES, _th(0.9, ood=1.0)) == ["EDIBLE"]


def test_safety_figures_and_cost():
    s = safety_figures(["EDIBLE", "UNSURE", "EDIBLE", "POISONOUS"], np.array([0, 0, 1, 1]), np.array([False, True]))
    assert s["poisonous_as_edible"] == 0.5 and s["edible_coverage"] == 0.5 and s["unsure_rate"] == 0.25
    assert s["cost"] == pytest.approx((100 * 1 + 1 * 1) / 4)


def test_install_replaces_a_bundle_and_leaves_no_backup(tmp_path):
    out, stage = tmp_path / "bundle", tmp_path / ".bundle.tmp"
    out.mkdir()
    (out / "model.json").write_text("old")
    stage.mkdir()
    (stage / "model.json").write_text("new")
    install(stage, out)
    assert (out / "model.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_install_never_replaces_a_folder_that_is_not_a_bundle(tmp_path):
    out, stage = tmp_path / "photos", tmp_path / ".stage"
    out.mkdir()
    (out / "a.jpg").write_bytes(b"x")
    stage.mkdir()
    with pytest.raises(BundleError, match="not a model bundle"):
        install(stage, out)
    assert (out / "a.jpg").read_bytes() == b"x"


def test_parse_compiler_stdout_without_a_log_file():
    text = """Edge TPU Compiler version 16.0.384591198
Number of operations that will run on Edge TPU: 70
Number of operations that will run on CPU: 2

Operator                       Count      Status

QUANTIZE                       1          Operation is otherwise supported, but not mapped due to some unspecified limitation
DEQUANTIZE                     1          Operation is working on an unsupported data type
"""
    rep = parse_log(text)
    assert rep.version == "16.0.384591198" and rep.ops_on_tpu == 70 and rep.ops_on_cpu == 2
    assert [o["op"] for o in rep.cpu_ops] == ["QUANTIZE", "DEQUANTIZE"]
    assert parse_log("Edge TPU Compiler version 16.0\nNumber of operations that will run on CPU: 0\n").cpu_ops == []


def _th(edible: float, ood: float | None = None):
    from device.bundle import Thresholds

    return Thresholds(**{**BASE, "edible_min_confidence": edible, "ood_max_score": ood})


def test_fold_downgrade_refuses_only_when_folds_would_be_lost(tmp_path):
    from device.errors import ExportGateError
    from train.export import ExportOptions, fold_downgrade

    folded = {"calibration": {"leave_one_species_out": {"photos": 1193}}}
    opts = ExportOptions(out=tmp_path)
    with pytest.raises(ExportGateError, match="leave-one-species-out folds"):
        fold_downgrade(folded, tmp_path, opts, "or else")
    # Nothing to lose: no card, a card without folds, a damaged calibration, or this run has folds too.
    for card in (None, {}, {"calibration": {}}, {"calibration": "x"}, {"calibration": {"leave_one_species_out": {}}}):
        assert fold_downgrade(card, tmp_path, opts, "or else") is None
    assert fold_downgrade(folded, tmp_path, ExportOptions(out=tmp_path, loso=tmp_path), "or else") is None
    # --force writes it, and the note says what was given up.
    note = fold_downgrade(folded, tmp_path, ExportOptions(out=tmp_path, force=True), "or else")
    assert note.startswith("forced: ") and "val species alone" in note
