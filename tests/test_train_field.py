"""`mushcam-train import-captures`: every mistake in the labels or the folders is one line naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.make_tiny_bundle import COLOURS, colour_image
from train.cli import app

runner = CliRunner()
PRESS = "20260601-101500-000000001-UNSURE"


@pytest.fixture
def field(tmp_path) -> Path:
    """field/<host>/<press>/ for two hosts that each have a press named PRESS, plus one more on pi1."""
    root = tmp_path / "field"
    for host, name in (("pi1", PRESS), ("pi2", PRESS), ("pi1", "20260601-101600-000000002-EDIBLE")):
        d = root / host / name
        d.mkdir(parents=True)
        colour_image(COLOURS["red_cap"]).save(d / "frame_0.jpg")
        (d / "result.json").write_text('{"verdict": "UNSURE"}')
    return root


@pytest.fixture
def edibility(tmp_path) -> Path:
    path = tmp_path / "edibility.csv"
    path.write_text("class,edibility\nred_cap,poisonous\ngreen_cap,edible\n")
    return path


def run(field: Path, labels_text: str, tmp_path: Path, *extra: str):
    labels = tmp_path / "labels.csv"
    labels.write_text(labels_text)
    return runner.invoke(app, ["import-captures", str(field), "--labels", str(labels), "--out", str(tmp_path / "data"), *extra])


def one_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "labels, words",
    [
        (f"press,species\n{PRESS},red_cap\n", "is on several hosts (pi1/" + PRESS),
        ("press,species\npi3/nothing,red_cap\n", "'pi3/nothing' is not among the collected presses"),
        (f"press,species\npi1/{PRESS},Red_Cap\n", "labels.csv:2: species 'Red_Cap' is not a known class (red_cap, green_cap)"),
        (f"press,species\npi1/{PRESS},unknown\n", "labelled 'unknown' (e.g. pi1/" + PRESS + "); give --other-out DIR"),
        (f"press,species\npi1/{PRESS},red_cap\npi1/{PRESS},green_cap\n", "labels.csv:3: press pi1/" + PRESS + " is labelled twice"),
        ("name,label\nx,y\n", "needs a header row with columns press,species"),
    ],
)
def test_label_mistakes_are_one_line(field, edibility, tmp_path, labels, words):
    line = one_error(run(field, labels, tmp_path, "--edibility", str(edibility)))
    assert words in line
    assert not (tmp_path / "data").exists()  # nothing written before the labels are all good


def test_no_edibility_table_says_where_to_get_one(field, tmp_path):
    line = one_error(run(field, f"press,species\npi1/{PRESS},red_cap\n", tmp_path))
    assert "no edibility table: give --base DATA_DIR" in line


def test_a_different_edibility_table_already_there_is_refused(field, edibility, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "edibility.csv").write_text("class,edibility\nred_cap,edible\n")
    line = one_error(run(field, f"press,species\npi1/{PRESS},red_cap\n", tmp_path, "--edibility", str(edibility)))
    assert "differs from" in line
    assert (tmp_path / "data" / "edibility.csv").read_text() == "class,edibility\nred_cap,edible\n"


def test_import_is_idempotent_and_counts(field, edibility, tmp_path):
    labels = f"press,species\npi1/{PRESS},red_cap\npi2/{PRESS},\n"
    first = run(field, labels, tmp_path, "--edibility", str(edibility))
    assert first.exit_code == 0, first.output
    assert "1 frame(s) from 1 labelled press(es)" in first.stdout
    assert "1 press(es) with an empty species skipped" in first.stderr
    assert "1 collected press(es) not in" in first.stderr
    made = sorted(p.relative_to(tmp_path / "data").as_posix() for p in (tmp_path / "data").rglob("*"))
    assert made == ["edibility.csv", "red_cap", f"red_cap/pi1-{PRESS}-frame_0.jpg"]
    second = run(field, labels, tmp_path, "--edibility", str(edibility))
    assert second.exit_code == 0
    assert sorted(p.relative_to(tmp_path / "data").as_posix() for p in (tmp_path / "data").rglob("*")) == made


def test_out_is_required_unless_template(field, tmp_path):
    r = runner.invoke(app, ["import-captures", str(field), "--labels", str(tmp_path / "l.csv")])
    assert r.exit_code == 2 and "--out DATA_DIR is needed" in r.stderr


def test_a_press_whose_label_is_cleared_leaves_its_class(field, edibility, tmp_path):
    assert run(field, f"press,species\npi1/{PRESS},red_cap\n", tmp_path, "--edibility", str(edibility)).exit_code == 0
    assert (tmp_path / "data" / "red_cap" / f"pi1-{PRESS}-frame_0.jpg").is_file()
    cleared = run(field, f"press,species\npi1/{PRESS},\n", tmp_path, "--edibility", str(edibility))
    assert cleared.exit_code == 0 and "1 old copy(ies) of relabelled presses removed" in cleared.stderr
    assert not list((tmp_path / "data").rglob(f"pi1-{PRESS}-*"))
