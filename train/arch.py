"""The evaluation on the Pi's architecture, and how far its answers are from this machine's.

The int8 kernels differ between x86-64 and aarch64 (the Pi): with bit-identical input tensors the same
model gives slightly different logits and embeddings, so a photo near a threshold can get another verdict
on the Pi. `classify_in_pi_root` runs the device's own code (`mushcam classify --json --probs`, installed
by deploy/install.sh) in the emulated Debian 12 arm64 root that `make pi-check` builds; `jitter` compares
its per-photo figures with this machine's and suggests the margins (`thresholds.confidence_margin`,
`thresholds.ood_margin`) that stop either CPU from giving a verdict the other would not.
"""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np

from device.bundle import Bundle
from device.errors import DataError
from device.verdict import Verdict, decide

PI_CHECK = Path(__file__).resolve().parent.parent / "deploy" / "pi-check.sh"
ROOT_MUSHCAM = "/opt/mushcam/venv/bin/mushcam"
ARCHES = ("x86_64", "aarch64")
# A photo is "near a threshold" when either CPU puts its confidence within NEAR_CONFIDENCE of a confidence
# threshold, its poisonous mass within NEAR_MASS of the limit, or its unknown-species score within
# NEAR_OOD_FRACTION of the limit.
NEAR_CONFIDENCE = 0.05
NEAR_MASS = 0.01
NEAR_OOD_FRACTION = 0.05
MARGIN_STEP = 0.005  # grid of the suggested confidence margin
MAX_MARGIN = 0.5


def _common_dirs(paths: list[Path], most: int = 16) -> list[Path]:
    """Few folders that hold every path (each is bind-mounted into the root): the photos' own folders,
    the deepest merged into their parents while there are more than `most`, never above two levels
    (a photo in /work/shared/data/x/ makes at most /work/shared a mount)."""
    def outermost(ds):
        ds = sorted(set(ds))
        out: list[Path] = []
        for d in ds:
            if not any(d == o or o in d.parents for o in out):
                out.append(d)
        return out

    dirs = outermost(Path(p).resolve().parent for p in paths)
    while len(dirs) > most:
        deepest = max(len(d.parts) for d in dirs)
        if deepest <= 3:  # ("/", "work", "shared")
            break
        dirs = outermost(d.parent if len(d.parts) == deepest else d for d in dirs)
    return dirs


def classify_in_pi_root(bundle_path: Path, paths: list[Path], threads: int | None = None,
                        pi_check: Path | None = None) -> list[dict]:
    """Rows of `mushcam classify --json --probs` run on aarch64 (in the arm64 root), in `paths`' order.

    Photos and bundle are bind-mounted read-only at their own absolute paths. Needs root and a root
    built by `make pi-check` (which installs this checkout's device code there).
    """
    bundle_path = Path(bundle_path).resolve()
    files = [Path(p).resolve() for p in paths]
    binds = []
    for d in _common_dirs(files + [bundle_path / "model.json"]):
        binds += ["--bind", str(d)]
    cmd = ["bash", str(pi_check or PI_CHECK), "exec", *binds, "--", ROOT_MUSHCAM, "classify", "--json", "--probs",
           "--engine", "cpu", "--model", str(bundle_path)]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd + [str(f) for f in files], capture_output=True, text=True)
    if out.returncode not in (0, 1):  # 1: some photos failed to decode, they are rows with "error"
        last = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"
        raise DataError(f"classifying in the arm64 root failed: {last} (run `make pi-check` first, as root)")
    rows = {r["path"]: r for r in map(json.loads, out.stdout.splitlines())}
    missing = [f for f in files if str(f) not in rows]
    if missing:
        raise DataError(f"the arm64 root gave no result for {len(missing)} photo(s), e.g. {missing[0]}")
    return [rows[str(f)] for f in files]


def _stats(xs) -> dict:
    a = np.abs(np.asarray([x for x in xs if x is not None], dtype=float))
    if a.size == 0:
        return {"n": 0}
    return {"n": int(a.size), "max": float(a.max()), "p99": float(np.percentile(a, 99)),
            "median": float(np.median(a))}


def _decide(bundle: Bundle, row: dict, thresholds) -> Verdict:
    return decide([row["probs"][lab] for lab in bundle.labels], bundle.labels, bundle.classes, thresholds,
                  row["ood_score"]).verdict


def _raw(thresholds):
    return replace(thresholds, confidence_margin=0.0, ood_margin=0.0, mass_margin=0.0)


