"""`mushcam` (device.cli): classify, selftest, check-config; exit codes, one-line errors, memory, imports.

Exit codes: 0 all good, 1 something failed (one line on stderr per problem, never a traceback),
2 usage (no arguments, no image files found).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from device.cli import app

REPO_ROOT = Path(__file__).resolve().parent.parent
JSON_KEYS = {"path", "label", "display_name", "confidence", "verdict", "reason", "ood_score", "runner_up", "latency_ms"}

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def classify(bundle, *args):
    return invoke("classify", "--model", bundle, "--engine", "cpu", *args)


def json_lines(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def assert_clean_stderr(result):
    assert "Traceback" not in result.output and "Exception ignored" not in result.output


def run_device(*args, env_extra=None, python_flags=()):
    """`python -m device ...` in a subprocess from the repo root."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSHCAM_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *python_flags, "-m", "device", *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


# --- classify: the happy paths -------------------------------------------------------------------------


def test_classify_files(tiny_bundle):
    samples = [tiny_bundle / "samples" / f"{c}.jpg" for c in ("red_cap", "green_cap")]
    r = classify(tiny_bundle, *samples)
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("EDIBLE") and "red cap" in lines[0] and str(samples[0]) in lines[0]
    assert lines[1].startswith("POISONOUS") and "green cap" in lines[1] and str(samples[1]) in lines[1]
    assert "Never eat a mushroom on this advice alone." in r.stderr


def test_classify_json(tiny_bundle):
    r = classify(tiny_bundle, "--json", tiny_bundle / "samples")
    assert r.exit_code == 0, r.output
    rows = json_lines(r)
    assert [Path(x["path"]).name for x in rows] == ["blue_cap.jpg", "green_cap.jpg", "red_cap.jpg"]  # sorted
    for row in rows:
        assert set(row) == JSON_KEYS
        assert isinstance(row["confidence"], float) and 0.9 < row["confidence"] <= 1.0
        assert isinstance(row["latency_ms"], float) and row["latency_ms"] > 0
        assert row["label"] == Path(row["path"]).stem
        second = row["runner_up"]
        assert set(second) == {"label", "display_name", "probability"} and second["label"] != row["label"]
        assert 0 <= second["probability"] <= 1 - row["confidence"] + 1e-3  # the second can only share what is left
    assert [x["verdict"] for x in rows] == ["POISONOUS", "POISONOUS", "EDIBLE"]
    assert r.stderr == ""  # --json output is for machines: no disclaimer mixed in


def test_classify_json_probs_are_exact(tiny_bundle):
    from device.bundle import load_bundle
    from device.classifier import Classifier

    r = classify(tiny_bundle, "--json", "--probs", tiny_bundle / "samples")
    assert r.exit_code == 0, r.output
    bundle = load_bundle(tiny_bundle)
    clf = Classifier(bundle, backend="cpu")
    for row in json_lines(r):
        assert set(row) == JSON_KEYS | {"probs", "poisonous_mass"}
        want = clf.classify(Path(row["path"]))
        # Unrounded: what the in-process classifier gives, to the last bit (a cross-machine diff needs it).
        assert row["confidence"] == want.confidence and row["ood_score"] == want.ood_score
        assert list(row["probs"]) == bundle.labels and row["probs"] == dict(zip(bundle.labels, map(float, want.probs)))
        assert row["poisonous_mass"] == want.decision.poisonous_mass


def test_classify_folders_recursively(tiny_bundle, make_image, tmp_path):
    make_image("photos/a_red.jpg", "red")
    make_image("photos/day2/b_blue.PNG", "blue")
    make_image("photos/day2/deeper/c_green.jpeg", "green")
    (tmp_path / "photos" / "notes.txt").write_text("not an image, and not an image name: skipped")
    r = classify(tiny_bundle, "--json", tmp_path / "photos")
    assert r.exit_code == 0, r.output
    assert [(Path(x["path"]).relative_to(tmp_path / "photos").as_posix(), x["label"]) for x in json_lines(r)] == [
        ("a_red.jpg", "red_cap"),
        ("day2/b_blue.PNG", "blue_cap"),
        ("day2/deeper/c_green.jpeg", "green_cap"),
    ]


