"""`import-captures`: presses collected from devices + a person's labels -> folder-per-class photos.

Layout read (what `deploy/collect.sh --out CAPTURES` writes)::

    CAPTURES/<host>/<press>/frame_N.jpg, result.json      <press> = <stamp>-<VERDICT>

The labels CSV (UTF-8, header row; one row per press, filled in from `mushcam review`)::

    press,species[,taxon,...]
    pi1/20260601-101500-000000001-UNSURE,boletus_edulis
    20260601-101733-000000002-EDIBLE,unknown,Hypholoma fasciculare
    pi2/20260601-111000-000000003-UNSURE,

- `press`: `<host>/<press>`, or `<press>` alone when no other host has a press of that name;
- `species`: a class of the edibility table (its `class` column, e.g. `boletus_edulis`), or `unknown`
  (a mushroom that is none of the known species), or empty (not labelled yet: the press is skipped);
- `taxon` (optional, only for `unknown`): what it is, if known (e.g. `Hypholoma fasciculare`); it names
  the folder under --other-out (`hypholoma_fasciculare`); empty: `field_unknown`.
- other columns are ignored (`--template` adds `device_label` and `device_verdict`, what the device said).

Written::

    DATA_DIR/edibility.csv                               copied from --edibility or --base
    DATA_DIR/<class>/<host>-<press>-frame_N.jpg          the labelled frames (copied, byte for byte)
    DATA_DIR/<class>/<photo>                             with --base: links to its photos (nothing copied)
    OTHER_OUT/<taxon-slug>/<host>-<press>-frame_N.jpg    presses labelled unknown
    OTHER_OUT/species.csv                                one row per taxon (edibility `unknown`)

Re-running is safe: files already there with the same bytes are kept, a relabelled press moves (its old
copies are removed; a press whose species is now empty is removed), presses the CSV does not mention are
left as they are, and every file is written under a hidden temporary name and renamed into place.
"""

from __future__ import annotations

import csv
import filecmp
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from device.errors import DataError

UNKNOWN = "unknown"
DEFAULT_TAXON = "field_unknown"
EDIBILITY_CSV = "edibility.csv"
SPECIES_CSV = "species.csv"
SPECIES_COLUMNS = ("slug", "scientific_name", "common_name", "edibility", "images", "sources")
_FRAME = re.compile(r"^frame_\d+\.(jpg|jpeg|png)$", re.IGNORECASE)
_PLAIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class ImportSummary:
    """What an import did, for the CLI's report."""

    per_class: dict[str, int] = field(default_factory=dict)  # class or other/<slug> -> presses
    frames: int = 0
    unlabelled: list[str] = field(default_factory=list)  # press ids with an empty species
    not_in_csv: list[str] = field(default_factory=list)  # collected presses the CSV does not mention
    linked: int = 0  # --base photos linked
    removed: int = 0  # stale copies of relabelled presses


def slug(text: str) -> str:
    """'Hypholoma fasciculare' -> 'hypholoma_fasciculare' (the fungi-other pool's folder names)."""
    s = re.sub(r"[^a-z0-9]+", "_", text.strip().lower()).strip("_")
    return s or DEFAULT_TAXON