def hard_disagreements(bundle: Bundle, pairs: list[tuple[dict, dict]], confidence_margin: float,
                       ood_margin: float, mass_margin: float = 0.0, verdicts=(Verdict.EDIBLE,)) -> list[int]:
    """Photos where one CPU, with these margins, gives one of `verdicts` and the other, at the raw
    thresholds, does not give the same: the answers the margins exist to prevent (by default a one-sided
    EDIBLE, the dangerous kind; POISONOUS against UNSURE says "do not eat" either way)."""
    raw = _raw(bundle.thresholds)
    strict = replace(raw, confidence_margin=confidence_margin, ood_margin=ood_margin, mass_margin=mass_margin)
    bad = []
    for i, (a, b) in enumerate(pairs):
        for one, other in ((a, b), (b, a)):
            v = _decide(bundle, one, strict)
            if v in verdicts and _decide(bundle, other, raw) is not v:
                bad.append(i)
                break
    return bad


def suggest_margins(bundle: Bundle, pairs: list[tuple[dict, dict]], ood_margin: float) -> dict:
    """The confidence and mass margins (with `ood_margin`) under which no photo is EDIBLE on one CPU and not
    on the other at the raw thresholds, keeping the most EDIBLE answers; None if no pair on the grid does.

    Never below the card's own margins: a suggestion may tighten them, never loosen them. Without that
    floor the most-EDIBLE pair can trade the card's confidence margin for a mass margin and turn a
    poisonous photo that one CPU called EDIBLE into one that both do (seen on a scarletina bolete at
    confidence 0.980 / 0.986 against a 0.964 raw threshold)."""
    t = bundle.thresholds

    def floor(margin: float, step: float) -> int:
        return int(math.ceil(round(margin / step, 6)))

    conf_grid = [round(k * MARGIN_STEP, 6)
                 for k in range(floor(t.confidence_margin, MARGIN_STEP), int(round(MAX_MARGIN / MARGIN_STEP)) + 1)]
    mass_grid = [round(k * 0.001, 6)
                 for k in range(floor(t.mass_margin, 0.001), int(round(t.poisonous_max_mass / 0.001)) + 1)]
    ood_margin = max(ood_margin, t.ood_margin)
    best = None
    for m_mass in mass_grid:
        for m_conf in conf_grid:
            if hard_disagreements(bundle, pairs, m_conf, ood_margin, m_mass):
                continue
            strict = replace(_raw(t), confidence_margin=m_conf, ood_margin=ood_margin, mass_margin=m_mass)
            edible = sum(_decide(bundle, r, strict) is Verdict.EDIBLE for pair in pairs for r in pair)
            key = (-edible, m_conf + m_mass)
            if best is None or key < best[0]:
                best = (key, m_conf, m_mass)
            break  # a larger confidence margin only removes EDIBLE answers
    if best is None:
        return {"confidence_margin": None, "ood_margin": ood_margin, "mass_margin": None}
    return {"confidence_margin": best[1], "ood_margin": ood_margin, "mass_margin": best[2]}


