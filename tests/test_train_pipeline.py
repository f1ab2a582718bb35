"""The whole chain through the CLI: prepare -> fit -> export -> evaluate -> edgetpu, on tiny real artefacts.

One session-scoped fixture prepares and trains once (MobileNetV2 alpha 0.35, 32 px, random init, one epoch
per stage) and exports one bundle; the tests reuse them (copies where they modify a bundle).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from device import preprocess as dp
from device.bundle import load_bundle
from tests.test_train_dataset import SHAPES, add_trouble, make_dataset
from train.cli import app

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Keras 3.15 vs numpy 2 chatter

runner = CliRunner()
FIT_ARGS = ["--weights", "none", "--size", "32", "--alpha", "0.35", "--epochs", "2", "--fine-tune-epochs", "1",
            "--batch-size", "8", "--feature-copies", "2", "--seed", "1"]
# A tiny data set cannot show float/int8 agreement with any statistical bound: the gate is opened here
# (and its refusal tested on its own).
LAX_GATE = ["--gate-min-photos", "1", "--min-agreement", "0", "--min-verdict-agreement", "0", "--max-new-edible", "1"]


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def error_line(result) -> str:
    """The one `error: ...` line (progress bars share stderr); asserts there is exactly one, no traceback."""
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and result.stderr.endswith(lines[0] + "\n"), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def chain(tmp_path_factory):
    """prepare + fit + export once; returns a dict of paths and the CLI outputs."""
    root = tmp_path_factory.mktemp("chain")
    data = make_dataset(root / "data", per_class=12)
    trouble = add_trouble(data)
    work = root / "work"
    prep = invoke("prepare", data, "--out", work)
    assert prep.exit_code == 0, prep.output
    fit = invoke("fit", work, *FIT_ARGS)
    assert fit.exit_code == 0, fit.output
    bundle = root / "bundle"
    exp = invoke("export", work, "--out", bundle, "--calibration", "16", *LAX_GATE, "--samples", "1",
                 "--name", "test-shapes", "--version", "1")
    assert exp.exit_code == 0, exp.output
    return {"root": root, "data": data, "work": work, "bundle": bundle, "trouble": trouble,
            "prepare": prep, "fit": fit, "export": exp}


def test_fit_writes_the_best_model_curves_and_info(chain):
    work = chain["work"]
    assert (work / "model.keras").is_file() and (work / "curves.png").stat().st_size > 1000
    info = json.loads((work / "fit.json").read_text())
    assert info["labels"] == sorted(SHAPES)
    assert info["input"] == {"size": [32, 32], "color": "RGB", "resize": "center_crop", "mean": 127.5, "std": 127.5}
    assert set(info["history"]) == {"head", "fine-tune"}
    assert info["best"]["stage"] in ("head", "fine-tune") and info["best"]["val_loss"] > 0
    assert "best:" in chain["fit"].stdout

    from train._tf import import_keras

    _, keras = import_keras()
    model = keras.models.load_model(work / "model.keras", compile=False)
    # Two outputs: logits (3 classes, no softmax) and the pooled embedding.
    logits, emb = model.predict(np.zeros((2, 32, 32, 3), np.float32), verbose=0)
    assert logits.shape == (2, 3) and emb.shape == (2, 1280)
    assert not np.allclose(logits.sum(axis=1), 1.0)


def test_export_writes_a_bundle_the_device_loads(chain):
    bundle = load_bundle(chain["bundle"])
    card = bundle.card
    assert card["name"] == "test-shapes" and card["version"] == "1"
    assert bundle.labels == sorted(SHAPES)
    assert {k: v.edibility for k, v in bundle.classes.items()} == SHAPES
    assert bundle.classes["red_circle"].display_name == "red circle"
    assert card["input"]["dtype"] == "int8" and card["input"]["size"] == [32, 32]
    assert card["outputs"]["logits"]["size"] == 3 and card["outputs"]["embedding"]["size"] == 1280
    # Every file the device reads is listed, the samples too (with their sha256).
    assert set(card["files"]) == {"model.tflite", "ood.npz"} | {s["file"] for s in card["samples"]}
    assert all(card["files"][s["file"]] == hashlib.sha256((chain["bundle"] / s["file"]).read_bytes()).hexdigest()
               and s["verdict"] in ("EDIBLE", "POISONOUS", "UNSURE") for s in card["samples"])
    assert all(info["role"] == info["edibility"] for info in card["classes"].values())
    assert 0 < card["thresholds"]["ood_max_score"]
    assert 0.9 <= card["thresholds"]["edible_min_confidence"] <= 1.0
    assert {"float_top1", "int8_top1", "val"} <= set(card["metrics"])
    assert card["training"]["backbone"] == "mobilenet_v2" and card["training"]["alpha"] == 0.35
    # The split's own hash (machine-independent), so `evaluate --arch aarch64 --record` knows its WORK dir.
    from train.dataset import split_sha256

    assert card["training"]["split_sha256"] == split_sha256(chain["work"] / "manifest.json")
    for s in bundle.samples:
        assert s.path.is_file() and max(__import__("PIL.Image").Image.open(s.path).size) <= 320
    # No temp or backup directories left beside the bundle.
    assert sorted(p.name for p in chain["root"].iterdir() if p.name.startswith(".")) == []

    # The int8 model's quantization in the card is the model's own (the device engine checks it).
    from device.engine import load_engine

    engine = load_engine(bundle, "cpu")
    out = engine.run(dp.preprocess(chain["data"] / "red_circle" / "red_circle_01.jpg", bundle.input))
    assert out.logits.shape == (3,) and out.embedding.shape == (1280,)


def test_export_gate_refuses_and_keeps_the_old_bundle(chain, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(chain["bundle"], bundle)
    before = tree_digest(bundle)
    result = invoke("export", chain["work"], "--out", bundle, "--calibration", "8", "--gate-min-photos", "100000")
    assert result.exit_code == 1
    line = error_line(result)
    # The refusal names the sample size it needed and the one it had.
    assert line.startswith("error: int8 gate:") and "not written" in line and "--gate-min-photos 100000" in line
    assert tree_digest(bundle) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no half bundle, no temp dir

    fresh = tmp_path / "fresh"
    result = invoke("export", chain["work"], "--out", fresh, "--calibration", "8", "--gate-min-photos", "100000")
    assert result.exit_code == 1 and not fresh.exists()

    # --force writes it anyway, and says so.
    result = invoke("export", chain["work"], "--out", bundle, "--calibration", "8", "--gate-min-photos", "100000",
                    "--force", "--samples", "0")
    assert result.exit_code == 0, result.output
    assert "warning: forced: int8 gate:" in result.stderr
    assert tree_digest(bundle) != before and load_bundle(bundle).samples == []


def test_export_refuses_to_replace_a_folder_that_is_not_a_bundle(chain, tmp_path):
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "holiday.jpg").write_bytes(b"not ours")
    result = invoke("export", chain["work"], "--out", precious)
    assert result.exit_code == 1 and "not a model bundle" in error_line(result)
    assert (precious / "holiday.jpg").read_bytes() == b"not ours"


def test_export_keeps_a_bundle_calibrated_on_folds_from_a_val_only_export(chain, tmp_path):
    """A bundle whose card was calibrated on leave-one-species-out folds is not replaced by an export without
    them (its thresholds would come from the val species alone); --force does, and says so."""
    bundle = tmp_path / "bundle"
    shutil.copytree(chain["bundle"], bundle)
    card = json.loads((bundle / "model.json").read_text())
    card["calibration"] = {**(card.get("calibration") or {}), "leave_one_species_out": {"photos": 1193}}
    (bundle / "model.json").write_text(json.dumps(card))
    before = tree_digest(bundle)
    result = invoke("export", chain["work"], "--out", bundle, "--calibration", "8")
    assert result.exit_code == 1
    line = error_line(result)
    assert "leave-one-species-out folds" in line and "--loso" in line and "not replaced" in line
    assert tree_digest(bundle) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # refused before any staging
    result = invoke("export", chain["work"], "--out", bundle, "--calibration", "8", "--samples", "0", "--force")
    assert result.exit_code == 0, result.output
    assert "warning: forced: " in result.stderr and "leave-one-species-out folds" in result.stderr
    assert "leave_one_species_out" not in (load_bundle(bundle).card.get("calibration") or {})


def test_evaluate_work_split_json_and_report(chain, tmp_path):
    result = invoke("evaluate", chain["bundle"], chain["work"], "--json", "--report", tmp_path / "rep")
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)  # nothing but JSON on stdout
    for key in ("top1", "poisonous_as_edible", "edible_coverage", "unsure_rate", "cost", "per_class"):
        assert key in figures
    assert set(figures["per_class"]) == set(SHAPES)
    n_test = sum(1 for r in json.loads((chain["work"] / "manifest.json").read_text())["images"] if r["split"] == "test")
    assert figures["n"] == n_test
    assert sum(sum(row) for row in figures["confusion"]["matrix"]) == n_test
    # The cost follows its definition from the verdict counts.
    v = figures["verdicts"]
    expected = (100 * v["poisonous"]["EDIBLE"] + v["edible"]["POISONOUS"] + v["edible"]["UNSURE"]) / figures["n"]
    assert figures["cost"] == pytest.approx(expected)
    assert (tmp_path / "rep" / "report.md").read_text().startswith("# Evaluation of test-shapes 1")
    assert (tmp_path / "rep" / "confusion.png").stat().st_size > 1000


def test_evaluate_data_dir_lists_undecodable_photos(chain):
    result = invoke("evaluate", chain["bundle"], chain["data"], "--json")
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert [s["path"] for s in figures["skipped"]] == [str(chain["data"] / chain["trouble"]["corrupt"])]
    n_files = sum(1 for p in chain["data"].rglob("*.jpg"))
    assert figures["n"] == n_files - 1
    table = invoke("evaluate", chain["bundle"], chain["data"])
    assert "poisonous answered EDIBLE" in table.stdout and "edible coverage" in table.stdout


def test_evaluate_refuses_unknown_classes(chain, tmp_path):
    data = make_dataset(tmp_path / "other", per_class=2)
    (data / "red_circle").rename(data / "purple_star")
    result = invoke("evaluate", chain["bundle"], data)
    assert result.exit_code == 1 and "purple_star" in error_line(result)


def test_evaluate_runs_the_device_classifier(chain, monkeypatch):
    """evaluate's figures come from device.classifier.Classifier, not Keras."""
    import device.classifier as dc

    calls = []
    real = dc.Classifier.classify

    def spy(self, image):
        calls.append(Path(image))
        return real(self, image)

    monkeypatch.setattr(dc.Classifier, "classify", spy)
    result = invoke("evaluate", chain["bundle"], chain["work"], "--split", "val", "--json")
    assert result.exit_code == 0, result.output
    assert len(calls) == json.loads(result.stdout)["n"] > 0


