"""device.verdict.decide: no path of doubt or malformed input ever ends in EDIBLE."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from device.bundle import ClassInfo, Thresholds
from device.verdict import Decision, Verdict, decide, softmax

LABELS = ["ed_a", "pois_b", "ed_c", "pois_d"]
CLASSES = {lab: ClassInfo("edible" if lab.startswith("ed") else "poisonous", lab) for lab in LABELS}
T = Thresholds(edible_min_confidence=0.9, poisonous_max_mass=0.05, poisonous_min_confidence=0.5, ood_max_score=3.0)
T_NO_OOD = Thresholds(0.9, 0.05, 0.5, None)

CONFIDENT_EDIBLE = [0.97, 0.01, 0.01, 0.01]


def verdict(probs, thresholds=T, ood=1.0, labels=LABELS, classes=CLASSES) -> Verdict:
    return decide(probs, labels, classes, thresholds, ood).verdict


def test_the_reference_case_is_edible():
    # Every negative test below changes one thing about this case.
    d = decide(CONFIDENT_EDIBLE, LABELS, CLASSES, T, 1.0)
    assert d == Decision(Verdict.EDIBLE, "ed_a", 0.97, pytest.approx(0.02), 1.0, "edible species, confident")


# --- never EDIBLE ---------------------------------------------------------------------------------------

INVALID_PROBS = {
    "nan": [0.97, float("nan"), 0.02, 0.01],
    "inf": [float("inf"), 0.0, 0.0, 0.0],
    "too short": [0.97, 0.02, 0.01],
    "too long": [0.96, 0.01, 0.01, 0.01, 0.01],
    "empty": [],
    "sums to 0.98": [0.95, 0.01, 0.01, 0.01],
    "sums to 1.1": [0.97, 0.05, 0.05, 0.03],
    "negative": [1.02, -0.01, 0.0, -0.01],
    "strings": ["0.97", "x", "0.01", "0.01"],
    "None": None,
    "ragged": [[0.97], [0.01, 0.01], [0.01]],
}


@pytest.mark.parametrize("name", INVALID_PROBS, ids=list(INVALID_PROBS))
@pytest.mark.parametrize("thresholds", [T, T_NO_OOD], ids=["ood", "no-ood"])
def test_invalid_probabilities_are_unsure(name, thresholds):
    d = decide(INVALID_PROBS[name], LABELS, CLASSES, thresholds, 1.0)
    assert d.verdict is Verdict.UNSURE
    assert d.reason  # says why, for the log


def test_low_confidence_is_unsure():
    d = decide([0.89, 0.01, 0.10, 0.0], LABELS, CLASSES, T, 1.0)
    assert d.verdict is Verdict.UNSURE and d.label == "ed_a" and "confident" in d.reason


def test_high_poisonous_mass_is_unsure():
    # The edible top label is confident, but a poisonous look-alike has 8%.
    d = decide([0.92, 0.03, 0.0, 0.05], LABELS, CLASSES, T, 1.0)
    assert d.verdict is Verdict.UNSURE and d.poisonous_mass == pytest.approx(0.08) and "look-alike" in d.reason


@pytest.mark.parametrize("ood", [3.0001, 50.0, float("inf"), float("nan"), None])
def test_unknown_species_score_above_threshold_or_missing_is_unsure(ood):
    d = decide(CONFIDENT_EDIBLE, LABELS, CLASSES, T, ood)
    assert d.verdict is Verdict.UNSURE


def test_missing_ood_score_is_fine_when_the_bundle_has_no_ood():
    assert verdict(CONFIDENT_EDIBLE, T_NO_OOD, None) is Verdict.EDIBLE


def test_label_without_edibility_is_unsure():
    classes = {k: v for k, v in CLASSES.items() if k != "ed_c"}
    d = decide(CONFIDENT_EDIBLE, LABELS, classes, T, 1.0)
    assert d.verdict is Verdict.UNSURE and "ed_c" in d.reason


def test_labels_and_probs_disagree_in_length_even_if_classes_cover_them():
    assert verdict(CONFIDENT_EDIBLE, labels=LABELS[:3]) is Verdict.UNSURE


# --- boundaries: EDIBLE exactly when all conditions hold ------------------------------------------------


def test_boundaries_are_inclusive():
    at_limits = [0.9, 0.05, 0.05, 0.0]  # confidence == 0.9, poisonous mass == 0.05
    d = decide(at_limits, LABELS, CLASSES, T, 3.0)  # ood == 3.0
    assert d.verdict is Verdict.EDIBLE and d.confidence == 0.9 and d.poisonous_mass == 0.05


def test_one_step_past_each_boundary_is_unsure():
    eps = 1e-9
    assert verdict([0.9 - eps, 0.05, 0.05 + eps, 0.0], ood=3.0) is Verdict.UNSURE  # confidence
    assert verdict([0.9, 0.05 + eps, 0.05 - eps, 0.0], ood=3.0) is Verdict.UNSURE  # poisonous mass
    assert verdict([0.9, 0.05, 0.05, 0.0], ood=math.nextafter(3.0, 4.0)) is Verdict.UNSURE  # unknown-species score


def test_poisonous_at_and_below_its_threshold():
    d = decide([0.2, 0.5, 0.2, 0.1], LABELS, CLASSES, T, 1.0)
    assert d == Decision(Verdict.POISONOUS, "pois_b", 0.5, pytest.approx(0.6), 1.0, "poisonous species")
    assert verdict([0.2, 0.49, 0.2, 0.11]) is Verdict.UNSURE
    # Poisonous mass split over two species, neither ahead: UNSURE (still never EDIBLE).
    assert verdict([0.3, 0.35, 0.0, 0.35]) is Verdict.UNSURE


def test_poisonous_without_ood_threshold():
    assert verdict([0.0, 0.0, 0.1, 0.9], T_NO_OOD, None) is Verdict.POISONOUS


def test_poisonous_top_on_an_unfamiliar_picture_is_unsure():
    # A guess on something unlike the training data is reported as doubt (UNSURE, never EDIBLE).
    assert verdict([0.0, 0.99, 0.0, 0.01], ood=10.0) is Verdict.UNSURE


def test_defaults_are_strict():
    t = Thresholds()
    assert (t.edible_min_confidence, t.poisonous_max_mass, t.ood_max_score) == (0.9, 0.02, None)
    assert verdict([0.95, 0.03, 0.02, 0.0], t, None) is Verdict.UNSURE  # 3% poisonous is too much by default


def test_decision_to_dict_and_str():
    d = decide(CONFIDENT_EDIBLE, LABELS, CLASSES, T, 1.0)
    out = d.to_dict()
    assert out["verdict"] == "EDIBLE" and out["label"] == "ed_a" and set(out) == {
        "verdict", "label", "confidence", "poisonous_mass", "ood_score", "reason"}
    assert str(Verdict.UNSURE) == "UNSURE" and Verdict("POISONOUS") is Verdict.POISONOUS


# --- cross-architecture margins ------------------------------------------------------------------------

TM = replace(T, confidence_margin=0.05, ood_margin=0.5)


def test_margins_default_to_zero():
    assert (Thresholds().confidence_margin, Thresholds().ood_margin, Thresholds().mass_margin) == (0.0, 0.0, 0.0)
    assert Thresholds.from_dict({"edible_min_confidence": 0.9}).confidence_margin == 0.0


def test_edible_needs_threshold_plus_margin():
    assert verdict([0.951, 0.01, 0.039, 0.0], TM) is Verdict.EDIBLE  # just past 0.9 + 0.05
    d = decide([0.94, 0.01, 0.05, 0.0], LABELS, CLASSES, TM, 1.0)
    assert d.verdict is Verdict.UNSURE and "confident" in d.reason
    assert verdict([0.94, 0.01, 0.05, 0.0], T) is Verdict.EDIBLE  # the same photo without the band


def test_ood_needs_margin_below_its_limit():
    assert verdict(CONFIDENT_EDIBLE, TM, ood=2.5) is Verdict.EDIBLE  # exactly 3.0 - 0.5
    assert verdict(CONFIDENT_EDIBLE, TM, ood=math.nextafter(2.5, 3.0)) is Verdict.UNSURE
    assert verdict(CONFIDENT_EDIBLE, T, ood=2.9) is Verdict.EDIBLE
    # The same band for a poisonous answer: inside it, the picture may be unfamiliar on another CPU.
    assert verdict([0.0, 0.9, 0.0, 0.1], TM, ood=2.9) is Verdict.UNSURE
    assert verdict([0.0, 0.9, 0.0, 0.1], TM, ood=2.5) is Verdict.POISONOUS


def test_edible_needs_the_mass_margin_below_its_limit():
    tm = replace(T, mass_margin=0.02)  # T allows 0.05 poisonous mass
    assert verdict([0.95, 0.02, 0.02, 0.01], tm) is Verdict.EDIBLE  # 0.03 = 0.05 - 0.02
    d = decide([0.95, 0.02, 0.01, 0.02], LABELS, CLASSES, tm, 1.0)  # 0.04
    assert d.verdict is Verdict.UNSURE and "look-alike" in d.reason
    assert verdict([0.95, 0.02, 0.01, 0.02], T) is Verdict.EDIBLE
    # It has no say on a poisonous answer (a large poisonous mass is what POISONOUS means).
    assert verdict([0.0, 0.9, 0.0, 0.1], replace(T, mass_margin=0.05)) is Verdict.POISONOUS


def test_poisonous_needs_threshold_plus_margin():
    assert verdict([0.2, 0.551, 0.2, 0.049], TM) is Verdict.POISONOUS  # just past 0.5 + 0.05
    assert verdict([0.2, 0.54, 0.21, 0.05], TM) is Verdict.UNSURE
    assert verdict([0.2, 0.54, 0.21, 0.05], T) is Verdict.POISONOUS


@pytest.mark.parametrize("dconf", [-0.049, -0.02, 0.0, 0.02, 0.049])
@pytest.mark.parametrize("dood", [-0.5, 0.0, 0.5])
def test_a_verdict_inside_the_margins_holds_on_the_other_cpu(dconf, dood):
    # A photo EDIBLE (or POISONOUS) on one CPU with the margins stays so at the raw thresholds on any CPU
    # whose figures differ by at most the margins: the bands absorb the jitter.
    for probs, ood, want in (([0.951, 0.0, 0.049, 0.0], 2.49, Verdict.EDIBLE),
                             ([0.0, 0.56, 0.0, 0.44], 2.49, Verdict.POISONOUS)):
        assert verdict(probs, TM, ood=ood) is want
        top = int(np.argmax(probs))
        other = list(probs)
        other[top] += dconf
        other[2 if want is Verdict.EDIBLE else 3] -= dconf
        assert verdict(other, T, ood=ood + dood) is want


@pytest.mark.parametrize("key,value,message", [
    ("confidence_margin", -0.01, "outside 0..1"),
    ("confidence_margin", 1.5, "outside 0..1"),
    ("confidence_margin", True, "must be a number"),
    ("ood_margin", -0.1, ">= 0"),
    ("ood_margin", float("inf"), "must be a number"),
    ("ood_margin", "0.1", "must be a number"),
    ("mass_margin", -0.01, "outside 0..1"),
    ("mass_margin", 2, "outside 0..1"),
])
def test_bad_margins_are_refused(key, value, message):
    from device.errors import BundleError

    with pytest.raises(BundleError, match=message):
        Thresholds.from_dict({key: value})


def test_margins_are_read_from_the_card():
    t = Thresholds.from_dict({"ood_max_score": 3.0, "confidence_margin": 0.04, "ood_margin": 0.02})
    assert (t.confidence_margin, t.ood_margin) == (0.04, 0.02)


# --- property test: the policy against an independent statement of it ----------------------------------


def _random_case(rng):
    n = int(rng.integers(1, 7))
    labels = [f"s{i}" for i in range(n)]
    edible = rng.random(n) < 0.5
    classes = {lab: ClassInfo("edible" if e else "poisonous", lab) for lab, e in zip(labels, edible)}
    kind = rng.random()
    if kind < 0.5:  # sharp: often confident, sometimes a near miss
        p = rng.dirichlet(np.full(n, 0.05))
    elif kind < 0.8:
        p = rng.dirichlet(np.full(n, 1.0))
    else:  # one label with almost everything, the rest spread thin: exercises the mass limit
        p = rng.dirichlet(np.full(n, 1.0)) * rng.uniform(0, 0.15)
        p[rng.integers(n)] += 1 - p.sum()
    ood_thr = None if rng.random() < 0.3 else float(rng.uniform(0.5, 5))
    t = Thresholds(float(rng.uniform(0.5, 1.0)), float(rng.uniform(0, 0.2)), float(rng.uniform(0.3, 0.9)), ood_thr)
    if rng.random() < 0.4:  # the cross-architecture margins, sometimes large
        t = replace(t, confidence_margin=float(rng.uniform(0, 0.3)), ood_margin=float(rng.uniform(0, 1.0)),
                    mass_margin=float(rng.uniform(0, 0.1)))
    r = rng.random()
    ood = None if r < 0.1 else float("nan") if r < 0.15 else float(rng.uniform(0, 6))
    # Sometimes put a threshold exactly on the case's own figure, to test the boundaries at random too.
    top = int(np.argmax(p))
    if rng.random() < 0.1:
        t = replace(t, edible_min_confidence=float(p[top]) - t.confidence_margin,
                    poisonous_min_confidence=float(p[top]) - t.confidence_margin)
    valid = True
    r = rng.random()
    if r < 0.03:
        p = p.copy()
        p[rng.integers(n)] = np.nan
        valid = False
    elif r < 0.06:
        p = p * 1.01 + 0.01
        valid = False
    elif r < 0.09:
        p = np.append(p, 0.0)
        valid = False
    elif r < 0.12 and n > 1:
        p = p.copy()
        i, j = rng.choice(n, 2, replace=False)
        p[j] += p[i] + 0.01  # a negative entry while the sum stays 1
        p[i] = -0.01
        valid = False
    elif r < 0.15:
        del classes[labels[int(rng.integers(n))]]
        valid = False
    return p, labels, classes, t, ood, valid, edible


def _expected(p, labels, classes, t, ood, valid, edible) -> Verdict:
    """The policy, written independently of device.verdict (docs and module docstring)."""
    if not valid:
        return Verdict.UNSURE
    top = int(np.argmax(p))
    conf = p[top]
    mass = sum(p[i] for i in range(len(labels)) if not edible[i])
    ood_ok = t.ood_max_score is None or (
        ood is not None and math.isfinite(ood) and ood <= t.ood_max_score - t.ood_margin)
    if edible[top] and ood_ok and conf >= t.edible_min_confidence + t.confidence_margin and \
            mass <= t.poisonous_max_mass - t.mass_margin:
        return Verdict.EDIBLE
    if not edible[top] and ood_ok and conf >= t.poisonous_min_confidence + t.confidence_margin:
        return Verdict.POISONOUS
    return Verdict.UNSURE


def test_policy_on_thousands_of_random_cases():
    rng = np.random.default_rng(20261124)
    seen = {v: 0 for v in Verdict}
    for _ in range(20_000):
        p, labels, classes, t, ood, valid, edible = _random_case(rng)
        d = decide(p, labels, classes, t, ood)
        seen[d.verdict] += 1
        if d.verdict is Verdict.EDIBLE:
            # EDIBLE implies every condition, checked from the raw inputs (not from the Decision's own figures).
            q = np.asarray(p, dtype=float)
            assert valid and len(q) == len(labels) and np.isfinite(q).all() and (q >= 0).all()
            assert abs(q.sum() - 1) <= 1e-3
            top = int(np.argmax(q))
            assert classes[labels[top]].edibility == "edible"
            assert q[top] >= t.edible_min_confidence + t.confidence_margin
            assert sum(q[i] for i, lab in enumerate(labels) if classes[lab].edibility != "edible") <= \
                t.poisonous_max_mass - t.mass_margin
            if t.ood_max_score is not None:
                assert ood is not None and math.isfinite(ood) and ood <= t.ood_max_score - t.ood_margin
        # Margins only ever move a verdict to UNSURE: the same case without them gives this verdict or
        # a bolder one, never the reverse (in particular no margin turns anything into EDIBLE).
        bare = decide(p, labels, classes, replace(t, confidence_margin=0.0, ood_margin=0.0, mass_margin=0.0), ood).verdict
        assert d.verdict in (bare, Verdict.UNSURE), (p, labels, t, ood, d, bare)
        assert d.verdict is _expected(p, labels, classes, t, ood, valid, edible), (p, labels, t, ood, d)
    # The loop reached every outcome often enough to mean something.
    assert min(seen.values()) > 1000, seen


# --- softmax -------------------------------------------------------------------------------------------


def test_softmax():
    p = softmax(np.array([1.0, 2.0, 3.0], np.float32))
    assert p.sum() == pytest.approx(1.0) and list(np.argsort(p)) == [0, 1, 2]
    assert np.allclose(p, np.exp([1, 2, 3]) / np.exp([1, 2, 3]).sum())
    big = softmax(np.array([1e4, 0.0, -1e4]))  # no overflow
    assert np.isfinite(big).all() and big[0] == pytest.approx(1.0)


# --- roles: `other` never EDIBLE; margins only ever move towards UNSURE ---------------------------------


def _role_case(rng):
    n = int(rng.integers(1, 7))
    labels = [f"s{i}" for i in range(n)]
    kinds = rng.choice(["edible", "poisonous", "other"], size=n)
    classes = {lab: ClassInfo("edible" if k == "edible" else "poisonous", lab, str(k)) for lab, k in zip(labels, kinds)}
    p = rng.dirichlet(np.full(n, float(rng.choice([0.05, 1.0]))))
    ood_thr = None if rng.random() < 0.3 else float(rng.uniform(0.05, 1.0))
    t = Thresholds(float(rng.uniform(0.0, 1.0)), float(rng.uniform(0, 1.0)), float(rng.uniform(0.0, 1.0)), ood_thr,
                   float(rng.uniform(0, 0.1)), float(rng.uniform(0, 0.1)))
    ood = float(rng.uniform(0, 1.2))
    return p, labels, classes, kinds, t, ood


def test_other_role_never_gives_edible_and_margins_only_make_it_stricter():
    rng = np.random.default_rng(9)
    seen = {v: 0 for v in Verdict}
    for _ in range(20_000):
        p, labels, classes, kinds, t, ood = _role_case(rng)
        d = decide(p, labels, classes, t, ood)
        seen[d.verdict] += 1
        top = int(np.argmax(p))
        if kinds[top] == "other":
            # Even with every threshold at its loosest, an `other` top label is UNSURE.
            assert d.verdict is Verdict.UNSURE and d.reason == "not a species it knows"
            loose = Thresholds(0.0, 1.0, 0.0, None)
            assert decide(p, labels, classes, loose, ood).verdict is Verdict.UNSURE
        if d.verdict is Verdict.EDIBLE:
            assert kinds[top] == "edible"
            assert p[top] >= t.edible_min_confidence + t.confidence_margin
            assert sum(p[i] for i in range(len(p)) if kinds[i] != "edible") <= t.poisonous_max_mass + 1e-12
            if t.ood_max_score is not None:
                assert ood <= t.ood_max_score - t.ood_margin
        # Without margins, any verdict that is not UNSURE stays the same: a margin never creates an answer.
        bare = Thresholds(t.edible_min_confidence, t.poisonous_max_mass, t.poisonous_min_confidence, t.ood_max_score)
        if d.verdict is not Verdict.UNSURE:
            assert decide(p, labels, classes, bare, ood).verdict is d.verdict
    assert seen[Verdict.EDIBLE] > 500 and seen[Verdict.POISONOUS] > 500 and seen[Verdict.UNSURE] > 500


def test_margins_turn_a_borderline_edible_into_unsure():
    base = Thresholds(0.9, 0.05, 0.5, 3.0)
    assert verdict([0.91, 0.02, 0.05, 0.02], base, ood=2.99) is Verdict.EDIBLE
    assert verdict([0.91, 0.02, 0.05, 0.02], Thresholds(0.9, 0.05, 0.5, 3.0, confidence_margin=0.02), ood=2.99) \
        is Verdict.UNSURE
    d = decide([0.91, 0.02, 0.05, 0.02], LABELS, CLASSES, Thresholds(0.9, 0.05, 0.5, 3.0, ood_margin=0.015), 2.99)
    assert d.verdict is Verdict.UNSURE and d.reason == "unlike the species it knows"
    # The same margin guards POISONOUS: a borderline poisonous guess becomes UNSURE, never EDIBLE.
    assert verdict([0.01, 0.51, 0.01, 0.47], Thresholds(0.9, 0.05, 0.5, 3.0, confidence_margin=0.02)) is Verdict.UNSURE


def test_other_mass_counts_against_edible():
    labels = ["ed", "other"]
    classes = {"ed": ClassInfo("edible", "ed", "edible"), "other": ClassInfo("poisonous", "unknown fungus", "other")}
    t = Thresholds(0.9, 0.05, 0.5, None)
    assert decide([0.96, 0.04], labels, classes, t).verdict is Verdict.EDIBLE
    d = decide([0.93, 0.07], labels, classes, t)
    assert d.verdict is Verdict.UNSURE and d.poisonous_mass == pytest.approx(0.07)
    d = decide([0.2, 0.8], labels, classes, t)
    assert d.verdict is Verdict.UNSURE and d.label == "other" and len(d.reason) <= 24
