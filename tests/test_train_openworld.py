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


# --- leave-one-species-out folds as calibration evidence (export --loso) ---

def _held(folds: dict[str, tuple[np.ndarray, np.ndarray]]) -> ow.Held:
    """Held-out photos per fold: (top label edible?, ood) each; confidence 0.97, no non-edible mass."""
    fold = np.concatenate([[f] * len(e) for f, (e, _) in folds.items()])
    top = np.concatenate([e for e, _ in folds.values()]).astype(bool)
    ood = np.concatenate([o for _, o in folds.values()]).astype(float)
    return ow.Held(fold, top, np.full(len(fold), 0.97), np.zeros(len(fold)), ood)


def _bolete_fold() -> tuple[np.ndarray, np.ndarray]:
    """20 held-out photos taken for the edible species, ood 0.205..0.281: more familiar-looking than every
    val unseen photo (>= 0.30), as a look-alike of a known species is."""
    return np.ones(20, bool), 0.205 + 0.004 * np.arange(20)


def _with_folds(max_held: float, max_held_fold: float):
    """_table() plus two folds: the bolete look-alikes and 180 photos of a species never taken for edible."""
    probs, oods, g = _table()
    held = _held({"bolete": _bolete_fold(), "morel": (np.zeros(180, bool), np.full(180, 0.1))})
    opts = ExportOptions(out=None, max_unseen_edible=0.02, max_poison_edible=0.0, min_edible_confidence=0.8,
                         max_held_edible=max_held, max_held_fold_edible=max_held_fold)
    return probs, oods, g, Thresholds(0.9, 0.25, 0.5, None), held, opts


def test_held_out_folds_make_the_calibration_stricter_per_fold():
    # Val alone (target 2%) chooses ood <= 0.30 (coverage 11/20), where all 20 bolete photos are EDIBLE.
    probs, oods, g, base, held, opts = _with_folds(0.10, 1.0)
    loose, _, _ = open_world_calibration(probs, oods, LABELS, CLASSES, g, base, opts, held)
    assert loose.ood_max_score == pytest.approx(0.30) and ow.held_mask(held, loose).sum() == 20  # 20/200 = 10%
    # Each fold <= 5% (1 of 20): the bolete fold binds, ood moves to the val value 0.20 under its first
    # photo (0.205), and coverage falls to edible i = 0..5.
    opts.max_held_fold_edible = 0.05
    best, table, edible_labels = open_world_calibration(probs, oods, LABELS, CLASSES, g, base, opts, held)
    assert best.ood_max_score == pytest.approx(0.20)
    assert ow.held_mask(held, best).sum() == 0
    assert (ow.edible_mask(probs, oods, edible_labels, best) & g.edible).sum() == 6
    assert table[0][6] is not None  # the table carries the held-out rate of every point
    # The same fold also binds through the all-folds target.
    opts.max_held_fold_edible, opts.max_held_edible = 1.0, 0.005
    assert open_world_calibration(probs, oods, LABELS, CLASSES, g, base, opts, held)[0].ood_max_score == pytest.approx(0.20)


def test_held_mask_is_edible_mask_on_per_photo_figures():
    rng = np.random.default_rng(5)
    probs = rng.dirichlet(np.full(3, 0.1), size=3000)
    oods = rng.uniform(0, 1, size=3000)
    oods[::50] = np.nan  # no score: never EDIBLE when the bundle has an ood threshold
    top = probs.argmax(axis=1)
    held = ow.Held(np.array(["f"] * 3000), EDIBLE_LABELS[top], probs.max(axis=1), probs[:, ~EDIBLE_LABELS].sum(axis=1),
                   oods)
    for _ in range(20):
        th = Thresholds(float(rng.uniform(0.5, 1)), float(rng.uniform(0, 0.5)), 0.5,
                        None if rng.uniform() < 0.2 else float(rng.uniform(0.1, 0.9)),
                        float(rng.uniform(0, 0.05)), float(rng.uniform(0, 0.05)), float(rng.uniform(0, 0.02)))
        assert np.array_equal(ow.held_mask(held, th), ow.edible_mask(probs, oods, EDIBLE_LABELS, th))


def test_held_evidence_measures_each_fold_at_thresholds_calibrated_without_it():
    from train.export import held_evidence

    probs, oods, g, base, held, opts = _with_folds(0.01, 0.05)
    best, _, _ = open_world_calibration(probs, oods, LABELS, CLASSES, g, base, opts, held)
    ev = held_evidence(probs, oods, LABELS, CLASSES, g, base, opts, held, best)
    assert ev["at_effective"]["all"]["count"] == 0 and ev["at_effective"]["folds"]["bolete"]["n"] == 20
    lofo = {f["held_out"]: f for f in ev["leave_one_fold_out"]["folds"]}
    # Calibrated without the bolete fold, val alone sets ood 0.30: every bolete photo comes out EDIBLE.
    # That is what the in-sample 0/20 hides, and what the card must show.
    assert lofo["bolete"]["ood_max_score"] == pytest.approx(0.30)
    assert lofo["bolete"]["answered_edible"]["count"] == 20
    assert lofo["morel"]["answered_edible"]["count"] == 0
    assert ev["leave_one_fold_out"]["all"] == ow.rate(20, 200)


