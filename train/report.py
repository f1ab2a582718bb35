"""Human-readable summaries (rich tables) of what prepare did."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape
from rich.table import Table

from train import console
from train.dataset import MANIFEST, SPLITS, Manifest


def print_prepare(manifest: Manifest, work: Path) -> None:
    """List skipped and dropped files, then the class table (counts per split, edibility)."""
    out = console.out
    if manifest.skipped:
        out.print(f"skipped {len(manifest.skipped)} file(s) (corrupt or unsupported):")
        for s in manifest.skipped:
            out.print(f"  {s['path']}: {s['reason']}", markup=False)
    if manifest.dropped:
        out.print(f"dropped {len(manifest.dropped)} image(s) filed under two classes (exact or near duplicates):")
        for d in manifest.dropped:
            out.print(f"  {d['path']}: {d['reason']}", markup=False)
    if manifest.copies:
        out.print(f"ignored {len(manifest.copies)} byte-identical cop(ies) within a class (one of each kept)")
    n_groups = len({r.group for r in manifest.images})
    table = Table(title=f"{len(manifest.images)} images, {n_groups} duplicate groups, seed {manifest.seed}")
    table.add_column("class", no_wrap=True)
    table.add_column("name")
    table.add_column("edibility", no_wrap=True)
    for s in SPLITS:
        table.add_column(s, justify="right")
    table.add_column("total", justify="right")
    counts = manifest.counts()
    totals = {s: 0 for s in SPLITS}
    for label in manifest.labels:
        info = manifest.classes[label]
        row = counts[label]
        for s in SPLITS:
            totals[s] += row[s]
        style = "red" if info["edibility"] == "poisonous" else "green"
        table.add_row(escape(label), escape(info["display_name"]), f"[{style}]{info['edibility']}[/]",
                      *(str(row[s]) for s in SPLITS), str(sum(row.values())))
    table.add_section()
    table.add_row("total", "", "", *(str(totals[s]) for s in SPLITS), str(sum(totals.values())))
    out.print(table)
    if manifest.other_dir is not None:
        per = {s: manifest.other_species(s) for s in SPLITS}
        out.print(f"other pool {manifest.other_dir}: species per split (whole species) "
                  + ", ".join(f"{s} {len(v)}" for s, v in per.items()), markup=False)
    out.print(f"manifest: {Path(work) / MANIFEST}")
