"""mushcam-train prepare: scanning, duplicates, splitting, the manifest and its errors (no TensorFlow)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from device.errors import DataError
from train import dataset
from train.cli import app

SHAPES = {"red_circle": "edible", "blue_square": "poisonous", "green_triangle": "poisonous"}
COLOURS = {"red_circle": (220, 40, 40), "blue_square": (40, 60, 220), "green_triangle": (40, 200, 60)}


def shape_image(label: str, rng: np.random.Generator, size: int = 40) -> Image.Image:
    """A noisy background with one coloured shape at a random place and size."""
    bg = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    img = Image.fromarray(((bg.astype(np.int32) + rng.integers(0, 256, size=3)) // 2).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    r = int(rng.integers(size // 5, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
    colour = COLOURS[label]
    if label == "red_circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif label == "blue_square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return img


def jpeg_bytes(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_dataset(root: Path, per_class: int = 12, seed: int = 0, edibility: dict | None = None) -> Path:
    """Folder-per-class JPEGs of coloured shapes plus edibility.csv; returns root."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for label in SHAPES:
        (root / label).mkdir(exist_ok=True)
        for i in range(per_class):
            (root / label / f"{label}_{i:02d}.jpg").write_bytes(jpeg_bytes(shape_image(label, rng)))
    rows = ["class,edibility,common_name"] + [f"{k},{v},{k.replace('_', ' ')}" for k, v in (edibility or SHAPES).items()]
    (root / "edibility.csv").write_text("\n".join(rows) + "\n")
    return root