def _loso_dir(tmp_path, manifest: dict, held: str, records: list[dict], thresholds: dict):
    """A fold as `loso` leaves it: manifest without `held`, bundle card (roles, thresholds), loso.json."""
    import json

    from train.loso import fold_manifest

    fold = tmp_path / "loso" / f"without-{held}"
    (fold / "bundle").mkdir(parents=True)
    (fold / "manifest.json").write_text(json.dumps(fold_manifest(manifest, held)))
    classes = {lab: {"edibility": c["edibility"], "role": c.get("role", c["edibility"])}
               for lab, c in manifest["classes"].items() if lab != held}
    (fold / "bundle" / "model.json").write_text(json.dumps({"classes": classes, "thresholds": thresholds}))
    (fold / "loso.json").write_text(json.dumps({
        "held_out": held, "photos": len(records), "answered_edible": sum(r["verdict"] == "EDIBLE" for r in records),
        "answered_unsure": sum(r["verdict"] == "UNSURE" for r in records), "answered_poisonous": 0,
        "edible_rate": 0.0, "val_edible_coverage": 0.5, "held_records": records}))
    return tmp_path / "loso"


def _manifest() -> dict:
    classes = {"ed": {"edibility": "edible"}, "pois": {"edibility": "poisonous"},
               "other": {"edibility": "poisonous", "role": "other"}}
    images = [{"path": f"{lab}/{i}.jpg", "label": lab, "split": ("train", "val", "test")[i % 3]}
              for lab in classes for i in range(6)]
    return {"labels": list(classes), "classes": classes, "images": images, "data_dir": "/data"}


def test_load_held_reads_the_folds_and_refuses_another_split_or_inconsistent_records(tmp_path):
    import json

    from device.errors import DataError
    from train.loso import load_held

    th = {"edible_min_confidence": 0.9, "poisonous_max_mass": 0.1, "poisonous_min_confidence": 0.5,
          "ood_max_score": 0.5, "confidence_margin": 0.02, "ood_margin": 0.015}
    recs = [{"path": "p0", "verdict": "EDIBLE", "label": "ed", "confidence": 0.95, "poisonous_mass": 0.05, "ood_score": 0.4},
            {"path": "p1", "verdict": "UNSURE", "label": "ed", "confidence": 0.95, "poisonous_mass": 0.05, "ood_score": 0.49},
            {"path": "p2", "verdict": "UNSURE", "label": "other", "confidence": 0.99, "poisonous_mass": 0.99,
             "ood_score": None}]
    m = _manifest()
    loso = _loso_dir(tmp_path, m, "pois", recs, th)
    held, folds = load_held(loso, m)
    assert list(held.fold) == ["pois"] * 3 and list(held.top_edible) == [True, True, False]
    assert np.isnan(held.ood[2]) and folds[0]["held_out"] == "pois" and "held_records" not in folds[0]
    # A fold trained on another split would have trained on photos the shipped model is calibrated on.
    other_split = json.loads(json.dumps(m))
    other_split["images"][0]["split"] = "val"
    with pytest.raises(DataError, match="different split"):
        load_held(loso, other_split)
    # A recorded verdict the recorded figures do not give (rounded past a threshold, or edited).
    recs[1]["verdict"] = "EDIBLE"
    (loso / "without-pois" / "loso.json").write_text(json.dumps({**json.loads((loso / "without-pois" / "loso.json").read_text()),
                                                                  "held_records": recs}))
    with pytest.raises(DataError, match="1 recorded verdicts"):
        load_held(loso, m)
    with pytest.raises(DataError, match="no leave-one-species-out folds"):
        load_held(tmp_path / "empty", m)


