"""Leave-one-species-out: how does the recipe answer a poisonous species it never saw?

For each held-out poisonous species, the same recipe as the shipped model (fit + export, thresholds
calibrated on that fold's own validation split) is trained without it; then every photo of the held-out
species goes through the device's classifier and we count how often it comes out EDIBLE. The field will
meet species the model never saw: this is the figure that says how the device treats them.
Never calibrates on the test split; the held-out photos are only measured.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from device.bundle import load_bundle, write_json_atomic
from device.classifier import Classifier
from device.errors import DataError
from train import console
from train.dataset import OTHER, sha256_of
from train.export import ExportOptions, export as run_export
from train.fit import FIT_INFO, MODEL_FILE, weights_label, fit as run_fit
from train.hparams import HParams
from train.model_spec import SPECS


def fold_manifest(manifest: dict, held: str) -> dict:
    """The manifest without one class: its photos, label, edibility row and counts are all removed."""
    m = dict(manifest)
    m["images"] = [im for im in manifest["images"] if im["label"] != held]
    m["labels"] = [lab for lab in manifest["labels"] if lab != held]
    m["classes"] = {k: v for k, v in manifest["classes"].items() if k != held}
    m["counts"] = {k: v for k, v in manifest.get("counts", {}).items() if k != held}
    m["held_out"] = held
    return m


def _records(clf: Classifier, paths: list[Path]) -> list[dict]:
    out = []
    for p in paths:
        r = clf.classify(p)
        out.append({"path": str(p), "verdict": r.verdict, "label": r.label, "confidence": round(r.confidence, 5),
                    "poisonous_mass": round(r.decision.poisonous_mass, 5),
                    "ood_score": None if r.ood_score is None else round(r.ood_score, 4)})
    return out


def stale_fit(fold: Path, hp: HParams) -> str | None:
    """Why the fit already in FOLD is not this recipe's (None: it is, and may be reused).

    `--reuse-fits` must not pass off a fold trained with other hyper-parameters (another input size,
    epochs, seed) or on another split as this recipe's: its held-out figures would calibrate the new
    model's thresholds.
    """
    if not (fold / MODEL_FILE).is_file():
        return "no fit yet"
    try:
        info = json.loads((fold / FIT_INFO).read_text())
        done = dict(info["hparams"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {FIT_INFO}"
    if info.get("manifest_sha256") != sha256_of(fold / "manifest.json"):
        return "it was trained on another split"
    want = {**hp.to_dict(), "size": int(hp.size or SPECS[hp.backbone].default_size)}
    for key, value in want.items():
        if key == "weights":
            # The path may differ between runs; the file's name and hash are what count.
            if info.get("weights") != weights_label(str(value)):
                return f"its weights were {info.get('weights')}"
        elif key == "batch_size":
            # fit lowers the batch to the number of training photos on a tiny set.
            if not (done.get(key) == value or (isinstance(done.get(key), int) and done[key] < value)):
                return f"its batch_size was {done.get(key)}"
        elif done.get(key) != value:
            return f"its {key} was {done.get(key)!r}, this recipe's is {value!r}"
    return None


def run_fold(work: Path, manifest: dict, held: str, out: Path, hp: HParams, opts: ExportOptions,
             reuse_fit: bool = False) -> dict:
    """Train and export without `held`, then classify every photo of `held` and the fold's val photos."""
    fold = out / f"without-{held}"
    fold.mkdir(parents=True, exist_ok=True)
    write_json_atomic(fold / "manifest.json", fold_manifest(manifest, held))
    t0 = time.monotonic()
    why = stale_fit(fold, hp) if reuse_fit else "not asked to reuse"
    if why is not None:
        if reuse_fit and why != "no fit yet":
            console.note(f"{fold.name}: refitting, the fit there is not this recipe's ({why})")
        run_fit(fold, hp)
    res = run_export(fold, replace(opts, out=fold / "bundle", force=True, name=f"loso-without-{held}"))
    bundle = load_bundle(fold / "bundle")
    clf = Classifier(bundle)
    root = Path(manifest["data_dir"])
    # Other-pool photos live under the manifest's other_dir.
    other_root = Path(manifest["other_dir"]) if manifest.get("other_dir") else root

    def path_of(im: dict) -> Path:
        return (other_root if im["label"] == OTHER and manifest.get("other_dir") else root) / im["path"]

    held_paths = [path_of(im) for im in manifest["images"] if im["label"] == held]
    val = [im for im in manifest["images"] if im["label"] != held and im["split"] == "val"]
    held_rec = _records(clf, held_paths)
    val_rec = _records(clf, [path_of(im) for im in val])
    for rec, im in zip(val_rec, val):
        rec["true"] = im["label"]
    edible_val = [r for r in val_rec if manifest["classes"][r["true"]]["edibility"] == "edible"]
    result = {
        "held_out": held,
        "photos": len(held_rec),
        "answered_edible": sum(r["verdict"] == "EDIBLE" for r in held_rec),
        "answered_poisonous": sum(r["verdict"] == "POISONOUS" for r in held_rec),
        "answered_unsure": sum(r["verdict"] == "UNSURE" for r in held_rec),
        "val_edible_coverage": float(np.mean([r["verdict"] == "EDIBLE" for r in edible_val])) if edible_val else None,
        "thresholds": bundle.card["thresholds"],
        "seconds": round(time.monotonic() - t0, 1),
        "export_val": res.val,
    }
    result["edible_rate"] = result["answered_edible"] / max(1, result["photos"])
    write_json_atomic(fold / "loso.json", {**result, "held_records": held_rec, "val_records": val_rec})
    return result


