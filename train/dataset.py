"""`prepare`: scan a folder-per-class photo set, find duplicates, split by duplicate group, write a manifest.

Layout read::

    DATA_DIR/
      edibility.csv            class,edibility[,common_name]  (edibility: edible | poisonous)
      <class>/*.jpg|png|...    one folder per class; the folder name is the label

What `prepare` does, in order:

1. decodes every file fully with device.preprocess.load_image (the device's decoder); a corrupt or
   unsupported file is listed by path and skipped;
2. hashes each image: sha256 of the file's bytes (exact duplicates) and a 64-bit perceptual hash
   (imagehash.phash of the decoded image) for near-duplicates (Hamming distance <= 4);
3. unites exact and near duplicates into groups (union-find), and the frames of one device press
   (`<host>-<press>-frame_N.*`, as `import-captures` names them): three views of one mushroom;
4. drops every group that spans two classes (the same photo filed under two labels is label noise), and
   keeps one file of each set of byte-identical copies within a class (the copies add nothing);
5. splits train/val/test by GROUP, stratified per class and seeded, so no photograph (or a re-crop of it)
   sits on both sides of a split and inflates validation accuracy;
6. writes WORK/manifest.json. No image is copied: paths in the manifest are RELATIVE to `data_dir`, which
   is stored as an absolute path (move the photos, then edit `data_dir` or re-run prepare).

With `--other OTHER_DIR` (one folder per species of fungi that are NOT the known classes, e.g.
../shared/data/fungi-other), those photos become one more class, `other` (role `other`: "not a species
the model knows", never EDIBLE), and each record keeps its `species` (the folder name). The other pool is
split **by species**: a species is wholly in train, val or test, so "unseen" figures on val/test are on
species the model never saw. Near-duplicate groups are formed over both pools together; a group that
spans two other species or an other species and a known class is dropped whole (the same photo under two
names), so no photograph sits on two sides of the split.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import zlib
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from device.errors import DataError, ImageError

FORMAT = "mushcam-manifest/1"
MANIFEST = "manifest.json"
EDIBILITY_CSV = "edibility.csv"
EDIBILITY = ("edible", "poisonous")
OTHER = "other"  # label (and role) of the "not one of the known species" class
OTHER_DISPLAY = "unknown fungus"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".heic", ".heif"})
SPLITS = ("train", "val", "test")
NEAR_DUPLICATE_BITS = 4  # pHash Hamming distance treated as "the same photograph"
# A frame of a field press (train/field.py names them): the press is one scene however far apart the
# frames' hashes are, so it must sit wholly in one split (and calibration must not see its twin in train).
PRESS_FRAME = re.compile(r"^(?P<press>.+)-frame_\d+$")
MIN_IMAGES_PER_CLASS = 2

Track = Callable[[Sequence, str], Iterable]


def _no_progress(items: Sequence, description: str) -> Iterable:
    return items


@dataclass
class ImageRecord:
    """One usable image: where it is, its label, its hashes, its duplicate group and its split."""

    path: str  # relative to the manifest's data_dir, POSIX separators
    label: str
    sha256: str
    phash: str  # 16 hex digits
    group: int = -1
    split: str = ""
    species: str = ""  # the species folder (other pool); empty for known classes, whose label is the species


@dataclass
class Manifest:
    """The result of `prepare`, stored as WORK/manifest.json and read by fit, export and evaluate."""

    data_dir: Path
    labels: list[str]
    classes: dict[str, dict]  # label -> {"edibility": ..., "display_name": ...}
    images: list[ImageRecord]
    seed: int = 0
    val: float = 0.15
    test: float = 0.15
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"}: corrupt or unsupported
    dropped: list[dict] = field(default_factory=list)  # {"path", "label", "reason"}: cross-class duplicates
    copies: list[dict] = field(default_factory=list)  # {"path", "label", "same_as"}: byte-identical copies
    created: str = ""
    other_dir: Path | None = None  # the other pool's root (its records' paths are relative to it)
    other_val: float = 0.0
    other_test: float = 0.0
    other_split: str = "species"  # how the other pool's species were dealt (OTHER_SPLITS)
    other_train_genera: list[str] = field(default_factory=list)  # genera put wholly in train

    def records(self, split: str | None = None) -> list[ImageRecord]:
        """Images of one split (or all), in manifest order."""
        return [r for r in self.images if split is None or r.split == split]

    def abspath(self, record: ImageRecord) -> Path:
        if record.label == OTHER and self.other_dir is not None:
            return self.other_dir / record.path
        return self.data_dir / record.path

    def species(self, record: ImageRecord) -> str:
        """The species a photo shows: its folder in the other pool, else its label."""
        return record.species or record.label

    def other_species(self, split: str) -> list[str]:
        """The other-pool species of one split (sorted)."""
        return sorted({r.species for r in self.records(split) if r.label == OTHER})

    def label_index(self, record: ImageRecord) -> int:
        return self.labels.index(record.label)

    def counts(self) -> dict[str, dict[str, int]]:
        """label -> split -> number of images."""
        table = {lab: {s: 0 for s in SPLITS} for lab in self.labels}
        for r in self.images:
            table[r.label][r.split] += 1
        return table

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "created": self.created,
            "data_dir": str(self.data_dir),
            "paths": "relative to data_dir",
            "seed": self.seed,
            "val": self.val,
            "test": self.test,
            "labels": self.labels,
            "classes": self.classes,
            "counts": self.counts(),
            "images": [asdict(r) for r in self.images],
            "skipped": self.skipped,
            "dropped": self.dropped,
            "copies": self.copies,
            **({"other_dir": str(self.other_dir), "other_val": self.other_val, "other_test": self.other_test,
                "other_split": self.other_split,
                # only when used, so a manifest prepared without it keeps its split hash
                **({"other_train_genera": self.other_train_genera} if self.other_train_genera else {}),
                "other_species": {sp: self.other_species(sp) for sp in SPLITS}} if self.other_dir else {}),
        }

    def save(self, work: Path) -> Path:
        """Write WORK/manifest.json atomically."""
        from device.bundle import write_json_atomic

        work = Path(work)
        work.mkdir(parents=True, exist_ok=True)
        path = work / MANIFEST
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def load(cls, work: Path) -> "Manifest":
        """Read WORK/manifest.json; DataError with the fix when it is missing or not ours."""
        path = Path(work) / MANIFEST
        if not path.is_file():
            raise DataError(f"{work}: no {MANIFEST}; run `mushcam-train prepare DATA_DIR --out {work}` first")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: not valid JSON ({e}); re-run mushcam-train prepare") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise DataError(f"{path}: not a {FORMAT} manifest; re-run mushcam-train prepare")
        images = [ImageRecord(**r) for r in d["images"]]
        return cls(
            Path(d["data_dir"]), list(d["labels"]), dict(d["classes"]), images, int(d.get("seed", 0)),
            float(d.get("val", 0.15)), float(d.get("test", 0.15)), list(d.get("skipped", [])),
            list(d.get("dropped", [])), list(d.get("copies", [])), str(d.get("created", "")),
            Path(d["other_dir"]) if d.get("other_dir") else None, float(d.get("other_val", 0.0)),
            float(d.get("other_test", 0.0)), str(d.get("other_split", "species")),
            [str(g) for g in d.get("other_train_genera", [])],
        )


def read_edibility(data_dir: Path, labels: Sequence[str]) -> dict[str, dict]:
    """Read DATA_DIR/edibility.csv into label -> {edibility, display_name}; every label needs a row."""
    path = Path(data_dir) / EDIBILITY_CSV
    if not path.is_file():
        raise DataError(
            f"{path}: missing; write a CSV with columns class,edibility[,common_name] "
            f"(edibility: edible or poisonous) with one row per class folder"
        )
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if not rows or "class" not in rows[0] or "edibility" not in rows[0]:
        raise DataError(f"{path}: needs a header with columns class,edibility[,common_name]")
    table: dict[str, dict] = {}
    for line, row in enumerate(rows, start=2):
        name = (row.get("class") or "").strip()
        if not name:
            continue
        edibility = (row.get("edibility") or "").strip().lower()
        if edibility not in EDIBILITY:
            raise DataError(f"{path}:{line}: class {name!r} has edibility {edibility!r}; use edible or poisonous")
        display = (row.get("common_name") or "").strip() or name
        table[name] = {"edibility": edibility, "display_name": display}
    missing = [lab for lab in labels if lab not in table]
    if missing:
        raise DataError(
            f"{path}: no edibility for class {', '.join(repr(m) for m in missing)}; "
            "add a row `class,edibility` (edible or poisonous) for it"
        )
    return {lab: table[lab] for lab in labels}


def class_folders(data_dir: Path) -> list[Path]:
    """The class folders of a folder-per-class data set (sorted; hidden folders ignored)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such data folder")
    folders = sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{data_dir}: no class folders; expected {data_dir}/<class>/*.jpg and {EDIBILITY_CSV}")
    return folders


def list_files(folder: Path) -> list[Path]:
    """Every non-hidden file under a class folder (recursively), sorted."""
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _phash(rgb: np.ndarray) -> int:
    import imagehash
    from PIL import Image

    return int(str(imagehash.phash(Image.fromarray(rgb))), 16)


def scan(data_dir: Path, labels: Sequence[str], track: Track = _no_progress,
         as_other: bool = False) -> tuple[list[ImageRecord], list[dict]]:
    """Decode and hash every file of every class; return (usable images, skipped files with reasons).

    With `as_other`, `labels` are species folders of the other pool: each record is labelled `other`
    and keeps its folder as `species`.
    """
    from device.preprocess import load_image

    data_dir = Path(data_dir)
    jobs = [(lab, p) for lab in labels for p in list_files(data_dir / lab)]
    records: list[ImageRecord] = []
    skipped: list[dict] = []
    for label, path in track(jobs, "scanning"):
        rel = path.relative_to(data_dir).as_posix()
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append({"path": rel, "reason": f"unsupported file type {path.suffix or '(none)'}"})
            continue
        try:
            data = path.read_bytes()
            rgb = load_image(data)  # full decode: a truncated file fails here
        except ImageError as e:
            reason = str(e).removeprefix("<bytes>: ")
            skipped.append({"path": rel, "reason": reason})
            continue
        except OSError as e:
            skipped.append({"path": rel, "reason": f"cannot read ({e.strerror or e})"})
            continue
        digest, ph = hashlib.sha256(data).hexdigest(), f"{_phash(rgb):016x}"
        if as_other:
            records.append(ImageRecord(rel, OTHER, digest, ph, species=label))
        else:
            records.append(ImageRecord(rel, label, digest, ph))
    return records, skipped


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def group_duplicates(records: list[ImageRecord], max_bits: int = NEAR_DUPLICATE_BITS) -> list[int]:
    """Group ids (0..k-1, in order of first appearance) uniting exact (sha256) and near (pHash) duplicates."""
    n = len(records)
    uf = _UnionFind(n)
    first_by_sha: dict[str, int] = {}
    for i, r in enumerate(records):
        if r.sha256 in first_by_sha:
            uf.union(first_by_sha[r.sha256], i)
        else:
            first_by_sha[r.sha256] = i
    first_by_press: dict[str, int] = {}
    for i, r in enumerate(records):
        m = PRESS_FRAME.match(Path(r.path).stem)
        if m:
            uf.union(first_by_press.setdefault(m["press"], i), i)
    hashes = np.array([int(r.phash, 16) for r in records], dtype=np.uint64)
    for i in range(n - 1):
        # One vectorised row of the pairwise Hamming matrix at a time: O(n^2) bit ops, no n x n array.
        dist = np.bitwise_count(hashes[i + 1:] ^ hashes[i])
        for j in np.nonzero(dist <= max_bits)[0]:
            uf.union(i, i + 1 + int(j))
    roots: dict[int, int] = {}
    return [roots.setdefault(uf.find(i), len(roots)) for i in range(n)]


def _resolve_duplicates(records: list[ImageRecord]) -> tuple[list[ImageRecord], list[dict], list[dict]]:
    """Drop cross-class groups whole; keep one file per set of byte-identical copies in a class."""
    by_group: dict[int, list[ImageRecord]] = {}
    for r in records:
        by_group.setdefault(r.group, []).append(r)
    kept: list[ImageRecord] = []
    dropped: list[dict] = []
    copies: list[dict] = []
    for members in by_group.values():
        # Other-pool photos count under their species: one photo under two species names is label noise too.
        labels = sorted({m.species or m.label for m in members})
        if len(labels) > 1:
            for m in members:
                dropped.append({
                    "path": m.path, "label": m.label,
                    "reason": f"same or near-identical photo filed under {' and '.join(labels)}",
                })
            continue
        seen: dict[str, str] = {}
        for m in members:
            if m.sha256 in seen:
                copies.append({"path": m.path, "label": m.label, "same_as": seen[m.sha256]})
            else:
                seen[m.sha256] = m.path
                kept.append(m)
    kept.sort(key=lambda r: (r.label, r.species, r.path))
    dropped.sort(key=lambda d: d["path"])
    return kept, dropped, copies


def split_groups(records: list[ImageRecord], labels: Sequence[str], seed: int, val: float, test: float) -> None:
    """Assign each record's `split`, by group, stratified per class, deterministic for a seed.

    Per class, the groups are shuffled (the generator is seeded with the seed and the class name, so adding
    a class never reshuffles the others) and each group goes to the split furthest below its target count.
    """
    fractions = {"train": 1.0 - val - test, "val": val, "test": test}
    for label in labels:
        groups: dict[int, list[ImageRecord]] = {}
        for r in records:
            if r.label == label:
                groups.setdefault(r.group, []).append(r)
        _assign_splits(groups, np.random.default_rng([seed, zlib.crc32(label.encode())]), fractions)


def _assign_splits(units: dict, rng, fractions: dict[str, float], have: dict | None = None,
                   total: int | None = None) -> None:
    """Shuffle the units (groups or species, each a list of records) and give each whole unit the split
    furthest below its target share of the records (`have`/`total`: records already dealt elsewhere)."""
    order = sorted(units)
    rng.shuffle(order)
    n = total if total is not None else sum(len(u) for u in units.values())
    have = have if have is not None else {s: 0 for s in SPLITS}
    for key in order:
        # Ties go to the rarer splits first so tiny classes still get a validation image.
        split = max(("val", "test", "train"), key=lambda s: fractions[s] * n - have[s] if fractions[s] > 0 else -1e9)
        for r in units[key]:
            r.split = split
        have[split] += len(units[key])


OTHER_SPLITS = ("species", "genus")


def genus_of(species: str) -> str:
    """The genus of an other-pool folder name (`rubroboletus_satanas` -> `rubroboletus`)."""
    return species.split("_", 1)[0]


def split_species(records: list[ImageRecord], seed: int, val: float, test: float, by: str = "species",
                  train_genera: Sequence[str] = ()) -> None:
    """Assign each other-pool record's `split` by SPECIES: a species is wholly in train, val or test.

    `species`: the species are shuffled (seeded) and each goes to the split furthest below its target share
    of the pool's photos, so the splits get about the asked fraction of photos, not of species.
    `genus`: the same, stratified by genus. In each genus with several species (shuffled), the first goes
    to train, the next ones to val and test (the one further below its share first), then round again;
    single-species genera then fill each split up to its share. So every genus with two or more species
    is learnt as `other` from one of them, and its other species test the model on a relative it saw:
    the look-alike a forager meets (seen: with a plain species split, every red-stemmed bolete but one
    small species fell on the val and test side, and the scarletina fold took unseen red-stemmed boletes
    for penny buns).
    `train_genera`: every species of these genera goes to train, whatever `by` says (the look-alikes a
    model must learn as `other`, at the cost of not measuring them as unseen species); the rest is dealt
    as above, val and test keeping their share of the whole pool.
    """
    if by not in OTHER_SPLITS:
        raise DataError(f"other pool split {by!r}: use one of {', '.join(OTHER_SPLITS)}")
    fractions = {"train": 1.0 - val - test, "val": val, "test": test}
    by_species: dict[str, list[ImageRecord]] = {}
    for r in records:
        by_species.setdefault(r.species, []).append(r)
    n = sum(len(u) for u in by_species.values())
    have = {s: 0 for s in SPLITS}
    forced = sorted(set(train_genera))
    missing = [g for g in forced if not any(genus_of(sp) == g for sp in by_species)]
    if missing:
        raise DataError(f"--other-train-genus {missing[0]!r}: no species folder of that genus in the other pool "
                        f"(folders are named genus_species, e.g. {sorted(by_species)[0]!r})")
    for sp in [sp for sp in sorted(by_species) if genus_of(sp) in forced]:
        # Whole genera the model must learn as `other`; val and test still get their share of the
        # whole pool (have/total), so they are filled from the remaining species.
        for r in by_species.pop(sp):
            r.split = "train"
            have["train"] += 1
    rng = np.random.default_rng([seed, zlib.crc32(OTHER.encode())])
    if by == "species":
        _assign_splits(by_species, rng, fractions, have=have, total=n)
        return
    genera: dict[str, list[str]] = {}
    for sp in sorted(by_species):
        genera.setdefault(genus_of(sp), []).append(sp)
    singles: dict[str, list[ImageRecord]] = {}
    order = sorted(genera)
    rng.shuffle(order)
    for g in order:
        members = list(genera[g])
        if len(members) == 1:
            singles[members[0]] = by_species[members[0]]
            continue
        rng.shuffle(members)
        held: list[str] = []  # this round's val/test sides, the one further below its share first
        for i, sp in enumerate(members):
            if i % 3 == 0:
                split = "train"
                held = sorted((s for s in ("val", "test") if fractions[s] > 0),
                              key=lambda s: fractions[s] * n - have[s], reverse=True)
            else:
                split = held[(i % 3 - 1) % len(held)] if held else "train"
            for r in by_species[sp]:
                r.split = split
            have[split] += len(by_species[sp])
    _assign_splits(singles, rng, fractions, have=have, total=n)


def other_folders(other_dir: Path) -> list[str]:
    """Species folders of the other pool (sorted; hidden ones ignored)."""
    return [p.name for p in class_folders(other_dir)]


def prepare(
    data_dir: Path, work: Path, seed: int = 0, val: float = 0.15, test: float = 0.15, track: Track = _no_progress,
    other_dir: Path | None = None, other_val: float = 0.25, other_test: float = 0.25, other_split: str = "species",
    other_train_genera: Sequence[str] = (),
) -> Manifest:
    """Scan DATA_DIR (and OTHER_DIR), group duplicates, split, and write WORK/manifest.json; return the manifest."""
    if not (0.0 <= val < 1.0 and 0.0 <= test < 1.0 and val + test < 1.0):
        raise DataError(f"--val {val} and --test {test} must each be in [0, 1) and sum to less than 1")
    if other_dir is not None and not (0.0 <= other_val < 1.0 and 0.0 <= other_test < 1.0 and other_val + other_test < 1.0):
        raise DataError(f"--other-val {other_val} and --other-test {other_test} must each be in [0, 1) and sum to less than 1")
    if other_train_genera and other_dir is None:
        raise DataError("--other-train-genus names genera of the other pool: pass --other OTHER_DIR too")
    data_dir = Path(data_dir).resolve()
    labels = [p.name for p in class_folders(data_dir)]
    if len(labels) < 2:
        raise DataError(f"{data_dir}: only one class ({labels[0]}); a classifier needs at least 2 class folders")
    if OTHER in labels:
        raise DataError(f"{data_dir}: a class folder is named {OTHER!r}, the name reserved for --other; rename it")
    classes = read_edibility(data_dir, labels)  # fail before the slow scan
    species: list[str] = []
    if other_dir is not None:
        other_dir = Path(other_dir).resolve()
        species = other_folders(other_dir)
        clash = sorted(set(species) & set(labels))
        if clash:
            raise DataError(f"{other_dir}: species folder {clash[0]!r} is also a known class; the other pool "
                            "must hold only species the model is not to know")
    records, skipped = scan(data_dir, labels, track)
    if other_dir is not None:
        other_recs, other_skipped = scan(other_dir, species, track, as_other=True)
        records += other_recs
        skipped += [{**s, "pool": "other"} for s in other_skipped]
    for r, gid in zip(records, group_duplicates(records)):
        r.group = gid
    kept, dropped, copies = _resolve_duplicates(records)
    others = [r for r in kept if r.label == OTHER]
    kept = [r for r in kept if r.label != OTHER]
    counts = {lab: 0 for lab in labels}
    for r in kept:
        counts[r.label] += 1
    if not kept:
        raise DataError(f"{data_dir}: no usable images in any class folder")
    short = [f"{lab} ({n})" for lab, n in counts.items() if n < MIN_IMAGES_PER_CLASS]
    if short:
        raise DataError(
            f"{data_dir}: too few usable images in class {', '.join(short)}; each class needs at least "
            f"{MIN_IMAGES_PER_CLASS} (add photos or remove the folder)"
        )
    # Renumber groups densely after dropping, in manifest order, so group ids are stable for a data set.
    renumber: dict[int, int] = {}
    for r in kept + others:  # known classes first: their group ids (and so their split) do not depend on --other
        r.group = renumber.setdefault(r.group, len(renumber))
    split_groups(kept, labels, seed, val, test)
    if other_dir is not None:
        if not others:
            raise DataError(f"{other_dir}: no usable images in any species folder")
        split_species(others, seed, other_val, other_test, other_split, other_train_genera)
        kept += others
        labels = labels + [OTHER]
        # edibility "poisonous": an older device that knows no roles still never answers EDIBLE for it.
        classes[OTHER] = {"edibility": "poisonous", "role": OTHER, "display_name": OTHER_DISPLAY}
    manifest = Manifest(
        data_dir, labels, classes, kept, seed, val, test, skipped, dropped, copies,
        datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        other_dir, other_val if other_dir else 0.0, other_test if other_dir else 0.0, other_split,
        sorted(set(other_train_genera)) if other_dir else [],
    )
    manifest.save(work)
    return manifest


def load_rgb_arrays(
    manifest: Manifest, records: Sequence[ImageRecord], spec, track: Track = _no_progress, description: str = "loading"
) -> tuple[np.ndarray, np.ndarray]:
    """Decode and resize images with the DEVICE's code (device.preprocess.prepare_rgb).

    Returns (uint8 array (n, h, w, 3), int64 label indices). Training, calibration and evaluation all read
    pixels through here, so the model learns from exactly the pixels the Pi will feed it.
    """
    from device import preprocess as dp

    h, w = spec.size
    x = np.empty((len(records), h, w, 3), dtype=np.uint8)
    y = np.empty(len(records), dtype=np.int64)
    for i, r in enumerate(track(records, description)):
        path = manifest.abspath(r)
        try:
            x[i] = dp.prepare_rgb(path, spec)
        except ImageError as e:
            raise DataError(f"{e}; the data changed since prepare: re-run mushcam-train prepare") from None
        y[i] = manifest.label_index(r)
    return x, y


def sha256_of(path: Path) -> str:
    """Hex sha256 of a small file (the manifest, for the model card)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# What a manifest says about this machine and this run, not about the split: the same photos dealt the
# same way on another machine (or by a later `prepare` with the same seed) differ only here.
_NOT_THE_SPLIT = ("created", "data_dir", "other_dir")


def split_sha256(path: Path) -> str:
    """Hex sha256 of a manifest's split alone: every photo's path, content hash, label and side, without
    the absolute folders and the time (so a WORK dir prepared again elsewhere is recognised)."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    canon = {k: v for k, v in doc.items() if k not in _NOT_THE_SPLIT}
    return hashlib.sha256(json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
