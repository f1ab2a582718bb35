"""device.engine (backends, the real Edge TPU failure) and device.classifier (image(s) -> verdict)."""

from __future__ import annotations

import gc
import logging
import shutil
import sys

import numpy as np
import pytest

from device.bundle import load_bundle
from device.classifier import Classifier
from device.engine import ENGINES, CpuEngine, EdgeTpuEngine, load_engine, make_interpreter
from device.errors import BundleError, ConfigError, InferenceError
from device.preprocess import preprocess


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return load_bundle(tiny_bundle)


@pytest.fixture(scope="module")
def classifier(bundle):
    return Classifier(bundle, backend="cpu")


@pytest.fixture
def edgetpu_bundle(bundle_copy, edit_card):
    """The tiny bundle plus a (fake: just the CPU model's bytes) model_edgetpu.tflite listed in the card."""
    shutil.copy(bundle_copy / "model.tflite", bundle_copy / "model_edgetpu.tflite")
    edit_card(bundle_copy, lambda c: c["files"].update({"model_edgetpu.tflite": ""}), rehash=True)
    return load_bundle(bundle_copy)


# --- engines -------------------------------------------------------------------------------------------


def test_cpu_engine_outputs(bundle, rgb_array):
    engine = CpuEngine(bundle, threads=1)
    out = engine.run(preprocess(rgb_array("red"), bundle.input))
    assert out.logits.dtype == np.float32 and out.logits.shape == (3,)
    assert out.embedding is not None and out.embedding.shape == (3,)
    assert int(out.logits.argmax()) == 0 and out.logits[0] - out.logits[1:].max() > 3
    engine.invoke_only()  # the benchmark hook runs on whatever input is set


def test_auto_without_an_edgetpu_model_is_cpu(bundle, caplog):
    with caplog.at_level(logging.WARNING, logger="mushcam.engine"):
        engine = load_engine(bundle, "auto")
    assert isinstance(engine, CpuEngine) and not caplog.records  # nothing to warn about


@pytest.mark.parametrize("bad", [np.zeros((1, 8, 8, 3), np.int8), np.zeros((1, 16, 16, 3), np.float32)])
def test_wrong_tensor_is_an_inference_error(bundle, bad):
    with pytest.raises(InferenceError, match="cpu inference failed"):
        CpuEngine(bundle).run(bad)


def test_edgetpu_engine_reports_no_edge_tpu(edgetpu_bundle, monkeypatch):
    # LiteRT's half-built Delegate raises from __del__ ("Exception ignored ... Traceback" on the user's
    # terminal) whenever it is finally freed: it must be gone before the InferenceError leaves.
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with pytest.raises(InferenceError) as e:
        EdgeTpuEngine(edgetpu_bundle)
    msg = str(e.value)
    assert "no Edge TPU" in msg and "libedgetpu.so.1" in msg and "engine cpu" in msg and "\n" not in msg
    with pytest.raises(InferenceError, match="no Edge TPU"):
        load_engine(edgetpu_bundle, "edgetpu")
    del e
    gc.collect()
    assert unraisable == []


def test_auto_falls_back_to_cpu_with_a_warning(edgetpu_bundle, caplog, rgb_array, monkeypatch):
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with caplog.at_level(logging.INFO, logger="mushcam.engine"):
        engine = load_engine(edgetpu_bundle, "auto")
    assert isinstance(engine, CpuEngine)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Edge TPU is unavailable" in warnings[0].getMessage()
    assert "no Edge TPU" in warnings[0].getMessage()
    del warnings
    caplog.clear()  # the records hold the error; once they go, nothing may complain on stderr
    gc.collect()
    assert unraisable == []
    assert Classifier(edgetpu_bundle, engine=engine).classify(rgb_array("red")).verdict == "EDIBLE"


def test_edgetpu_without_a_compiled_model(bundle):
    with pytest.raises(InferenceError, match="no model_edgetpu.tflite"):
        load_engine(bundle, "edgetpu")


def test_unknown_backend_lists_the_valid_ones(bundle):
    with pytest.raises(ConfigError) as e:
        load_engine(bundle, "gpu")
    assert "'gpu'" in str(e.value)
    for name in ("auto", *ENGINES):
        assert name in str(e.value)
    assert set(ENGINES) == {"cpu", "edgetpu"}


def test_make_interpreter_on_garbage_names_the_file(tmp_path, capfd):
    p = tmp_path / "model.tflite"
    p.write_bytes(b"\x00" * 64)
    with pytest.raises(BundleError, match="cannot load it") as e:
        make_interpreter(p)
    assert str(p) in str(e.value)
    assert capfd.readouterr().err == ""


# --- classifier ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("label, verdict", [("red_cap", "EDIBLE"), ("green_cap", "POISONOUS"), ("blue_cap", "POISONOUS")])
def test_samples_classify_correctly(classifier, bundle, label, verdict):
    r = classifier.classify(bundle.path / "samples" / f"{label}.jpg")
    assert (r.label, r.verdict) == (label, verdict)
    assert r.confidence > 0.95 and r.frames == 1 and r.latency_ms > 0
    assert r.ood_score is not None and r.ood_score < bundle.thresholds.ood_max_score
    assert r.probs.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("colour", ["grey", "yellow"])
def test_unseen_colours_are_unsure(classifier, bundle, rgb_array, colour):
    r = classifier.classify(rgb_array(colour))
    assert r.verdict == "UNSURE"
    assert r.ood_score > bundle.thresholds.ood_max_score and "unlike the species" in r.decision.reason


