"""train.openworld and the export's open-world calibration and int8 gate, on synthetic score tables."""

from __future__ import annotations

import numpy as np
import pytest

from device.bundle import ClassInfo, Thresholds
from device.verdict import Verdict, decide
from train import openworld as ow
from train.export import ExportOptions, gate, open_world_calibration

LABELS = ["ed", "pois", "other"]
CLASSES = {"ed": ClassInfo("edible", "ed", "edible"), "pois": ClassInfo("poisonous", "pois", "poisonous"),
           "other": ClassInfo("poisonous", "unknown fungus", "other")}
EDIBLE_LABELS = np.array([True, False, False])


def test_wilson_interval_known_values():
    assert ow.wilson(0, 100) == (pytest.approx(0.0, abs=1e-12), pytest.approx(0.0370, abs=1e-4))
    lo, hi = ow.wilson(5, 100)
    assert lo == pytest.approx(0.0215, abs=1e-4) and hi == pytest.approx(0.1118, abs=1e-4)
    assert ow.wilson(0, 0) == (0.0, 1.0)
    assert ow.rate(1, 4)["wilson95"][0] < 0.25 < ow.rate(1, 4)["wilson95"][1]


def test_edible_mask_is_the_device_policy():
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.full(3, 0.1), size=2000)
    oods = rng.uniform(0, 1, size=2000)
    for _ in range(20):
        th = Thresholds(float(rng.uniform(0.5, 1)), float(rng.uniform(0, 0.5)), 0.5, float(rng.uniform(0.1, 0.9)),
                        float(rng.uniform(0, 0.05)), float(rng.uniform(0, 0.05)))
        m = ow.edible_mask(probs, oods, EDIBLE_LABELS, th)
        ow.check_mirror(probs, oods, LABELS, CLASSES, th, m)  # raises on any disagreement
        assert m.any() or th.edible_min_confidence > 0.95


def _table():
    """20 edible photos with confidence 0.80..0.99 and ood 0.10..0.48 (both rising), 50 unseen photos top-1 `ed`
    with confidence 0.97 and ood 0.30..0.79, 10 poisonous photos confidently poisonous (fewer distinct ood
    values than the grid's 80, so the grid holds every observed value)."""
    rows, kinds = [], []
    for i in range(20):
        c = 0.80 + 0.01 * i
        rows.append(([c, 0.0, 1 - c], 0.10 + 0.02 * i))
        kinds.append("edible")
    for i in range(50):
        rows.append(([0.97, 0.01, 0.02], 0.30 + 0.01 * i))
        kinds.append("other")
    for _ in range(10):
        rows.append(([0.01, 0.98, 0.01], 0.1))
        kinds.append("poisonous")
    probs = np.array([r[0] for r in rows])
    oods = np.array([r[1] for r in rows])
    kinds = np.array(kinds)
    return probs, oods, ow.Groups(kinds == "edible", kinds == "poisonous", kinds == "other")


def test_calibration_picks_the_loosest_point_within_the_unseen_target():
    probs, oods, g = _table()
    base = Thresholds(0.9, 0.25, 0.5, None)
    # Target 2%: at most 1 of the 50 unseen photos may be EDIBLE. The unseen photos all have confidence
    # 0.97 > every edible photo, so only the ood threshold can separate them: ood <= 0.30 lets exactly one
    # through (0.300); the edible photos with ood <= 0.30 are i = 0..10, of which those with confidence
    # >= the floor 0.8 are all 11: coverage 11/20.
    opts = ExportOptions(out=None, max_unseen_edible=0.02, max_poison_edible=0.0, min_edible_confidence=0.8)
    best, table, edible_labels = open_world_calibration(probs, oods, LABELS, CLASSES, g, base, opts)
    m = ow.edible_mask(probs, oods, edible_labels, best)
    assert (m & g.unseen).sum() == 1 and (m & g.poisonous).sum() == 0
    assert (m & g.edible).sum() == 11
    assert best.ood_max_score == pytest.approx(0.30, abs=1e-9) and best.edible_min_confidence == pytest.approx(0.8)
    # Every point of the searched grid that meets the target has at most this coverage (it is the loosest).
    assert max(r[2] for r in table if r[3] <= 0.02 and r[4] <= 0.0) == pytest.approx(11 / 20)
    # Target 0: no unseen photo EDIBLE; the threshold moves below 0.30 and coverage drops to i = 0..9.
    best0, _, _ = open_world_calibration(probs, oods, LABELS, CLASSES, g, base,
                                         ExportOptions(out=None, max_unseen_edible=0.0, min_edible_confidence=0.8))
    m0 = ow.edible_mask(probs, oods, edible_labels, best0)
    assert (m0 & g.unseen).sum() == 0 and (m0 & g.edible).sum() == 10
    # The margins then only remove EDIBLE answers (device: stricter than the calibrated point).
    eff = Thresholds(**{**best.__dict__, "confidence_margin": 0.02, "ood_margin": 0.015})
    assert not (ow.edible_mask(probs, oods, edible_labels, eff) & ~m).any()
    assert decide(probs[5], LABELS, CLASSES, eff, float(oods[5])).verdict is Verdict.EDIBLE
    assert decide(probs[0], LABELS, CLASSES, eff, float(oods[0])).verdict is Verdict.UNSURE  # 0.80 < 0.80 + 0.02


