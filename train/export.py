"""`export`: WORK/model.keras -> a validated int8 model bundle (docs/model-bundle.md), or nothing at all.

1. Full-integer post-training quantization (TFLiteConverter.from_keras_model, TFLITE_BUILTINS_INT8, int8
   input and outputs), calibrated on N training images put through the device's own preprocessing.
   Both outputs stay raw: `logits` (the device applies softmax in float; a quantized softmax saturates,
   measured here at 1.0 on a wrong label) and `embedding`.
2. The card's `input`/`outputs` quantization is read back from the converted model with the device's
   interpreter, never assumed.
3. Gate: the float Keras model and the int8 model (run by device.classifier, i.e. device preprocessing and
   the device interpreter) are compared on the val split; a top-1 drop above --max-drop points refuses
   the export (ExportGateError) unless --force.
4. Unknown-species data: device.ood.fit_ood on the int8 embeddings of the train split -> ood.npz.
5. Thresholds, calibrated on val with device.verdict.decide itself:
   - `ood_max_score` = the 95th percentile of the val photos' scores (all val photos are known species,
     so about 5% of familiar photos are answered UNSURE for looking unfamiliar);
   - `edible_min_confidence` = the lowest threshold (most edible coverage) at which the fraction of
     poisonous val photos answered EDIBLE stays <= --max-poison-edible (default 0.5%), but never below
     --min-edible-confidence (default 0.9): a few hundred val photos are thin evidence, so the floor
     keeps a margin. If no threshold <= 1 meets the target, the export is refused unless --force.
6. samples/: K photos per class from the test split (else val), longest side <= 320 px, JPEG q85, each
   checked to classify as its label with the new bundle (so `mushcam selftest` passes on the device).
7. Everything is written into a temp dir beside BUNDLE, validated with device.bundle.load_bundle, then
   renamed into place; an existing BUNDLE is replaced only once the new one is complete (old -> backup,
   new -> BUNDLE, backup removed).
"""

from __future__ import annotations

import math
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
from train.dataset import ImageRecord, Manifest, load_rgb_arrays, sha256_of
from train.fit import MODEL_FILE, load_fit_info, training_input_spec
from train.metrics import poisonous_mask, safety_figures
from train.model_spec import get_spec

OOD_PERCENTILE = 95.0
OOD_DIMS = 64
SAMPLE_MAX_SIDE = 320
SAMPLE_QUALITY = 85


@dataclass
class ExportOptions:
    """Settings of one export (the CLI's options)."""

    out: Path
    calibration: int = 400
    max_drop: float = 1.0  # top-1 points
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


def device_scores(classifier, recorder: _Recorder, paths: list[Path], description: str):
    """(probs (n, k), embeddings (n, d) or None, ood scores or None) of files, via device.classifier."""
    probs, embs, oods = [], [], []
    for p in console.track(paths, description):
        pr, ood = classifier.scores(p)
        probs.append(pr)
        embs.append(recorder.last.embedding)
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


def write_samples(stage: Path, manifest: Manifest, classifier, k: int, seed: int) -> tuple[list[dict], list[str]]:
    """K small JPEGs per class that the new bundle classifies correctly; returns (card entries, warnings)."""
    from PIL import Image

    from device.preprocess import load_image

    split = "test" if manifest.records("test") else "val"
    folder = stage / "samples"
    folder.mkdir()
    entries: list[dict] = []
    notes: list[str] = []
    rng = np.random.default_rng(seed)
    for label in manifest.labels:
        recs = [r for r in manifest.records(split) if r.label == label]
        rng.shuffle(recs)
        got = 0
        for r in recs:
            if got >= k:
                break
            img = Image.fromarray(load_image(manifest.abspath(r)))
            img.thumbnail((SAMPLE_MAX_SIDE, SAMPLE_MAX_SIDE), Image.LANCZOS)
            name = f"samples/{label}_{got + 1}.jpg"
            img.save(stage / name, "JPEG", quality=SAMPLE_QUALITY)
            if classifier.classify(stage / name).label != label:
                (stage / name).unlink()
                continue
            entries.append({"file": name, "label": label, "source": f"{split}: {r.path}"})
            got += 1
        if got < k:
            notes.append(f"only {got} of {k} {split} samples of {label} classify correctly; samples/ has {got}")
    return entries, notes


def _check_out(out: Path) -> None:
    """Refuse early to overwrite something that is not a model bundle."""
    if out.exists():
        if not out.is_dir():
            raise BundleError(f"{out}: exists and is not a directory; choose another --out")
        if any(out.iterdir()) and not (out / "model.json").is_file():
            raise BundleError(f"{out}: exists and is not a model bundle; refusing to replace it (choose another --out)")


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


def _sample_records(records: list[ImageRecord], n: int, seed: int) -> list[ImageRecord]:
    if n >= len(records):
        return list(records)
    idx = np.sort(np.random.default_rng(seed).choice(len(records), size=n, replace=False))
    return [records[i] for i in idx]