def add_trouble(root: Path) -> dict[str, str]:
    """A corrupt JPEG, an unsupported file, an exact and a near duplicate filed under two classes."""
    good = (root / "red_circle" / "red_circle_00.jpg").read_bytes()
    (root / "red_circle" / "broken.jpg").write_bytes(good[: len(good) // 2])
    (root / "blue_square" / "notes.txt").write_text("not a photo\n")
    (root / "blue_square" / "copy_of_red.jpg").write_bytes(good)  # exact duplicate across classes
    near = Image.open(io.BytesIO((root / "green_triangle" / "green_triangle_03.jpg").read_bytes()))
    (root / "red_circle" / "recompressed_green.jpg").write_bytes(jpeg_bytes(near, quality=60))
    return {
        "corrupt": "red_circle/broken.jpg",
        "unsupported": "blue_square/notes.txt",
        "exact": "blue_square/copy_of_red.jpg",
        "near": "red_circle/recompressed_green.jpg",
    }


runner = CliRunner()


def test_prepare_lists_bad_files_drops_cross_class_duplicates_and_splits_by_group(tmp_path):
    data = make_dataset(tmp_path / "data")
    trouble = add_trouble(data)
    # A same-class near duplicate must stay on one side of every split.
    img = Image.open(data / "blue_square" / "blue_square_05.jpg")
    (data / "blue_square" / "blue_square_05_again.jpg").write_bytes(jpeg_bytes(img, quality=70))
    work = tmp_path / "work"
    result = runner.invoke(app, ["prepare", str(data), "--out", str(work), "--seed", "3"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert trouble["corrupt"] in out and trouble["unsupported"] in out  # listed by path
    assert "skipped 2 file(s)" in out
    assert "dropped 4 image(s) filed under two classes" in out
    for key in ("exact", "near"):
        assert trouble[key] in out
    assert "red_circle/red_circle_00.jpg" in out and "green_triangle/green_triangle_03.jpg" in out

    manifest = json.loads((work / "manifest.json").read_text())
    paths = {r["path"] for r in manifest["images"]}
    assert not paths & {trouble["exact"], trouble["near"], "red_circle/red_circle_00.jpg", "green_triangle/green_triangle_03.jpg"}
    assert {s["path"] for s in manifest["skipped"]} == {trouble["corrupt"], trouble["unsupported"]}
    assert manifest["labels"] == sorted(SHAPES)
    assert manifest["classes"]["blue_square"] == {"edibility": "poisonous", "display_name": "blue square"}
    # Paths are relative to the absolute data_dir and point at real files.
    assert Path(manifest["data_dir"]).is_absolute()
    assert all((Path(manifest["data_dir"]) / p).is_file() for p in paths)
    # No duplicate group straddles two splits; the planted pair shares a group.
    split_of_group: dict[int, set] = {}
    for r in manifest["images"]:
        split_of_group.setdefault(r["group"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of_group.values())
    by_path = {r["path"]: r for r in manifest["images"]}
    assert by_path["blue_square/blue_square_05.jpg"]["group"] == by_path["blue_square/blue_square_05_again.jpg"]["group"]
    # Every class is in every split (stratified), and the table shows counts and edibility.
    for label in SHAPES:
        assert {r["split"] for r in manifest["images"] if r["label"] == label} == {"train", "val", "test"}
    assert "poisonous" in out and "edible" in out and "total" in out


def test_split_is_deterministic_for_a_seed_and_changes_with_it(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=20)
    splits = []
    for seed, name in ((1, "a"), (1, "b"), (2, "c")):
        dataset.prepare(data, tmp_path / name, seed=seed)
        m = dataset.Manifest.load(tmp_path / name)
        splits.append({r.path: r.split for r in m.images})
    assert splits[0] == splits[1]
    assert splits[0] != splits[2]
    counts = dataset.Manifest.load(tmp_path / "a").counts()
    assert counts["red_circle"] == {"train": 14, "val": 3, "test": 3}


def test_split_sha256_recognises_the_same_split_prepared_elsewhere_and_nothing_else(tmp_path):
    import shutil

    data = make_dataset(tmp_path / "data", per_class=8)
    shutil.copytree(data, tmp_path / "elsewhere" / "data")  # another machine's copy of the same photos
    dataset.prepare(data, tmp_path / "a", seed=1)
    dataset.prepare(tmp_path / "elsewhere" / "data", tmp_path / "b", seed=1)
    dataset.prepare(data, tmp_path / "c", seed=2)
    a, b, c = (tmp_path / n / dataset.MANIFEST for n in "abc")
    # The file differs (absolute folder, time), the split does not.
    assert dataset.sha256_of(a) != dataset.sha256_of(b)
    assert dataset.split_sha256(a) == dataset.split_sha256(b)
    assert dataset.split_sha256(a) != dataset.split_sha256(c)
    # One photo moved to another side is another split.
    doc = json.loads(b.read_text())
    first = next(r for r in doc["images"] if r["split"] == "test")
    first["split"] = "train"
    b.write_text(json.dumps(doc))
    assert dataset.split_sha256(a) != dataset.split_sha256(b)


def test_missing_edibility_row_is_an_error_naming_the_class(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=3, edibility={"red_circle": "edible", "blue_square": "poisonous"})
    result = runner.invoke(app, ["prepare", str(data), "--out", str(tmp_path / "work")])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "green_triangle" in result.stderr and "edibility" in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "work" / "manifest.json").exists()


def test_bad_edibility_value_and_missing_csv(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=3, edibility={**SHAPES, "blue_square": "maybe"})
    with pytest.raises(DataError, match="blue_square.*maybe"):
        dataset.prepare(data, tmp_path / "w")
    (data / "edibility.csv").unlink()
    with pytest.raises(DataError, match="edibility.csv: missing"):
        dataset.prepare(data, tmp_path / "w")


def test_empty_data_dir_and_too_few_images_are_clear_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["prepare", str(empty), "--out", str(tmp_path / "w")])
    assert result.exit_code == 1 and "no class folders" in result.stderr

    data = make_dataset(tmp_path / "data", per_class=3)
    for p in list((data / "green_triangle").iterdir())[1:]:
        p.unlink()
    result = runner.invoke(app, ["prepare", str(data), "--out", str(tmp_path / "w")])
    assert result.exit_code == 1
    assert "green_triangle (1)" in result.stderr and "at least 2" in result.stderr

    lonely = tmp_path / "lonely"
    (lonely / "red_circle").mkdir(parents=True)
    result = runner.invoke(app, ["prepare", str(lonely), "--out", str(tmp_path / "w")])
    assert result.exit_code == 1 and "only one class (red_circle)" in result.stderr


def test_bad_fractions_are_refused(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=3)
    result = runner.invoke(app, ["prepare", str(data), "--out", str(tmp_path / "w"), "--val", "0.6", "--test", "0.5"])
    assert result.exit_code == 1 and "--val" in result.stderr


def test_missing_data_dir_is_a_usage_error(tmp_path):
    result = runner.invoke(app, ["prepare", str(tmp_path / "nope"), "--out", str(tmp_path / "w")])
    assert result.exit_code == 2


def test_group_duplicates_unites_chains_within_hamming_4():
    def rec(name, phash, sha=None):
        return dataset.ImageRecord(name, "x", sha or name, f"{phash:016x}")

    records = [rec("a", 0b0), rec("b", 0b1111), rec("c", 0b1111 | 0b11110000), rec("d", 0xFFFF0000), rec("e", 0x0F0F0F, "a")]
    groups = dataset.group_duplicates(records)
    assert groups[0] == groups[1] == groups[2]  # a-b: 4 bits, b-c: 4 bits (a-c: 8, joined through b)
    assert groups[3] != groups[0]
    assert groups[4] == groups[0]  # same sha256 as a


def test_fit_needs_a_manifest(tmp_path):
    result = runner.invoke(app, ["fit", str(tmp_path), "--weights", "none"])
    assert result.exit_code == 1
    assert "run `mushcam-train prepare" in result.stderr


def test_help_and_prepare_do_not_import_tensorflow():
    code = (
        "import sys; from typer.testing import CliRunner; from train.cli import app; "
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
        "import train.dataset, train.report, train.hparams, train.model_spec; "
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TF imported'"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for cmd in ("prepare", "fit", "export", "evaluate", "edgetpu"):
        assert cmd in runner.invoke(app, ["--help"]).stdout


# --- the other pool (prepare --other) ----------------------------------------------------------------


def make_other_pool(root: Path, species: int = 9, seed: int = 5) -> Path:
    """Folder-per-species JPEGs of yellow shapes (never a known class), 1-6 photos each."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for s in range(species):
        folder = root / f"genus_sp{s}"
        folder.mkdir()
        for i in range(1 + s % 6):
            img = shape_image("red_circle", rng)
            img = Image.fromarray(np.asarray(img)[:, :, ::-1].copy())  # a different colour than any known class
            (folder / f"sp{s}_{i}.jpg").write_bytes(jpeg_bytes(img))
    return root


def test_prepare_other_pool_splits_by_species_and_drops_cross_species_duplicates(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=6)
    other = make_other_pool(tmp_path / "other")
    # The same photo under two species names: label noise, dropped on both sides.
    (other / "genus_sp8" / "copy.jpg").write_bytes((other / "genus_sp2" / "sp2_0.jpg").read_bytes())
    result = runner.invoke(app, ["prepare", str(data), "--out", str(tmp_path / "w"), "--other", str(other)])
    assert result.exit_code == 0, result.output
    m = dataset.Manifest.load(tmp_path / "w")
    assert m.labels == sorted(SHAPES) + ["other"]
    assert m.classes["other"]["role"] == "other" and m.classes["other"]["edibility"] == "poisonous"
    others = m.records()
    others = [r for r in others if r.label == "other"]
    sides: dict[str, set] = {}
    for r in others:
        sides.setdefault(r.species, set()).add(r.split)
        assert m.abspath(r).is_file()
    assert all(len(v) == 1 for v in sides.values()), sides  # a species is wholly on one side
    assert {s for v in sides.values() for s in v} == {"train", "val", "test"}
    dropped = {d["path"] for d in m.dropped}
    assert {"genus_sp8/copy.jpg", "genus_sp2/sp2_0.jpg"} <= dropped
    # The known classes' split is the same as without --other.
    plain = dataset.prepare(data, tmp_path / "plain")
    assert {r.path: r.split for r in plain.images} == {r.path: r.split for r in m.images if r.label != "other"}
    assert "species per split" in result.stdout


def test_species_split_never_puts_a_species_on_two_sides():
    rng = np.random.default_rng(0)
    for trial in range(50):
        recs = [dataset.ImageRecord(f"{s}/{i}.jpg", "other", "0" * 64, "0" * 16, species=f"sp{s}")
                for s in range(int(rng.integers(3, 40))) for i in range(int(rng.integers(1, 12)))]
        dataset.split_species(recs, seed=trial, val=0.25, test=0.25)
        sides: dict[str, set] = {}
        for r in recs:
            sides.setdefault(r.species, set()).add(r.split)
        assert all(len(v) == 1 for v in sides.values())
        assert all(r.split in dataset.SPLITS for r in recs)


def test_genus_split_puts_one_species_of_every_larger_genus_in_train_and_never_splits_a_species():
    rng = np.random.default_rng(1)
    for trial in range(50):
        genera = int(rng.integers(2, 30))
        recs = [dataset.ImageRecord(f"g{g}_s{s}/{i}.jpg", "other", "0" * 64, "0" * 16, species=f"g{g}_s{s}")
                for g in range(genera) for s in range(int(rng.integers(1, 6))) for i in range(int(rng.integers(1, 12)))]
        dataset.split_species(recs, seed=trial, val=0.25, test=0.25, by="genus")
        sides: dict[str, set] = {}
        for r in recs:
            sides.setdefault(r.species, set()).add(r.split)
        assert all(len(v) == 1 for v in sides.values())
        by_genus: dict[str, dict[str, str]] = {}
        for sp, v in sides.items():
            by_genus.setdefault(dataset.genus_of(sp), {})[sp] = next(iter(v))
        for g, members in by_genus.items():
            got = sorted(members.values())
            if len(members) >= 2:
                assert "train" in got and set(got) != {"train"}, (g, members)
            if len(members) >= 3:
                assert set(got) == {"train", "val", "test"}, (g, members)
    # An unknown way of dealing species is refused, naming the valid ones.
    with pytest.raises(DataError, match="species, genus"):
        dataset.split_species(recs, seed=0, val=0.25, test=0.25, by="family")


def test_prepare_records_the_other_split(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=3)
    other = make_other_pool(tmp_path / "other", species=6)
    m = dataset.prepare(data, tmp_path / "w", other_dir=other, other_split="genus")
    assert m.other_split == "genus" and dataset.Manifest.load(tmp_path / "w").other_split == "genus"
    assert dataset.Manifest.load(tmp_path / "w").to_dict()["other_split"] == "genus"


def test_prepare_refuses_an_other_species_that_is_a_known_class(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=3)
    other = make_other_pool(tmp_path / "other", species=3)
    (other / "red_circle").mkdir()
    with pytest.raises(DataError, match="also a known class"):
        dataset.prepare(data, tmp_path / "w", other_dir=other)


def test_train_genera_go_wholly_to_train_and_val_test_keep_their_share():
    rng = np.random.default_rng(2)
    for trial in range(40):
        by = ("species", "genus")[trial % 2]
        recs = [dataset.ImageRecord(f"g{g}_s{s}/{i}.jpg", "other", "0" * 64, "0" * 16, species=f"g{g}_s{s}")
                for g in range(int(rng.integers(4, 20))) for s in range(int(rng.integers(1, 5)))
                for i in range(int(rng.integers(1, 12)))]
        dataset.split_species(recs, seed=trial, val=0.25, test=0.25, by=by, train_genera=["g0", "g1"])
        sides: dict[str, set] = {}
        for r in recs:
            sides.setdefault(r.species, set()).add(r.split)
        assert all(len(v) == 1 for v in sides.values())
        assert all(v == {"train"} for sp, v in sides.items() if dataset.genus_of(sp) in ("g0", "g1")), by
        n = len(recs)
        forced = sum(dataset.genus_of(r.species) in ("g0", "g1") for r in recs)
        if forced < n / 2:  # room left for val and test: each still gets about its share of the whole pool
            assert any(r.split == "val" for r in recs) and any(r.split == "test" for r in recs)
    # Without train genera, the species split is exactly what it was (the shipped manifest's split).
    a = [dataset.ImageRecord(f"g{g}_s{s}/{i}.jpg", "other", "0" * 64, "0" * 16, species=f"g{g}_s{s}")
         for g in range(9) for s in range(3) for i in range(1 + (g + s) % 5)]
    b = [dataset.ImageRecord(**vars(r)) for r in a]
    dataset.split_species(a, seed=0, val=0.25, test=0.25)
    dataset.split_species(b, seed=0, val=0.25, test=0.25, train_genera=())
    assert [r.split for r in a] == [r.split for r in b]
    with pytest.raises(DataError, match="no species folder of that genus"):
        dataset.split_species(a, seed=0, val=0.25, test=0.25, train_genera=["nosuch"])


def test_prepare_other_train_genus_is_recorded_and_needs_other(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=3)
    other = make_other_pool(tmp_path / "other", species=6)
    result = runner.invoke(app, ["prepare", str(data), "--out", str(tmp_path / "w"), "--other", str(other),
                                 "--other-train-genus", "genus"])
    assert result.exit_code == 0, result.output
    m = dataset.Manifest.load(tmp_path / "w")
    assert m.other_train_genera == ["genus"]
    assert {r.split for r in m.records() if r.label == "other"} == {"train"}
    # A manifest prepared without the option has no such key, so its split hash is what it was.
    plain = dataset.prepare(data, tmp_path / "p", other_dir=other)
    assert "other_train_genera" not in plain.to_dict() and plain.other_train_genera == []
    result = runner.invoke(app, ["prepare", str(data), "--out", str(tmp_path / "x"), "--other-train-genus", "genus"])
    assert result.exit_code != 0 and "pass --other" in result.output and "Traceback" not in result.output