def test_fold_evidence_file_gives_what_the_folds_folder_gives_and_only_for_its_split(tmp_path):
    """`mushcam-train folds` writes one file from a folds folder; export --loso reads it as it reads the
    folder (make model calibrates with it without refitting the folds), for the same split only."""
    import json

    from device.errors import DataError
    from train.loso import evidence, load_held

    th = {"edible_min_confidence": 0.9, "poisonous_max_mass": 0.1, "poisonous_min_confidence": 0.5,
          "ood_max_score": 0.5, "confidence_margin": 0.02, "ood_margin": 0.015}
    recs = [{"path": "/data/pois/p0.jpg", "verdict": "EDIBLE", "label": "ed", "confidence": 0.95,
             "poisonous_mass": 0.05, "ood_score": 0.4},
            {"path": "/data/pois/p1.jpg", "verdict": "UNSURE", "label": "other", "confidence": 0.99,
             "poisonous_mass": 0.99, "ood_score": None}]
    m = _manifest()
    loso = _loso_dir(tmp_path, m, "pois", recs, th)
    doc = evidence(loso, m)
    assert [r["photo"] for r in doc["folds"][0]["held_records"]] == ["pois/p0.jpg", "pois/p1.jpg"]
    assert "/data" not in json.dumps(doc)  # no machine's folders in a committed file
    f = tmp_path / "folds.json"
    f.write_text(json.dumps(doc))
    (h1, folds1), (h2, folds2) = load_held(loso, m), load_held(f, m)
    for name in ("fold", "top_edible", "conf", "mass", "ood"):
        np.testing.assert_array_equal(getattr(h1, name), getattr(h2, name))
    assert folds1 == folds2
    # Another split (one photo on another side): refused, as the folder is.
    other_split = json.loads(json.dumps(m))
    other_split["images"][0]["split"] = "val"
    with pytest.raises(DataError, match="another split"):
        load_held(f, other_split)
    # An edited verdict, a missing field, not this format: each refused in one line.
    bad = json.loads(json.dumps(doc))
    bad["folds"][0]["held_records"][1]["verdict"] = "EDIBLE"
    f.write_text(json.dumps(bad))
    with pytest.raises(DataError, match="1 recorded verdicts"):
        load_held(f, m)
    del bad["folds"][0]["thresholds"]
    f.write_text(json.dumps(bad))
    with pytest.raises(DataError, match="lacks 'thresholds'"):
        load_held(f, m)
    for text in ("{}", "not json", json.dumps({**doc, "format": "other/1"})):
        f.write_text(text)
        with pytest.raises(DataError, match="not a fold evidence file"):
            load_held(f, m)


def test_calibration_ranks_points_by_the_coverage_the_device_will_have_after_the_margins():
    # 10 edible photos at confidence 0.985 but unfamiliar-looking (ood 0.3), 6 at 0.95 and familiar (0.1),
    # 20 unseen photos at 0.98 with ood 0.25 (non-edible mass 0.02: the smallest mass cap keeps them).
    # No unseen photo may be EDIBLE. Two ways: confidence above 0.98 (raw coverage 10/16, but with the
    # 0.02 margin the bar is above 1: none on the device), or ood at 0.1 (6/16 raw, and 6/16 with the
    # margin). The device's coverage decides.
    rows = ([([0.985, 0.0075, 0.0075], 0.3)] * 10 + [([0.95, 0.025, 0.025], 0.1)] * 6
            + [([0.98, 0.01, 0.01], 0.25)] * 20)
    probs, oods = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
    kinds = np.array(["edible"] * 16 + ["other"] * 20)
    g = ow.Groups(kinds == "edible", kinds == "poisonous", kinds == "other")
    base = Thresholds(0.9, 0.25, 0.5, None)
    opts = ExportOptions(out=None, max_unseen_edible=0.0, max_poison_edible=0.0, min_edible_confidence=0.9,
                         confidence_margin=0.02, ood_margin=0.0, mass_margin=0.0)
    best, table, edible_labels = open_world_calibration(probs, oods, LABELS, CLASSES, g, base, opts)
    assert best.ood_max_score == pytest.approx(0.1)
    eff = Thresholds(**{**best.__dict__, "confidence_margin": 0.02})
    assert (ow.edible_mask(probs, oods, edible_labels, eff) & g.edible).sum() == 6
    # The raw-coverage winner is on the grid: ranked by raw coverage it would have been chosen.
    raw_best = max((r for r in table if r[3] == 0.0 and r[4] == 0.0), key=lambda r: r[2])
    assert raw_best[2] == pytest.approx(10 / 16) and raw_best[7] == 0.0


def _sample_bundle(tiny_bundle, **th):
    """The tiny bundle's labels and classes with other thresholds (what robust_sample and the sample
    chooser read of a bundle)."""
    from dataclasses import replace
    from types import SimpleNamespace

    from device.bundle import load_bundle

    b = load_bundle(tiny_bundle)
    return SimpleNamespace(thresholds=replace(b.thresholds, **th), labels=b.labels, classes=b.classes)


def _result(bundle, probs, ood=0.0):
    import numpy as np

    from device.classifier import Result
    from device.verdict import decide

    return Result(decide(probs, bundle.labels, bundle.classes, bundle.thresholds, ood), np.array(probs), ood, 1.0, 1,
                  tuple(bundle.labels))