def export(work: Path, opts: ExportOptions) -> ExportResult:
    """Convert, gate, calibrate and write the bundle to opts.out (see the module docstring)."""
    from device import preprocess as dp
    from device.bundle import Thresholds, load_bundle, sha256_file, write_card
    from device.classifier import Classifier
    from device.engine import load_engine
    from device.ood import fit_knn, fit_ood, load_ood

    t0 = time.perf_counter()
    work, out = Path(work), Path(opts.out).absolute()
    _check_out(out)
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
    train_recs, val_recs = manifest.records("train"), manifest.records("val")
    if not val_recs:
        raise DataError(f"{work}: no validation images to check the int8 model on; re-run prepare with --val > 0")

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
            "classes": {lab: {"edibility": classes[lab]["edibility"], "display_name": classes[lab]["display_name"]}
                        for lab in labels},
            "input": {**spec.input_dict(size), **input_q},
            "outputs": outputs,
            "thresholds": dict(thresholds),
            "files": {"model.tflite": sha256_file(stage / "model.tflite")},
        }
        write_card(stage, card)
        bundle = load_bundle(stage)
        recorder = _Recorder(load_engine(bundle, "cpu", opts.threads))
        classifier = Classifier(bundle, engine=recorder)

        # Gate: float Keras vs int8 through the device, same val photos.
        x_val, y_val = load_rgb_arrays(manifest, val_recs, float_spec, console.track, "loading val")
        float_logits = model.predict(dp.normalize(x_val, float_spec), batch_size=32, verbose=0)[0]
        float_top1 = float(np.mean(np.argmax(float_logits, axis=1) == y_val))
        del x_val
        # The float model's test top-1, for the card's float-vs-int8 table only (nothing is tuned on it).
        test_recs = manifest.records("test")
        float_test_top1 = None
        if test_recs:
            x_test, y_test = load_rgb_arrays(manifest, test_recs, float_spec, console.track, "loading test")
            test_logits = model.predict(dp.normalize(x_test, float_spec), batch_size=32, verbose=0)[0]
            float_test_top1 = float(np.mean(np.argmax(test_logits, axis=1) == y_test))
            del x_test
        val_paths = [manifest.abspath(r) for r in val_recs]
        probs_val, emb_val, _ = device_scores(classifier, recorder, val_paths, "int8 val (device)")
        int8_top1 = float(np.mean(np.argmax(probs_val, axis=1) == y_val))
        drop = (float_top1 - int8_top1) * 100.0
        console.note(f"val top-1: float {float_top1:.4f}, int8 {int8_top1:.4f} (drop {drop:+.2f} points, limit {opts.max_drop})")
        notes: list[str] = []
        if drop > opts.max_drop:
            message = (
                f"int8 model loses {drop:.2f} top-1 points on val (float {float_top1:.2%}, int8 {int8_top1:.2%}; "
                f"limit --max-drop {opts.max_drop}); bundle not written. Retrain, try more --calibration images, "
                "or pass --force"
            )
            if not opts.force:
                raise ExportGateError(message)
            notes.append("forced: " + message)

        # Unknown-species score: fitted on int8 train embeddings, threshold from val.
        ood_section = None
        ood_max = None
        oods_val = None
        if "embedding" in outputs:
            train_paths = [manifest.abspath(r) for r in train_recs]
            y_train = np.array([manifest.label_index(r) for r in train_recs])
            _, emb_train, _ = device_scores(classifier, recorder, train_paths, "int8 train (device)")
            if opts.ood_method == "knn":
                params = fit_knn(emb_train, k=opts.ood_k)
                detail = {"k": opts.ood_k}
            else:
                params = fit_ood(emb_train, y_train, n, dims=OOD_DIMS)
                detail = {"dims": int(np.asarray(params["components"]).shape[1])}
            np.savez(stage / "ood.npz", **params)
            scorer = load_ood(stage / "ood.npz")
            oods_val = np.array([scorer.score(e) for e in emb_val])
            percentile = opts.ood_percentile
            if opts.min_edible_coverage is not None:
                percentile = strictest_ood_percentile(
                    probs_val, oods_val, y_val, labels, bundle.classes, thresholds, opts, percentile)
                notes.append(f"ood percentile {percentile:g}: the strictest keeping val edible coverage >= "
                             f"{opts.min_edible_coverage:.0%}")
            ood_max = max(float(np.percentile(oods_val, percentile)), 1e-6)
            thresholds["ood_max_score"] = ood_max
            ood_section = {"method": opts.ood_method, "file": "ood.npz", **detail, "percentile": percentile}

        # Edible threshold: lowest with poisonous-as-EDIBLE <= target on val, never below the floor.
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
        final_th = Thresholds(**thresholds)
        val_safety = safety_figures(
            verdicts_for(probs_val, oods_val, labels, bundle.classes, final_th), y_val, poisonous_mask(labels, classes)
        )

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
                "float_test_top1": float_test_top1,
                "model_bytes": (stage / "model.tflite").stat().st_size,
                "fit_seconds": (info.get("seconds") or {}).get("total"),
                "val": {"top1": int8_top1, "float_top1": float_top1, **val_safety},
            },
            "calibration": {
                "split": "val",
                "ood_max_score": {"percentile": ood_section["percentile"] if ood_section else None,
                                  "min_edible_coverage": opts.min_edible_coverage, "photos": len(val_recs)} if ood_section else None,
                "edible_min_confidence": {
                    "target_poisonous_as_edible": opts.max_poison_edible,
                    "floor": opts.min_edible_confidence,
                    "calibrated": calibrated,
                    "chosen": float(edible),
                },
                "quantization_images": len(calib_recs),
            },
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
                "versions": info.get("versions"),
            },
        })
        write_card(stage, card)
        bundle = load_bundle(stage)
        checker = Classifier(bundle, backend="cpu", threads=opts.threads)
        samples, sample_notes = write_samples(stage, manifest, checker, opts.samples, seed)
        notes += sample_notes
        card["samples"] = samples
        write_card(stage, card)
        load_bundle(stage)  # the complete bundle validates before it replaces anything
        os.chmod(stage, 0o777 & ~_umask())  # mkdtemp made it private; a bundle is an ordinary folder
        install(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    final = load_bundle(out)
    for w in notes:
        console.warn(w)
    return ExportResult(final.path, float_top1, int8_top1, thresholds, val_safety, time.perf_counter() - t0, notes)