def test_odd_but_valid_images_all_classify(tiny_bundle, make_image, tmp_path, tree_state, write_png16_rgb):
    d = tmp_path / "odd"
    make_image("odd/cmyk.jpg", "red", mode="CMYK")
    make_image("odd/grey.jpg", "red", mode="L")
    make_image("odd/palette.gif", "blue")
    a16 = np.zeros((48, 64), np.uint16)
    a16[:] = 40000
    Image.fromarray(a16).save(d / "grey16.png")
    rgb16 = np.zeros((48, 64, 3), np.uint16)
    rgb16[:] = (30 * 257, 50 * 257, 200 * 257)  # the blue caps' colour, in 16 bits
    write_png16_rgb(d / "blue16.png", rgb16)
    rgba = np.zeros((48, 64, 4), np.uint8)
    Image.fromarray(rgba, "RGBA").save(d / "transparent.png")
    gif = Image.new("P", (64, 48), 0)
    gif.putpalette([40, 190, 50] + [0] * 765)
    gif.save(d / "transparent.gif", transparency=0)  # every pixel transparent: a white picture
    green = Image.open(make_image("green.jpg", "green"))
    exif = green.getexif()
    exif[0x0112] = 6
    green.save(d / "rotated.jpg", exif=exif)
    before = tree_state(d)
    r = classify(tiny_bundle, "--json", d)
    assert r.exit_code == 0, r.output
    got = {Path(x["path"]).name: (x["label"], x["verdict"]) for x in json_lines(r)}
    assert got["cmyk.jpg"] == ("red_cap", "EDIBLE")
    assert got["palette.gif"] == ("blue_cap", "POISONOUS")
    assert got["rotated.jpg"] == ("green_cap", "POISONOUS")
    assert got["blue16.png"] == ("blue_cap", "POISONOUS")
    for name in ("grey.jpg", "grey16.png", "transparent.png", "transparent.gif"):  # no colour the model knows: UNSURE
        assert got[name][1] == "UNSURE"
    assert tree_state(d) == before


# --- classify: bad input -------------------------------------------------------------------------------


def _empty(path: Path):
    path.write_bytes(b"")


def _truncated(path: Path):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    img.save(path, quality=90)
    path.write_bytes(path.read_bytes()[:1500])


def _text(path: Path):
    path.write_text("Boletus edulis, 3 specimens, oak wood\n")


BAD_INPUTS = {"empty.jpg": (_empty, "empty"), "truncated.jpg": (_truncated, "truncated"),
              "notes.jpg": (_text, "not an image")}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_1(tiny_bundle, tmp_path, tree_state, name):
    make, words = BAD_INPUTS[name]
    path = tmp_path / "in" / name
    path.parent.mkdir()
    make(path)
    before = tree_state(tmp_path, tiny_bundle)
    r = classify(tiny_bundle, path)
    assert r.exit_code == 1
    assert_clean_stderr(r)
    errors = [line for line in r.stderr.splitlines() if str(path) in line]
    assert len(errors) == 1 and words in errors[0]
    assert r.stdout == ""
    assert tree_state(tmp_path, tiny_bundle) == before


def test_missing_file_is_one_line(tiny_bundle, tmp_path):
    r = classify(tiny_bundle, tmp_path / "gone.jpg")
    assert r.exit_code == 1 and r.stderr.count("no such file") == 1 and str(tmp_path / "gone.jpg") in r.stderr


def test_bad_files_do_not_stop_the_rest(tiny_bundle, make_image, tmp_path, tree_state):
    make_image("mixed/1_red.jpg", "red")
    for name, (make, _) in BAD_INPUTS.items():
        make(tmp_path / "mixed" / name)
    make_image("mixed/z_green.png", "green")
    before = tree_state(tmp_path, tiny_bundle)
    r = classify(tiny_bundle, "--json", tmp_path / "mixed")
    assert r.exit_code == 1
    assert_clean_stderr(r)
    rows = {Path(x["path"]).name: x for x in json_lines(r)}
    assert set(rows) == {"1_red.jpg", "z_green.png", *BAD_INPUTS}
    assert rows["1_red.jpg"]["verdict"] == "EDIBLE" and rows["z_green.png"]["verdict"] == "POISONOUS"
    for name in BAD_INPUTS:
        assert set(rows[name]) == {"path", "error"} and name in rows[name]["error"]
    assert len(r.stderr.splitlines()) == len(BAD_INPUTS)  # one line per bad file, nothing else
    assert tree_state(tmp_path, tiny_bundle) == before