def test_training_pixels_are_the_devices(chain, monkeypatch):
    """Train's loader calls device.preprocess, and its float input quantizes to exactly the device's tensor."""
    from train.dataset import Manifest, load_rgb_arrays
    from train.fit import training_input_spec
    from train.model_spec import get_spec

    manifest = Manifest.load(chain["work"])
    records = manifest.records("val")[:4]
    spec = training_input_spec(get_spec("mobilenet_v2"), 32)
    calls = []
    real = dp.prepare_rgb
    monkeypatch.setattr(dp, "prepare_rgb", lambda image, s: calls.append(image) or real(image, s))
    x, _ = load_rgb_arrays(manifest, records, spec)
    assert calls == [manifest.abspath(r) for r in records]
    bundle = load_bundle(chain["bundle"])
    for xi, r in zip(x, records):
        trained_on = dp.normalize(xi, spec)  # what fit/export feed the Keras model
        tensor = dp.preprocess(manifest.abspath(r).read_bytes(), bundle.input)  # what the Pi feeds the int8 model
        assert np.array_equal(dp.quantize(trained_on, bundle.input)[None], tensor)


def test_fit_batches_normalize_with_the_device_function(monkeypatch):
    from train._tf import import_keras
    from train.fit import _batches, training_input_spec
    from train.model_spec import get_spec

    _, keras = import_keras()
    spec = training_input_spec(get_spec("mobilenet_v2"), 32)
    seen = []
    real = dp.normalize
    monkeypatch.setattr(dp, "normalize", lambda rgb, s: seen.append(rgb.shape) or real(rgb, s))
    x = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    xb, yb = _batches(keras, x, np.arange(5), None, spec, 4, False, 0)[0]
    assert seen == [(4, 32, 32, 3)]
    assert np.array_equal(xb, real(x[:4], spec)) and list(yb) == [0, 1, 2, 3]


