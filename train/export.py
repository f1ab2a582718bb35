"""`export`: WORK/model.keras -> a validated int8 model bundle (docs/model-bundle.md), or nothing at all.

1. Full-integer post-training quantization (TFLiteConverter.from_keras_model, TFLITE_BUILTINS_INT8, int8
   input and outputs), calibrated on N training images put through the device's own preprocessing.
   Both outputs stay raw: `logits` (the device applies softmax in float; a quantized softmax saturates,
   measured here at 1.0 on a wrong label) and `embedding`.
2. The card's `input`/`outputs` quantization is read back from the converted model with the device's
   interpreter, never assumed. The card's classes carry their `role` (edible / poisonous / other).
3. Every split goes through device.classifier (device preprocessing, the device interpreter).
4. Unknown-species index (device.ood.fit_knn) on the int8 train embeddings of the known classes; with an
   `other` class, the other pool's train embeddings are stored as negatives (score d_known / (d_known +
   d_other)); PCA to `ood_dims` and int8 rows keep ood.npz small.
5. Thresholds, with device.verdict.decide's policy (a vectorised mirror, checked against decide):
   - open world (the manifest has other-pool val species): the loosest (edible_min_confidence,
     ood_max_score) on a grid of val quantiles with val unseen-species->EDIBLE <= --max-unseen-edible (1%)
     and poisonous->EDIBLE <= --max-poison-edible (0.5%), margins 0; then --confidence-margin and
     --ood-margin are written into the card (the device is stricter than the calibrated point by the
     int8 jitter between machines) and the expected figures at the effective thresholds, with Wilson 95%
     intervals, go into `calibration`. WORK/openworld/ gets the score comparison and the risk-coverage
     curve (evaluation only);
   - closed world (no other pool): ood_max_score = a val percentile, edible_min_confidence = the lowest
     keeping poisonous val photos EDIBLE <= --max-poison-edible, never below --min-edible-confidence.
6. Gate: float Keras vs int8 through the device must agree on top-1 over every photo not used for
   quantization calibration, and on the verdict over val + test, each on >= --gate-min-photos photos with a
   Wilson 95% lower bound >= --min-agreement / --min-verdict-agreement; else ExportGateError (unless --force).
7. samples/: K photos per known class from the test split (else val), longest side <= 320 px, JPEG q85, each
   checked to classify as its label with the new bundle, plus --other-samples other-pool test photos the
   bundle files under `other` (verdict UNSURE); each entry records its verdict, and each file is in `files`
   with its sha256.
8. Everything is written into a temp dir beside BUNDLE, validated with device.bundle.load_bundle, then
   renamed into place; an existing BUNDLE is replaced only once the new one is complete (old -> backup,
   new -> BUNDLE, backup removed).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from device.errors import BundleError, DataError, ExportGateError
from train import console
from train.dataset import OTHER, ImageRecord, Manifest, load_rgb_arrays, sha256_of, split_sha256
from train.fit import MODEL_FILE, load_fit_info, training_input_spec
from train.metrics import poisonous_mask, safety_figures
from train.model_spec import get_spec

OOD_PERCENTILE = 95.0
MASS_GRID = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25)  # candidate poisonous_max_mass (device floor: <= 0.25)
OOD_DIMS = 64
SAMPLE_MAX_SIDE = 320
SAMPLE_QUALITY = 85


@dataclass
class ExportOptions:
    """Settings of one export (the CLI's options)."""

    out: Path
    calibration: int = 400
    # int8 gate: float/int8 agreement over every photo not used for quantization calibration (see gate())
    min_agreement: float = 0.95  # Wilson 95% lower bound of top-1 agreement (known species)
    min_verdict_agreement: float = 0.90  # Wilson 95% lower bound of verdict agreement (val + test)
    max_new_edible: float = 0.02  # Wilson 95% upper bound: int8 EDIBLE where float is not
    gate_min_photos: int = 200
    force: bool = False
    name: str | None = None
    version: str | None = None
    samples: int = 3
    max_poison_edible: float = 0.005
    min_edible_confidence: float = 0.9
    threads: int | None = None
    ood_method: str = "knn"  # knn or mahalanobis (device/ood.py)
    ood_k: int = 1
    ood_percentile: float = OOD_PERCENTILE  # of val (known-species) scores: ood_max_score
    min_edible_coverage: float | None = None  # if set: the strictest ood percentile keeping this val coverage
    # Open-world calibration (a manifest with an `other` class): val other-pool species are the unseen ones.
    max_unseen_edible: float = 0.01
    confidence_margin: float = 0.02
    ood_margin: float = 0.015
    mass_margin: float = 0.0
    margins_why: str = "assumed int8 score jitter between this machine and the Pi (issue 9: +/-0.015) until measured"
    ood_negatives: bool = True  # other-pool train embeddings in the kNN index as negatives
    ood_dims: int | None = 256  # PCA dims of the kNN index (None: full embedding)
    ood_int8: bool = True  # int8 rows in the kNN index
    other_samples: int = 0  # other-pool test photos in samples/ (expected verdict UNSURE; the pool says: do not redistribute)
    # Leave-one-species-out folds of the same recipe (`loso --out`), used as more unseen species: each
    # known poisonous species measured by a fit that never saw it (issue 9: "and the LOSO folds where
    # available"). The val other species alone let a bolete look-alike through (a fold: 50/264 EDIBLE).
    loso: Path | None = None
    max_held_edible: float = 0.01  # all held-out photos answered EDIBLE (the same target as val unseen)
    max_held_fold_edible: float = 0.05  # each held-out species (the per-species target of the issue)
    # recalibrate only: keep the card's thresholds (samples chosen again, the folds measured at them).
    keep_thresholds: bool = False


@dataclass
class ExportResult:
    """The written bundle and the figures that let it through."""

    path: Path
    float_top1: float
    int8_top1: float
    thresholds: dict
    val: dict
    seconds: float
    warnings: list[str] = field(default_factory=list)
    calibration: dict | None = None
    gate: dict | None = None


def convert_int8(model, images: np.ndarray, spec) -> bytes:
    """Full-integer quantization with int8 input and outputs, calibrated on uint8 `images` (n, h, w, 3).

    Each image is normalised with device.preprocess.normalize as it is fed (never all at once: 1,000
    float images at 224 px would take 600 MB).
    """
    from device import preprocess as dp
    from train._tf import held_stderr, import_keras

    tf, _ = import_keras()

    def gen():
        for x in images:
            yield [dp.normalize(x, spec)[None]]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = gen
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    with held_stderr(stdout=True), warnings.catch_warnings():
        # "Statistics for quantized inputs were expected": the int8 input's range comes from calibration.
        warnings.simplefilter("ignore", UserWarning)
        return converter.convert()


def read_quantization(model_path: Path, n_classes: int) -> tuple[dict, dict]:
    """Input quantization and the `outputs` section, read from the .tflite with the device's interpreter.

    Outputs are matched by shape: the logits have n_classes values, the embedding is the other one.
    """
    from device.engine import make_interpreter

    interp = make_interpreter(model_path)
    inputs = interp.get_input_details()
    if len(inputs) != 1:
        raise BundleError(f"{model_path}: expected one input, the converter produced {len(inputs)}")
    inp = inputs[0]
    scale, zp = inp["quantization"]
    input_q = {"dtype": np.dtype(inp["dtype"]).name, "scale": float(scale), "zero_point": int(zp)}
    outputs: dict[str, dict] = {}
    for index, o in enumerate(interp.get_output_details()):
        size = int(np.prod(o["shape"][1:]))
        name = "logits" if size == n_classes else "embedding"
        if name in outputs:
            raise BundleError(f"{model_path}: cannot tell the logits from the embedding by shape ({size} values twice)")
        s, z = o["quantization"]
        outputs[name] = {"index": index, "size": size, "dtype": np.dtype(o["dtype"]).name,
                         "scale": float(s), "zero_point": int(z)}
    if "logits" not in outputs:
        raise BundleError(f"{model_path}: no output with {n_classes} values (the logits)")
    return input_q, {"logits": outputs["logits"], **({"embedding": outputs["embedding"]} if "embedding" in outputs else {})}


class _Recorder:
    """Wraps a device Engine so the Classifier's own path runs, and keeps the last raw output (embedding)."""

    def __init__(self, engine):
        self.engine = engine
        self.last = None

    def run(self, tensor):
        self.last = self.engine.run(tensor)
        return self.last

    def __getattr__(self, name):
        return getattr(self.engine, name)


def device_scores(classifier, recorder: _Recorder, paths: list[Path], description: str, logits: list | None = None):
    """(probs (n, k), embeddings (n, d) or None, ood scores or None) of files, via device.classifier.

    `logits`: a list to append each photo's dequantized logits to (for the energy / max-logit scores).
    """
    probs, embs, oods = [], [], []
    for p in console.track(paths, description):
        pr, ood = classifier.scores(p)
        probs.append(pr)
        embs.append(recorder.last.embedding)
        if logits is not None:
            logits.append(np.asarray(recorder.last.logits, dtype=np.float32))
        oods.append(ood)
    emb = None if any(e is None for e in embs) else np.stack(embs)
    ood_arr = None if any(o is None for o in oods) else np.asarray(oods, dtype=np.float64)
    return np.stack(probs), emb, ood_arr


def verdicts_for(probs: np.ndarray, oods: np.ndarray | None, labels, bundle_classes, thresholds) -> list[str]:
    """device.verdict.decide on each row (the device's own policy, not a re-implementation)."""
    from device.verdict import decide

    out = []
    for i, p in enumerate(probs):
        d = decide(p, labels, bundle_classes, thresholds, None if oods is None else float(oods[i]))
        out.append(str(getattr(d.verdict, "value", d.verdict)))
    return out


OOD_PERCENTILE_CANDIDATES = tuple(range(50, 96, 5))


def strictest_ood_percentile(probs, oods, y, labels, bundle_classes, base: dict, opts, fallback: float) -> float:
    """The lowest val percentile for ood_max_score at which, after edible calibration, val edible coverage
    still reaches opts.min_edible_coverage: every unfamiliar-looking photo turned away is one that a species
    missing from training could have been. Falls back to `fallback` if none reaches it."""
    from device.bundle import Thresholds

    poison = poisonous_mask(labels, {lab: {"edibility": bundle_classes[lab].edibility} for lab in labels})
    for p in OOD_PERCENTILE_CANDIDATES:
        th = {**base, "ood_max_score": max(float(np.percentile(oods, p)), 1e-6)}
        edible, _ = calibrate_edible(probs, oods, y, labels, bundle_classes, th, opts.max_poison_edible,
                                     opts.min_edible_confidence)
        if edible is None:
            continue
        final = Thresholds(**{**th, "edible_min_confidence": float(edible)})
        s = safety_figures(verdicts_for(probs, oods, labels, bundle_classes, final), y, poison)
        if s["edible_coverage"] >= opts.min_edible_coverage:
            return float(p)
    return fallback


def calibrate_edible(probs, oods, y, labels, bundle_classes, base: dict, target: float, floor: float):
    """Lowest edible_min_confidence >= floor with poisonous-as-EDIBLE <= target on these photos.

    EDIBLE needs confidence >= the threshold, so raising it only removes EDIBLE answers: the candidates are
    0 and, just above each photo's confidence, the value that turns it away.
    Returns (chosen threshold, calibrated value before the floor), or (None, None) if none <= 1 works.
    """
    from device.bundle import Thresholds

    poison = np.array([bundle_classes[lab].edibility == "poisonous" for lab in labels], dtype=bool)
    conf = probs.max(axis=1)
    candidates = sorted({0.0, *(float(np.nextafter(c, 2.0)) for c in conf)})
    for t in (c for c in candidates if c <= 1.0):
        th = Thresholds(**{**base, "edible_min_confidence": t})
        s = safety_figures(verdicts_for(probs, oods, labels, bundle_classes, th), y, poison)
        if s["poisonous_as_edible"] <= target:
            return max(t, floor), t
    return None, None


# A sample must give its label and verdict on every CPU: the Pi's int8 arithmetic moves a confidence by up
# to ~0.24 on ambiguous photos and the unknown-species score by ~0.02 (README, "Checked on the Pi's
# architecture"), and the emulated Pi's self-test once failed on 2 of 14 samples picked without this
# check. So a sample's top class must lead by SAMPLE_LEAD, and its verdict must stay the same with every
# threshold moved by these bands either way. Near certainty the softmax saturates: a logit shift of d
# moves 1 - p to about (1 - p) e^d, so a photo at 0.999 cannot move by 0.05. The confidence and mass
# bands are therefore at most SAMPLE_SATURATION x the photo's own distance from certainty (1 - top
# probability; its unsafe mass), which covers a logit shift of ln(1 + 2) = 1.1 (the largest shift seen
# between x86-64 and emulated aarch64 was about 0.7, on ambiguous photos). Without it no EDIBLE photo
# could be a sample once the edible bar plus its band passed 1.0, and the self-test never checked EDIBLE.
SAMPLE_LEAD = 0.3
SAMPLE_BANDS = {"confidence": 0.05, "mass": 0.01, "ood": 0.03}
SAMPLE_SATURATION = 2.0


def robust_sample(result, bundle) -> bool:
    """True when `result`'s label and verdict would survive the jitter between CPUs (see SAMPLE_BANDS)."""
    from dataclasses import replace

    from device.verdict import decide

    p = np.sort(np.asarray(result.probs, dtype=np.float64))[::-1]
    if len(p) > 1 and p[0] - p[1] < SAMPLE_LEAD:
        return False
    th, b = bundle.thresholds, SAMPLE_BANDS
    band_conf = min(b["confidence"], SAMPLE_SATURATION * (1.0 - float(p[0])))
    band_mass = min(b["mass"], SAMPLE_SATURATION * float(result.decision.poisonous_mass))
    for sign in (-1.0, 1.0):
        moved = replace(
            th,
            edible_min_confidence=th.edible_min_confidence + sign * band_conf,
            poisonous_min_confidence=th.poisonous_min_confidence + sign * band_conf,
            poisonous_max_mass=th.poisonous_max_mass - sign * band_mass,
            ood_max_score=None if th.ood_max_score is None else th.ood_max_score - sign * b["ood"],
        )
        if decide(result.probs, bundle.labels, bundle.classes, moved, result.ood_score).verdict.value != result.verdict:
            return False
    return True


def write_samples(stage: Path, manifest: Manifest, classifier, k: int, seed: int,
                  k_other: int = 0) -> tuple[list[dict], list[str]]:
    """K small JPEGs per known class that the new bundle classifies correctly (and `k_other` other-pool
    test photos it files under `other`, verdict UNSURE); returns (card entries, warnings).

    Each entry records the verdict the bundle gives the sample: the device's self-test can check it. The
    first sample of an edible species is one the bundle answers EDIBLE when a robust one exists (the
    others are drawn at random), so the self-test checks the EDIBLE path on the device's own CPU too."""
    from PIL import Image

    from device.preprocess import load_image

    split = "test" if manifest.records("test") else "val"
    folder = stage / "samples"
    folder.mkdir()
    entries: list[dict] = []
    notes: list[str] = []
    rng = np.random.default_rng(seed)
    for label in manifest.labels:
        want = k_other if label == OTHER else k
        recs = [r for r in manifest.records(split) if r.label == label]
        rng.shuffle(recs)
        got = 0
        fallback = []  # correct but near a threshold: used only when too few robust ones exist
        edible = want > 0 and label != OTHER and classifier.bundle.classes[label].kind == "edible"
        # For an edible species, the photos the bundle answers EDIBLE (in the same random order) are
        # tried first, for the first slot only; every other slot is drawn from the rest as before.
        first = [r for r in recs if classifier.classify(manifest.abspath(r)).verdict == "EDIBLE"] if edible else []
        tried: set[str] = set()
        for robust_only in (True, False):
            for i, r in enumerate((first + recs) if robust_only else fallback):
                if got >= want:
                    break
                in_first = robust_only and i < len(first)
                if (in_first and got > 0) or (robust_only and not in_first and r.path in tried):
                    continue  # the EDIBLE slot is taken (the rest stay a random draw), or seen already
                if robust_only:
                    tried.add(r.path)
                img = Image.fromarray(load_image(manifest.abspath(r)))
                img.thumbnail((SAMPLE_MAX_SIDE, SAMPLE_MAX_SIDE), Image.LANCZOS)
                name = f"samples/{label}_{got + 1}.jpg"
                img.save(stage / name, "JPEG", quality=SAMPLE_QUALITY)
                result = classifier.classify(stage / name)
                if result.label != label or (label == OTHER and result.verdict != "UNSURE"):
                    (stage / name).unlink()
                    continue
                if robust_only and not robust_sample(result, classifier.bundle):
                    fallback.append(r)
                    (stage / name).unlink()
                    continue
                if in_first and result.verdict != "EDIBLE":
                    (stage / name).unlink()  # its thumbnail is not EDIBLE: not the sample this slot wants
                    continue
                entries.append({"file": name, "label": label, "verdict": result.verdict,
                                "source": f"{split}: {manifest.species(r) + ': ' if label == OTHER else ''}{r.path}"})
                got += 1
                if not robust_only:
                    notes.append(f"sample {name} is near a threshold (no robust {split} photo of {label} left): "
                                 "another CPU may give it another verdict, and fail the self-test there")
        if got < want:
            notes.append(f"only {got} of {want} {split} samples of {label} classify correctly; samples/ has {got}")
    return entries, notes


def _check_out(out: Path) -> None:
    """Refuse early to overwrite something that is not a model bundle."""
    if out.exists():
        if not out.is_dir():
            raise BundleError(f"{out}: exists and is not a directory; choose another --out")
        if any(out.iterdir()) and not (out / "model.json").is_file():
            raise BundleError(f"{out}: exists and is not a model bundle; refusing to replace it (choose another --out)")


def fold_downgrade(card: object, where: Path, opts: ExportOptions, instead: str) -> str | None:
    """Refuse to replace thresholds calibrated on leave-one-species-out folds with ones chosen without them.

    The val species alone let an unseen look-alike through: on the shared pool, `make model` without folds
    chose a point that answered 1/179 known poisonous test photos EDIBLE where the fold-calibrated bundle
    answers 0/179 (docs/training.md), and a user re-running one command would not see the difference.
    Returns the note a forced run records, None when nothing is lost; raises ExportGateError otherwise.
    """
    if opts.loso is not None or not isinstance(card, dict):
        return None
    calibration = card.get("calibration")
    if not isinstance(calibration, dict) or not calibration.get("leave_one_species_out"):
        return None
    message = (f"{where} was calibrated on leave-one-species-out folds too and these thresholds would come from "
               f"the val species alone (less safe on an unseen look-alike); not replaced. Pass --loso FOLDS "
               f"(`make loso` makes them), {instead}")
    if not opts.force:
        raise ExportGateError(message)
    return "forced: " + message


def _card_at(out: Path) -> object:
    """The card of the bundle at `out`, or None when there is none to read (nothing there to protect)."""
    import json

    try:
        return json.loads((out / "model.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def install(stage: Path, out: Path) -> None:
    """Move the complete bundle `stage` to `out`, replacing an old bundle only after the new one is in place."""
    if not out.exists():
        os.rename(stage, out)
        return
    _check_out(out)
    backup = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.rename(out, backup)
    try:
        os.rename(stage, out)
    except BaseException:
        os.rename(backup, out)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def finish_with_samples(stage: Path, out: Path, card: dict, manifest: Manifest, checker, k: int, seed: int,
                        k_other: int) -> list[str]:
    """Samples into the staged bundle (each file in `files` with its sha256), validate, swap into `out`."""
    from device.bundle import load_bundle, sha256_file, write_card

    samples, notes = write_samples(stage, manifest, checker, k, seed, k_other)
    card["samples"] = samples
    # Every file the device reads is listed with its sha256, the samples too.
    for s in samples:
        card["files"][s["file"]] = sha256_file(stage / s["file"])
    write_card(stage, card)
    load_bundle(stage)  # the complete bundle validates before it replaces anything
    os.chmod(stage, 0o777 & ~_umask())  # mkdtemp made it private; a bundle is an ordinary folder
    install(stage, out)
    return notes


def _sample_records(records: list[ImageRecord], n: int, seed: int) -> list[ImageRecord]:
    if n >= len(records):
        return list(records)
    idx = np.sort(np.random.default_rng(seed).choice(len(records), size=n, replace=False))
    return [records[i] for i in idx]


def role_of(info: dict) -> str:
    """A manifest class's role: its `role` (the other pool's class), else its edibility."""
    return str(info.get("role") or info["edibility"])


def float_outputs(model, manifest: Manifest, records: list[ImageRecord], spec, description: str, chunk: int = 256):
    """(logits, embeddings) of the float Keras model, loaded in chunks (thousands of photos would not fit)."""
    from device import preprocess as dp

    logits, embs = [], []
    for i in range(0, len(records), chunk):
        x, _ = load_rgb_arrays(manifest, records[i:i + chunk], spec, console.track, f"{description} {i // chunk + 1}")
        lo, em = model.predict(dp.normalize(x, spec), batch_size=32, verbose=0)
        logits.append(lo)
        embs.append(em)
    if not logits:
        return np.zeros((0, 0)), np.zeros((0, 0))
    return np.concatenate(logits), np.concatenate(embs)


def gate(top1_same: np.ndarray, verdict_same: np.ndarray, new_edible: np.ndarray,
         opts: ExportOptions) -> tuple[dict, str | None]:
    """The int8 gate: the int8 model must give the float model's answers, measured with enough photos.

    A val-only top-1 comparison on a small val set lets one photo refuse a model (one photo of 15 is 6.7
    points). Here, each with >= opts.gate_min_photos photos and a Wilson 95% bound:
    - top1_same: top-1 agreement on photos of KNOWN species not used for quantization calibration
      (lower bound >= min_agreement); other-pool photos are left out because an unseen species sits
      between classes by nature, so its top-1 flips under any perturbation without meaning a broken model;
    - verdict_same: verdict agreement on val + test (lower bound >= min_verdict_agreement);
    - new_edible: among val + test photos the float model does NOT answer EDIBLE, which ones int8 does
      (upper bound <= max_new_edible): the one direction of disagreement that can hurt someone.
    Returns (figures, refusal message or None).
    """
    from train.openworld import rate

    t = rate(int(top1_same.sum()), len(top1_same))
    v = rate(int(verdict_same.sum()), len(verdict_same))
    e = rate(int(new_edible.sum()), len(new_edible))
    figures = {"top1_agreement_known": t, "verdict_agreement": v, "int8_edible_where_float_not": e,
               "min_photos": opts.gate_min_photos, "min_top1_lower_bound": opts.min_agreement,
               "min_verdict_lower_bound": opts.min_verdict_agreement, "max_new_edible_upper_bound": opts.max_new_edible}
    problems = []
    for name, r, limit in (("top-1 (known species)", t, opts.min_agreement), ("verdict", v, opts.min_verdict_agreement)):
        if r["n"] < opts.gate_min_photos:
            problems.append(f"{name} agreement measured on {r['n']} photos, fewer than --gate-min-photos "
                            f"{opts.gate_min_photos}")
        elif r["wilson95"][0] < limit:
            problems.append(f"float and int8 {name} agree on {r['count']}/{r['n']} photos (Wilson 95% lower bound "
                            f"{r['wilson95'][0]:.4f} < {limit})")
    if e["n"] >= opts.gate_min_photos and e["wilson95"][1] > opts.max_new_edible:
        problems.append(f"int8 answers EDIBLE on {e['count']}/{e['n']} photos the float model does not (Wilson 95% "
                        f"upper bound {e['wilson95'][1]:.4f} > {opts.max_new_edible})")
    if not problems:
        return figures, None
    return figures, ("int8 gate: " + "; ".join(problems) + "; bundle not written. Retrain, try more --calibration "
                     "images, add photos, or pass --force")


def open_world_calibration(probs, oods, labels, bundle_classes, g, base, opts: ExportOptions, held=None):
    """The loosest (edible_min_confidence, ood_max_score) with unseen->EDIBLE <= opts.max_unseen_edible and
    poisonous->EDIBLE <= opts.max_poison_edible on val, and (with `held`, the LOSO folds' photos) held-out
    species answered EDIBLE within opts.max_held_edible / max_held_fold_edible, margins 0
    (train.openworld.search)."""
    from dataclasses import replace

    from train import openworld as ow

    edible_labels = np.array([bundle_classes[lab].kind == "edible" for lab in labels])
    conf = probs.max(axis=1)
    conf_grid = np.unique(np.concatenate([[opts.min_edible_confidence],
                                          ow.candidates(conf[conf >= opts.min_edible_confidence], 40)]))
    conf_grid = conf_grid[(conf_grid >= opts.min_edible_confidence) & (conf_grid <= 1.0)]
    ood_grid = None if oods is None else ow.candidates(oods, 80)
    base = replace(base, confidence_margin=0.0, ood_margin=0.0, mass_margin=0.0)
    # The cap on non-edible mass (poisonous + other) is searched too: with an `other` class it is an
    # unknown-species score of its own (p(other) was the best single score on val species).
    mass_grid = sorted({base.poisonous_max_mass, *MASS_GRID})
    best, table = ow.search(probs, oods, edible_labels, g, base, conf_grid, ood_grid, opts.max_unseen_edible,
                            opts.max_poison_edible, mass_grid, held, opts.max_held_edible, opts.max_held_fold_edible,
                            (opts.confidence_margin, opts.ood_margin, opts.mass_margin))
    return best, table, edible_labels


def held_evidence(probs, oods, labels, bundle_classes, g, base, opts: ExportOptions, held, th_final) -> dict:
    """What the LOSO folds say at the chosen point, and an honest estimate of it: leave-one-fold-out (each
    fold measured at thresholds calibrated without it, the same margins added), because the folds used for
    calibration no longer measure the shipped point independently."""
    from dataclasses import replace

    from train import openworld as ow

    edible_labels = np.array([bundle_classes[lab].kind == "edible" for lab in labels])
    out = {"folds": sorted(set(held.fold)), "photos": len(held),
           "target_all": opts.max_held_edible, "target_per_fold": opts.max_held_fold_edible,
           "at_effective": ow.held_figures(ow.held_mask(held, th_final), held),
           "at_raw": ow.held_figures(ow.held_mask(held, replace_th(th_final, 0.0)), held)}
    lofo = []
    for f in out["folds"]:
        rest = held.without(f)
        best, _, _ = open_world_calibration(probs, oods, labels, bundle_classes, g, base, opts, rest)
        one = held.only(f)
        if best is None:
            lofo.append({"held_out": f, "thresholds": None})
            continue
        eff = replace(best, confidence_margin=th_final.confidence_margin, mass_margin=th_final.mass_margin,
                      ood_margin=th_final.ood_margin)
        m = ow.held_mask(one, eff)
        cov = ow.edible_mask(probs, oods, edible_labels, eff) & g.edible
        lofo.append({"held_out": f, "edible_min_confidence": best.edible_min_confidence,
                     "poisonous_max_mass": best.poisonous_max_mass, "ood_max_score": best.ood_max_score,
                     "answered_edible": ow.rate(int(m.sum()), len(m)),
                     "val_edible_coverage": ow.rate(int(cov.sum()), int(g.edible.sum()))})
    k = sum(r["answered_edible"]["count"] for r in lofo if r.get("answered_edible"))
    n = sum(r["answered_edible"]["n"] for r in lofo if r.get("answered_edible"))
    out["leave_one_fold_out"] = {"folds": lofo, "all": ow.rate(k, n)}
    return out


def _load_folds(loso: Path, work: Path):
    """train.loso.load_held on WORK's manifest, and a line saying what was found."""
    import json

    from train.loso import load_held

    held, folds = load_held(Path(loso), json.loads((Path(work) / "manifest.json").read_text()))
    console.note(f"leave-one-species-out evidence: {len(held)} photos of {len(folds)} held-out species "
                 f"({', '.join(f['held_out'] for f in folds)})")
    return held, folds


def choose_open_world(probs_val, oods_val, y_val, manifest: Manifest, val_recs,
                      labels, roles, bundle_classes, thresholds: dict, opts: ExportOptions, held, notes: list):
    """The open-world operating point and the card's `calibration` (export and recalibrate share it).

    Val (and the folds) only: the test split is `evaluate`'s, so whoever exports decides before any test
    figure exists (the card once carried calibration.expected_at_effective.test, written at export).

    Returns (effective Thresholds, calibration dict, raw Thresholds, search table, edible_labels, val Groups).
    """
    from dataclasses import replace

    from device.bundle import Thresholds
    from train import openworld as ow

    kinds_val = np.array([roles[labels[i]] for i in y_val])
    g_val = ow.Groups(kinds_val == "edible", kinds_val == "poisonous", kinds_val == "other")
    best, table, edible_labels = open_world_calibration(
        probs_val, oods_val, labels, bundle_classes, g_val, Thresholds(**thresholds), opts, held)
    if best is None:
        also = (f" and the held-out species of {opts.loso} <= {opts.max_held_edible:.2%} (each "
                f"<= {opts.max_held_fold_edible:.2%})" if held is not None else "")
        message = (f"no thresholds keep val unseen species answered EDIBLE <= {opts.max_unseen_edible:.2%} "
                   f"and poisonous <= {opts.max_poison_edible:.2%}{also}; bundle not written. Retrain, or pass "
                   "--force (the bundle then demands confidence 1.0 for EDIBLE)")
        if not opts.force:
            raise ExportGateError(message)
        notes.append("forced: " + message)
        best = Thresholds(**{**thresholds, "edible_min_confidence": 1.0,
                             "ood_max_score": None if oods_val is None else float(np.max(oods_val))})
    raw = best
    ow.check_mirror(probs_val, oods_val, labels, bundle_classes, raw,
                    ow.edible_mask(probs_val, oods_val, edible_labels, raw))
    th_final = replace(raw, confidence_margin=opts.confidence_margin, mass_margin=opts.mass_margin,
                       ood_margin=opts.ood_margin if raw.ood_max_score is not None else 0.0)
    val_species = [manifest.species(r) for r in val_recs]
    raw_fig = ow.figures(ow.edible_mask(probs_val, oods_val, edible_labels, raw), g_val, val_species)
    eff_mask = ow.edible_mask(probs_val, oods_val, edible_labels, th_final)
    ow.check_mirror(probs_val, oods_val, labels, bundle_classes, th_final, eff_mask)
    eff_fig = ow.figures(eff_mask, g_val, val_species)
    if g_val.edible.any() and not (eff_mask & g_val.edible).any():
        # A bundle that can never answer EDIBLE is safe but useless; say so instead of shipping it
        # quietly (seen: calibrated confidence 0.988 + margin 0.02 is a bar above 1).
        notes.append(
            f"no val edible photo is EDIBLE at the effective thresholds (edible_min_confidence "
            f"{raw.edible_min_confidence:.3f} + margin {th_final.confidence_margin:g}, mass cap "
            f"{raw.poisonous_max_mass:g} - {th_final.mass_margin:g}): this bundle will practically never "
            "answer EDIBLE; retrain, add val photos, or lower the margins if they were not measured")
    calibration = {
        "method": ("open world: the loosest (edible_min_confidence, poisonous_max_mass, ood_max_score) "
                   "on a grid of observed val values with val unseen-species->EDIBLE <= target and known "
                   "poisonous->EDIBLE <= target (margins 0; most val edible coverage at the effective thresholds, ties to the "
                   "stricter); then the cross-architecture margins are added"),
        "split": "val",
        "unseen_species": manifest.other_species("val"),
        "photos": {"edible": int(g_val.edible.sum()), "poisonous": int(g_val.poisonous.sum()),
                   "unseen": int(g_val.unseen.sum())},
        "target_unseen_as_edible": opts.max_unseen_edible,
        "target_poisonous_as_edible": opts.max_poison_edible,
        "edible_confidence_floor": opts.min_edible_confidence,
        "grid": {"edible_min_confidence": len(set(r[0] for r in table)),
                 "ood_max_score": len(set(r[1] for r in table)),
                 "poisonous_max_mass": sorted(set(r[5] for r in table))},
        "raw": {"edible_min_confidence": raw.edible_min_confidence, "ood_max_score": raw.ood_max_score,
                "poisonous_max_mass": raw.poisonous_max_mass, "val": raw_fig},
        "margins": {"confidence_margin": th_final.confidence_margin, "ood_margin": th_final.ood_margin,
                    "mass_margin": th_final.mass_margin,
                    "why": opts.margins_why},
        "expected_at_effective": {"val": eff_fig},
    }
    if held is not None:
        calibration["method"] += ("; the leave-one-species-out folds' photos (each poisonous species "
                                  "measured by a fit without it) are more unseen species: all of them "
                                  "answered EDIBLE <= target_all and each fold <= target_per_fold")
        calibration["leave_one_species_out"] = held_evidence(
            probs_val, oods_val, labels, bundle_classes, g_val, Thresholds(**thresholds), opts, held, th_final)
        # What each share of held-out species answered EDIBLE costs in val coverage (raw thresholds, the
        # val targets met): the curve that says how far this model is from the per-species target.
        calibration["leave_one_species_out"]["frontier"] = [
            {"edible_min_confidence": r[0], "ood_max_score": r[1], "poisonous_max_mass": r[5],
             "val_edible_coverage": round(r[2], 5), "held_as_edible": round(r[3], 5)}
            for r in ow.held_frontier(table, opts.max_unseen_edible, opts.max_poison_edible)]
    return th_final, calibration, raw, table, edible_labels, g_val


def export(work: Path, opts: ExportOptions) -> ExportResult:
    """Convert, gate, calibrate and write the bundle to opts.out (see the module docstring)."""
    from device.bundle import Thresholds, load_bundle, sha256_file, write_card
    from device.classifier import Classifier
    from device.engine import load_engine
    from device.ood import fit_knn, fit_ood, load_ood
    from device.verdict import softmax
    from train import openworld as ow

    t0 = time.perf_counter()
    work, out = Path(work), Path(opts.out).absolute()
    _check_out(out)
    # Before the conversion (minutes): refuse now rather than after the work.
    forced_fold_note = fold_downgrade(_card_at(out), out, opts, "write to another --out, or --force")
    if opts.calibration < 1:
        raise DataError("--calibration must be >= 1")
    manifest = Manifest.load(work)
    info = load_fit_info(work)
    if info.get("labels") != manifest.labels:
        raise DataError(f"{work}: the manifest's classes changed since fit; re-run mushcam-train fit")
    spec = get_spec(info["backbone"])
    size = int(info["input"]["size"][0])
    float_spec = training_input_spec(spec, size)
    labels, n = manifest.labels, len(manifest.labels)
    seed = int(info["hparams"].get("seed", 0))
    train_recs, val_recs, test_recs = manifest.records("train"), manifest.records("val"), manifest.records("test")
    if not val_recs:
        raise DataError(f"{work}: no validation images to check the int8 model on; re-run prepare with --val > 0")
    roles = {lab: role_of(manifest.classes[lab]) for lab in labels}
    other_index = labels.index(OTHER) if roles.get(OTHER) == "other" else None
    open_world = other_index is not None and any(r.label == OTHER for r in val_recs)
    held = loso_folds = None
    if opts.loso is not None:
        if not open_world:
            raise DataError("--loso needs an open-world manifest (prepare --other): the folds add to its unseen species")
        held, loso_folds = _load_folds(opts.loso, work)

    from train._tf import import_keras

    tf, keras = import_keras()
    model = keras.models.load_model(work / MODEL_FILE, compile=False)

    calib_recs = _sample_records(train_recs, opts.calibration, seed)
    x_cal, _ = load_rgb_arrays(manifest, calib_recs, float_spec, console.track, "calibration images")
    console.note(f"converting to int8 (calibrating on {len(x_cal)} training images)")
    tflite = convert_int8(model, x_cal, float_spec)
    del x_cal

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (stage / "model.tflite").write_bytes(tflite)
        input_q, outputs = read_quantization(stage / "model.tflite", n)
        if input_q["dtype"] != "int8":
            raise BundleError(f"the converter produced a {input_q['dtype']} input, expected int8")
        classes = manifest.classes
        defaults = Thresholds()
        thresholds = {
            "edible_min_confidence": defaults.edible_min_confidence,
            "poisonous_max_mass": defaults.poisonous_max_mass,
            "poisonous_min_confidence": defaults.poisonous_min_confidence,
        }
        created = datetime.now(timezone.utc)
        card = {
            "format": "mushcam-bundle/1",
            "name": opts.name or f"mushcam-{spec.name.replace('_', '')}-{n}sp",
            "version": opts.version or created.strftime("%Y.%m.%d-%H%M"),
            "created": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "labels": labels,
            "classes": {lab: {"edibility": classes[lab]["edibility"], "role": roles[lab],
                              "display_name": classes[lab]["display_name"]} for lab in labels},
            "input": {**spec.input_dict(size), **input_q},
            "outputs": outputs,
            "thresholds": dict(thresholds),
            "files": {"model.tflite": sha256_file(stage / "model.tflite")},
        }
        write_card(stage, card)
        bundle = load_bundle(stage)
        recorder = _Recorder(load_engine(bundle, "cpu", opts.threads))
        classifier = Classifier(bundle, engine=recorder)

        # int8 through the device: train for the index, val to calibrate, test only for the float/int8 agreement
        # gate (agreement, never accuracy: how well the model does on test is evaluate's to say).
        y_val = np.array([manifest.label_index(r) for r in val_recs])
        y_train = np.array([manifest.label_index(r) for r in train_recs])
        lg_val: list = []
        probs_val, emb_val, _ = device_scores(classifier, recorder, [manifest.abspath(r) for r in val_recs],
                                              "int8 val (device)", lg_val)
        probs_test, emb_test, _ = (device_scores(classifier, recorder, [manifest.abspath(r) for r in test_recs],
                                                 "int8 test (device)") if test_recs else (None, None, None))
        int8_top1 = float(np.mean(np.argmax(probs_val, axis=1) == y_val))
        notes: list[str] = [forced_fold_note] if forced_fold_note else []

        # Float Keras on every photo not used for quantization calibration: the gate's sample.
        calib_paths = {r.path for r in calib_recs}
        rest_train = [r for r in train_recs if r.path not in calib_paths]
        f_logits, f_emb = float_outputs(model, manifest, val_recs + test_recs + rest_train, float_spec, "float")
        nv, nt = len(val_recs), len(test_recs)
        float_top1 = float(np.mean(np.argmax(f_logits[:nv], axis=1) == y_val))
        console.note(f"val top-1: float {float_top1:.4f}, int8 {int8_top1:.4f}")

        # Unknown-species score: kNN index on int8 train embeddings (other-pool ones as negatives).
        ood_section = None
        oods_val = oods_test = None
        emb_rest = None
        scorer = None
        if "embedding" in outputs:
            _, emb_train, _ = device_scores(classifier, recorder, [manifest.abspath(r) for r in train_recs],
                                            "int8 train (device)")
            known_tr = y_train != (other_index if other_index is not None else -1)
            negatives = emb_train[~known_tr] if (other_index is not None and opts.ood_negatives
                                                 and (~known_tr).sum() >= opts.ood_k) else None
            if opts.ood_method == "knn":
                params = fit_knn(emb_train[known_tr], k=opts.ood_k, negatives=negatives, dims=opts.ood_dims,
                                 int8=opts.ood_int8)
                detail = {"k": opts.ood_k, "known": int(known_tr.sum()),
                          "negatives": 0 if negatives is None else int(len(negatives)),
                          "dims": int(np.asarray(params["projection"]).shape[1]) if "projection" in params else None,
                          "dtype": "int8" if opts.ood_int8 else "float16",
                          "score": "d_known / (d_known + d_other)" if negatives is not None else "d_known"}
            else:
                params = fit_ood(emb_train[known_tr], y_train[known_tr], n, dims=OOD_DIMS)
                detail = {"dims": int(np.asarray(params["components"]).shape[1])}
            np.savez(stage / "ood.npz", **params)
            scorer = load_ood(stage / "ood.npz")
            oods_val = np.array([scorer.score(e) for e in emb_val])
            oods_test = np.array([scorer.score(e) for e in emb_test]) if nt else None
            ood_section = {"method": opts.ood_method, "file": "ood.npz", **detail}

        # Calibration.
        th_final: Thresholds
        calibration: dict
        if open_world:
            th_final, calibration, raw, table, edible_labels, g_val = choose_open_world(
                probs_val, oods_val, y_val, manifest, val_recs, labels, roles,
                bundle.classes, thresholds, opts, held, notes)
            thresholds = {k: v for k, v in th_final.__dict__.items()}
            write_loso_curve(work, calibration)
            _open_world_evidence(work, manifest, labels, roles, edible_labels, probs_val, oods_val, lg_val, emb_val,
                                 emb_train, known_tr, scorer, g_val, table, raw, th_final, opts)
        else:
            calibration = _closed_world_calibration(probs_val, oods_val, y_val, labels, bundle, thresholds, opts,
                                                    notes, ood_section)
            th_final = Thresholds(**thresholds)
        val_safety = safety_figures(
            verdicts_for(probs_val, oods_val, labels, bundle.classes, th_final), y_val, poisonous_mask(labels, classes)
        )

        # Gate: float vs int8 over every photo not used for quantization calibration.
        int8_rest = None
        if rest_train:
            probs_rest, emb_rest, _ = device_scores(classifier, recorder, [manifest.abspath(r) for r in rest_train],
                                                    "int8 rest of train (device)")
            int8_rest = probs_rest
        int8_all = np.concatenate([probs_val] + ([probs_test] if nt else []) + ([int8_rest] if int8_rest is not None else []))
        gate_labels = np.array([manifest.label_index(r) for r in val_recs + test_recs + rest_train])
        known_gate = gate_labels != (other_index if other_index is not None else -1)
        top1_same_all = np.argmax(f_logits, axis=1) == np.argmax(int8_all, axis=1)
        top1_same = top1_same_all[known_gate]
        # Verdicts on val + test only: train photos are in the kNN index, their score is ~0 either way.
        nvt = nv + nt
        f_probs = np.stack([softmax(z) for z in f_logits[:nvt]])
        f_oods = None if scorer is None else np.array([scorer.score(e) for e in f_emb[:nvt]])
        i_oods = None if oods_val is None else np.concatenate([oods_val] + ([oods_test] if nt else []))
        v_float = verdicts_for(f_probs, f_oods, labels, bundle.classes, th_final)
        v_int8 = verdicts_for(int8_all[:nvt], i_oods, labels, bundle.classes, th_final)
        verdict_same = np.array([a == b for a, b in zip(v_float, v_int8)])
        new_edible = np.array([b == "EDIBLE" for a, b in zip(v_float, v_int8) if a != "EDIBLE"])
        gate_fig, refusal = gate(top1_same, verdict_same, new_edible, opts)
        gate_fig["top1_agreement_all"] = ow.rate(int(top1_same_all.sum()), len(top1_same_all))
        gate_fig["float_edible_int8_not"] = int(sum(a == "EDIBLE" and b != "EDIBLE" for a, b in zip(v_float, v_int8)))
        pairs: dict[str, int] = {}
        for a, b in zip(v_float, v_int8):
            if a != b:
                pairs[f"{a}->{b}"] = pairs.get(f"{a}->{b}", 0) + 1
        gate_fig["verdict_changes_float_to_int8"] = pairs
        (Path(work) / "openworld").mkdir(exist_ok=True)
        import json as _json

        (Path(work) / "openworld" / "int8_gate.json").write_text(_json.dumps(gate_fig, indent=2) + "\n")
        ta, va = gate_fig["top1_agreement_known"], gate_fig["verdict_agreement"]
        console.note(f"int8 gate: top-1 (known species) agrees on {ta['count']}/{ta['n']}, verdict on "
                     f"{va['count']}/{va['n']}, int8 EDIBLE where float not {new_edible.sum()}/{len(new_edible)}")
        if refusal:
            if not opts.force:
                raise ExportGateError(refusal)
            notes.append("forced: " + refusal)

        # Files, card, then samples checked with the final bundle.
        files = {"model.tflite": card["files"]["model.tflite"]}
        if ood_section:
            files["ood.npz"] = sha256_file(stage / "ood.npz")
            card["ood"] = ood_section
        card.update({
            "thresholds": thresholds,
            "files": files,
            "metrics": {
                "float_top1": float_top1,
                "int8_top1": int8_top1,
                "model_bytes": (stage / "model.tflite").stat().st_size,
                "ood_bytes": (stage / "ood.npz").stat().st_size if ood_section else None,
                "fit_seconds": (info.get("seconds") or {}).get("total"),
                "val": {"top1": int8_top1, "float_top1": float_top1, **val_safety},
                "int8_gate": gate_fig,
            },
            "calibration": {**calibration, "quantization_images": len(calib_recs)},
            "training": {
                "backbone": spec.name,
                "alpha": info["hparams"].get("alpha"),
                "size": size,
                "weights": info.get("weights"),
                "seed": seed,
                "hparams": info["hparams"],
                "images": info.get("counts"),
                "best": info.get("best"),
                "manifest_sha256": sha256_of(work / "manifest.json"),
                "split_sha256": split_sha256(work / "manifest.json"),
                "versions": info.get("versions"),
            },
        })
        if loso_folds is not None:
            from train.loso import card_section

            # The folds' own figures (each at its own thresholds), as `loso --record` writes them.
            card["metrics"]["leave_one_species_out"] = card_section(loso_folds, {"method": opts.ood_method})
        write_card(stage, card)
        bundle = load_bundle(stage)
        checker = Classifier(bundle, backend="cpu", threads=opts.threads)
        notes += finish_with_samples(stage, out, card, manifest, checker, opts.samples, seed,
                                     opts.other_samples if other_index is not None else 0)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    final = load_bundle(out)
    for w in notes:
        console.warn(w)
    return ExportResult(final.path, float_top1, int8_top1, thresholds, val_safety, time.perf_counter() - t0, notes,
                        card.get("calibration"), card["metrics"]["int8_gate"])


def _closed_world_calibration(probs_val, oods_val, y_val, labels, bundle, thresholds: dict, opts, notes,
                              ood_section) -> dict:
    """Without an other pool: ood_max_score from a val percentile, edible_min_confidence from poisonous val."""
    percentile = opts.ood_percentile
    if oods_val is not None:
        if opts.min_edible_coverage is not None:
            percentile = strictest_ood_percentile(
                probs_val, oods_val, y_val, labels, bundle.classes, thresholds, opts, percentile)
            notes.append(f"ood percentile {percentile:g}: the strictest keeping val edible coverage >= "
                         f"{opts.min_edible_coverage:.0%}")
        thresholds["ood_max_score"] = max(float(np.percentile(oods_val, percentile)), 1e-6)
        from device.bundle import OOD_SCORE_CEILING

        ceiling = OOD_SCORE_CEILING.get(opts.ood_method)
        if ceiling is not None and thresholds["ood_max_score"] >= ceiling:
            # The device refuses a threshold at its ceiling (that check could never say no). Val scores this
            # high mean the embeddings do not separate anything: keep the bundle strict, and say so.
            thresholds["ood_max_score"] = float(np.nextafter(ceiling, 0.0))
            notes.append(f"the val unknown-species scores reach {ceiling:g} (the score's ceiling): the index does not "
                         "tell familiar photos from others; ood_max_score set just under it")
        ood_section["percentile"] = percentile
    edible, calibrated = calibrate_edible(
        probs_val, oods_val, y_val, labels, bundle.classes, thresholds, opts.max_poison_edible, opts.min_edible_confidence
    )
    if edible is None:
        message = (
            f"no edible_min_confidence <= 1 keeps poisonous val photos answered EDIBLE <= {opts.max_poison_edible:.2%} "
            "(the model is confidently wrong on a poisonous photo); bundle not written. Retrain, or pass --force "
            "(the bundle then demands confidence 1.0 for EDIBLE)"
        )
        if not opts.force:
            raise ExportGateError(message)
        notes.append("forced: " + message)
        edible = 1.0
    thresholds["edible_min_confidence"] = float(edible)
    if opts.confidence_margin or (opts.ood_margin and "ood_max_score" in thresholds):
        thresholds["confidence_margin"] = float(opts.confidence_margin)
        if "ood_max_score" in thresholds:
            thresholds["ood_margin"] = float(opts.ood_margin)
    return {
        "method": "closed world (no other pool): ood_max_score = a val percentile, edible_min_confidence = the "
                  "lowest keeping poisonous val photos answered EDIBLE <= target",
        "split": "val",
        "ood_max_score": {"percentile": percentile, "min_edible_coverage": opts.min_edible_coverage,
                          "photos": len(y_val)} if oods_val is not None else None,
        "edible_min_confidence": {
            "target_poisonous_as_edible": opts.max_poison_edible,
            "floor": opts.min_edible_confidence,
            "calibrated": calibrated,
            "chosen": float(edible),
        },
    }


def _open_world_evidence(work, manifest, labels, roles, edible_labels, probs_val, oods_val, lg_val, emb_val,
                         emb_train, known_tr, scorer, g_val, table, raw, th_final, opts):
    """WORK/openworld/: the score comparison on val species (compare.json/.md, compare.png) and the
    risk-coverage curve of the shipped policy on val (risk_coverage.csv/.png). Val only: the test curve is
    `evaluate`'s (its --report), read after the bundle is chosen."""
    import json

    from train import openworld as ow

    folder = Path(work) / "openworld"
    folder.mkdir(parents=True, exist_ok=True)
    other_index = labels.index(OTHER) if OTHER in labels else None
    # The per-photo tables (device path), so other operating points can be studied without re-running it.
    np.savez(folder / "tables.npz", probs_val=probs_val, oods_val=oods_val if oods_val is not None else np.array([]),
             logits_val=np.stack(lg_val),
             kinds_val=np.array(["other" if u else "poisonous" if pz else "edible"
                                 for u, pz in zip(g_val.unseen, g_val.poisonous)]),
             species_val=np.array([manifest.species(r) for r in manifest.records("val")]),
             labels=np.array(labels))
    rows = []
    if emb_val is not None:
        kn = emb_train[known_tr]
        kn = kn / (np.linalg.norm(kn, axis=1, keepdims=True) + 1e-12)
        ev = emb_val / (np.linalg.norm(emb_val, axis=1, keepdims=True) + 1e-12)
        d_full = 1.0 - (ev @ kn.T).max(axis=1)
        dk, do = zip(*(scorer.distances(e) for e in emb_val)) if hasattr(scorer, "distances") else ((), ())
        do = None if not do or do[0] is None else np.array(do)
        scores = ow.candidate_scores(probs_val, np.stack(lg_val), d_full, np.array(dk) if dk else d_full, do,
                                     edible_labels | np.array([roles[lab] == "poisonous" for lab in labels]),
                                     other_index)
        rows = ow.compare(scores, probs_val, edible_labels, g_val)
        # The device policy: confidence AND the shipped ood score, both thresholds searched (2-D).
        for t in (0.01, 0.02):
            best, _ = ow.search(probs_val, oods_val, edible_labels, g_val, replace_th(raw, 0.0),
                                sorted({r[0] for r in table}), sorted({r[1] for r in table if r[1] is not None}), t,
                                opts.max_poison_edible, sorted({r[5] for r in table}))
            cov = 0.0 if best is None else float((ow.edible_mask(probs_val, oods_val, edible_labels, best) & g_val.edible).sum() / max(1, g_val.edible.sum()))
            name = f"policy: confidence + mass + {('knn ratio' if do is not None else 'knn')} (3-D)"
            row = next((r for r in rows if r["score"] == name), None)
            if row is None:
                row = {"score": name, "auroc_unseen_vs_edible": float("nan")}
                rows.append(row)
            row[f"coverage_at_unseen_{t:g}"] = cov
        curves = {}
        for name, s in scores.items():
            top_edible = edible_labels[probs_val.argmax(axis=1)]
            pts = []
            for thr in ow.candidates(s, 200):
                m = top_edible & (s <= thr)
                pts.append((0.0, float(thr), float((m & g_val.edible).sum() / max(1, g_val.edible.sum())),
                            float((m & g_val.unseen).sum() / max(1, g_val.unseen.sum())), 0.0))
            curves[name] = ow.frontier(pts)
        curves["policy (confidence + mass + ood)"] = ow.frontier(table)
        ow.write_curve(curves, folder / "compare.csv", folder / "compare.png",
                       f"unknown-species scores on {int(g_val.unseen.sum())} val photos of "
                       f"{len(manifest.other_species('val'))} unseen species")
    (folder / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| score | AUROC unseen vs edible | coverage at unseen->EDIBLE <= 1% | at <= 2% |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['score']} | {r['auroc_unseen_vs_edible']:.3f} | {r.get('coverage_at_unseen_0.01', 0):.1%} | "
                     f"{r.get('coverage_at_unseen_0.02', 0):.1%} |")
    (folder / "compare.md").write_text("\n".join(lines) + "\n")
    # Risk-coverage curve of the shipped policy on val, where the thresholds were chosen.
    curves = {"val (calibration)": ow.frontier(table)}
    marks = {}
    m = ow.edible_mask(probs_val, oods_val, edible_labels, th_final)
    marks["shipped, val"] = (float((m & g_val.unseen).sum() / max(1, g_val.unseen.sum())),
                             float((m & g_val.edible).sum() / max(1, g_val.edible.sum())))
    ow.write_curve(curves, folder / "risk_coverage.csv", folder / "risk_coverage.png",
                   "shipped policy: thresholds moved on the grid (frontier)", marks)
    console.note(f"open-world evidence: {folder}")


def replace_th(th, margin: float):
    from dataclasses import replace

    return replace(th, confidence_margin=margin, ood_margin=margin, mass_margin=margin)


def write_loso_curve(work: Path, calibration: dict) -> Path | None:
    """WORK/openworld/loso_risk_coverage.{csv,png}: val coverage against the share of held-out species
    answered EDIBLE (the frontier in calibration.leave_one_species_out), the chosen raw point marked."""
    from train import openworld as ow

    lo = calibration.get("leave_one_species_out")
    if not lo or not lo.get("frontier"):
        return None
    rows = [(f["edible_min_confidence"], f["ood_max_score"], f["val_edible_coverage"], f["held_as_edible"], 0.0,
             f["poisonous_max_mass"]) for f in lo["frontier"]]
    folder = Path(work) / "openworld"
    folder.mkdir(parents=True, exist_ok=True)
    raw_cov = calibration["raw"]["val"]["edible_coverage"]["rate"]
    png = folder / "loso_risk_coverage.png"
    ow.write_curve({"leave-one-species-out folds (val targets met)": rows}, folder / "loso_risk_coverage.csv", png,
                   "held-out poisonous species answered EDIBLE vs val coverage (raw thresholds)",
                   {"chosen (raw)": (lo["at_raw"]["all"]["rate"], raw_cov)},
                   xmax=max(6.0, 100 * max(r[3] for r in rows) * 1.05),
                   xlabel="held-out poisonous species answered EDIBLE (%)")
    return png


# Card figures that depend on the thresholds and that recalibrate cannot measure again itself (evaluate
# --record and evaluate --arch aarch64 --record write them for the new thresholds).
STALE_AFTER_RECALIBRATION = ("test", "test_aarch64")


def recalibrate(bundle_path: Path, work: Path, opts: ExportOptions) -> dict:
    """Choose an existing bundle's thresholds again, with export's open-world search, without its Keras model.

    The operating point is a property of the evidence, not only of the model: when new evidence arrives
    (leave-one-species-out folds, `opts.loso`) the shipped model should not need a refit to use it, and a
    refit is not reproducible across machines. Val and test photos go through the bundle itself
    (device.classifier). WORK must be the split the bundle was trained and calibrated on (same labels,
    split sizes and val species). The cross-architecture margins stay the card's own (they are measured
    properties of the CPUs, not of this search). Samples are chosen again (their recorded verdicts depend
    on the thresholds). Written like export: a staged copy, validated, then swapped in; the old card's
    calibration is kept under calibration.previous.
    """
    import json

    from device.bundle import Thresholds, load_bundle, write_card
    from device.classifier import Classifier

    bundle_path, work = Path(bundle_path), Path(work)
    b = load_bundle(bundle_path)
    card = json.loads((bundle_path / "model.json").read_text(encoding="utf-8"))
    manifest = Manifest.load(work)
    labels = list(b.labels)
    if manifest.labels != labels:
        raise DataError(f"{work} has classes {manifest.labels}, {bundle_path} {labels}: not the split it was trained on")
    sizes = {s: len(manifest.records(s)) for s in ("train", "val", "test")}
    old_cal = card.get("calibration") or {}
    trained = (card.get("training") or {}).get("images")
    if (trained and {k: trained.get(k) for k in sizes} != sizes) or (
            old_cal.get("unseen_species") and old_cal["unseen_species"] != manifest.other_species("val")):
        raise DataError(f"{work} is not the split {bundle_path} was trained and calibrated on (split sizes "
                        f"{sizes} vs {trained}, or other val species differ); recalibrate with that WORK dir")
    roles = {lab: b.classes[lab].kind for lab in labels}
    if OTHER not in roles or roles[OTHER] != "other" or not manifest.other_species("val"):
        raise DataError(f"{bundle_path}: recalibrate needs an open-world bundle and split (prepare --other)")
    if not opts.keep_thresholds:
        fold_downgrade(card, bundle_path, opts, "or --keep-thresholds")
    th_now = b.thresholds
    opts.confidence_margin, opts.ood_margin, opts.mass_margin = (
        th_now.confidence_margin, th_now.ood_margin, th_now.mass_margin)
    opts.margins_why = (old_cal.get("margins") or {}).get("why", opts.margins_why)
    held = loso_folds = None
    if opts.loso is not None:
        held, loso_folds = _load_folds(opts.loso, work)
    classifier = Classifier(b, backend="cpu", threads=opts.threads)
    val_recs = manifest.records("val")

    def scores(recs, what):
        probs, oods = [], []
        for r in console.track(recs, what):
            pr, ood = classifier.scores(manifest.abspath(r))
            probs.append(pr)
            oods.append(np.nan if ood is None else ood)
        return np.array(probs), (np.array(oods) if card.get("ood") else None)

    probs_val, oods_val = scores(val_recs, "val (device)")
    y_val = np.array([manifest.label_index(r) for r in val_recs])
    base = {"edible_min_confidence": Thresholds().edible_min_confidence,
            "poisonous_max_mass": Thresholds().poisonous_max_mass,
            "poisonous_min_confidence": th_now.poisonous_min_confidence}
    notes: list[str] = []
    if opts.keep_thresholds:
        # The operating point stays; what changes is the evidence about it (folds fitted again, which
        # did not choose it) and the samples. The figures measured at these thresholds stay valid.
        from dataclasses import replace

        from train import openworld as ow

        th_final, raw = th_now, replace(th_now, confidence_margin=0.0, ood_margin=0.0, mass_margin=0.0)
        calibration = dict(old_cal)
        if held is not None:
            calibration["folds_refitted"] = {
                "why": "leave-one-species-out folds fitted again; these thresholds were not chosen on them",
                "folds": sorted(set(held.fold)), "photos": len(held),
                "at_effective": ow.held_figures(ow.held_mask(held, th_final), held),
                "at_raw": ow.held_figures(ow.held_mask(held, raw), held)}
        stale: tuple[str, ...] = ()
    else:
        th_final, calibration, raw, _, _, _ = choose_open_world(
            probs_val, oods_val, y_val, manifest, val_recs, labels, roles,
            b.classes, base, opts, held, notes)
        calibration["quantization_images"] = old_cal.get("quantization_images")
        calibration["previous"] = {k: old_cal.get(k) for k in ("method", "raw", "expected_at_effective")}
        stale = STALE_AFTER_RECALIBRATION
    curve = None if opts.keep_thresholds else write_loso_curve(work, calibration)
    if curve:
        console.note(f"leave-one-species-out risk-coverage curve: {curve}")
    now = datetime.now(timezone.utc)
    old_version = card.get("version")
    if opts.keep_thresholds:
        calibration["samples_rechosen"] = {"time": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "version_before": old_version}
    else:
        calibration["recalibrated"] = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        calibration["previous"]["version"] = old_version
    # A new version: another card is another release. With the old version (and the same model file)
    # a device would name both cards alike, and flash.sh could not tell which one it serves.
    if opts.version == old_version:
        raise DataError(f"--version {opts.version} is the bundle's own version; a recalibrated bundle needs a new one")
    # Export's date-and-time version, with seconds when the bundle was made within the same minute.
    card["version"] = opts.version or next(v for v in (now.strftime("%Y.%m.%d-%H%M"), now.strftime(
        "%Y.%m.%d-%H%M%S"), f"{old_version}-1") if v != old_version)
    card["thresholds"] = dict(th_final.__dict__)
    card["calibration"] = calibration
    metrics = card.setdefault("metrics", {})
    metrics["val"] = {**(metrics.get("val") or {}), **safety_figures(
        verdicts_for(probs_val, oods_val, labels, b.classes, th_final), y_val, poisonous_mask(labels, manifest.classes))}
    for k in stale:
        metrics.pop(k, None)
    if "int8_gate" in metrics and not opts.keep_thresholds:
        # Its top-1 agreement does not depend on the thresholds; its verdict figures were measured at the
        # export's (needs the float model, which a bundle does not carry).
        metrics["int8_gate"]["verdicts_measured_at"] = (old_cal.get("raw") or {}) | {"margins": old_cal.get("margins")}
    if loso_folds is not None:
        from train.loso import card_section

        metrics["leave_one_species_out"] = card_section(loso_folds, {"method": (card.get("ood") or {}).get("method")})
    out = bundle_path.absolute()
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        # The bytes load_bundle verified against the card, not the files again (they may have changed since).
        for name in (f for f in card["files"] if not f.startswith("samples/")):
            (stage / name).write_bytes(b.data[name])
        card["files"] = {k: v for k, v in card["files"].items() if not k.startswith("samples/")}
        card.pop("samples", None)
        write_card(stage, card)
        checker = Classifier(load_bundle(stage), backend="cpu", threads=opts.threads)
        seed = int((card.get("training") or {}).get("seed") or 0)
        k = max(1, sum(1 for s in b.card.get("samples", []) if s["label"] != OTHER) // max(1, len(labels) - 1))
        k_other = sum(1 for s in b.card.get("samples", []) if s["label"] == OTHER)
        if (out / "model.json.sig").exists():
            notes.append(f"{out / 'model.json.sig'} no longer matches the new card and was left out: sign the bundle again")
        notes += finish_with_samples(stage, out, card, manifest, checker, k, seed, k_other)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    for w in notes:
        console.warn(w)
    return {"thresholds": card["thresholds"], "calibration": calibration, "raw": raw.__dict__,
            "stale": list(stale), "version": card["version"]}
