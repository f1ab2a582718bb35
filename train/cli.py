"""`mushcam-train`: photos -> int8 TFLite model bundle, in five steps.

    mushcam-train prepare DATA_DIR --out WORK     scan, de-duplicate, split by duplicate group
    mushcam-train fit WORK --weights ...          transfer learning (Keras 3)
    mushcam-train export WORK --out BUNDLE        int8 TFLite + card, gated on accuracy loss
    mushcam-train evaluate BUNDLE DATA_DIR|WORK   the bundle through the device's own code path
    mushcam-train edgetpu BUNDLE                  optional: compile for a Coral Edge TPU
    mushcam-train import-captures CAPTURES ...    field presses (deploy/collect.sh) -> folder-per-class photos

TensorFlow is imported only by the commands that need it, so --help and prepare start quickly.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer

from device.errors import MushcamError

# What the `train` extra brings (pyproject.toml). Without it, say how to install it, not a traceback.
TRAIN_EXTRA_MODULES = frozenset({"tensorflow", "keras", "imagehash", "matplotlib", "rich", "tf_keras", "h5py"})


def _exit_without_train_extra(err: ModuleNotFoundError) -> None:
    """Exit with one line naming the missing module and the fix, if it is one the train extra provides."""
    missing = (err.name or "").split(".")[0]
    if missing not in TRAIN_EXTRA_MODULES:
        return
    sys.stderr.write(
        f"mushcam-train: error: {missing} is not installed; the training toolchain needs the train extra: "
        "pip install -e '.[train]' in the checkout (on a workstation; the Pi never needs it)\n"
    )
    raise SystemExit(1)


try:
    from train import console
except ModuleNotFoundError as _err:  # rich: imported here, before any command runs
    _exit_without_train_extra(_err)
    raise
from train.hparams import HParams
from train.sign import sign

_HP = HParams()  # the CLI's defaults are the documented dataclass's

app = typer.Typer(
    name="mushcam-train",
    help=__doc__.split("\n\n")[0],
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@contextmanager
def _reported() -> Iterator[None]:
    """Turn our errors into one `error: ...` line on stderr and exit code 1 (usage errors stay 2)."""
    try:
        yield
    except MushcamError as e:
        sys.stderr.write(f"error: {e}\n")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        raise typer.Exit(130) from None


@app.command()
def prepare(
    data_dir: Annotated[Path, typer.Argument(help="Folder-per-class photos with edibility.csv beside the class folders.",
                                             exists=True, file_okay=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="WORK dir: the manifest and all later outputs go here.")],
    seed: Annotated[int, typer.Option(help="Seed of the split.")] = 0,
    val: Annotated[float, typer.Option(help="Fraction of each class for validation.")] = 0.15,
    test: Annotated[float, typer.Option(help="Fraction of each class for the test split.")] = 0.15,
    other: Annotated[Optional[Path], typer.Option(help="Folder-per-species photos of OTHER fungi: one more class, `other`, never EDIBLE; split by species.",
                                                  exists=True, file_okay=False)] = None,
    other_val: Annotated[float, typer.Option(help="Fraction of the other pool's photos (whole species) for validation/calibration.")] = 0.25,
    other_test: Annotated[float, typer.Option(help="Fraction of the other pool's photos (whole species) for the test split.")] = 0.25,
    other_split: Annotated[str, typer.Option(help="How the other pool's species are dealt: `species` (shuffled) or `genus` (stratified: every genus with 2+ species has one in train).")] = "species",
    other_train_genus: Annotated[Optional[list[str]], typer.Option(help="A genus (folder prefix, e.g. `rubroboletus`) whose species all go to train as `other`; repeat for more.")] = None,
) -> None:
    """Scan DATA_DIR: decode every image, group duplicates, split train/val/test by group, write WORK/manifest.json."""
    from train import dataset, report

    with _reported():
        manifest = dataset.prepare(data_dir, out, seed=seed, val=val, test=test, track=console.track,
                                   other_dir=other, other_val=other_val, other_test=other_test,
                                   other_split=other_split, other_train_genera=other_train_genus or ())
        report.print_prepare(manifest, out)


@app.command("import-captures")
def import_captures(
    captures: Annotated[Path, typer.Argument(help="Presses collected by deploy/collect.sh: CAPTURES/<host>/<press>/.",
                                             exists=True, file_okay=False)],
    labels: Annotated[Path, typer.Option(help="CSV with columns press,species[,taxon] (see docs/training.md).", dir_okay=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="DATA_DIR to write: <class>/<host>-<press>-frame_N.jpg + edibility.csv.")] = None,
    base: Annotated[Optional[Path], typer.Option(help="Existing photo set (e.g. ../shared/data/mushrooms): its photos are linked into DATA_DIR, its edibility.csv copied.",
                                                 exists=True, file_okay=False)] = None,
    edibility: Annotated[Optional[Path], typer.Option(help="edibility.csv naming the classes (default: --base's, else DATA_DIR's).",
                                                      exists=True, dir_okay=False)] = None,
    other_out: Annotated[Optional[Path], typer.Option(help="Folder for presses labelled unknown: <taxon-slug>/ + species.csv (for prepare --other).")] = None,
    template: Annotated[bool, typer.Option(help="Only write --labels: one row per collected press, species empty, to fill in.")] = False,
) -> None:
    """Turn labelled field presses into folder-per-class photos for prepare (presses labelled unknown go to --other-out)."""
    from train import field

    if template:
        with _reported():
            n = field.write_template(captures, labels)
        console.out.print(f"{labels}: {n} press(es); fill in the species column (a class, unknown, or empty to skip)", markup=False)
        return
    if out is None:
        sys.stderr.write("error: --out DATA_DIR is needed (or --template to write the labels file)\n")
        raise typer.Exit(2)
    with _reported():
        s = field.import_captures(captures, labels, out, edibility=edibility, base=base, other_out=other_out)
    for name, n in sorted(s.per_class.items()):
        console.out.print(f"{name:<32} {n:>4} press(es)", markup=False)
    console.out.print(f"{s.frames} frame(s) from {sum(s.per_class.values())} labelled press(es) into {out}"
                      + (f" and {other_out}" if other_out and any(k.startswith('unknown/') for k in s.per_class) else "")
                      + (f"; {s.linked} photo(s) of {base} linked" if base else ""), markup=False)
    if s.unlabelled:
        console.note(f"{len(s.unlabelled)} press(es) with an empty species skipped (not labelled yet)")
    if s.not_in_csv:
        console.note(f"{len(s.not_in_csv)} collected press(es) not in {labels} skipped, e.g. {s.not_in_csv[0]}")
    if s.removed:
        console.note(f"{s.removed} old copy(ies) of relabelled presses removed")


@app.command()
def fit(
    work: Annotated[Path, typer.Argument(help="WORK dir written by prepare.", exists=True, file_okay=False)],
    weights: Annotated[str, typer.Option(help="Backbone init: imagenet (download), PATH to a .weights.h5, or none.")],
    backbone: Annotated[str, typer.Option(help="mobilenet_v2, mobilenet_v3_small or mobilenet_v3_large.")] = _HP.backbone,
    alpha: Annotated[float, typer.Option(help="Backbone width multiplier.")] = _HP.alpha,
    size: Annotated[Optional[int], typer.Option(help="Square input size in pixels (default: the backbone's, 224).")] = None,
    epochs: Annotated[int, typer.Option(help="Max epochs of stage 1 (head on cached features).")] = _HP.epochs,
    fine_tune_epochs: Annotated[int, typer.Option(help="Max epochs of stage 2 (fine-tune the top of the backbone; 0 skips).")] = _HP.fine_tune_epochs,
    batch_size: Annotated[int, typer.Option(help="Images per training step.")] = _HP.batch_size,
    feature_copies: Annotated[int, typer.Option(help="Stage 1: cached feature copies per image (1 clean + n-1 augmented).")] = _HP.feature_copies,
    fine_tune_fraction: Annotated[float, typer.Option(help="Stage 2: fraction of the backbone's layers (from the top) trained.")] = _HP.fine_tune_fraction,
    edible_penalty: Annotated[float, typer.Option(help="Extra loss -log(1 - p_edible) on non-edible photos, times this (0: plain cross-entropy).")] = _HP.edible_penalty,
    seed: Annotated[int, typer.Option(help="Random seed (Python, NumPy, Keras).")] = _HP.seed,
) -> None:
    """Train a classifier on WORK's manifest; writes WORK/model.keras (best on val), fit.json and curves.png."""
    with _reported():
        from train.fit import fit as run_fit

        hp = HParams(
            backbone=backbone, alpha=alpha, size=size, weights=weights, epochs=epochs,
            fine_tune_epochs=fine_tune_epochs, batch_size=batch_size, feature_copies=feature_copies,
            fine_tune_fraction=fine_tune_fraction, edible_penalty=edible_penalty, seed=seed,
        )
        result = run_fit(work, hp)
        console.out.print(
            f"best: {result.best_stage} epoch {result.best_epoch}, val loss {result.val_loss:.4f}, "
            f"val top-1 {result.val_accuracy:.3f} -> {result.model_path} ({result.seconds:.0f} s)"
        )
        console.out.print(f"curves: {result.curves_path}")