def test_frames_are_combined_by_mean_probs_and_worst_ood(classifier, rgb_array):
    red, green = rgb_array("red", seed=1), rgb_array("green", seed=2)
    (p_red, o_red), (p_green, o_green) = classifier.scores(red), classifier.scores(green)
    r = classifier.classify_frames([red, green])
    assert r.frames == 2
    assert np.allclose(r.probs, (p_red + p_green) / 2)
    assert r.ood_score == max(o_red, o_green)
    assert r.verdict == "UNSURE"  # half red, half green: not confident of anything


def test_one_unfamiliar_frame_makes_the_press_unsure(classifier, rgb_array):
    reds = [rgb_array("red", seed=s) for s in range(3)]
    assert classifier.classify_frames(reds).verdict == "EDIBLE"
    r = classifier.classify_frames(reds[:2] + [rgb_array("grey")])
    assert r.verdict == "UNSURE" and r.ood_score == classifier.scores(rgb_array("grey"))[1]


def test_frames_from_files_and_arrays_agree(classifier, bundle):
    path = bundle.path / "samples" / "blue_cap.jpg"
    from PIL import Image

    a = classifier.classify_frames([path, path])
    b = classifier.classify(np.asarray(Image.open(path)))
    assert np.allclose(a.probs, b.probs) and a.ood_score == pytest.approx(b.ood_score)


def test_bundle_without_ood(bundle_copy, edit_card, rgb_array):
    def drop_ood(card):
        del card["ood"], card["outputs"]["embedding"], card["thresholds"]["ood_max_score"]

    edit_card(bundle_copy, drop_ood)
    clf = Classifier(load_bundle(bundle_copy), backend="cpu")
    assert clf.ood is None
    red = clf.classify(rgb_array("red"))
    assert red.verdict == "EDIBLE" and red.ood_score is None
    grey = clf.classify(rgb_array("grey"))  # no unknown-species score, but the spread probabilities still say no
    assert grey.verdict == "UNSURE" and grey.confidence < 0.5


def test_ood_threshold_without_a_score_is_never_edible(bundle_copy, edit_card, rgb_array):
    def drop_ood_data(card):
        del card["ood"], card["outputs"]["embedding"]  # thresholds.ood_max_score stays

    edit_card(bundle_copy, drop_ood_data)
    clf = Classifier(load_bundle(bundle_copy), backend="cpu")
    r = clf.classify(rgb_array("red"))
    assert r.label == "red_cap" and r.verdict == "UNSURE" and "no unknown-species score" in r.decision.reason


def test_classifier_reuses_a_given_engine(bundle):
    engine = CpuEngine(bundle)
    clf = Classifier(bundle, engine=engine)
    assert clf.engine is engine
    interp = engine.interpreter
    clf.classify(bundle.samples[0].path)
    assert clf.engine.interpreter is interp  # built once, not per frame


def test_threads_zero_means_the_runtime_default(bundle, rgb_array):
    # config.toml documents `threads = 0` as "one per core": it must not be refused as a broken bundle.
    engine = load_engine(bundle, "cpu", threads=0)
    assert Classifier(bundle, engine=engine).classify(rgb_array("red")).verdict == "EDIBLE"


@pytest.mark.parametrize("threads,cores,want", [(None, 4, 4), (0, 4, 4), (0, 1, 1), (3, 4, 3), (1, 4, 1)])
def test_the_default_uses_every_core_and_a_number_pins_it(bundle, monkeypatch, threads, cores, want):
    # LiteRT's own default is one thread; a 4-core Pi would run at a third of its speed.
    import device.engine as eng

    real = eng._runtime()
    seen = []

    class Runtime:
        def Interpreter(self, **kw):
            seen.append(kw["num_threads"])
            return real.Interpreter(**kw)

    monkeypatch.setattr(eng, "_runtime", lambda: Runtime())
    monkeypatch.setattr(eng.os, "sched_getaffinity", lambda pid: set(range(cores)))
    load_engine(bundle, "cpu", threads=threads)
    assert seen == [want]


def test_default_threads_falls_back_to_cpu_count(monkeypatch):
    import device.engine as eng

    monkeypatch.delattr(eng.os, "sched_getaffinity")
    monkeypatch.setattr(eng.os, "cpu_count", lambda: None)
    assert eng.default_threads() == 1


def test_negative_threads_is_a_config_error_not_a_bundle_error(bundle):
    with pytest.raises(ConfigError, match="threads"):
        load_engine(bundle, "cpu", threads=-2)


def test_the_edgetpu_engine_is_built_from_the_verified_bytes(edgetpu_bundle, monkeypatch):
    """Issue 12 item 1: the Edge TPU model is run from the bytes whose sha256 was checked, not re-opened.
    Only the delegate (the hardware) is faked; the interpreter is LiteRT's own, built with model_content."""
    import device.engine as engine_mod

    marker = object()
    real = engine_mod.make_interpreter
    monkeypatch.setattr(engine_mod, "load_edgetpu_delegate", lambda: marker)
    monkeypatch.setattr(engine_mod, "make_interpreter",
                        lambda path, threads=None, delegates=None, content=None:
                        real(path, threads, [d for d in delegates or [] if d is not marker], content=content))
    (edgetpu_bundle.path / "model_edgetpu.tflite").write_bytes(b"swapped after the check")
    engine = EdgeTpuEngine(edgetpu_bundle)
    assert engine.name == "edgetpu" and engine.interpreter.get_input_details()[0]["shape"].tolist() == [1, 16, 16, 3]
