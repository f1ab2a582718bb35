"""Open-world evaluation and calibration: how often does a species the model never saw come out EDIBLE?

Everything here works on per-photo tables that were measured through the device's code path
(device.classifier: device preprocessing, the int8 engine, device.ood) and only re-applies the verdict
policy as thresholds move, so no figure is computed on a different model than the one shipped.

Groups of photos (names used throughout):
- `edible`: photos of known edible species (coverage = the share answered EDIBLE);
- `poisonous`: photos of known poisonous species (must stay ~never EDIBLE);
- `unseen`: photos of species held out of training: the other pool's val species (calibration) or test
  species (evaluation), and leave-one-species-out folds.

`edible_mask` mirrors device.verdict.decide for the EDIBLE branch only, vectorised so a 2-D threshold
search is fast; `check_mirror` asserts it agrees with decide on the chosen point, so the mirror can never
drift from the device silently.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (95% by default); (0, 1) when n == 0."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def rate(k: int, n: int) -> dict:
    """A rate with its count, sample size and Wilson 95% interval (what the card records)."""
    lo, hi = wilson(k, n)
    return {"rate": k / n if n else 0.0, "count": int(k), "n": int(n), "wilson95": [round(lo, 5), round(hi, 5)]}


def edible_mask(probs: np.ndarray, oods: np.ndarray | None, edible_labels: np.ndarray, th) -> np.ndarray:
    """Which rows device.verdict.decide answers EDIBLE under thresholds `th` (vectorised mirror).

    edible_labels[i]: True when label i has role edible (everything else counts as unsafe mass).
    """
    p = np.asarray(probs, dtype=np.float64)
    top = p.argmax(axis=1)
    conf = p[np.arange(len(p)), top]
    mass = p[:, ~edible_labels].sum(axis=1)
    ok = edible_labels[top] & (conf >= th.edible_min_confidence + max(0.0, th.confidence_margin)) \
        & (mass <= th.poisonous_max_mass - max(0.0, getattr(th, "mass_margin", 0.0)))
    if th.ood_max_score is not None:
        if oods is None:
            return np.zeros(len(p), dtype=bool)
        o = np.asarray(oods, dtype=np.float64)
        ok &= np.isfinite(o) & (o <= th.ood_max_score - max(0.0, th.ood_margin))
    return ok


def check_mirror(probs, oods, labels, classes, th, mask: np.ndarray) -> None:
    """Assert that decide gives EDIBLE exactly where `mask` says (guards the vectorised mirror)."""
    from device.verdict import Verdict, decide

    for i, p in enumerate(probs):
        d = decide(p, labels, classes, th, None if oods is None else float(oods[i]))
        if (d.verdict is Verdict.EDIBLE) != bool(mask[i]):
            raise AssertionError(f"edible_mask disagrees with device.verdict.decide on row {i} ({d.reason})")


@dataclass
class Groups:
    """Boolean row masks of one score table."""

    edible: np.ndarray
    poisonous: np.ndarray
    unseen: np.ndarray


def figures(mask: np.ndarray, g: Groups, species: Sequence[str] | None = None) -> dict:
    """Coverage, poisonous->EDIBLE and unseen->EDIBLE (each with Wilson interval) of an EDIBLE mask."""
    out = {
        "edible_coverage": rate(int((mask & g.edible).sum()), int(g.edible.sum())),
        "poisonous_as_edible": rate(int((mask & g.poisonous).sum()), int(g.poisonous.sum())),
        "unseen_as_edible": rate(int((mask & g.unseen).sum()), int(g.unseen.sum())),
    }
    if species is not None:
        sp = np.asarray(species)
        per = {}
        for s in sorted(set(sp[g.unseen])):
            m = g.unseen & (sp == s)
            per[s] = (int((mask & m).sum()), int(m.sum()))
        worst = max(per.items(), key=lambda kv: (kv[1][0] / kv[1][1], kv[1][1]), default=None)
        out["unseen_species"] = len(per)
        out["unseen_species_with_edible"] = sum(1 for k, n in per.values() if k)
        if worst is not None:
            out["worst_unseen_species"] = {"species": worst[0], **rate(*worst[1])}
        # Per-species rates are only meaningful with a few photos; >= 5 photos, rate > 5%:
        out["unseen_species_over_5pct"] = sorted(s for s, (k, n) in per.items() if n >= 5 and k / n > 0.05)
    return out


def candidates(values: np.ndarray, n: int = 60) -> np.ndarray:
    """Threshold candidates: observed values themselves (a threshold at a photo's value includes it),
    every one when there are at most n, else n of them at evenly spaced quantiles."""
    v = np.unique(np.asarray(values, dtype=np.float64))
    v = v[np.isfinite(v)]
    if len(v) <= n:
        return v
    return np.unique(np.quantile(v, np.linspace(0, 1, n), method="inverted_cdf"))


@dataclass
class Held:
    """Photos of known poisonous species each measured by a fit that never saw its species (the
    leave-one-species-out folds of the same recipe): per photo, the fold (= held-out species), whether
    the top label's role is edible, the confidence, the non-edible mass and the unknown-species score
    (NaN: none). Enough to re-apply the EDIBLE branch of the policy at any thresholds."""

    fold: np.ndarray
    top_edible: np.ndarray
    conf: np.ndarray
    mass: np.ndarray
    ood: np.ndarray

    def __len__(self) -> int:
        return len(self.fold)

    def _rows(self, keep: np.ndarray) -> "Held":
        return Held(self.fold[keep], self.top_edible[keep], self.conf[keep], self.mass[keep], self.ood[keep])

    def without(self, fold: str) -> "Held":
        return self._rows(self.fold != fold)

    def only(self, fold: str) -> "Held":
        return self._rows(self.fold == fold)


def held_mask(h: Held, th) -> np.ndarray:
    """Which held-out photos the policy answers EDIBLE under `th` (edible_mask on per-photo figures)."""
    ok = h.top_edible & (h.conf >= th.edible_min_confidence + max(0.0, th.confidence_margin)) \
        & (h.mass <= th.poisonous_max_mass - max(0.0, getattr(th, "mass_margin", 0.0)))
    if th.ood_max_score is not None:
        ok &= np.isfinite(h.ood) & (h.ood <= th.ood_max_score - max(0.0, th.ood_margin))
    return ok


def held_figures(mask: np.ndarray, h: Held) -> dict:
    """All held-out photos answered EDIBLE, and each fold's share (Wilson intervals)."""
    folds = {f: rate(int((mask & (h.fold == f)).sum()), int((h.fold == f).sum())) for f in sorted(set(h.fold))}
    worst = max(folds.items(), key=lambda kv: (kv[1]["rate"], kv[1]["n"]), default=(None, None))
    return {"all": rate(int(mask.sum()), len(mask)), "folds": folds, "worst_fold": worst[0]}


def held_within(mask: np.ndarray, h: Held, max_all: float, max_fold: float) -> bool:
    """Held-out photos answered EDIBLE at or under max_all over all folds and max_fold in every fold."""
    if not len(h):
        return True
    if mask.sum() > max_all * len(mask):
        return False
    return all((mask & (h.fold == f)).sum() <= max_fold * (h.fold == f).sum() for f in set(h.fold))


def search(probs, oods, edible_labels, g: Groups, base, conf_grid, ood_grid, max_unseen: float,
           max_poisonous: float, mass_grid=None, held: Held | None = None, max_held: float = 1.0,
           max_held_fold: float = 1.0, margins: tuple[float, float, float] | None = None):
    """The loosest (edible_min_confidence, ood_max_score[, poisonous_max_mass]) on a grid: most edible
    coverage such that the unseen->EDIBLE and poisonous->EDIBLE rates stay at or under their targets,
    and (with `held`: leave-one-species-out photos) the held-out species answered EDIBLE stay at or under
    max_held overall and max_held_fold in each fold.
    With `margins` (confidence, ood, mass: what the device adds on top of the point), "most coverage"
    means most coverage at the effective thresholds, the coverage the device will have; the targets are
    still met at the raw point (margins 0), so the margins only ever add safety. Without it, a raw point
    at confidence 0.997 wins and a 0.02 margin then puts the device's bar above 1 (seen: no EDIBLE at all).
    Ties go to the stricter point (higher confidence, lower mass cap, lower ood). Returns (Thresholds or
    None, table of every point: (conf, ood, coverage, unseen, poisonous, mass, held or None, effective
    coverage or None))."""
    from dataclasses import replace

    best, best_key, table = None, None, []
    n_e, n_p, n_u = max(1, int(g.edible.sum())), int(g.poisonous.sum()), int(g.unseen.sum())
    for mcap in (mass_grid if mass_grid is not None else [base.poisonous_max_mass]):
        for c in conf_grid:
            for o in (ood_grid if ood_grid is not None else [None]):
                th = replace(base, edible_min_confidence=float(c), ood_max_score=None if o is None else float(o),
                             poisonous_max_mass=float(mcap))
                m = edible_mask(probs, oods, edible_labels, th)
                cov = (m & g.edible).sum() / n_e
                u = (m & g.unseen).sum() / n_u if n_u else 0.0
                pz = (m & g.poisonous).sum() / n_p if n_p else 0.0
                hm = held_mask(held, th) if held is not None and len(held) else None
                ok = u <= max_unseen and pz <= max_poisonous and (
                    hm is None or held_within(hm, held, max_held, max_held_fold))
                cov_eff = None
                if margins is not None:
                    eff = replace(th, confidence_margin=margins[0], ood_margin=margins[1] if o is not None else 0.0,
                                  mass_margin=margins[2])
                    cov_eff = float((edible_mask(probs, oods, edible_labels, eff) & g.edible).sum() / n_e)
                table.append((float(c), None if o is None else float(o), float(cov), float(u), float(pz), float(mcap),
                              None if hm is None else float(hm.mean()), cov_eff))
                if ok:
                    key = (cov if cov_eff is None else cov_eff, cov, c, -mcap, -(o if o is not None else 0.0))
                    if best_key is None or key > best_key:
                        best, best_key = th, key
    return best, table


def frontier(table: list[tuple]) -> list[tuple]:
    """Risk-coverage frontier of a search table: for each unseen->EDIBLE rate, the best coverage."""
    pts = sorted(table, key=lambda r: (r[3], -r[2]))
    out, best = [], -1.0
    for r in pts:
        if r[2] > best:
            out.append(r)
            best = r[2]
    return out


def held_frontier(table: list[tuple], max_unseen: float, max_poisonous: float) -> list[tuple]:
    """Leave-one-species-out risk-coverage frontier of a search table: among the points that meet the val
    unseen and poisonous targets, the best val coverage for each share of held-out photos answered
    EDIBLE. Rows as frontier's, with the held-out rate in the unseen column."""
    rows = [(r[0], r[1], r[2], r[6], r[4], r[5]) for r in table
            if len(r) > 6 and r[6] is not None and r[3] <= max_unseen and r[4] <= max_poisonous]
    return frontier(rows)


def write_curve(curves: dict[str, list[tuple]], csv_path: Path, png_path: Path, title: str,
                marks: dict[str, tuple[float, float]] | None = None, xmax: float = 6.0,
                xlabel: str = "unseen species answered EDIBLE (%)") -> None:
    """Risk-coverage curves (x: unseen->EDIBLE, y: edible coverage) as CSV and PNG."""
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["curve", "edible_min_confidence", "ood_max_score", "edible_coverage", "unseen_as_edible",
                    "poisonous_as_edible", "poisonous_max_mass"])
        for name, rows in curves.items():
            for r in rows:
                w.writerow([name, f"{r[0]:.5f}", "" if r[1] is None else f"{r[1]:.5f}", f"{r[2]:.5f}",
                            f"{r[3]:.5f}", f"{r[4]:.5f}", "" if len(r) < 6 else f"{r[5]:.4f}"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=100)
    for name, rows in curves.items():
        xs = [r[3] * 100 for r in rows]
        ys = [r[2] * 100 for r in rows]
        # A frontier of one point (no photo of an unseen species EDIBLE at any threshold on the grid) is
        # an invisible step line: give it a marker so the curve does not look empty.
        ax.step(xs, ys, where="post", label=name, marker="o" if len(rows) == 1 else None)
    for name, (x, y) in (marks or {}).items():
        ax.plot([x * 100], [y * 100], "o", ms=7, label=name)
    ax.axvline(2.0, color="red", ls=":", lw=1, label="target unseen->EDIBLE 2%")
    ax.axhline(75.0, color="green", ls=":", lw=1, label="target coverage 75%")
    ax.set_xlim(0, xmax)  # the region that matters: the target is 2%
    ax.set_ylim(0, 100)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("known edible answered EDIBLE (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


# --- comparing unknown-species scores on one protocol (evaluation only; the device keeps the winner) ---

def _logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]


def candidate_scores(probs, logits, d_known_full, d_known, d_other, known_labels: np.ndarray,
                     other_index: int | None) -> dict[str, np.ndarray]:
    """Unknown-species scores of each photo, higher = less familiar.

    d_known_full: cosine distance to the nearest known training photo in the full embedding (the
    shipped score before this change); d_known / d_other: the same in the index's (PCA) space, to known
    photos and to other-pool photos.
    """
    lk = np.asarray(logits, dtype=np.float64)[:, known_labels]
    out = {
        "msp (1 - max prob)": 1.0 - np.asarray(probs).max(axis=1),
        "energy (-logsumexp known logits)": -_logsumexp(lk),
        "max-logit (-max known logit)": -lk.max(axis=1),
        "knn cosine (known only)": np.asarray(d_known_full, dtype=np.float64),
    }
    if other_index is not None:
        out["p(other)"] = np.asarray(probs)[:, other_index]
    if d_other is not None:
        dk, do = np.asarray(d_known, dtype=np.float64), np.asarray(d_other, dtype=np.float64)
        out["knn known-vs-other (dk - do)"] = dk - do
        out["knn ratio dk/(dk+do)"] = dk / np.maximum(dk + do, 1e-9)
    return out


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a random unseen photo > score of a random known-edible photo); ties count half."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    if not len(pos) or not len(neg):
        return float("nan")
    allv = np.concatenate([neg, pos])
    ranks = np.argsort(np.argsort(allv, kind="mergesort"), kind="mergesort").astype(float) + 1
    # average ranks of ties
    _, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    ranks = (sums / counts)[inv]
    r_pos = ranks[len(neg):].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def compare(scores: dict[str, np.ndarray], probs, edible_labels: np.ndarray, g: Groups,
            targets: Sequence[float] = (0.01, 0.02)) -> list[dict]:
    """Each score alone: EDIBLE iff the top label is edible and score <= t. Coverage at each unseen
    target, and AUROC of unseen vs known edible. One protocol for all: the same photos, same rule."""
    top_edible = edible_labels[np.asarray(probs).argmax(axis=1)]
    rows = []
    n_u, n_e, n_p = int(g.unseen.sum()), max(1, int(g.edible.sum())), int(g.poisonous.sum())
    for name, s in scores.items():
        s = np.asarray(s, dtype=np.float64)
        row = {"score": name, "auroc_unseen_vs_edible": auroc(s[g.unseen], s[g.edible])}
        for t in targets:
            best = (0.0, None, 0.0)
            for thr in np.unique(s[top_edible & (g.edible | g.unseen)]):
                m = top_edible & (s <= thr)
                u = (m & g.unseen).sum() / max(1, n_u)
                if u <= t:
                    cov = (m & g.edible).sum() / n_e
                    if cov > best[0]:
                        best = (cov, float(thr), (m & g.poisonous).sum() / max(1, n_p))
            row[f"coverage_at_unseen_{t:g}"] = best[0]
            row[f"poisonous_at_unseen_{t:g}"] = best[2]
        rows.append(row)
    return rows