def _ood_method(value: str) -> str:
    if value not in ("knn", "mahalanobis"):
        raise typer.BadParameter(f"{value!r} is not one of knn, mahalanobis", param_hint="--ood-method")
    return value


@app.command()
def export(
    work: Annotated[Path, typer.Argument(help="WORK dir with a trained model (fit).", exists=True, file_okay=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="BUNDLE dir to write (replaced only when the new one is complete).")],
    calibration: Annotated[int, typer.Option(help="Training images used to calibrate the int8 quantization.")] = 400,
    min_agreement: Annotated[float, typer.Option(help="int8 gate: Wilson 95% lower bound of float/int8 top-1 agreement on known-species photos not used for quantization.")] = 0.95,
    min_verdict_agreement: Annotated[float, typer.Option(help="int8 gate: the same for the verdict (val + test photos).")] = 0.90,
    max_new_edible: Annotated[float, typer.Option(help="int8 gate: Wilson 95% upper bound of int8 EDIBLE among val+test photos float does not call EDIBLE.")] = 0.02,
    gate_min_photos: Annotated[int, typer.Option(help="int8 gate: refuse when fewer photos than this measure an agreement.")] = 200,
    force: Annotated[bool, typer.Option("--force", help="Write the bundle even if a gate refuses it (says so).")] = False,
    name: Annotated[Optional[str], typer.Option(help="Bundle name in the card (default mushcam-<backbone>-<n>sp).")] = None,
    version: Annotated[Optional[str], typer.Option(help="Bundle version in the card (default: UTC date and time).")] = None,
    samples: Annotated[int, typer.Option(help="Sample photos per class for `mushcam selftest`.")] = 3,
    max_poison_edible: Annotated[float, typer.Option(help="Calibration target: fraction of poisonous val photos answered EDIBLE.")] = 0.005,
    min_edible_confidence: Annotated[float, typer.Option(help="Floor of the calibrated edible_min_confidence.")] = 0.9,
    ood_method: Annotated[str, typer.Option(help="Unknown-species score: knn or mahalanobis.")] = "knn",
    ood_percentile: Annotated[float, typer.Option(min=50, max=100, help="ood_max_score = this percentile of val scores.")] = 95.0,
    min_edible_coverage: Annotated[Optional[float], typer.Option(min=0, max=1, help="Instead: the strictest ood percentile that keeps val edible coverage >= this (no other pool only).")] = None,
    max_unseen_edible: Annotated[float, typer.Option(min=0, max=1, help="Open-world calibration target: val unseen-species photos answered EDIBLE (needs prepare --other).")] = 0.01,
    confidence_margin: Annotated[float, typer.Option(min=0, max=0.5, help="Written to thresholds.confidence_margin: the device demands this much more confidence.")] = 0.02,
    ood_margin: Annotated[float, typer.Option(min=0, max=0.5, help="Written to thresholds.ood_margin: the device's ood threshold is this much stricter (int8 jitter).")] = 0.015,
    mass_margin: Annotated[float, typer.Option(min=0, max=0.2, help="Written to thresholds.mass_margin: EDIBLE needs the non-edible mass this much under poisonous_max_mass (int8 jitter).")] = 0.0,
    margins_why: Annotated[Optional[str], typer.Option(help="Where the margins come from, for the card (default: the assumed jitter).")] = None,
    other_samples: Annotated[int, typer.Option(help="Other-pool test photos in samples/ (expected verdict UNSURE); 0 by default: the other pool's photos must not be redistributed.")] = 0,
    loso: Annotated[Optional[Path], typer.Option(help="Leave-one-species-out folds of this split (`loso --out`, or the file `folds` writes from it): their held-out poisonous species are calibration evidence too.",
                                                 exists=True)] = None,
    max_held_edible: Annotated[float, typer.Option(min=0, max=1, help="With --loso: target share of all held-out photos answered EDIBLE.")] = 0.01,
    max_held_fold_edible: Annotated[float, typer.Option(min=0, max=1, help="With --loso: target share of each held-out species answered EDIBLE.")] = 0.05,
) -> None:
    """Quantize WORK/model.keras to an int8 bundle, gate it on float/int8 agreement, calibrate thresholds, write BUNDLE."""
    from train.export import ExportOptions, export as run_export

    with _reported():
        result = run_export(work, ExportOptions(
            out=out, calibration=calibration, min_agreement=min_agreement, min_verdict_agreement=min_verdict_agreement,
            gate_min_photos=gate_min_photos, max_new_edible=max_new_edible, force=force, name=name, version=version,
            samples=samples, max_poison_edible=max_poison_edible, min_edible_confidence=min_edible_confidence,
            ood_method=_ood_method(ood_method), ood_percentile=ood_percentile, min_edible_coverage=min_edible_coverage,
            max_unseen_edible=max_unseen_edible, confidence_margin=confidence_margin, ood_margin=ood_margin,
            mass_margin=mass_margin, other_samples=other_samples, loso=loso, max_held_edible=max_held_edible,
            max_held_fold_edible=max_held_fold_edible,
            **({"margins_why": margins_why} if margins_why else {}),
        ))
        th, v = result.thresholds, result.val
        console.out.print(
            f"val top-1: float {result.float_top1:.4f}, int8 {result.int8_top1:.4f}; "
            f"edible_min_confidence {th['edible_min_confidence']:.4f} (+{th.get('confidence_margin') or 0:g}), "
            f"ood_max_score {th.get('ood_max_score') or 0:.3f} (-{th.get('ood_margin') or 0:g})"
        )
        eff = ((result.calibration or {}).get("expected_at_effective") or {}).get("val")
        if eff:
            console.out.print(
                f"val at the effective thresholds: unseen species answered EDIBLE {eff['unseen_as_edible']['rate']:.2%} "
                f"({eff['unseen_as_edible']['count']}/{eff['unseen_as_edible']['n']}), poisonous "
                f"{eff['poisonous_as_edible']['rate']:.2%}, edible coverage {eff['edible_coverage']['rate']:.2%}"
            )
        else:
            console.out.print(
                f"val safety: poisonous answered EDIBLE {v['poisonous_as_edible']:.2%}, edible coverage "
                f"{v['edible_coverage']:.2%}, UNSURE {v['unsure_rate']:.2%}, cost {v['cost']:.3f}"
            )
        lo = (result.calibration or {}).get("leave_one_species_out")
        if lo:
            a, lofo = lo["at_effective"]["all"], lo["leave_one_fold_out"]["all"]
            console.out.print(
                f"held-out species (leave-one-species-out folds) answered EDIBLE at the effective thresholds: "
                f"{a['count']}/{a['n']} (calibrated on them); each fold calibrated without it: "
                f"{lofo['count']}/{lofo['n']} ({lofo['rate']:.2%})")
        g = result.gate or {}
        if g:
            console.out.print(f"int8 gate: top-1 agreement (known species) {g['top1_agreement_known']['count']}/{g['top1_agreement_known']['n']}, "
                              f"verdict agreement {g['verdict_agreement']['count']}/{g['verdict_agreement']['n']}")
        console.out.print(f"bundle: {result.path} ({result.seconds:.0f} s)")


