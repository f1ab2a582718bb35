"""`evaluate`: an exported bundle, run through the DEVICE's code path (device.classifier), never Keras.

Source of photos: a WORK dir (its manifest's --split, default test) or a folder-per-class DATA_DIR
(every image; class folders must be labels of the bundle). True edibility comes from the bundle's card.

Figures (all per photo):
- top1: fraction whose top label is the true class;
- per_class: precision, recall, F1 and support of each label;
- poisonous_as_edible: fraction of poisonous photos answered EDIBLE (the number that must stay ~0);
- edible_coverage: fraction of edible photos answered EDIBLE;
- unsure_rate: fraction of all photos answered UNSURE;
- cost: FungiCLEF-style mean cost per photo, 100 for each poisonous photo answered EDIBLE and 1 for
  each edible photo not answered EDIBLE (UNSURE or POISONOUS).

Open world (a WORK dir prepared with --other): photos of the other pool's species in the split are
*unseen* (held out of training by species). They are kept out of top-1 and of the table above and give
- unseen_as_edible: share of them answered EDIBLE, with a Wilson 95% interval, and per species (the worst
  one, and those with >= 5 photos over 5%);
- a risk-coverage curve (report: risk_coverage.png/.csv): unseen->EDIBLE against edible coverage as
  edible_min_confidence and ood_max_score move on a grid (the frontier), the bundle's point marked.
"""

from __future__ import annotations

import json

import time
from pathlib import Path

import numpy as np

from device.bundle import write_card
from device.errors import DataError, ImageError
from train import console
from train.dataset import IMAGE_SUFFIXES, MANIFEST, OTHER, Manifest, class_folders, list_files
from train.metrics import safety_figures

VERDICTS = ("EDIBLE", "POISONOUS", "UNSURE")


def collect(source: Path, labels: list[str], split: str) -> tuple[list[tuple[Path, str, str]], str, list[str]]:
    """(path, true label, species) triples from a WORK dir's manifest split or a folder-per-class DATA_DIR,
    where they came from, and the genera of the other pool put wholly in training (`prepare
    --other-train-genus`): no unseen species of the split is of them, so its figures say nothing about them.

    Photos of the other pool have label `other` (whether or not the bundle has that class) and their
    species; known photos have their label as species.
    """
    source = Path(source)
    genera: list[str] = []
    if (source / MANIFEST).is_file():
        manifest = Manifest.load(source)
        genera = list(manifest.other_train_genera)
        items = [(manifest.abspath(r), r.label, manifest.species(r)) for r in manifest.records(split)]
        if not items:
            raise DataError(f"{source}: the manifest has no images in split {split!r} (try --split val)")
        where = f"{source} ({split} split)"
    else:
        folders = class_folders(source)
        unknown = [f.name for f in folders if f.name not in labels]
        if unknown:
            raise DataError(
                f"{source}: class folder(s) {', '.join(unknown)} are not labels of the bundle "
                f"({', '.join(labels)}); evaluate only species the model knows"
            )
        items = [(p, f.name, f.name) for f in folders for p in list_files(f) if p.suffix.lower() in IMAGE_SUFFIXES]
        if not items:
            raise DataError(f"{source}: no images in the class folders")
        where = f"{source} (all images)"
    missing = sorted({lab for _, lab, _ in items} - set(labels) - {OTHER})
    if missing:
        raise DataError(f"{source}: label(s) {', '.join(missing)} are not in the bundle; it was trained on other classes")
    return items, where, genera