def test_a_nearly_certain_edible_photo_is_a_robust_sample_under_a_bar_near_one(tiny_bundle):
    """The shipped bar (0.970 + margin 0.02) plus the flat 0.05 band passed 1.0, so no EDIBLE photo could be
    a sample and the self-test never checked EDIBLE. Near certainty the band shrinks with 1 - p."""
    from train.export import robust_sample

    b = _sample_bundle(tiny_bundle, edible_min_confidence=0.97, confidence_margin=0.02, poisonous_max_mass=0.02,
                       mass_margin=0.006)
    sure = _result(b, [0.9996, 0.0002, 0.0002])
    assert sure.verdict == "EDIBLE" and robust_sample(sure, b)
    near = _result(b, [0.992, 0.004, 0.004])  # EDIBLE, but 2 x (1 - p) = 0.016 reaches past the bar
    assert near.verdict == "EDIBLE" and not robust_sample(near, b)
    below = _result(b, [0.985, 0.0075, 0.0075])  # UNSURE, and the bar moved down by 0.03 would make it EDIBLE
    assert below.verdict == "UNSURE" and not robust_sample(below, b)
    # A clearly poisonous photo keeps its verdict whatever the band.
    assert robust_sample(_result(b, [0.001, 0.998, 0.001]), b)


def test_an_edible_species_first_sample_is_edible_when_one_exists(tiny_bundle, tmp_path):
    """Export's samples: the first of an edible species is EDIBLE when the bundle answers any robust photo
    EDIBLE; the second is drawn from the rest; without such a photo the samples are drawn as before."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from train.dataset import ImageRecord, Manifest
    from train.export import write_samples

    b = _sample_bundle(tiny_bundle)
    data = tmp_path / "data"
    recs = []
    for label, shades in (("red_cap", [40, 60, 80, 250]), ("green_cap", [40, 60]), ("blue_cap", [40, 60])):
        (data / label).mkdir(parents=True)
        for i, v in enumerate(shades):
            Image.new("RGB", (64, 64), (v, v, v)).save(data / label / f"{i}.jpg", quality=95)
            recs.append(ImageRecord(f"{label}/{i}.jpg", label, "0" * 64, "0" * 16, i, "test"))

    class Fake:
        """Stands in for the bundle's classifier: a bright photo is a sure red cap, a dark one is the
        right species but not sure enough (UNSURE for the edible one)."""
        bundle = b

        def classify(self, path):
            bright = np.asarray(Image.open(path)).mean() > 200
            # data/<label>/N.jpg, or the sample written from it: samples/<label>_K.jpg
            path = Path(path)
            label = path.stem.rsplit("_", 1)[0] if path.parent.name == "samples" else path.parent.name
            p = {"red_cap": [0.9999, 0.00005, 0.00005] if bright else [0.6, 0.2, 0.2],
                 "green_cap": [0.01, 0.98, 0.01], "blue_cap": [0.01, 0.01, 0.98]}[label]
            return _result(b, p)

    m = Manifest(data, list(b.labels), {lab: {"edibility": b.classes[lab].kind} for lab in b.labels}, recs)
    for seed in range(5):
        stage = tmp_path / f"s{seed}"
        stage.mkdir()
        entries, _ = write_samples(stage, m, Fake(), 2, seed)
        red = [e for e in entries if e["label"] == "red_cap"]
        assert [e["verdict"] for e in red] == ["EDIBLE", "UNSURE"], (seed, red)
        assert red[0]["source"].endswith("red_cap/3.jpg")
    # No photo the bundle answers EDIBLE: the samples are drawn as before, UNSURE.
    (data / "red_cap" / "3.jpg").unlink()
    m.images = [r for r in recs if r.path != "red_cap/3.jpg"]
    stage = tmp_path / "none"
    stage.mkdir()
    entries, _ = write_samples(stage, m, Fake(), 2, 0)
    assert [e["verdict"] for e in entries if e["label"] == "red_cap"] == ["UNSURE", "UNSURE"]


def test_a_one_point_risk_coverage_curve_is_drawn(tmp_path):
    """A frontier of one point (no unseen photo EDIBLE anywhere on the grid) shows up in the PNG: a step line
    through one point draws nothing, so an honest figure looked like an empty plot."""
    from PIL import Image

    def curve_pixels(rows):
        png = tmp_path / "c.png"
        ow.write_curve({"frontier": rows}, tmp_path / "c.csv", png, "t")
        rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
        # matplotlib's first colour (C0, #1f77b4), which only the curve and its legend sample use
        return int((np.abs(rgb - np.array([0x1F, 0x77, 0xB4])).sum(axis=2) < 60).sum())

    assert curve_pixels([(0.9, 0.4, 0.8, 0.0, 0.0, 0.25)]) > curve_pixels([]) + 20