def jitter(bundle: Bundle, x86: list[dict], arm: list[dict], known: int) -> dict:
    """Per-photo differences between the two CPUs' rows (same photos, same order; the first `known`
    are of the model's species, the rest unseen species), and the margins that absorb them."""
    both = [(i, a, b) for i, (a, b) in enumerate(zip(x86, arm)) if "error" not in a and "error" not in b]
    if not both:
        raise DataError("no photo was classified on both architectures")
    pairs = [(a, b) for _, a, b in both]
    t = bundle.thresholds
    conf_thresholds = (t.edible_min_confidence, t.poisonous_min_confidence)
    dconf = [a["confidence"] - b["confidence"] for a, b in pairs]
    dmass = [a["poisonous_mass"] - b["poisonous_mass"] for a, b in pairs]
    dood = [None if a["ood_score"] is None or b["ood_score"] is None else a["ood_score"] - b["ood_score"]
            for a, b in pairs]

    def near(a, b) -> bool:
        for r in (a, b):
            if any(abs(r["confidence"] - c) <= NEAR_CONFIDENCE for c in conf_thresholds):
                return True
            if abs(r["poisonous_mass"] - t.poisonous_max_mass) <= NEAR_MASS:
                return True
            if t.ood_max_score is not None and r["ood_score"] is not None and \
                    abs(r["ood_score"] - t.ood_max_score) <= NEAR_OOD_FRACTION * t.ood_max_score:
                return True
        return False

    near_idx = [i for i, (a, b) in enumerate(pairs) if near(a, b)]
    flips = [{"path": a["path"], "x86_64": a["verdict"], "aarch64": b["verdict"],
              "x86_64_label": a["label"], "aarch64_label": b["label"],
              "confidence": [round(a["confidence"], 4), round(b["confidence"], 4)],
              "poisonous_mass": [round(a["poisonous_mass"], 4), round(b["poisonous_mass"], 4)],
              "ood_score": [a["ood_score"], b["ood_score"]]}
             for a, b in pairs if a["verdict"] != b["verdict"]]
    od = _stats(dood)
    ood_margin = math.ceil(round(od["max"] * 1000, 6)) / 1000 if od["n"] else 0.0  # the largest seen, rounded up
    suggested = suggest_margins(bundle, pairs, ood_margin)
    strict = replace(_raw(t), **{k: v or 0.0 for k, v in suggested.items()})
    left = [(a, b) for a, b in pairs if _decide(bundle, a, strict) is not _decide(bundle, b, strict)]
    poisonous_left = hard_disagreements(bundle, pairs, strict.confidence_margin, ood_margin, strict.mass_margin,
                                        (Verdict.POISONOUS,))
    n_known = sum(1 for i, _, _ in both if i < known)

    def edible_count(rows, th):
        return sum(_decide(bundle, r, th) is Verdict.EDIBLE for r in rows if "error" not in r)

    return {
        "photos": len(pairs),
        "known_species": n_known,
        "unseen_species": len(pairs) - n_known,
        "verdict_flips": len(flips),
        "label_flips": sum(a["label"] != b["label"] for a, b in pairs),
        "flips": flips,
        "abs_delta_confidence": _stats(dconf),
        "abs_delta_poisonous_mass": _stats(dmass),
        "abs_delta_ood": od,
        "near_thresholds": {
            "photos": len(near_idx),
            "abs_delta_confidence": _stats(dconf[i] for i in near_idx),
            "abs_delta_poisonous_mass": _stats(dmass[i] for i in near_idx),
            "abs_delta_ood": _stats(dood[i] for i in near_idx),
            "verdict_flips": sum(pairs[i][0]["verdict"] != pairs[i][1]["verdict"] for i in near_idx),
        },
        "one_sided_edible_at_zero_margin": len(hard_disagreements(bundle, pairs, 0.0, 0.0)),
        # None: no margins on the grid remove them.
        "suggested": suggested,
        "with_suggested": {
            "verdict_differences": len(left),  # each is UNSURE on one side (no one-sided EDIBLE is left)
            "one_sided_poisonous": len(poisonous_left),  # POISONOUS on one CPU, UNSURE on the other
            "edible_known_species": {"x86_64": edible_count(x86[:known], strict), "aarch64": edible_count(arm[:known], strict)},
        },
        "edible_known_species": {"x86_64": edible_count(x86[:known], t), "aarch64": edible_count(arm[:known], t)},
        "edible_unseen_species": {"x86_64": edible_count(x86[known:], t), "aarch64": edible_count(arm[known:], t)},
    }


def format_jitter(j: dict) -> str:
    """A few lines for the terminal."""
    def st(s):
        return "-" if not s.get("n") else f"max {s['max']:.4f}  p99 {s['p99']:.4f}  median {s['median']:.4f}"

    nt, ws, sg = j["near_thresholds"], j["with_suggested"], j["suggested"]
    lines = [
        f"x86-64 vs aarch64 on {j['photos']} photos ({j['known_species']} of the split, "
        f"{j['unseen_species']} from --unseen): {j['verdict_flips']} verdict flip(s), {j['label_flips']} label flip(s)",
        f"  |d confidence|      {st(j['abs_delta_confidence'])}",
        f"  |d poisonous mass|  {st(j['abs_delta_poisonous_mass'])}",
        f"  |d ood score|       {st(j['abs_delta_ood'])}",
        f"  near a threshold: {nt['photos']} photos, {nt['verdict_flips']} flips; |d conf| {st(nt['abs_delta_confidence'])}",
        f"  EDIBLE on one CPU only (raw thresholds): {j['one_sided_edible_at_zero_margin']}",
        f"  suggested margins: confidence {sg['confidence_margin']}, mass {sg['mass_margin']}, ood {sg['ood_margin']}; "
        f"with them {ws['verdict_differences']} difference(s) left, each UNSURE on one side "
        f"({ws['one_sided_poisonous']} POISONOUS/UNSURE)",
        f"  EDIBLE among the split's photos x86/aarch64: {j['edible_known_species']['x86_64']}/"
        f"{j['edible_known_species']['aarch64']} at the card's thresholds, {ws['edible_known_species']['x86_64']}/"
        f"{ws['edible_known_species']['aarch64']} with the suggested margins; --unseen photos answered EDIBLE: "
        f"{j['edible_unseen_species']['x86_64']}/{j['edible_unseen_species']['aarch64']}",
    ]
    for f in j["flips"]:
        lines.append(f"    flip {Path(f['path']).name}: x86 {f['x86_64']} {f['x86_64_label']} {f['confidence'][0]} / "
                     f"aarch64 {f['aarch64']} {f['aarch64_label']} {f['confidence'][1]}")
    return "\n".join(lines)
