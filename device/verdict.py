"""The verdict policy: probabilities -> EDIBLE, POISONOUS or UNSURE. Pure, and safety-first.

EDIBLE needs every one of: a top label whose role is `edible`, confidence at or above
`edible_min_confidence + confidence_margin`, at most `poisonous_max_mass - mass_margin` probability on all
labels that are not edible together (poisonous and `other`), and (when the bundle has one) an
unknown-species score at or under `ood_max_score - ood_margin` (`Thresholds.ood_limit`). POISONOUS needs a poisonous top label with at
least `poisonous_min_confidence + confidence_margin` and a familiar-looking image (same ood margin: a
poisonous guess on something unlike the training data is UNSURE: it is still a guess). A top label of role
`other` ("not one of the known species") is always UNSURE. Everything else, including any malformed input,
is UNSURE: no path of doubt or error ends in EDIBLE.

The margins are the measured difference between CPUs (x86-64 vs the Pi's aarch64 int8 arithmetic): a figure
inside the band, which another CPU might put on the other side of the threshold, gives UNSURE on every CPU.

Reasons are short: they go on a 128x64 display.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Mapping, Sequence

import numpy as np

from device.bundle import ClassInfo, Thresholds


class Verdict(str, Enum):
    EDIBLE = "EDIBLE"
    POISONOUS = "POISONOUS"
    UNSURE = "UNSURE"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Decision:
    """A verdict and the figures it was made from (for the display, logs and --json)."""

    verdict: Verdict
    label: str | None
    confidence: float
    poisonous_mass: float
    ood_score: float | None
    reason: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["verdict"] = self.verdict.value
        return d


def _unsure(reason: str, label=None, confidence=0.0, mass=1.0, ood=None) -> Decision:
    return Decision(Verdict.UNSURE, label, confidence, mass, ood, reason)


def decide(
    probs: Sequence[float] | np.ndarray,
    labels: Sequence[str],
    classes: Mapping[str, ClassInfo],
    thresholds: Thresholds,
    ood_score: float | None = None,
) -> Decision:
    """Apply the policy to one probability vector (already softmaxed, in label order)."""
    try:
        p = np.asarray(probs, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        return _unsure("malformed probabilities")
    if len(p) != len(labels) or len(p) == 0:
        return _unsure(f"{len(p)} probabilities for {len(labels)} labels")
    if not np.all(np.isfinite(p)) or np.any(p < -1e-6) or not math.isclose(p.sum(), 1.0, abs_tol=1e-3):
        return _unsure("probabilities are not a distribution")
    try:
        kinds = [_kind(classes[lab]) for lab in labels]
    except KeyError as e:
        return _unsure(f"no edibility for label {e.args[0]!r}")
    # Anything not positively edible (poisonous, other, or a role this code does not know) counts as unsafe.
    poisonous = np.array([k != "edible" for k in kinds])
    top = int(np.argmax(p))
    label, conf = labels[top], float(p[top])
    mass = float(p[poisonous].sum())
    if kinds[top] not in ("edible", "poisonous"):
        return _unsure("not a species it knows", label, conf, mass, ood_score)
    # Margins only ever make a verdict harder to reach (negative ones are refused at bundle load; clamp anyway).
    conf_margin = max(0.0, float(thresholds.confidence_margin))
    mass_margin = max(0.0, float(thresholds.mass_margin))
    ood_ok = True
    ood_note = ""
    if thresholds.ood_max_score is not None:
        if ood_score is None or not math.isfinite(ood_score):
            ood_ok, ood_note = False, "no unknown-species score"
        elif ood_score > thresholds.ood_limit:
            ood_ok, ood_note = False, "unlike the species it knows"
    if not poisonous[top]:
        if not ood_ok:
            return _unsure(ood_note, label, conf, mass, ood_score)
        if conf < thresholds.edible_min_confidence + conf_margin:
            return _unsure("not confident enough to call it edible", label, conf, mass, ood_score)
        if mass > thresholds.poisonous_max_mass - mass_margin:
            return _unsure("a poisonous look-alike is too likely", label, conf, mass, ood_score)
        return Decision(Verdict.EDIBLE, label, conf, mass, ood_score, "edible species, confident")
    if not ood_ok:
        # A poisonous top label on something unlike the training data is still a guess: say so, never EDIBLE.
        return _unsure(ood_note, label, conf, mass, ood_score)
    if conf >= thresholds.poisonous_min_confidence + conf_margin:
        return Decision(Verdict.POISONOUS, label, conf, mass, ood_score, "poisonous species")
    return _unsure("no species is clearly ahead", label, conf, mass, ood_score)


def _kind(info) -> str:
    """The class's role (ClassInfo.kind; a bare object without one: its edibility)."""
    return getattr(info, "kind", None) or info.edibility


def softmax(logits: np.ndarray) -> np.ndarray:
    """Float softmax of dequantized logits (the model exports logits: a quantized softmax saturates)."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    z = z - z.max()
    e = np.exp(z)
    return e / e.sum()
