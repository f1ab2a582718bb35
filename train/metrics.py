"""Safety figures shared by export (calibration on val) and evaluate."""

from __future__ import annotations

import numpy as np


def safety_figures(verdicts: list[str], y: np.ndarray, poisonous_label: np.ndarray) -> dict:
    """The safety table for verdicts against true label indices y (definitions in train/evaluate.py's docstring).

    `poisonous_label[i]` is True when label i is poisonous.
    """
    poisonous = np.asarray(poisonous_label, dtype=bool)[np.asarray(y, dtype=int)]
    edible_answer = np.array([v == "EDIBLE" for v in verdicts], dtype=bool)
    unsure = np.array([v == "UNSURE" for v in verdicts], dtype=bool)
    n = len(verdicts)
    n_p, n_e = int(poisonous.sum()), int((~poisonous).sum())
    p_as_e = int((edible_answer & poisonous).sum())
    e_ok = int((edible_answer & ~poisonous).sum())
    return {
        "n": n,
        "poisonous": n_p,
        "edible": n_e,
        "poisonous_as_edible": p_as_e / n_p if n_p else 0.0,
        "poisonous_as_edible_count": p_as_e,
        "edible_coverage": e_ok / n_e if n_e else 0.0,
        "unsure_rate": float(unsure.mean()) if n else 0.0,
        # FungiCLEF-style: a poisonous photo answered EDIBLE costs 100, an edible one not answered EDIBLE 1.
        "cost": (100.0 * p_as_e + 1.0 * (n_e - e_ok)) / n if n else 0.0,
    }


def poisonous_mask(labels: list[str], classes: dict) -> np.ndarray:
    """True for each label whose class is poisonous (classes: label -> {"edibility": ...})."""
    return np.array([classes[lab]["edibility"] == "poisonous" for lab in labels], dtype=bool)