# --- classify: exit 2 and setup errors -----------------------------------------------------------------


def test_no_arguments_is_usage():
    assert invoke().exit_code == 2
    r = invoke("classify")
    assert r.exit_code == 2 and "Missing argument" in r.stderr


def test_no_image_files_found_is_usage(tiny_bundle, tmp_path):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "readme.txt").write_text("no photos here")
    r = classify(tiny_bundle, tmp_path / "empty_dir")
    assert r.exit_code == 2
    assert r.stderr.splitlines() == [f"mushcam: error: no image files found in {tmp_path / 'empty_dir'}"]


def test_bad_model_dir_is_one_line(tiny_bundle, tmp_path):
    r = invoke("classify", "--model", tmp_path / "no_bundle", tiny_bundle / "samples")
    assert r.exit_code == 1
    assert r.stderr.splitlines() == [
        f"mushcam: error: {tmp_path / 'no_bundle'}: no such model bundle directory (pass --model DIR, or run `make model`)"
    ]


def test_unknown_engine_is_one_line(tiny_bundle):
    r = invoke("classify", "--model", tiny_bundle, "--engine", "gpu", tiny_bundle / "samples")
    assert r.exit_code == 1
    assert r.stderr.splitlines() == ["mushcam: error: unknown engine 'gpu'; valid: auto, cpu, edgetpu"]


def test_edgetpu_failure_in_a_real_process(bundle_copy, edit_card):
    """The real libedgetpu OSError, end to end: edgetpu is one error line, auto one warning line, no traceback."""
    (bundle_copy / "model_edgetpu.tflite").write_bytes((bundle_copy / "model.tflite").read_bytes())
    edit_card(bundle_copy, lambda c: c["files"].update({"model_edgetpu.tflite": ""}), rehash=True)
    sample = bundle_copy / "samples" / "red_cap.jpg"
    hard = run_device("classify", "--model", bundle_copy, "--engine", "edgetpu", sample)
    assert hard.returncode == 1
    assert hard.stderr.splitlines() == [hard.stderr.splitlines()[0]] and "mushcam: error: no Edge TPU" in hard.stderr
    auto = run_device("classify", "--model", bundle_copy, "--json", sample)
    assert auto.returncode == 0 and json.loads(auto.stdout)["verdict"] == "EDIBLE"
    lines = auto.stderr.splitlines()
    assert len(lines) == 1 and "WARNING" in lines[0] and "Edge TPU is unavailable" in lines[0]


# --- selftest ------------------------------------------------------------------------------------------


def test_selftest_passes(tiny_bundle):
    r = invoke("selftest", "--model", tiny_bundle)
    assert r.exit_code == 0, r.output
    first, thresholds = r.stdout.strip().splitlines()
    assert first == "selftest ok: tiny-colours 0.0.1, 3/3 samples"
    assert thresholds == ("thresholds in effect: edible_min_confidence=0.9, poisonous_max_mass=0.05, "
                          "poisonous_min_confidence=0.5, ood_max_score=6.0, confidence_margin=0.0, ood_margin=0.0, "
                          "mass_margin=0.0")


def test_selftest_fails_on_a_wrong_sample_label(bundle_copy, edit_card, tree_state):
    # Only the card changes: the model's sha still matches, so it is the self-test that must catch it.
    edit_card(bundle_copy, lambda c: c["samples"][2].update(label="red_cap"))
    before = tree_state(bundle_copy)
    r = invoke("selftest", "--model", bundle_copy)
    assert r.exit_code == 1
    assert_clean_stderr(r)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "self-test failed on 1/3 samples" in lines[0]
    assert "samples/blue_cap.jpg: classified as blue_cap, expected red_cap" in lines[0]
    assert r.stdout == ""
    assert tree_state(bundle_copy) == before