def find_presses(captures: Path) -> dict[str, Path]:
    """'<host>/<press>' -> folder, for every complete press (a folder with result.json and frames)."""
    captures = Path(captures)
    if not captures.is_dir():
        raise DataError(f"{captures}: no such folder; collect presses into it with deploy/collect.sh --out {captures}")
    presses: dict[str, Path] = {}
    for host in sorted(p for p in captures.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for press in sorted(p for p in host.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if (press / "result.json").is_file() and _frames(press):
                presses[f"{host.name}/{press.name}"] = press
    if not presses:
        raise DataError(f"{captures}: no presses found (expected {captures}/<host>/<press>/frame_0.jpg + result.json)")
    return presses


def _frames(press: Path) -> list[Path]:
    return sorted((f for f in press.iterdir() if f.is_file() and _FRAME.match(f.name)), key=lambda f: f.name)


def _read_csv(path: Path, what: str, reader) -> list:
    """All rows of a CSV through `reader` (csv.reader or csv.DictReader); DataError naming the file."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return list(reader(f))
    except FileNotFoundError:
        raise DataError(f"{path}: no such {what}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def read_classes(path: Path) -> list[str]:
    """The class names of an edibility.csv (class,edibility[,common_name]), in file order."""
    rows = _read_csv(path, "edibility table", csv.DictReader)
    if not rows or "class" not in rows[0]:
        raise DataError(f"{path}: needs a header with columns class,edibility[,common_name]")
    return [r["class"].strip() for r in rows if (r.get("class") or "").strip()]


def read_labels(path: Path, presses: dict[str, Path], classes: list[str]) -> dict[str, tuple[str, str]]:
    """press id ('<host>/<press>') -> (species or 'unknown' or '', taxon); DataError naming the line."""
    by_name: dict[str, list[str]] = {}
    for pid in presses:
        by_name.setdefault(pid.split("/", 1)[1], []).append(pid)
    rows = _read_csv(path, "labels file", csv.reader)
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if "press" not in header or "species" not in header:
        raise DataError(f"{path}: needs a header row with columns press,species[,taxon]")
    col = {name: header.index(name) for name in ("press", "species", "taxon") if name in header}
    known = set(classes)
    labels: dict[str, tuple[str, str]] = {}
    for line, row in enumerate(rows[1:], start=2):
        cell = {name: (row[i].strip() if i < len(row) else "") for name, i in col.items()}
        pid = cell["press"].strip("/")
        if not pid and not any(cell.values()):
            continue  # a blank line
        if pid in presses:
            pass
        elif pid in by_name and len(by_name[pid]) == 1:
            pid = by_name[pid][0]
        elif pid in by_name:
            raise DataError(f"{path}:{line}: press {pid!r} is on several hosts ({', '.join(by_name[pid])}); write HOST/PRESS")
        else:
            raise DataError(f"{path}:{line}: press {pid!r} is not among the collected presses; check the id on the review page")
        species, taxon = cell["species"], cell.get("taxon", "")
        if species.lower() == UNKNOWN:
            species = UNKNOWN
        elif species and species not in known:
            raise DataError(
                f"{path}:{line}: species {species!r} is not a known class ({', '.join(classes)}); "
                f"write one of them, {UNKNOWN!r} (none of these), or leave it empty"
            )
        if pid in labels and labels[pid] != (species, taxon):
            raise DataError(f"{path}:{line}: press {pid} is labelled twice, differently")
        labels[pid] = (species, taxon)
    return labels


def write_template(captures: Path, labels_csv: Path) -> int:
    """Write a labels CSV listing every collected press, species empty, the device's answer as a hint.

    Returns the number of presses. Never overwrites: a half-filled labels file is a person's work.
    """
    presses = find_presses(captures)
    labels_csv = Path(labels_csv)
    if labels_csv.exists():
        raise DataError(f"{labels_csv} exists; not overwriting it (give another --labels name)")
    tmp = labels_csv.with_name(f".{labels_csv.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["press", "species", "taxon", "device_label", "device_verdict"])
        for pid, folder in presses.items():
            try:
                result = json.loads((folder / "result.json").read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError):
                result = {}
            result = result if isinstance(result, dict) else {}
            writer.writerow([pid, "", "", result.get("label") or "", result.get("verdict") or ""])
    os.replace(tmp, labels_csv)
    return len(presses)


def _copy_atomic(src: Path, dest: Path) -> None:
    """Copy src to dest through a hidden temp name (prepare ignores hidden files), unless already equal."""
    if dest.is_file() and not dest.is_symlink() and filecmp.cmp(src, dest, shallow=False):
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def _link_base(base: Path, data_dir: Path, classes: list[str]) -> int:
    """Symlink each file of base/<class>/ (subfolders mirrored) into data_dir/<class>/; the pool is never written."""
    n = 0
    for cls in classes:
        src_dir = base / cls
        if not src_dir.is_dir():
            continue
        for src in sorted(src_dir.rglob("*")):
            rel = src.relative_to(src_dir)
            if not src.is_file() or any(part.startswith(".") for part in rel.parts):
                continue
            link = data_dir / cls / rel
            if link.is_symlink() and os.readlink(link) == str(src.resolve()):
                continue
            link.parent.mkdir(parents=True, exist_ok=True)
            tmp = link.with_name(f".{link.name}.lnk")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(src.resolve())
            os.replace(tmp, link)
            n += 1
    return n


def _edibility_source(data_dir: Path, edibility: Path | None, base: Path | None) -> Path:
    if edibility is not None:
        return edibility
    if base is not None:
        return base / EDIBILITY_CSV
    if (data_dir / EDIBILITY_CSV).is_file():
        return data_dir / EDIBILITY_CSV
    raise DataError(
        f"no edibility table: give --base DATA_DIR (a photo set with {EDIBILITY_CSV}) or --edibility FILE, "
        f"or put {EDIBILITY_CSV} in {data_dir}"
    )


def _write_species_csv(other_out: Path, counts: dict[str, int], taxa: dict[str, str]) -> None:
    """Add a row per new taxon to OTHER_OUT/species.csv (the fungi-other pool's format); keep existing rows."""
    path = other_out / SPECIES_CSV
    rows: list[dict[str, str]] = []
    if path.is_file():
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    have = {r.get("slug", "") for r in rows}
    for s in sorted(counts):
        if s in have:
            for r in rows:
                if r.get("slug") == s and "field" in (r.get("sources") or ""):
                    r["images"] = str(len(_frames_in(other_out / s)))
            continue
        rows.append({"slug": s, "scientific_name": taxa.get(s, ""), "common_name": "", "edibility": UNKNOWN,
                     "images": str(len(_frames_in(other_out / s))), "sources": "field"})
    tmp = path.with_name(f".{SPECIES_CSV}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        columns = list(rows[0].keys()) if rows and set(SPECIES_COLUMNS) <= set(rows[0]) else list(SPECIES_COLUMNS)
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _frames_in(folder: Path) -> list[Path]:
    return [f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")] if folder.is_dir() else []


def import_captures(
    captures: Path,
    labels_csv: Path,
    data_dir: Path,
    *,
    edibility: Path | None = None,
    base: Path | None = None,
    other_out: Path | None = None,
) -> ImportSummary:
    """Copy each labelled press's frames into DATA_DIR/<class>/ (or OTHER_OUT/<taxon>/); see the module doc."""
    captures, data_dir = Path(captures), Path(data_dir)
    if base is not None and not (Path(base) / EDIBILITY_CSV).is_file():
        raise DataError(f"{base}: no {EDIBILITY_CSV}; --base must be a folder-per-class photo set such as ../shared/data/mushrooms")
    source = _edibility_source(data_dir, edibility, base)
    classes = read_classes(source)
    presses = find_presses(captures)
    labels = read_labels(labels_csv, presses, classes)
    unknown = [pid for pid, (sp, _) in labels.items() if sp == UNKNOWN]
    if unknown and other_out is None:
        raise DataError(
            f"{labels_csv}: {len(unknown)} press(es) labelled {UNKNOWN!r} (e.g. {unknown[0]}); "
            "give --other-out DIR for them (a folder for `prepare --other`)"
        )
    for pid in presses:
        host, name = pid.split("/", 1)
        if not (_PLAIN.match(host) and _PLAIN.match(name)):
            raise DataError(f"{captures}/{pid}: not a plain name (letters, digits, . _ -); rename it")

    data_dir.mkdir(parents=True, exist_ok=True)
    target_csv = data_dir / EDIBILITY_CSV
    if target_csv.is_file() and target_csv.resolve() != source.resolve():
        if not filecmp.cmp(source, target_csv, shallow=False):
            raise DataError(f"{target_csv} differs from {source}; merge them by hand or import into a new folder")
    elif not target_csv.is_file():
        _copy_atomic(source, target_csv)

    summary = ImportSummary()
    if base is not None:
        summary.linked = _link_base(Path(base), data_dir, classes)
    roots = [data_dir] + ([Path(other_out)] if other_out is not None else [])
    other_counts: dict[str, int] = {}
    taxa: dict[str, str] = {}
    for pid, press_dir in presses.items():
        if pid not in labels:
            summary.not_in_csv.append(pid)
            continue
        species, taxon = labels[pid]
        host, name = pid.split("/", 1)
        prefix = f"{host}-{name}-"
        if not species:
            summary.unlabelled.append(pid)
            wanted_dir = None
        elif species == UNKNOWN:
            s = slug(taxon) if taxon else DEFAULT_TAXON
            taxa.setdefault(s, taxon)
            wanted_dir = Path(other_out) / s  # type: ignore[arg-type]
            other_counts[s] = other_counts.get(s, 0) + 1
            summary.per_class[f"{UNKNOWN}/{s}"] = summary.per_class.get(f"{UNKNOWN}/{s}", 0) + 1
        else:
            wanted_dir = data_dir / species
            summary.per_class[species] = summary.per_class.get(species, 0) + 1
        # A relabelled (or now unlabelled) press must not stay in its old class: that is label noise.
        for root in roots:
            if not root.is_dir():
                continue
            for folder in (p for p in root.iterdir() if p.is_dir() and p != wanted_dir):
                for stale in folder.glob(f"{prefix}frame_*"):
                    stale.unlink()
                    summary.removed += 1
        if wanted_dir is None:
            continue
        for frame in _frames(press_dir):
            _copy_atomic(frame, wanted_dir / f"{prefix}{frame.name}")
            summary.frames += 1
    if other_out is not None and other_counts:
        _write_species_csv(Path(other_out), other_counts, taxa)
    return summary