FAKE_COMPILER = r"""#!/bin/bash
# A stand-in for Coral's edgetpu_compiler: same arguments, same outputs, no compilation.
out=.
while [ $# -gt 0 ]; do
  case "$1" in
    -o|--out_dir) out="$2"; shift 2 ;;
    -s|--show_operations) shift ;;
    *) in="$1"; shift ;;
  esac
done
base=$(basename "$in" .tflite)
cp "$in" "$out/${base}_edgetpu.tflite"
cat > "$out/${base}_edgetpu.log" <<EOF
Edge TPU Compiler version 16.0.384591198
Input: $in
Output: $out/${base}_edgetpu.tflite

Operator                       Count      Status

ADD                            10         Mapped to Edge TPU
CONV_2D                        36         Mapped to Edge TPU
DEPTHWISE_CONV_2D              17         Mapped to Edge TPU
MEAN                           1          Operation is otherwise supported, but not mapped due to some unspecified limitation
FULLY_CONNECTED                1          More than one subgraph is not supported
QUANTIZE                       2          Mapped to Edge TPU
EOF
cat <<EOF
Edge TPU Compiler version 16.0.384591198
Started a compilation timeout timer of 180 seconds.

Model compiled successfully in 321 ms.

Input model: $in
Output model: $out/${base}_edgetpu.tflite
Operation log: $out/${base}_edgetpu.log

Model successfully compiled but not all operations are supported by the Edge TPU. A percentage of the model will instead run on the CPU, which is slower. If possible, consider updating your model to use only operations supported by the Edge TPU. For details, visit g.co/coral/model-reqs.
Number of operations that will run on Edge TPU: 65
Number of operations that will run on CPU: 2

Operator                       Count      Status

MEAN                           1          Operation is otherwise supported, but not mapped due to some unspecified limitation
FULLY_CONNECTED                1          More than one subgraph is not supported
Compilation child process completed within timeout period.
Compilation succeeded!
EOF
"""