def test_selftest_on_a_broken_bundle(bundle_copy):
    (bundle_copy / "model.tflite").write_bytes(b"\x00" * 10)
    r = invoke("selftest", "--model", bundle_copy)
    assert r.exit_code == 1 and len(r.stderr.splitlines()) == 1 and "sha256 does not match" in r.stderr


# --- check-config --------------------------------------------------------------------------------------


def test_check_config_good(tmp_path):
    p = tmp_path / "config.toml"
    p.write_text('engine = "cpu"\nmodel_dir = "/srv/m"\n[gpio]\nbutton = 6\n')
    r = invoke("check-config", p)
    assert r.exit_code == 0, r.output
    settings = json.loads(r.stdout)
    assert settings["engine"] == "cpu" and settings["gpio"]["button"] == 6 and settings["frames_per_press"] == 3
    assert "config ok; model bundle: /srv/m" in r.stderr


@pytest.mark.parametrize(
    "text, words",
    [
        ("[gpio]\nbuton = 6\n", "unknown key `gpio.buton`"),
        ("frames_per_press = 99\n", "`frames_per_press` = 99 is outside 1..20"),
        ('engine = "tpu"\n', "`engine` = 'tpu'"),
        ("threads = 'x'\n", "`threads` must be int"),
        ('engine = "cpu\n', "not valid TOML"),
    ],
)
def test_check_config_bad(tmp_path, text, words):
    p = tmp_path / "config.toml"
    p.write_text(text)
    r = invoke("check-config", p)
    assert r.exit_code == 1
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mushcam: error: {p}: ") and words in lines[0]


def test_check_config_missing_file(tmp_path):
    r = invoke("check-config", tmp_path / "nope.toml")
    assert r.exit_code == 1 and "no such config file" in r.stderr


# --- the Pi has little RAM and no TensorFlow ------------------------------------------------------------

RSS_PROBE = """
import resource, subprocess, sys
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stdout.write(r.stdout)
sys.stderr.write(r.stderr)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)  # KiB on Linux
sys.exit(r.returncode)
"""