def per_class_metrics(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict[str, dict]:
    """Precision, recall, F1 and support of each label (0 where undefined)."""
    out = {}
    for i, lab in enumerate(labels):
        tp = int(np.sum((y_pred == i) & (y_true == i)))
        fp = int(np.sum((y_pred == i) & (y_true != i)))
        fn = int(np.sum((y_pred != i) & (y_true == i)))
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        out[lab] = {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
                    "support": int(np.sum(y_true == i))}
    return out


def classify_rows(bundle, paths: list[Path], threads: int | None = None) -> list[dict]:
    """Each photo through device.classifier on this machine, as the rows `mushcam classify --json --probs`
    prints (an undecodable photo is a row with `error`)."""
    from device.classifier import Classifier

    classifier = Classifier(bundle, backend="cpu", threads=threads)
    rows = []
    for path in console.track(paths, "evaluating (device)"):
        try:
            r = classifier.classify(path)
        except ImageError as e:
            rows.append({"path": str(path), "error": str(e)})
            continue
        rows.append({"path": str(path), "label": r.label, "confidence": r.confidence,
                     "verdict": str(getattr(r.decision.verdict, "value", r.decision.verdict)),
                     "ood_score": r.ood_score, "poisonous_mass": r.decision.poisonous_mass,
                     "probs": {lab: float(p) for lab, p in zip(bundle.labels, r.probs)}, "latency_ms": r.latency_ms})
    return rows


def evaluate(bundle_path: Path, source: Path, split: str = "test", threads: int | None = None,
             rows: list[dict] | None = None) -> dict:
    """Classify every photo of `source` with the bundle on the device's code path; return the figures.

    `rows`: per-photo results already computed elsewhere (e.g. in the arm64 root), in `collect`'s order.
    """
    from device.bundle import load_bundle

    bundle = load_bundle(bundle_path)
    labels = list(bundle.labels)
    items, where, genera = collect(source, labels, split)
    t0 = time.perf_counter()
    if rows is None:
        rows = classify_rows(bundle, [p for p, _, _ in items], threads)
    return summarize(bundle, items, rows, where, time.perf_counter() - t0, genera)


def summarize(bundle, items: list[tuple[Path, str, str]], rows: list[dict], where: str, seconds: float,
              genera_in_training: list[str] = ()) -> dict:
    """The figures of per-photo rows (`classify_rows`, or the same rows from the arm64 root) against their
    true labels; photos of the other pool (label `other`) are the unseen species (`genera_in_training`:
    from `collect`, said with them)."""
    labels = list(bundle.labels)
    if len(rows) != len(items):
        raise DataError(f"{where}: {len(rows)} results for {len(items)} photos")
    y_true, y_pred, verdicts, confidences, oods, latencies, skipped = [], [], [], [], [], [], []
    unseen_rows: list[dict] = []
    all_probs, all_oods, all_kind, all_species = [], [], [], []
    for (path, label, species), row in zip(items, rows):
        if "error" in row:
            skipped.append({"path": str(path), "reason": row["error"]})
            continue
        all_probs.append(np.array([row["probs"][lab] for lab in labels], dtype=np.float64))
        all_oods.append(np.nan if row["ood_score"] is None else row["ood_score"])
        all_species.append(species)
        if label == OTHER:
            all_kind.append("other")
            unseen_rows.append({"species": species, "verdict": row["verdict"], "label": row["label"]})
            continue
        all_kind.append(bundle.classes[label].kind)
        y_true.append(labels.index(label))
        y_pred.append(labels.index(row["label"]))
        verdicts.append(row["verdict"])
        confidences.append(float(row["confidence"]))
        oods.append(row["ood_score"])
        latencies.append(row["latency_ms"])
    if not y_true:
        raise DataError(f"{where}: no photo could be decoded")
    yt, yp = np.array(y_true), np.array(y_pred)
    poison = np.array([bundle.classes[lab].kind != "edible" for lab in labels], dtype=bool)
    safety = safety_figures(verdicts, yt, poison)
    confusion = np.zeros((len(labels), len(labels)), dtype=int)
    for t, p in zip(yt, yp):
        confusion[t, p] += 1
    by_edibility = {e: {v: 0 for v in VERDICTS} for e in ("edible", "poisonous")}
    for t, v in zip(yt, verdicts):
        by_edibility["poisonous" if poison[t] else "edible"][v] += 1
    return {
        "bundle": {"path": str(bundle.path), "name": bundle.card.get("name"), "version": bundle.card.get("version")},
        "source": where,
        "n": len(yt),
        "top1": float(np.mean(yt == yp)),
        "poisonous_as_edible": safety["poisonous_as_edible"],
        "poisonous_as_edible_count": safety["poisonous_as_edible_count"],
        "edible_coverage": safety["edible_coverage"],
        "unsure_rate": safety["unsure_rate"],
        "cost": safety["cost"],
        "poisonous": safety["poisonous"],
        "edible": safety["edible"],
        "verdicts": by_edibility,
        "per_class": per_class_metrics(yt, yp, labels),
        "confusion": {"labels": labels, "matrix": confusion.tolist()},
        "latency_ms": {"mean": float(np.mean(latencies)), "p95": float(np.percentile(latencies, 95))},
        "seconds": seconds,
        "thresholds": dict(bundle.card.get("thresholds") or {}),
        "skipped": skipped,
        **_open_world(bundle, verdicts, yt, poison, unseen_rows, genera_in_training),
        "_records": {"y_true": yt.tolist(), "y_pred": yp.tolist(), "verdicts": verdicts,
                     "confidence": confidences, "ood": oods},
        "_table": {"probs": np.array(all_probs), "ood": np.array(all_oods, dtype=float), "kind": np.array(all_kind),
                   "species": all_species},
    }


def _open_world(bundle, verdicts, yt, poison, unseen_rows, genera_in_training=()) -> dict:
    """Unseen-species figures (Wilson intervals), only when the source has other-pool photos."""
    if not unseen_rows:
        return {}
    from train.openworld import rate

    edible_answer = np.array([v == "EDIBLE" for v in verdicts], dtype=bool)
    known_poison = poison[yt] if len(yt) else np.zeros(0, bool)
    per: dict[str, list[int]] = {}
    for r in unseen_rows:
        k = per.setdefault(r["species"], [0, 0])
        k[0] += r["verdict"] == "EDIBLE"
        k[1] += 1
    worst = max(per.items(), key=lambda kv: (kv[1][0] / kv[1][1], kv[1][1]))
    return {"open_world": {
        "unseen_as_edible": rate(sum(r["verdict"] == "EDIBLE" for r in unseen_rows), len(unseen_rows)),
        "unseen_verdicts": {v: sum(r["verdict"] == v for r in unseen_rows) for v in VERDICTS},
        "unseen_species": len(per),
        "unseen_species_with_edible": sorted(s for s, (k, _) in per.items() if k),
        "worst_unseen_species": {"species": worst[0], **rate(*worst[1])},
        "unseen_species_over_5pct": sorted(s for s, (k, n) in per.items() if n >= 5 and k / n > 0.05),
        "edible_coverage": rate(int((edible_answer & ~known_poison).sum()), int((~known_poison).sum())),
        "poisonous_as_edible": rate(int((edible_answer & known_poison).sum()), int(known_poison.sum())),
        # A reader of the figures must see that a whole family of look-alikes is absent from them.
        **({"genera_in_training": sorted(genera_in_training)} if genera_in_training else {}),
    }}


def plot_risk_coverage(result: dict, folder: Path, bundle_path: Path) -> Path | None:
    """The risk-coverage curve of this split (PNG + CSV), the bundle's operating point marked."""
    from dataclasses import replace

    from device.bundle import load_bundle
    from train import openworld as ow

    t = result.get("_table")
    if not result.get("open_world") or t is None:
        return None
    bundle = load_bundle(bundle_path)
    edible_labels = np.array([bundle.classes[lab].kind == "edible" for lab in bundle.labels])
    kind = t["kind"]
    g = ow.Groups(kind == "edible", kind == "poisonous", kind == "other")
    probs, oods = t["probs"], (None if bundle.thresholds.ood_max_score is None else t["ood"])
    base = replace(bundle.thresholds, confidence_margin=0.0, ood_margin=0.0)
    conf_grid = np.unique(np.concatenate([[0.5], ow.candidates(probs.max(axis=1), 50)]))
    ood_grid = None if oods is None else ow.candidates(oods, 100)
    from train.export import MASS_GRID

    _, table = ow.search(probs, oods, edible_labels, g, base, conf_grid, ood_grid, 1.0, 1.0,
                         sorted({base.poisonous_max_mass, *MASS_GRID}))
    m = ow.edible_mask(probs, oods, edible_labels, bundle.thresholds)
    mark = (float((m & g.unseen).sum() / max(1, g.unseen.sum())), float((m & g.edible).sum() / max(1, g.edible.sum())))
    png = Path(folder) / "risk_coverage.png"
    ow.write_curve({"thresholds moved (frontier)": ow.frontier(table)}, Path(folder) / "risk_coverage.csv", png,
                   f"{result['source']}: {int(g.unseen.sum())} unseen photos, {int(g.edible.sum())} edible",
                   {"the bundle's thresholds": mark})
    return png


def plot_confusion(result: dict, path: Path) -> Path:
    """The confusion matrix (rows: true class, columns: predicted) as a PNG with counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = result["confusion"]["labels"]
    m = np.array(result["confusion"]["matrix"])
    k = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * k, 1.0 + 0.8 * k), dpi=100)
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(k), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = m.max() if m.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if top and m[i, j] > top / 2 else "black")
    ax.set_title(f"top-1 {result['top1']:.1%} on {result['n']} photos")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_confidence(result: dict, path: Path) -> Path:
    """Histogram of top-1 confidence, correct vs wrong, with the bundle's edible threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec = result["_records"]
    conf = np.array(rec["confidence"])
    ok = np.array(rec["y_true"]) == np.array(rec["y_pred"])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    bins = np.linspace(0, 1, 21)
    ax.hist([conf[ok], conf[~ok]], bins=bins, label=["correct", "wrong"], stacked=True)
    t = result["thresholds"].get("edible_min_confidence")
    if t is not None:
        ax.axvline(t, color="red", ls="--", label=f"edible_min_confidence {t:.3f}")
    ax.set_xlabel("top-1 confidence")
    ax.set_ylabel("photos")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(result: dict, folder: Path) -> Path:
    """report.md with the summary, safety table, per-class table and the plots, in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plot_confusion(result, folder / "confusion.png")
    plot_confidence(result, folder / "confidence.png")
    b = result["bundle"]
    lines = [
        f"# Evaluation of {b['name']} {b['version']}",
        "",
        f"Bundle `{b['path']}`, photos {result['source']}: {result['n']} photos "
        f"({result['poisonous']} poisonous, {result['edible']} edible), run through device.classifier.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| top-1 | {result['top1']:.2%} |",
        f"| poisonous answered EDIBLE | {result['poisonous_as_edible']:.2%} ({result['poisonous_as_edible_count']} of {result['poisonous']} photos) |",
        f"| edible coverage (edible answered EDIBLE) | {result['edible_coverage']:.2%} |",
        f"| UNSURE rate | {result['unsure_rate']:.2%} |",
        f"| cost (100 per poisonous->EDIBLE, 1 per edible not EDIBLE; mean per photo) | {result['cost']:.3f} |",
        f"| latency (mean / p95) | {result['latency_ms']['mean']:.1f} / {result['latency_ms']['p95']:.1f} ms |",
        "",
        "## Verdicts by true edibility",
        "",
        "| true | EDIBLE | POISONOUS | UNSURE |",
        "|---|---|---|---|",
    ]
    for e, row in result["verdicts"].items():
        lines.append(f"| {e} | {row['EDIBLE']} | {row['POISONOUS']} | {row['UNSURE']} |")
    ow_ = result.get("open_world")
    if ow_:
        w = ow_["worst_unseen_species"]
        lines += [
            "", "## Unseen species (other pool, held out of training by species)", "",
            "| figure | value |", "|---|---|",
            f"| unseen species answered EDIBLE | {_rate_text(ow_['unseen_as_edible'])} |",
            f"| unseen verdicts | {ow_['unseen_verdicts']} |",
            f"| species | {ow_['unseen_species']}; with any EDIBLE: {len(ow_['unseen_species_with_edible'])} "
            f"({', '.join(ow_['unseen_species_with_edible']) or 'none'}) |",
            f"| worst species | {w['species']}: {_rate_text(w)} |",
            f"| species (>= 5 photos) over 5% EDIBLE | {', '.join(ow_['unseen_species_over_5pct']) or 'none'} |",
            f"| known edible answered EDIBLE (coverage) | {_rate_text(ow_['edible_coverage'])} |",
            f"| known poisonous answered EDIBLE | {_rate_text(ow_['poisonous_as_edible'])} |",
        ]
        if ow_.get("genera_in_training"):
            lines.append(f"| genera absent from the unseen species (all in training) | "
                         f"{', '.join(ow_['genera_in_training'])} |")
        if plot_risk_coverage(result, folder, Path(b["path"])):
            lines += ["", "![risk-coverage](risk_coverage.png)", "", "Data: `risk_coverage.csv`."]
    lines += ["", "## Per class", "", "| class | precision | recall | F1 | photos |", "|---|---|---|---|---|"]
    for lab, m in result["per_class"].items():
        lines.append(f"| {lab} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |")
    lines += ["", "![confusion matrix](confusion.png)", "", "![confidence](confidence.png)", ""]
    if result["skipped"]:
        lines += ["## Skipped (not decodable)", ""] + [f"- `{s['path']}`: {s['reason']}" for s in result["skipped"]] + [""]
    lines += [f"Thresholds: `{result['thresholds']}`", ""]
    path = folder / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def public(result: dict) -> dict:
    """The result without the per-photo records (what --json prints)."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


def _rate_text(r: dict) -> str:
    lo, hi = r["wilson95"]
    return f"{r['rate']:.2%} ({r['count']}/{r['n']}; 95% CI {lo:.1%}-{hi:.1%})"


def record_in_card(bundle_path: Path, split: str, result: dict) -> None:
    """Store the figures in the bundle's card as metrics.<split>: the card says how the model it ships scored.

    The card is read as plain JSON and written back atomically; model files and their hashes are untouched.
    """
    card_path = Path(bundle_path) / "model.json"
    card = json.loads(card_path.read_text(encoding="utf-8"))
    card.setdefault("metrics", {})[split] = public(result)
    write_card(Path(bundle_path), card)


def print_result(result: dict) -> None:
    """Rich tables: summary and safety, then per class."""
    from rich.table import Table

    out = console.out
    if result["skipped"]:
        out.print(f"skipped {len(result['skipped'])} photo(s) that could not be decoded:")
        for s in result["skipped"]:
            out.print(f"  {s['reason']}", markup=False)
    t = Table(title=f"{result['bundle']['name']} {result['bundle']['version']} on {result['source']}")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_row("photos", f"{result['n']} ({result['poisonous']} poisonous, {result['edible']} edible)")
    t.add_row("top-1", f"{result['top1']:.2%}")
    t.add_row("poisonous answered EDIBLE", f"{result['poisonous_as_edible']:.2%} ({result['poisonous_as_edible_count']})")
    t.add_row("edible coverage", f"{result['edible_coverage']:.2%}")
    t.add_row("UNSURE rate", f"{result['unsure_rate']:.2%}")
    t.add_row("cost per photo", f"{result['cost']:.3f}")
    t.add_row("latency mean / p95", f"{result['latency_ms']['mean']:.1f} / {result['latency_ms']['p95']:.1f} ms")
    ow_ = result.get("open_world")
    if ow_:
        t.add_row("unseen species answered EDIBLE", _rate_text(ow_["unseen_as_edible"]))
        w = ow_["worst_unseen_species"]
        t.add_row("worst unseen species", f"{w['species']}: {w['count']}/{w['n']}")
        t.add_row("edible coverage (95% CI)", _rate_text(ow_["edible_coverage"]))
        if ow_.get("genera_in_training"):
            t.add_row("not among the unseen species", f"{len(ow_['genera_in_training'])} genera, all in training")
    out.print(t)
    pc = Table(title="per class")
    for col in ("class", "precision", "recall", "F1", "photos"):
        pc.add_column(col, justify="left" if col == "class" else "right", no_wrap=col == "class")
    for lab, m in result["per_class"].items():
        pc.add_row(lab, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"]))
    out.print(pc)