def loso(work: Path, out: Path, hp: HParams, opts: ExportOptions, holdouts: list[str] | None = None,
         reuse_fits: bool = False) -> dict:
    """All folds (default: every poisonous species); writes OUT/loso.json and returns the summary."""
    manifest = json.loads((Path(work) / "manifest.json").read_text())
    # The `other` class is poisonous by edibility but is not a species: holding it out would measure
    # nothing the protocol asks (the other pool's test species already are unseen species).
    poisonous = [c for c in manifest["labels"] if manifest["classes"][c]["edibility"] == "poisonous"
                 and manifest["classes"][c].get("role", "poisonous") != "other"]
    holdouts = holdouts or poisonous
    unknown = [h for h in holdouts if h not in manifest["labels"]]
    if unknown:
        raise DataError(f"--holdout {unknown[0]!r} is not a class of {work} (classes: {', '.join(manifest['labels'])})")
    pools = [h for h in holdouts if manifest["classes"][h].get("role") == "other"]
    if pools:
        raise DataError(f"--holdout {pools[0]!r} is the other pool, not a species; hold out a known poisonous "
                        f"species ({', '.join(poisonous)})")
    if len(manifest["labels"]) - 1 < 2:
        raise DataError("leave-one-species-out needs at least 3 classes")
    folds = []
    for held in holdouts:
        import keras

        keras.backend.clear_session()  # each fold is a fresh model; free the last one's graph
        folds.append(run_fold(Path(work), manifest, held, Path(out), hp, opts, reuse_fits))
    summary = {
        "folds": folds,
        **totals(folds),
        "hparams": {k: str(v) for k, v in asdict(hp).items()},
        "ood": {"method": opts.ood_method, "percentile": opts.ood_percentile,
                "min_edible_coverage": opts.min_edible_coverage},
    }
    write_json_atomic(Path(out) / "loso.json", summary)
    return summary


def totals(folds: list[dict]) -> dict:
    """Photos, EDIBLE answers and rates over folds (what loso.json and the card both report)."""
    photos = sum(int(f["photos"]) for f in folds)
    answered = sum(int(f["answered_edible"]) for f in folds)
    return {"photos": photos, "answered_edible": answered, "edible_rate": answered / max(1, photos),
            "worst_fold_edible_rate": max(f["edible_rate"] for f in folds)}


