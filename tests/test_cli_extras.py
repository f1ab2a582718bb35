"""One line instead of a traceback when an optional part is missing; `mushcam --version`; HEIC photos;
the classify summary counts what it skipped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import device.preprocess as preprocess
from device.cli import app as device_app
from device.errors import ImageError
from tests.make_tiny_bundle import COLOURS, colour_image
from train.cli import app as train_app

REPO = Path(__file__).resolve().parents[1]
TRAIN_EXTRA = "tensorflow,keras,imagehash,rich,matplotlib"

# Runs mushcam-train's entry point with some modules made unimportable, as on a machine without them.
HIDE = """
import sys
HIDE = set(sys.argv[1].split(","))
class _Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDE:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _Hide())
sys.argv = ["mushcam-train", *sys.argv[2:]]
from train.cli import main
main()
"""


def train_without(hidden: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HIDE, hidden, *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def assert_install_hint(result: subprocess.CompletedProcess, *modules: str) -> None:
    """Exit 1, no traceback, and (after any progress lines) one error line naming the module and the fix."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "ModuleNotFoundError" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0] == result.stderr.strip().splitlines()[-1], result.stderr
    assert any(f"{m} is not installed" in errors[0] for m in modules), result.stderr
    assert "pip install -e '.[train]'" in errors[0]


@pytest.fixture
def data_dir(tmp_path) -> Path:
    d = tmp_path / "data"
    for cls, rgb in COLOURS.items():
        (d / cls).mkdir(parents=True)
        for i in range(4):
            colour_image(rgb, seed=i).save(d / cls / f"{i}.jpg")
    (d / "edibility.csv").write_text("class,edibility\n" + "".join(f"{c},poisonous\n" for c in COLOURS))
    return d


def test_mushcam_train_without_the_train_extra_says_how_to_install_it():
    assert_install_hint(train_without(TRAIN_EXTRA, "--help"), "rich")


def test_a_command_needing_a_missing_module_says_how_to_install_it(data_dir, tmp_path):
    # rich is there, imagehash is not: prepare gets as far as hashing, then one line.
    assert_install_hint(train_without("imagehash", "prepare", str(data_dir), "--out", str(tmp_path / "w")), "imagehash")


def test_fit_without_tensorflow_says_how_to_install_it(data_dir, tmp_path):
    work = tmp_path / "work"
    assert CliRunner().invoke(train_app, ["prepare", str(data_dir), "--out", str(work)]).exit_code == 0
    assert_install_hint(train_without("tensorflow,keras", "fit", str(work), "--weights", "none"), "tensorflow", "keras")


def test_other_import_errors_are_not_hidden():
    """Only the train extra's modules get the hint: a bug elsewhere still shows its traceback."""
    result = train_without("train", "--help")
    assert result.returncode == 1 and "ModuleNotFoundError" in result.stderr


def test_mushcam_version():
    from importlib.metadata import version

    r = CliRunner().invoke(device_app, ["--version"])
    assert r.exit_code == 0
    assert r.stdout.strip() == f"mushcam {version('mushcam')}"


# --- HEIC ----------------------------------------------------------------------------------------------

def _heic_bytes() -> bytes:
    """A real HEIC file if pillow-heif can write one; else just its header (enough to be recognised)."""
    pillow_heif = pytest.importorskip("pillow_heif", reason="the heic extra (pillow-heif) is not installed")
    pillow_heif.register_heif_opener()
    import io

    buf = io.BytesIO()
    Image.fromarray(np.asarray(colour_image(COLOURS["red_cap"], size=(48, 64)))).save(buf, format="HEIF", quality=90)
    return buf.getvalue()


def test_heic_is_decoded_with_the_heic_extra(tmp_path, tiny_bundle, monkeypatch):
    data = _heic_bytes()
    monkeypatch.setattr(preprocess, "_heif_registered", False)
    path = tmp_path / "IMG_0001.HEIC"
    path.write_bytes(data)
    rgb = preprocess.load_image(path)
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
    assert abs(rgb[..., 0].mean() - COLOURS["red_cap"][0]) < 20  # the red photo, not garbage
    r = CliRunner().invoke(device_app, ["classify", "--model", str(tiny_bundle), str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "red cap" in r.stdout and "1 photo classified" in r.stderr


def test_heic_without_the_extra_is_one_line_saying_how(tmp_path, monkeypatch):
    # A HEIF header Pillow cannot read, with pillow-heif hidden (as if the extra were not installed).
    path = tmp_path / "IMG_0002.heic"
    path.write_bytes(b"\x00\x00\x00\x1cftypheic\x00\x00\x00\x00mif1heicmiaf" + b"\x00" * 64)
    monkeypatch.setitem(sys.modules, "pillow_heif", None)
    monkeypatch.setattr(preprocess, "_heif_registered", False)
    for unregister in [k for k, v in Image.OPEN.items() if k.upper().startswith(("HEIF", "AVIF"))]:
        monkeypatch.delitem(Image.OPEN, unregister)
    monkeypatch.setattr(Image, "ID", [i for i in Image.ID if not i.upper().startswith(("HEIF", "AVIF"))])
    with pytest.raises(ImageError) as err:
        preprocess.load_image(path)
    assert str(err.value) == (
        f"{path}: a HEIC/HEIF photo; install the heic extra to decode it (pip install 'mushcam[heic]'), "
        "or convert it to JPEG"
    )


# --- classify's summary ----------------------------------------------------------------------------------

def test_classify_summary_counts_skipped_and_undecodable_files(tmp_path, tiny_bundle):
    d = tmp_path / "photos"
    d.mkdir()
    colour_image(COLOURS["red_cap"]).save(d / "a.jpg")
    colour_image(COLOURS["blue_cap"]).save(d / "b.png")
    (d / "broken.jpg").write_bytes(b"not a jpeg")
    (d / "notes.txt").write_text("x")
    (d / "result.json").write_text("{}")
    (d / "more").mkdir()
    (d / "more" / "list.txt").write_text("y")
    r = CliRunner().invoke(device_app, ["classify", "--model", str(tiny_bundle), str(d)])
    assert r.exit_code == 1
    assert "mushcam: 2 photos classified, 1 could not be decoded, 3 other files skipped, not images (.json, .txt)" in r.stderr.splitlines()


def test_classify_json_keeps_stdout_json_and_still_reports_skipped_files(tmp_path, tiny_bundle):
    d = tmp_path / "photos"
    d.mkdir()
    colour_image(COLOURS["red_cap"]).save(d / "a.jpg")
    (d / "notes.txt").write_text("x")
    r = CliRunner().invoke(device_app, ["classify", "--json", "--model", str(tiny_bundle), str(d)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [Path(row["path"]).name for row in rows] == ["a.jpg"]
    assert "mushcam: 1 photo classified, 1 other file skipped, not images (.txt)" in r.stderr.splitlines()