@app.command()
def evaluate(
    bundle: Annotated[Path, typer.Argument(help="Model bundle directory (export).", exists=True, file_okay=False)],
    source: Annotated[Path, typer.Argument(help="A WORK dir (uses --split) or a folder-per-class DATA_DIR (every image).",
                                           exists=True, file_okay=False)],
    split: Annotated[str, typer.Option(help="Split of a WORK dir's manifest: train, val or test.")] = "test",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (and nothing else) on stdout.")] = False,
    report: Annotated[Optional[Path], typer.Option(help="Write report.md and plots into this folder.")] = None,
    record: Annotated[bool, typer.Option("--record", help="Also store the figures in BUNDLE's model.json as metrics.<split>.")] = False,
    arch: Annotated[str, typer.Option(
        help="x86_64: on this machine. aarch64: also on the Pi's architecture, in the arm64 root of `make pi-check` "
             "(as root), with the per-photo differences and suggested margins; --record adds "
             "metrics.arch_jitter, and metrics.<split>_aarch64 when SOURCE is the model's own WORK dir.")] = "x86_64",
    unseen: Annotated[Optional[Path], typer.Option(
        help="With --arch aarch64: a folder of species the model does not know (searched recursively), "
             "compared too.", exists=True, file_okay=False)] = None,
    unseen_limit: Annotated[int, typer.Option(min=1, help="At most this many --unseen photos (evenly spaced).")] = 300,
    rows: Annotated[Optional[Path], typer.Option(
        help="With --arch aarch64: also write every photo's result on both architectures here (JSON).",
        dir_okay=False)] = None,
) -> None:
    """Run BUNDLE through the device's classifier on photos: top-1, per class, and the safety table."""
    import json

    from train import evaluate as ev

    with _reported():
        if split not in ("train", "val", "test"):
            raise typer.BadParameter(f"{split!r} is not one of train, val, test", param_hint="--split")
        if arch not in ("x86_64", "aarch64"):
            raise typer.BadParameter(f"{arch!r} is not one of x86_64, aarch64", param_hint="--arch")
        if (unseen is not None or rows is not None) and arch != "aarch64":
            raise typer.BadParameter("--unseen and --rows are for comparing architectures: add --arch aarch64",
                                     param_hint="--unseen/--rows")
        if arch == "aarch64":
            _evaluate_aarch64(bundle, source, split, as_json, record, unseen, unseen_limit, rows)
            return
        result = ev.evaluate(bundle, source, split, threads=os.cpu_count())
        if report is not None:
            path = ev.write_report(result, report)
            console.note(f"report: {path}")
        if record:
            ev.record_in_card(bundle, split, result)
            if (Path(bundle) / "model.json.sig").exists():
                console.warn("model.json changed, so model.json.sig no longer matches: sign the bundle again")
        if as_json:
            sys.stdout.write(json.dumps(ev.public(result), indent=2) + "\n")
        else:
            ev.print_result(result)