FOLD_KEEP = ("held_out", "photos", "answered_edible", "answered_unsure", "answered_poisonous", "edible_rate",
             "val_edible_coverage")


EVIDENCE_FORMAT = "mushcam-fold-evidence/1"


def split_id(images: list[dict]) -> str:
    """sha256 of a split's photos (path, label, side), in any order: what ties a fold to the split it left
    one species out of, without the manifest itself."""
    rows = sorted([im["path"], im["label"], im["split"]] for im in images)
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def _fold_part(held: str, records: list[dict], thresholds: dict, roles: dict, where: Path):
    """One fold's train.openworld.Held; its recorded verdicts must follow from the recorded figures at the
    fold's own thresholds (the records round them), else the fold is refused."""
    from device.bundle import Thresholds
    from train.openworld import Held, held_mask

    h = Held(np.array([held] * len(records)), np.array([roles.get(x["label"]) == "edible" for x in records], dtype=bool),
             np.array([x["confidence"] for x in records], dtype=np.float64),
             np.array([x["poisonous_mass"] for x in records], dtype=np.float64),
             np.array([np.nan if x["ood_score"] is None else x["ood_score"] for x in records], dtype=np.float64))
    th = Thresholds(**{k: v for k, v in thresholds.items() if k in Thresholds.__dataclass_fields__})
    recorded = np.array([x["verdict"] == "EDIBLE" for x in records], dtype=bool)
    if not np.array_equal(held_mask(h, th), recorded):
        raise DataError(f"{where}: {int((held_mask(h, th) != recorded).sum())} recorded verdicts of the {held} fold "
                        "do not follow from the recorded figures at the fold's thresholds; re-run the fold")
    return h


def _stack(parts: list):
    from train.openworld import Held

    cat = lambda name: np.concatenate([getattr(h, name) for h in parts])  # noqa: E731
    return Held(cat("fold"), cat("top_edible"), cat("conf"), cat("mass"), cat("ood"))


def _fold_dirs(loso_dir: Path, manifest: dict):
    """(held species, loso.json record, fold card) of every fold in LOSO_DIR trained on this very split."""
    files = sorted(loso_dir.glob("without-*/loso.json"))
    if not files:
        raise DataError(f"no leave-one-species-out folds in {loso_dir} (without-*/loso.json); run `make loso` "
                        "or mushcam-train loso first, or leave out --loso")
    for f in files:
        rec = json.loads(f.read_text())
        held = rec["held_out"]
        key = lambda im: (im["path"], im["label"], im["split"])  # noqa: E731
        want = {key(im) for im in manifest["images"] if im["label"] != held}
        got = {key(im) for im in json.loads((f.parent / "manifest.json").read_text())["images"]}
        if held not in manifest["labels"] or want != got:
            raise DataError(f"{f.parent}: this fold was trained on a different split than {manifest.get('data_dir')} "
                            f"({len(want ^ got)} photos differ); re-run the folds (make loso) for this manifest")
        yield held, rec, json.loads((f.parent / "bundle" / "model.json").read_text()), f


def _roles(card: dict) -> dict:
    return {lab: c.get("role") or c["edibility"] for lab, c in card["classes"].items()}


def load_held(loso: Path, manifest: dict):
    """The folds (a `loso --out` folder, or the one file `mushcam-train folds` writes from it) as
    calibration evidence for the shipped model.

    Returns (train.openworld.Held of every held-out photo, the folds' own figures at their own thresholds).
    A fold counts only if it was trained on this very split: the photos (path, label, split) of `manifest`
    minus its species, else a threshold would be calibrated on photos the shipped model trained on. Each
    fold's recorded verdicts must also come out of the per-photo figures at that fold's own thresholds.
    """
    loso = Path(loso)
    if loso.is_file():
        return _load_evidence(loso, manifest)
    parts, folds = [], []
    for held, rec, card, f in _fold_dirs(loso, manifest):
        parts.append(_fold_part(held, rec["held_records"], card["thresholds"], _roles(card), f))
        folds.append({k: rec[k] for k in FOLD_KEEP if k in rec})
    return _stack(parts), folds