def test_huge_jpeg_peak_memory(tiny_bundle, tmp_path):
    """An 8000x6000 photo (144 MB decoded) is classified within 150 MB: the JPEG is decoded small."""
    big = tmp_path / "huge.jpg"
    Image.new("RGB", (8000, 6000), (210, 40, 30)).save(big, quality=85)
    cmd = [sys.executable, "-m", "device", "classify", "--model", str(tiny_bundle), "--json", str(big)]
    # A wrapper process, so that only this classify counts (not other children of the test run).
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    p = subprocess.run([sys.executable, "-c", RSS_PROBE, *cmd], cwd=REPO_ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    *out, rss = p.stdout.splitlines()
    assert json.loads(out[0])["label"] == "red_cap"
    peak_mb = int(rss) / 1024
    assert peak_mb <= 150, f"classify peaked at {peak_mb:.0f} MB"


FORBIDDEN_TOP_LEVEL = {"tensorflow", "keras", "tf_keras"}


def test_classify_imports_no_tensorflow(tiny_bundle):
    r = run_device("classify", "--model", tiny_bundle, tiny_bundle / "samples" / "red_cap.jpg",
                   python_flags=("-X", "importtime"))
    assert r.returncode == 0, r.stderr
    modules = {line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "device.classifier" in modules and "ai_edge_litert" in modules  # the parse works
    assert not {m for m in modules if m.split(".")[0] in FORBIDDEN_TOP_LEVEL | {"train"}}


def _imports(tree: ast.AST):
    """(top-level module name, inside a function?) for every import in a module."""

    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name.split(".")[0], in_function
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                yield child.module.split(".")[0], in_function
            yield from walk(child, inner)

    return walk(tree, False)


def test_device_sources_never_import_train_or_tensorflow_at_module_level():
    sources = sorted((REPO_ROOT / "device").rglob("*.py"))
    assert len(sources) >= 10
    for src in sources:
        for name, in_function in _imports(ast.parse(src.read_text(), str(src))):
            assert name != "train", f"{src} imports train/"
            if name in FORBIDDEN_TOP_LEVEL:
                assert in_function, f"{src} imports {name} at module level"


def test_classify_threads(tiny_bundle):
    sample = tiny_bundle / "samples" / "red_cap.jpg"
    assert classify(tiny_bundle, "--threads", "0", sample).exit_code == 0
    assert classify(tiny_bundle, "--threads", "2", sample).exit_code == 0
    r = classify(tiny_bundle, "--threads", "-1", sample)
    assert r.exit_code == 1 and len(r.stderr.splitlines()) == 1 and "bundle" not in r.stderr


def test_selftest_on_a_100000_deep_card_is_one_line(bundle_copy):
    """Issue 12 item 1: a 100,000-deep JSON card gave a RecursionError traceback in `mushcam selftest`."""
    depth = 100_000
    (bundle_copy / "model.json").write_text('{"a": ' + "[" * depth + "]" * depth + "}")
    r = run_device("selftest", "--model", bundle_copy)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [f"mushcam: error: {bundle_copy / 'model.json'}: JSON nested deeper than 32 levels; not a model card"]


def _png16_grey(path: Path, w: int, h: int) -> Path:
    """A real w x h 16-bit greyscale PNG, compressed row by row (no w x h array in the test's memory)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\0" + b"\x30\x00" * w
    z = zlib.compressobj(6)
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side, accepted", [(10_000, False), (3_400, True)])
def test_png_peak_memory_fits_a_pi(tiny_bundle, tmp_path, side, accepted):
    """Issue 12 item 10: a 10k x 10k 16-bit PNG peaked at 2.6 GB; now refused in one line, and the largest
    accepted size (11.6 MP here) is shrunk before conversion and classified within 200 MB."""
    big = _png16_grey(tmp_path / "big.png", side, side)
    cmd = [sys.executable, "-m", "device", "classify", "--model", str(tiny_bundle), "--json", str(big)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    p = subprocess.run([sys.executable, "-c", RSS_PROBE, *cmd], cwd=REPO_ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    *out, rss = p.stdout.splitlines()
    peak_mb = int(rss) / 1024
    if accepted:
        assert p.returncode == 0, p.stderr
    else:
        assert p.returncode == 1 and "too many pixels to decode safely on a Pi" in p.stderr
        assert "Traceback" not in p.stderr
    assert peak_mb <= 200, f"classify peaked at {peak_mb:.0f} MB"


def test_check_config_refuses_a_missing_allowed_signers_and_warns_on_a_missing_model_dir(tmp_path):
    """Issue 12 item 12: check-config said ok to `require_signature = true` with no allowed-signers file."""
    p = tmp_path / "config.toml"
    p.write_text(f'require_signature = true\nallowed_signers = "{tmp_path / "signers"}"\nmodel_dir = "{tmp_path / "m"}"\n')
    r = invoke("check-config", p)
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.splitlines() == [
        f"mushcam: warning: `model_dir` {tmp_path / 'm'} does not exist yet; the daemon will not start until a bundle is there",
        f"mushcam: error: `allowed_signers` {tmp_path / 'signers'} does not exist, and `require_signature = true` makes "
        "the daemon refuse every bundle without it; create it with the trusted public keys",
    ]
    (tmp_path / "signers").write_text("")
    r = invoke("check-config", p)
    assert r.exit_code == 0 and "mushcam: warning: `model_dir`" in r.stderr and "config ok" in r.stderr


@pytest.mark.parametrize("text, words", [
    ('[captures]\ndir = "/"\n', "`captures.dir` = '/' is a system folder"),
    ('model_dir = "models/x"\n', "must be an absolute path"),
    ('status_file = "/etc/passwd"\n', "outside a runtime or state folder"),
    ('camera = "usb:0"\n', "valid kinds: fake, opencv, picamera2"),
])
def test_check_config_refuses_what_a_config_could_abuse(tmp_path, text, words):
    p = tmp_path / "config.toml"
    p.write_text(text)
    r = invoke("check-config", p)
    assert r.exit_code == 1 and words in r.stderr and len(r.stderr.splitlines()) == 1