def _evaluate_aarch64(bundle: Path, source: Path, split: str, as_json: bool, record: bool, unseen: Path | None,
                      unseen_limit: int, rows_out: Path | None = None) -> None:
    """evaluate --arch aarch64: the same photos on both architectures, their figures and differences."""
    import json
    import time

    from device.bundle import load_bundle
    from train import arch as ar
    from train import evaluate as ev
    from train.dataset import IMAGE_SUFFIXES

    b = load_bundle(bundle)
    items, where, genera = ev.collect(source, list(b.labels), split)
    extra: list[Path] = []
    if unseen is not None:
        every = sorted(p for p in unseen.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if every:
            step = max(1, len(every) // unseen_limit)
            extra = every[::step][:unseen_limit]
    paths = [p for p, _, _ in items] + extra
    t0 = time.perf_counter()
    x86 = ev.classify_rows(b, paths, threads=os.cpu_count())
    t1 = time.perf_counter()
    console.note(f"classifying {len(paths)} photos in the arm64 root (emulated: slow)")
    arm = ar.classify_in_pi_root(bundle, paths)
    t2 = time.perf_counter()
    results = {"x86_64": ev.summarize(b, items, x86[:len(items)], where, t1 - t0, genera),
               "aarch64": ev.summarize(b, items, arm[:len(items)], where + ", aarch64 (emulated)", t2 - t1, genera)}
    if rows_out is not None:
        from device.bundle import write_json_atomic

        write_json_atomic(rows_out, {"known": len(items), "x86_64": x86, "aarch64": arm})
    jit = ar.jitter(b, x86, arm, len(items))
    jit["source"] = where
    jit["unseen_source"] = str(unseen) if unseen is not None else None
    jit["figures"] = {a: {k: r[k] for k in ("n", "top1", "poisonous_as_edible_count", "edible_coverage", "unsure_rate")}
                      for a, r in results.items()}
    if record:
        # metrics.<split> must describe photos the model never trained on: only when SOURCE holds the very
        # split the model was trained on (the card has its manifest's sha256 and, since 2026-12-05, the split's
        # own sha256, which a WORK dir prepared again with the same photos and seed on another machine matches).
        from train.dataset import MANIFEST, sha256_of, split_sha256

        training = b.card.get("training") or {}
        mf = Path(source) / MANIFEST
        own = mf.is_file() and (sha256_of(mf) == training.get("manifest_sha256")
                                or split_sha256(mf) == training.get("split_sha256"))
        if own:
            ev.record_in_card(bundle, split, results["x86_64"])
            ev.record_in_card(bundle, f"{split}_aarch64", results["aarch64"])
        else:
            console.warn(f"{source} does not hold the split {b.name} was trained on (manifest and split sha256 differ): "
                         f"recording only metrics.arch_jitter, not metrics.{split}/{split}_aarch64")
        card_path = Path(bundle) / "model.json"
        card = json.loads(card_path.read_text(encoding="utf-8"))
        card.setdefault("metrics", {})["arch_jitter"] = jit
        from device.bundle import write_card

        write_card(Path(bundle), card)
        if (Path(bundle) / "model.json.sig").exists():
            console.warn("model.json changed, so model.json.sig no longer matches: sign the bundle again")
    if as_json:
        sys.stdout.write(json.dumps({"x86_64": ev.public(results["x86_64"]), "aarch64": ev.public(results["aarch64"]),
                                     "arch_jitter": jit}, indent=2) + "\n")
        return
    for name, result in results.items():
        console.out.print(f"--- {name}")
        ev.print_result(result)
    console.out.print(ar.format_jitter(jit))


@app.command()
def edgetpu(
    bundle: Annotated[Path, typer.Argument(help="Model bundle directory (export).", exists=True, file_okay=False)],
) -> None:
    """Compile BUNDLE's model for a Coral Edge TPU (edgetpu_compiler) and add it to the bundle and card."""
    from train.edgetpu import compile_bundle

    with _reported():
        rep = compile_bundle(bundle)
        console.out.print(f"compiled with edgetpu_compiler {rep.version or '(unknown version)'}: "
                          f"{rep.ops_on_tpu if rep.ops_on_tpu is not None else '?'} operations on the Edge TPU, "
                          f"{rep.ops_on_cpu if rep.ops_on_cpu is not None else '?'} on the CPU")
        for op in rep.cpu_ops:
            console.out.print(f"  on CPU: {op['op']} x{op['count']}: {op['reason']}", markup=False)
        if (Path(bundle) / "model.json.sig").exists():
            console.warn("model.json changed, so model.json.sig no longer matches: sign the bundle again")
        console.out.print(f"added {Path(bundle) / 'model_edgetpu.tflite'}")


@app.command()
def loso(
    work: Annotated[Path, typer.Argument(help="WORK dir written by prepare (all species).", exists=True, file_okay=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the folds (one WORK and bundle each) and loso.json.")],
    weights: Annotated[str, typer.Option(help="Backbone init, as for fit.")],
    holdout: Annotated[Optional[list[str]], typer.Option(help="Species to hold out (repeatable; default: every poisonous one).")] = None,
    size: Annotated[Optional[int], typer.Option(help="Square input size, as for fit.")] = None,
    epochs: Annotated[int, typer.Option(help="As for fit.")] = _HP.epochs,
    fine_tune_epochs: Annotated[int, typer.Option(help="As for fit.")] = _HP.fine_tune_epochs,
    feature_copies: Annotated[int, typer.Option(help="As for fit.")] = _HP.feature_copies,
    edible_penalty: Annotated[float, typer.Option(help="As for fit.")] = _HP.edible_penalty,
    calibration: Annotated[int, typer.Option(help="As for export.")] = 400,
    ood_method: Annotated[str, typer.Option(help="As for export.")] = "knn",
    ood_percentile: Annotated[float, typer.Option(min=50, max=100, help="As for export.")] = 95.0,
    min_edible_coverage: Annotated[Optional[float], typer.Option(min=0, max=1, help="As for export.")] = None,
    reuse_fits: Annotated[bool, typer.Option(help="Re-export folds already trained in OUT (same recipe) instead of refitting.")] = False,
    record: Annotated[Optional[Path], typer.Option(help="Store the per-fold figures in this bundle's model.json (metrics.leave_one_species_out).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = _HP.seed,
) -> None:
    """Leave-one-species-out: train without each poisonous species, count how often its photos come out EDIBLE."""
    from train.export import ExportOptions
    from train.loso import loso as run_loso

    with _reported():
        hp = HParams(weights=weights, size=size, epochs=epochs, fine_tune_epochs=fine_tune_epochs,
                     feature_copies=feature_copies, edible_penalty=edible_penalty, seed=seed)
        opts = ExportOptions(out=out, calibration=calibration, ood_method=_ood_method(ood_method),
                             ood_percentile=ood_percentile, min_edible_coverage=min_edible_coverage)
        summary = run_loso(work, out, hp, opts, holdout, reuse_fits=reuse_fits)
        for f in summary["folds"]:
            console.out.print(
                f"without {f['held_out']}: {f['answered_edible']}/{f['photos']} answered EDIBLE ({f['edible_rate']:.1%}), "
                f"{f['answered_unsure']} UNSURE, {f['answered_poisonous']} POISONOUS; fold val edible coverage "
                f"{f['val_edible_coverage']:.1%}", markup=False)
        console.out.print(f"all folds: {summary['answered_edible']}/{summary['photos']} answered EDIBLE "
                          f"({summary['edible_rate']:.2%}); worst fold {summary['worst_fold_edible_rate']:.1%}")
        if record is not None:
            from train.loso import record_in_card

            record_in_card(record, summary)
            console.out.print(f"recorded in {record / 'model.json'}")


@app.command()
def folds(
    loso_dir: Annotated[Path, typer.Argument(help="Folds folder (`loso --out`).", exists=True, file_okay=False)],
    work: Annotated[Path, typer.Argument(help="The WORK dir (split) the folds left one species out of.", exists=True, file_okay=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="The file to write (JSON; no photos, no models).")],
) -> None:
    """Write the folds' evidence (per-photo figures, thresholds, split id) to one file for export --loso."""
    import json

    from device.bundle import write_json_atomic
    from train.loso import evidence

    with _reported():
        doc = evidence(loso_dir, json.loads((work / "manifest.json").read_text(encoding="utf-8")))
        write_json_atomic(out, doc)
        console.out.print(f"{out}: {sum(len(f['held_records']) for f in doc['folds'])} held-out photos of "
                          f"{len(doc['folds'])} folds ({', '.join(f['held_out'] for f in doc['folds'])})", markup=False)


@app.command()
def recalibrate(
    bundle: Annotated[Path, typer.Argument(help="Open-world model bundle (export) to choose the thresholds of again.", exists=True, file_okay=False)],
    work: Annotated[Path, typer.Argument(help="The WORK dir (split) the bundle was trained and calibrated on.", exists=True, file_okay=False)],
    loso: Annotated[Optional[Path], typer.Option(help="Leave-one-species-out folds of this split (`loso --out`, or the file `folds` writes from it): their held-out species are calibration evidence too.",
                                                 exists=True)] = None,
    max_unseen_edible: Annotated[float, typer.Option(min=0, max=1, help="Target: val unseen-species photos answered EDIBLE.")] = 0.01,
    max_poison_edible: Annotated[float, typer.Option(min=0, max=1, help="Target: known poisonous val photos answered EDIBLE.")] = 0.005,
    max_held_edible: Annotated[float, typer.Option(min=0, max=1, help="With --loso: target share of all held-out photos answered EDIBLE.")] = 0.01,
    max_held_fold_edible: Annotated[float, typer.Option(min=0, max=1, help="With --loso: target share of each held-out species answered EDIBLE.")] = 0.05,
    min_edible_confidence: Annotated[float, typer.Option(help="Floor of the calibrated edible_min_confidence.")] = 0.9,
    version: Annotated[Optional[str], typer.Option(help="The new bundle version (default: UTC date and time; never the old one).")] = None,
    keep_thresholds: Annotated[bool, typer.Option(help="Keep the card's thresholds: choose the samples again and measure --loso folds at them.")] = False,
) -> None:
    """Choose BUNDLE's thresholds again with export's search (no refit; the card's margins kept), e.g. with --loso folds."""
    from train.export import ExportOptions, recalibrate as run

    with _reported():
        res = run(bundle, work, ExportOptions(out=bundle, max_unseen_edible=max_unseen_edible,
                                              max_poison_edible=max_poison_edible, min_edible_confidence=min_edible_confidence,
                                              loso=loso, max_held_edible=max_held_edible,
                                              max_held_fold_edible=max_held_fold_edible, version=version,
                                              keep_thresholds=keep_thresholds))
        th, cal = res["thresholds"], res["calibration"]
        was = (cal.get("samples_rechosen") or {}).get("version_before") if keep_thresholds else cal["previous"]["version"]
        console.out.print(f"version {res['version']} (was {was})", markup=False)
        eff = cal["expected_at_effective"]["val"]
        console.out.print(
            f"thresholds {th['edible_min_confidence']:.4f} (+{th['confidence_margin']:g}) / mass "
            f"{th['poisonous_max_mass']:g} (-{th['mass_margin']:g}) / ood {th.get('ood_max_score') or 0:.4f} "
            f"(-{th['ood_margin']:g}); val at the effective thresholds: coverage {eff['edible_coverage']['count']}/"
            f"{eff['edible_coverage']['n']}, unseen {eff['unseen_as_edible']['count']}/{eff['unseen_as_edible']['n']}, "
            f"poisonous {eff['poisonous_as_edible']['count']}/{eff['poisonous_as_edible']['n']}")
        refit = cal.get("folds_refitted") if keep_thresholds else None
        if refit:
            a = refit["at_effective"]["all"]
            console.out.print(f"thresholds kept; the refitted folds' held-out species answered EDIBLE at them: "
                              f"{a['count']}/{a['n']} ({a['rate']:.2%})")
        lo = None if keep_thresholds else cal.get("leave_one_species_out")
        if lo:
            a, lofo = lo["at_effective"]["all"], lo["leave_one_fold_out"]["all"]
            console.out.print(f"held-out species answered EDIBLE: {a['count']}/{a['n']} (calibrated on them); each "
                              f"fold calibrated without it: {lofo['count']}/{lofo['n']} ({lofo['rate']:.2%})")
        if res["stale"]:
            console.out.print(f"re-run `mushcam-train evaluate {bundle} {work} --split test --record` (metrics."
                              f"{', metrics.'.join(res['stale'])} were removed: they were measured at the old thresholds)",
                              markup=False)


app.command("sign")(sign)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except ModuleNotFoundError as err:  # TensorFlow, imagehash, ... are imported by the commands that need them
        _exit_without_train_extra(err)
        raise


if __name__ == "__main__":
    main()