def evidence(loso_dir: Path, manifest: dict) -> dict:
    """What export --loso reads from a folds folder, in one small JSON document (no photos, no models):
    the split's id (each fold was checked against it here, as load_held checks a folder) and per fold its
    thresholds, output roles, figures and per-photo records, so the shipped bundle can be calibrated again
    (`make model`) without refitting the folds (`make loso`, about an hour)."""
    folds = []
    for held, rec, card, f in _fold_dirs(Path(loso_dir), manifest):
        _fold_part(held, rec["held_records"], card["thresholds"], _roles(card), f)  # refuse an inconsistent fold
        folds.append({
            **{k: rec[k] for k in FOLD_KEEP if k in rec},
            "thresholds": card["thresholds"],
            "roles": _roles(card),
            # The photo by its last two path parts (species folder / file): which photo, not where it was.
            "held_records": [{"photo": "/".join(Path(x["path"]).parts[-2:]),
                              **{k: x[k] for k in ("verdict", "label", "confidence", "poisonous_mass", "ood_score")}}
                             for x in rec["held_records"]],
        })
    return {"format": EVIDENCE_FORMAT, "split": split_id(manifest["images"]), "folds": folds}


def _load_evidence(path: Path, manifest: dict):
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        ok = isinstance(doc, dict) and doc.get("format") == EVIDENCE_FORMAT and isinstance(doc.get("folds"), list)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path}: not a fold evidence file ({e}); write it with mushcam-train folds") from None
    if not ok or not doc["folds"]:
        raise DataError(f"{path}: not a fold evidence file ({EVIDENCE_FORMAT}); write it with mushcam-train folds")
    if doc.get("split") != split_id(manifest["images"]):
        raise DataError(f"{path}: its folds were measured on another split than this WORK dir's; run the folds "
                        "for this split (make loso) or leave out --loso")
    parts, folds = [], []
    try:
        for fold in doc["folds"]:
            held = fold["held_out"]
            if held not in manifest["labels"]:
                raise DataError(f"{path}: {held} is not a class of this split; run the folds (make loso)")
            parts.append(_fold_part(held, fold["held_records"], fold["thresholds"], fold["roles"], path))
            folds.append({k: fold[k] for k in FOLD_KEEP if k in fold})
    except (KeyError, TypeError) as e:
        raise DataError(f"{path}: a fold lacks {e}; write the file again with mushcam-train folds") from None
    return _stack(parts), folds


def card_section(folds: list[dict], ood: dict | None, earlier: dict | None = None) -> dict:
    """metrics.leave_one_species_out: the folds' own figures (each at its own val-calibrated thresholds)."""
    ran = {f["held_out"] for f in folds}
    # A run of some folds (--holdout, e.g. the one fold that did not fit in a session) adds to the folds
    # already recorded instead of erasing them; a fold run again replaces its earlier figures.
    kept = [f for f in (earlier or {}).get("folds", []) if f.get("held_out") not in ran]
    both = totals(kept + folds)
    return {
        "folds": kept + folds,
        "edible_rate": both["edible_rate"],
        "worst_fold_edible_rate": both["worst_fold_edible_rate"],
        "ood": ood,
        **({"earlier_folds": [f["held_out"] for f in kept], "earlier_ood": (earlier or {}).get("ood")} if kept else {}),
    }


def record_in_card(bundle: Path, summary: dict) -> None:
    """Put the per-fold figures into a bundle's card (metrics.leave_one_species_out); hashes untouched."""
    from device.bundle import write_card

    card_path = Path(bundle) / "model.json"
    card = json.loads(card_path.read_text(encoding="utf-8"))
    new = [{k: f[k] for k in FOLD_KEEP} for f in summary["folds"]]
    metrics = card.setdefault("metrics", {})
    metrics["leave_one_species_out"] = card_section(new, summary.get("ood"), metrics.get("leave_one_species_out"))
    write_card(Path(bundle), card)