def test_score_comparison_ranks_a_separating_score_first():
    probs, oods, g = _table()
    good = np.where(g.unseen, 1.0, 0.0)  # separates perfectly
    rows = ow.compare({"good": good, "ood": oods}, probs, EDIBLE_LABELS, g)
    by = {r["score"]: r for r in rows}
    assert by["good"]["auroc_unseen_vs_edible"] == 1.0 and by["good"]["coverage_at_unseen_0.01"] == 1.0
    assert by["ood"]["coverage_at_unseen_0.02"] == pytest.approx(11 / 20)  # one unseen photo of 50 allowed
    assert by["ood"]["coverage_at_unseen_0.01"] == pytest.approx(10 / 20)  # none allowed


def test_gate_refuses_too_few_photos_and_a_low_bound_naming_both():
    opts = ExportOptions(out=None, min_agreement=0.97, min_verdict_agreement=0.95, gate_min_photos=200)
    none = np.zeros(1000, bool)
    fig, msg = gate(np.ones(150, bool), np.ones(150, bool), none, opts)
    assert msg.startswith("int8 gate:") and "150 photos, fewer than --gate-min-photos 200" in msg
    same = np.ones(1000, bool)
    same[:40] = False  # 96.0% agreement: lower bound ~0.946 < 0.97
    fig, msg = gate(same, np.ones(1000, bool), none, opts)
    assert "top-1 (known species) agree on 960/1000 photos (Wilson 95% lower bound 0.94" in msg
    assert "verdict" not in msg.split(";")[1]
    # The dangerous direction on its own: 1.5% new EDIBLE answers, upper bound ~2.5% > 2%.
    new = np.zeros(1000, bool)
    new[:15] = True
    fig, msg = gate(np.ones(1000, bool), np.ones(1000, bool), new, opts)
    assert "int8 answers EDIBLE on 15/1000 photos the float model does not" in msg
    fig, msg = gate(np.ones(1000, bool), np.ones(1000, bool), none, opts)
    assert msg is None and fig["top1_agreement_known"]["n"] == 1000


def test_a_sample_near_a_threshold_is_not_robust(tiny_bundle):
    """Export's samples must give the same verdict on every CPU: one whose figures sit within the jitter
    bands of a threshold (or whose top class barely leads) is passed over."""
    import numpy as np

    from device.bundle import load_bundle
    from device.classifier import Result
    from device.verdict import decide
    from train.export import robust_sample

    b = load_bundle(tiny_bundle)
    t = b.thresholds

    def result(probs, ood=1.0):
        return Result(decide(probs, b.labels, b.classes, t, ood), np.array(probs), ood, 1.0, 1, tuple(b.labels))

    assert robust_sample(result([0.999, 0.0005, 0.0005]), b)  # clearly edible
    assert robust_sample(result([0.01, 0.98, 0.01]), b)  # clearly poisonous
    assert result([0.955, 0.0225, 0.0225]).verdict == "EDIBLE"
    assert not robust_sample(result([0.955, 0.0225, 0.0225]), b)  # EDIBLE by a hair (poisonous mass 0.045)
    assert not robust_sample(result([0.999, 0.0005, 0.0005], ood=t.ood_max_score - t.ood_margin - 0.01), b)
    assert not robust_sample(result([0.45, 0.40, 0.15]), b)  # the label could flip


def _fold(held: str, photos: int, edible: int) -> dict:
    return {"held_out": held, "photos": photos, "answered_edible": edible, "answered_unsure": photos - edible,
            "answered_poisonous": 0, "edible_rate": edible / photos, "val_edible_coverage": 0.5}


def test_loso_record_adds_a_partial_run_to_the_folds_already_in_the_card(bundle_copy):
    import json

    from device.bundle import load_bundle
    from train.loso import record_in_card

    record_in_card(bundle_copy, {"folds": [_fold("a", 100, 20), _fold("b", 50, 1)], "ood": {"method": "knn"}})
    # A later run of one missing fold and one fold again: both replace or add, nothing else is erased.
    record_in_card(bundle_copy, {"folds": [_fold("c", 50, 0), _fold("b", 50, 5)], "ood": {"method": "knn", "v": 2}})
    rec = json.loads((bundle_copy / "model.json").read_text())["metrics"]["leave_one_species_out"]
    assert [f["held_out"] for f in rec["folds"]] == ["a", "c", "b"]
    assert rec["edible_rate"] == pytest.approx(25 / 200) and rec["worst_fold_edible_rate"] == pytest.approx(0.2)
    assert rec["earlier_folds"] == ["a"] and rec["earlier_ood"] == {"method": "knn"}
    load_bundle(bundle_copy)  # the card still validates; hashes untouched