def test_edgetpu_with_a_fake_compiler_adds_the_model_and_reports_cpu_ops(chain, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "edgetpu_compiler"
    fake.write_text(FAKE_COMPILER)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    bundle = tmp_path / "bundle"
    shutil.copytree(chain["bundle"], bundle)
    result = invoke("edgetpu", bundle)
    assert result.exit_code == 0, result.output
    assert "65 operations on the Edge TPU, 2 on the CPU" in result.stdout
    assert "MEAN x1" in result.stdout and "FULLY_CONNECTED x1" in result.stdout
    loaded = load_bundle(bundle)
    assert loaded.edgetpu_path == bundle / "model_edgetpu.tflite" and loaded.edgetpu_path.is_file()
    section = loaded.card["edgetpu"]
    assert section["compiler_version"] == "16.0.384591198"
    assert section["ops_on_cpu"] == 2 and section["ops_on_edgetpu"] == 65
    assert {o["op"] for o in section["cpu_ops"]} == {"MEAN", "FULLY_CONNECTED"}
    assert "model_edgetpu.tflite" in loaded.card["files"]


def test_edgetpu_without_the_compiler_says_how_to_get_it(chain, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    before = tree_digest(chain["bundle"])
    result = invoke("edgetpu", chain["bundle"])
    assert result.exit_code == 1
    assert error_line(result) + "\n" == (
        "error: edgetpu_compiler not found: install it from Coral's apt repository (x86-64 Linux only), "
        "or skip this step\n"
    )
    assert tree_digest(chain["bundle"]) == before


def test_fit_errors_are_one_line(chain, tmp_path):
    result = invoke("fit", chain["work"], "--weights", tmp_path / "missing.weights.h5", "--size", "32")
    assert result.exit_code == 1 and "no such file" in error_line(result)
    result = invoke("fit", chain["work"], "--weights", "none", "--backbone", "resnet")
    assert result.exit_code == 1
    assert "mobilenet_v2, mobilenet_v3_small, mobilenet_v3_large" in error_line(result)


def test_imagenet_without_network_says_pass_weights_path(monkeypatch):
    from keras.src.applications import mobilenet_v2

    from device.errors import ConfigError
    from train.model_spec import get_spec

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://example.invalid/w.h5: None -- [Errno -2] Name or service not known")

    monkeypatch.setattr(mobilenet_v2.file_utils, "get_file", offline)
    with pytest.raises(ConfigError, match="no network: .*pass --weights PATH"):
        get_spec("mobilenet_v2").build_backbone(32, 0.35, "imagenet")


def test_weights_file_of_another_backbone_is_refused(tmp_path):
    from device.errors import ConfigError
    from train._tf import import_keras
    from train.model_spec import get_spec

    _, keras = import_keras()
    path = tmp_path / "small.weights.h5"
    keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, include_top=False, weights=None).save_weights(path)
    with pytest.raises(ConfigError, match="does not fit mobilenet_v2 alpha 0.5"):
        get_spec("mobilenet_v2").build_backbone(32, 0.5, str(path))
    assert get_spec("mobilenet_v2").build_backbone(32, 0.35, str(path)).output_shape == (None, 1280)


def test_export_card_has_the_float_vs_int8_table(chain):
    m = json.loads((chain["bundle"] / "model.json").read_text())["metrics"]
    assert 0.0 <= m["float_top1"] <= 1.0 and 0.0 <= m["int8_top1"] <= 1.0
    # Test accuracy is evaluate's, read after a bundle is chosen: export scores test photos only for the
    # float/int8 agreement gate, never for a figure of the model.
    assert "float_test_top1" not in m
    assert m["model_bytes"] == (chain["bundle"] / "model.tflite").stat().st_size
    assert m["fit_seconds"] > 0


def test_evaluate_record_stores_test_metrics_in_the_card(chain, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(chain["bundle"], bundle)
    out = invoke("evaluate", bundle, chain["work"], "--split", "test", "--record", "--json")
    assert out.exit_code == 0, out.output
    card = json.loads((bundle / "model.json").read_text())
    assert card["metrics"]["test"]["top1"] == json.loads(out.stdout)["top1"]
    load_bundle(bundle)  # the card still validates; model hashes are untouched


def test_loso_trains_without_each_poisonous_class_and_counts_edible_answers(chain, tmp_path):
    manifest = json.loads((chain["work"] / "manifest.json").read_text())
    poisonous = [c for c in manifest["labels"] if manifest["classes"][c]["edibility"] == "poisonous"]
    shipped = tmp_path / "shipped"
    shutil.copytree(chain["bundle"], shipped)
    out = invoke("loso", chain["work"], "--out", tmp_path / "loso", "--holdout", poisonous[0], "--weights", "none",
                 "--size", "32", "--epochs", "1", "--fine-tune-epochs", "0", "--feature-copies", "1",
                 "--calibration", "8", "--record", shipped)
    assert out.exit_code == 0, out.output
    summary = json.loads((tmp_path / "loso" / "loso.json").read_text())
    (fold,) = summary["folds"]
    held = [im for im in manifest["images"] if im["label"] == poisonous[0]]
    assert fold["held_out"] == poisonous[0] and fold["photos"] == len(held)
    assert fold["answered_edible"] + fold["answered_unsure"] + fold["answered_poisonous"] == len(held)
    fold_bundle = load_bundle(tmp_path / "loso" / f"without-{poisonous[0]}" / "bundle")
    assert poisonous[0] not in fold_bundle.labels and len(fold_bundle.labels) == len(manifest["labels"]) - 1
    assert "answered EDIBLE" in out.stdout
    recorded = json.loads((shipped / "model.json").read_text())["metrics"]["leave_one_species_out"]
    assert recorded["folds"][0]["held_out"] == poisonous[0]
    load_bundle(shipped)


def test_loso_refuses_an_unknown_holdout(chain, tmp_path):
    out = invoke("loso", chain["work"], "--out", tmp_path / "l", "--holdout", "no_such", "--weights", "none")
    assert out.exit_code == 1
    assert "no_such" in error_line(out)


def test_export_min_edible_coverage_picks_the_strictest_ood_percentile_and_records_it(chain, tmp_path):
    out = invoke("export", chain["work"], "--out", tmp_path / "b", "--calibration", "16", *LAX_GATE,
                 "--samples", "1", "--min-edible-coverage", "0", "--force")
    assert out.exit_code == 0, out.output
    card = json.loads((tmp_path / "b" / "model.json").read_text())
    # Coverage >= 0 is met by the first candidate: the strictest percentile, 50.
    assert card["ood"]["method"] == "knn" and card["ood"]["percentile"] == 50.0
    assert card["calibration"]["ood_max_score"]["min_edible_coverage"] == 0.0
    load_bundle(tmp_path / "b")


@pytest.fixture(scope="module")
def open_world(tmp_path_factory):
    """prepare --other + fit + export + evaluate once, on shapes and an other pool of recoloured shapes."""
    from tests.test_train_dataset import make_other_pool

    root = tmp_path_factory.mktemp("ow")
    data = make_dataset(root / "data", per_class=10)
    other = make_other_pool(root / "other", species=12)
    work = root / "work"
    assert invoke("prepare", data, "--out", work, "--other", other).exit_code == 0
    fit = invoke("fit", work, *FIT_ARGS)
    assert fit.exit_code == 0, fit.output
    bundle = root / "bundle"
    exp = invoke("export", work, "--out", bundle, "--calibration", "16", *LAX_GATE, "--samples", "1",
                 "--max-unseen-edible", "1", "--max-poison-edible", "1", "--min-edible-confidence", "0.5", "--force")
    assert exp.exit_code == 0, exp.output
    return {"work": work, "bundle": bundle, "export": exp, "root": root}


def test_open_world_export_records_roles_calibration_and_sample_verdicts(open_world):
    b = load_bundle(open_world["bundle"])
    card = b.card
    assert b.labels == sorted(SHAPES) + ["other"]
    assert {lab: card["classes"][lab]["role"] for lab in b.labels} == {**SHAPES, "other": "other"}
    cal = card["calibration"]
    assert cal["method"].startswith("open world") and cal["unseen_species"]
    assert cal["margins"]["confidence_margin"] == card["thresholds"]["confidence_margin"] == 0.02
    assert card["thresholds"]["ood_margin"] == 0.015
    val = cal["expected_at_effective"]["val"]
    assert set(val["unseen_as_edible"]) == {"rate", "count", "n", "wilson95"} and val["unseen_as_edible"]["n"] > 0
    # No test figure of the bundle at export: the test split is evaluate's, read after the bundle is chosen.
    assert set(cal["expected_at_effective"]) == {"val"}
    assert "test" not in card.get("metrics", {})
    with np.load(open_world["work"] / "openworld" / "tables.npz") as t:
        assert not any("test" in k for k in t.files)
    assert "test" not in (open_world["work"] / "openworld" / "risk_coverage.csv").read_text()
    # The index holds the other pool's train photos as negatives, in int8 rows.
    assert card["ood"]["negatives"] > 0 and card["ood"]["dtype"] == "int8"
    # Every sample is in `files` with its sha256 and carries the verdict the bundle gives it.
    for s in card["samples"]:
        assert card["files"][s["file"]] == hashlib.sha256((open_world["bundle"] / s["file"]).read_bytes()).hexdigest()
        assert s["verdict"] in ("EDIBLE", "POISONOUS", "UNSURE")
        if s["label"] == "other":
            assert s["verdict"] == "UNSURE"
    gate = card["metrics"]["int8_gate"]
    assert gate["top1_agreement_known"]["n"] > 0 and "verdict_changes_float_to_int8" in gate
    assert (open_world["work"] / "openworld" / "risk_coverage.png").stat().st_size > 1000
    assert (open_world["work"] / "openworld" / "compare.json").is_file()


def test_open_world_evaluate_reports_unseen_species_and_the_curve(open_world, tmp_path):
    out = invoke("evaluate", open_world["bundle"], open_world["work"], "--split", "test", "--json",
                 "--report", tmp_path / "r")
    assert out.exit_code == 0, out.output
    res = json.loads(out.stdout[out.stdout.index("{"):])
    manifest = json.loads((open_world["work"] / "manifest.json").read_text())
    n_unseen = sum(1 for im in manifest["images"] if im["split"] == "test" and im["label"] == "other")
    assert res["open_world"]["unseen_as_edible"]["n"] == n_unseen
    assert res["n"] == sum(1 for im in manifest["images"] if im["split"] == "test" and im["label"] != "other")
    assert (tmp_path / "r" / "risk_coverage.png").is_file() and (tmp_path / "r" / "risk_coverage.csv").is_file()
    assert "Unseen species" in (tmp_path / "r" / "report.md").read_text()


def test_edible_penalty_charges_only_a_non_edible_photo_pushed_towards_an_edible_class():
    from train._tf import import_keras
    from train.fit import make_loss

    _, keras = import_keras()
    edible = np.array([1.0, 0.0, 0.0], dtype=np.float32)  # class 0 edible; 1 poisonous; 2 other
    logits = np.array([[4.0, 1.0, 0.0], [4.0, 1.0, 0.0], [0.0, 3.0, 1.0]], dtype=np.float32)
    y = np.array([0, 1, 2])
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    ce = -np.log(p[np.arange(3), y])
    plain = np.asarray(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
    # Keras losses reduce to the batch mean; compare per photo by feeding one row at a time.
    with_penalty = make_loss(keras, edible, 2.0)
    per_photo = [float(with_penalty(y[i:i + 1], logits[i:i + 1])[0]) for i in range(3)]
    expected = ce + 2.0 * np.array([0.0, -np.log(1 - p[1, 0]), -np.log(1 - p[2, 0])])
    assert np.allclose(plain, ce, atol=1e-5)
    assert np.allclose(per_photo, expected, atol=1e-4)
    # The edible photo pays nothing extra; the poisonous one called edible pays the most.
    assert per_photo[0] == pytest.approx(ce[0], abs=1e-5) and per_photo[1] - ce[1] > per_photo[2] - ce[2] > 0
    assert make_loss(keras, edible, 0.0).__class__.__name__ == "SparseCategoricalCrossentropy"


def test_a_negative_edible_penalty_is_refused():
    from device.errors import ConfigError
    from train.hparams import HParams

    with pytest.raises(ConfigError, match="edible-penalty"):
        HParams(edible_penalty=-1.0).validate()


def test_export_says_so_when_the_margins_leave_no_edible_answer(open_world, tmp_path):
    # Raw confidence floor 0.6 + a 0.45 margin is a bar above 1: nothing can be EDIBLE. The bundle is still
    # written (it is safe), but the user is told in one line instead of finding out in the field.
    exp = invoke("export", open_world["work"], "--out", tmp_path / "b", "--calibration", "16", *LAX_GATE,
                 "--samples", "1", "--max-unseen-edible", "1", "--max-poison-edible", "1",
                 "--min-edible-confidence", "0.6", "--confidence-margin", "0.45", "--force")
    assert exp.exit_code == 0, exp.output
    assert "practically never answer EDIBLE" in exp.output
    card = json.loads((tmp_path / "b" / "model.json").read_text())
    assert card["calibration"]["expected_at_effective"]["val"]["edible_coverage"]["count"] == 0


def test_loso_holds_out_known_poisonous_species_never_the_other_pool(open_world, tmp_path):
    out = invoke("loso", open_world["work"], "--out", tmp_path / "l", "--holdout", "other", "--weights", "none")
    assert out.exit_code == 1 and "the other pool, not a species" in error_line(out)


@pytest.fixture(scope="module")
def open_world_loso(open_world, tmp_path_factory):
    """Leave-one-species-out folds (every known poisonous species) of the open-world split, tiny fits."""
    loso = tmp_path_factory.mktemp("owl") / "loso"
    run = invoke("loso", open_world["work"], "--out", loso, "--weights", "none", "--size", "32", "--epochs", "1",
                 "--fine-tune-epochs", "0", "--feature-copies", "1", "--calibration", "8")
    assert run.exit_code == 0, run.output
    return loso


def test_export_with_loso_folds_calibrates_on_them_and_records_both_figures(open_world, open_world_loso, tmp_path):
    manifest = json.loads((open_world["work"] / "manifest.json").read_text())
    loso = open_world_loso
    poisonous = sorted(c for c, v in manifest["classes"].items() if v["edibility"] == "poisonous" and v.get("role") != "other")
    assert sorted(p.name for p in loso.glob("without-*")) == [f"without-{c}" for c in poisonous]
    bundle = tmp_path / "b"
    exp = invoke("export", open_world["work"], "--out", bundle, "--calibration", "16", *LAX_GATE, "--samples", "1",
                 "--max-unseen-edible", "1", "--max-poison-edible", "1", "--min-edible-confidence", "0.5",
                 "--loso", loso, "--max-held-edible", "0", "--max-held-fold-edible", "0", "--force")
    assert exp.exit_code == 0, exp.output
    assert "held-out species (leave-one-species-out folds) answered EDIBLE" in exp.stdout
    card = load_bundle(bundle).card
    lo = card["calibration"]["leave_one_species_out"]
    held = sum(1 for im in manifest["images"] if im["label"] in poisonous)
    assert lo["photos"] == held and lo["folds"] == poisonous
    assert lo["at_effective"]["all"]["count"] == 0  # target 0: no held-out photo EDIBLE at the shipped point
    assert [f["held_out"] for f in lo["leave_one_fold_out"]["folds"]] == poisonous
    assert [f["held_out"] for f in card["metrics"]["leave_one_species_out"]["folds"]] == poisonous
    assert "leave-one-species-out" in card["calibration"]["method"]
    # Folds of another split are refused with one line, and nothing is written.
    other = tmp_path / "w2"
    shutil.copytree(open_world["work"], other)
    m2 = json.loads((other / "manifest.json").read_text())
    m2["images"] = m2["images"][1:]
    (other / "manifest.json").write_text(json.dumps(m2))
    bad = invoke("export", other, "--out", tmp_path / "b2", "--calibration", "16", *LAX_GATE, "--loso", loso, "--force")
    assert bad.exit_code == 1 and "different split" in error_line(bad) and not (tmp_path / "b2").exists()


def test_recalibrate_reproduces_the_export_then_tightens_with_folds_keeping_the_model(open_world, open_world_loso,
                                                                                      tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(open_world["bundle"], bundle)
    before = json.loads((bundle / "model.json").read_text())
    same = ["--max-unseen-edible", "1", "--max-poison-edible", "1", "--min-edible-confidence", "0.5"]
    out = invoke("recalibrate", bundle, open_world["work"], *same)
    assert out.exit_code == 0, out.output
    again = json.loads((bundle / "model.json").read_text())
    # The same evidence and targets through the bundle itself give export's thresholds back.
    assert again["thresholds"] == before["thresholds"]
    assert again["files"]["model.tflite"] == before["files"]["model.tflite"]
    # ... under a new version (a device names a release by version and model file: the same name for
    # two cards would leave the fleet unable to tell them apart), the old one recorded.
    assert again["version"] != before["version"] and again["calibration"]["previous"]["version"] == before["version"]
    assert f"(was {before['version']})" in out.stdout
    # With the folds and no held-out photo allowed EDIBLE: none is, the model and margins are the same,
    # the earlier calibration is kept, and the figures measured at the old thresholds are gone.
    out = invoke("recalibrate", bundle, open_world["work"], *same, "--loso", open_world_loso,
                 "--max-held-edible", "0", "--max-held-fold-edible", "0")
    assert out.exit_code == 0, out.output
    assert "evaluate" in out.stdout and "--record" in out.stdout
    card = load_bundle(bundle).card
    lo = card["calibration"]["leave_one_species_out"]
    assert lo["at_effective"]["all"]["count"] == 0 and lo["photos"] > 0
    assert card["calibration"]["previous"]["raw"] == before["calibration"]["raw"]
    assert card["thresholds"]["confidence_margin"] == before["thresholds"]["confidence_margin"]
    assert card["files"]["model.tflite"] == before["files"]["model.tflite"]
    assert "test" not in card["metrics"] and "leave_one_species_out" in card["metrics"]
    for s in card["samples"]:  # samples chosen again: each still gives its recorded verdict
        assert s["file"] in card["files"]
    # Another split is refused in one line, and the bundle is left as it was.
    other = tmp_path / "w2"
    shutil.copytree(open_world["work"], other)
    m2 = json.loads((other / "manifest.json").read_text())
    m2["images"] = [im for im in m2["images"] if im["split"] != "test"][:-1] + [im for im in m2["images"] if im["split"] == "test"]
    (other / "manifest.json").write_text(json.dumps(m2))
    kept = (bundle / "model.json").read_bytes()
    bad = invoke("recalibrate", bundle, other)
    assert bad.exit_code == 1 and "not the split" in error_line(bad)
    assert (bundle / "model.json").read_bytes() == kept
    # --keep-thresholds: the point stays, the folds are measured at it, metrics.test stays, a new version.
    (bundle / "model.json").write_text(json.dumps({**json.loads(kept), "metrics": {
        **json.loads(kept)["metrics"], "test": {"n": 1}}}))
    before_keep = json.loads((bundle / "model.json").read_text())
    keep = invoke("recalibrate", bundle, open_world["work"], "--loso", open_world_loso, "--keep-thresholds")
    assert keep.exit_code == 0, keep.output
    kc = json.loads((bundle / "model.json").read_text())
    assert kc["thresholds"] == before_keep["thresholds"] and kc["metrics"]["test"] == {"n": 1}
    assert kc["version"] != before_keep["version"] == kc["calibration"]["samples_rechosen"]["version_before"]
    assert kc["calibration"]["folds_refitted"]["photos"] == lo["photos"]
    assert "thresholds kept" in keep.stdout and "re-run" not in keep.stdout
    kept = (bundle / "model.json").read_bytes()
    # Thresholds chosen again without the folds the card was calibrated on: refused in one line (the val
    # species alone let an unseen look-alike through), the bundle as it was.
    val_only = invoke("recalibrate", bundle, open_world["work"], *same)
    assert val_only.exit_code == 1 and "leave-one-species-out folds" in error_line(val_only)
    assert "--loso" in error_line(val_only) and (bundle / "model.json").read_bytes() == kept
    same_version = invoke("recalibrate", bundle, open_world["work"], *same, "--loso", open_world_loso,
                          "--version", kc["version"])
    assert same_version.exit_code == 1 and "needs a new one" in error_line(same_version)
    assert (bundle / "model.json").read_bytes() == kept


def test_folds_file_calibrates_as_the_folds_folder_does(open_world, open_world_loso, tmp_path):
    """`folds` writes the folds' evidence to one file; recalibrate --loso FILE picks the same point as
    --loso FOLDER (what make model relies on when the folds are not on the machine)."""
    evidence = tmp_path / "folds.json"
    out = invoke("folds", open_world_loso, open_world["work"], "--out", evidence)
    assert out.exit_code == 0, out.output
    assert json.loads(evidence.read_text())["format"] == "mushcam-fold-evidence/1" and "held-out photos" in out.stdout
    cards = []
    for source in (open_world_loso, evidence):
        bundle = tmp_path / f"b-{source.name}"
        shutil.copytree(open_world["bundle"], bundle)
        res = invoke("recalibrate", bundle, open_world["work"], "--loso", source, "--max-unseen-edible", "1",
                     "--max-poison-edible", "1", "--min-edible-confidence", "0.5", "--max-held-edible", "0",
                     "--max-held-fold-edible", "0")
        assert res.exit_code == 0, res.output
        cards.append(json.loads((bundle / "model.json").read_text()))
    assert cards[0]["thresholds"] == cards[1]["thresholds"]
    assert cards[0]["calibration"]["leave_one_species_out"]["leave_one_fold_out"] == \
        cards[1]["calibration"]["leave_one_species_out"]["leave_one_fold_out"]


def test_evaluate_says_which_genera_are_absent_from_the_unseen_species(open_world, tmp_path):
    """A WORK dir prepared with --other-train-genus has none of those genera among its unseen species: the
    figures say so, in the result, the console and the report (a reader would take 0 % for all fungi)."""
    work = tmp_path / "work"
    work.mkdir()
    manifest = json.loads((open_world["work"] / "manifest.json").read_text())
    manifest["other_train_genera"] = ["boletus", "suillus"]
    (work / "manifest.json").write_text(json.dumps(manifest))
    out = invoke("evaluate", open_world["bundle"], work, "--split", "test", "--report", tmp_path / "r")
    assert out.exit_code == 0, out.output
    assert "2 genera, all in training" in out.stdout
    assert "| genera absent from the unseen species (all in training) | boletus, suillus |" in (
        tmp_path / "r" / "report.md").read_text()
    js = invoke("evaluate", open_world["bundle"], work, "--split", "test", "--json")
    assert json.loads(js.stdout[js.stdout.index("{"):])["open_world"]["genera_in_training"] == ["boletus", "suillus"]
    # Without the option nothing is said (the fixture's own WORK dir).
    js = invoke("evaluate", open_world["bundle"], open_world["work"], "--split", "test", "--json")
    assert "genera_in_training" not in json.loads(js.stdout[js.stdout.index("{"):])["open_world"]


def test_loso_reuses_a_fold_fit_only_when_it_is_this_recipes(chain, tmp_path):
    """--reuse-fits keeps a fold trained with the same recipe, and refits one trained at another input size."""
    manifest = json.loads((chain["work"] / "manifest.json").read_text())
    held = next(c for c in manifest["labels"] if manifest["classes"][c]["edibility"] == "poisonous")
    common = ("--holdout", held, "--weights", "none", "--epochs", "1", "--fine-tune-epochs", "0",
              "--feature-copies", "1", "--calibration", "8", "--reuse-fits")
    fit_json = tmp_path / "loso" / f"without-{held}" / "fit.json"
    assert invoke("loso", chain["work"], "--out", tmp_path / "loso", "--size", "32", *common).exit_code == 0
    first = fit_json.read_bytes()
    same = invoke("loso", chain["work"], "--out", tmp_path / "loso", "--size", "32", *common)
    assert same.exit_code == 0, same.output
    assert fit_json.read_bytes() == first and "refitting" not in same.output
    other = invoke("loso", chain["work"], "--out", tmp_path / "loso", "--size", "40", *common)
    assert other.exit_code == 0, other.output
    assert "refitting" in other.output and "size was 32" in other.output
    assert json.loads(fit_json.read_text())["hparams"]["size"] == 40
