"""`mushcam`: the device's command line (also `python -m device`)."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from device.errors import MushcamError

app = typer.Typer(
    name="mushcam",
    help="Offline mushroom-identification camera. Verdicts are a prototype's guesses: never eat a mushroom on this advice alone.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}

ModelOption = Annotated[
    Optional[Path],
    typer.Option("--model", "-m", help="Model bundle directory (default: the installed or shipped bundle)."),
]


def _fail(message: str, code: int = 1):
    typer.echo(f"mushcam: error: {message}", err=True)
    raise typer.Exit(code)


def one_line_errors(fn):
    """Turn mushcam's own errors into one line on stderr and exit code 1: never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MushcamError as e:
            _fail(str(e))
        except KeyboardInterrupt:
            raise typer.Exit(130)

    return wrapper


def _setup_logging(level: str = "warning") -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _model_dir(model: Path | None) -> Path:
    from device.config import Config

    return model if model is not None else Config().resolved_model_dir()


def _expand(paths: list[Path]) -> list[Path]:
    """Files as given; folders searched recursively for image files, in a stable order."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS))
        else:
            out.append(p)
    return out


@app.command()
@one_line_errors
def classify(
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders (searched recursively).")],
    model: ModelOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per input per line.")] = False,
    engine: Annotated[str, typer.Option(help="Inference engine: auto, cpu or edgetpu.")] = "auto",
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for the interpreter (default: one per core).")] = None,
    probs: Annotated[
        bool, typer.Option("--probs", help="With --json: every label's probability and the figures unrounded.")
    ] = False,
) -> None:
    """Classify photos and print a verdict for each. Exit 0 if all were classified, 1 if some failed."""
    from device.bundle import load_bundle
    from device.classifier import Classifier

    _setup_logging()
    files = _expand(paths)
    if not files:
        _fail("no image files found in " + ", ".join(map(str, paths)), 2)
    bundle = load_bundle(_model_dir(model))
    clf = Classifier(bundle, backend=engine, threads=threads)
    failed = 0
    for f in files:
        try:
            r = clf.classify(f)
        except MushcamError as e:
            failed += 1
            typer.echo(f"mushcam: {e}", err=True)
            if as_json:
                typer.echo(json.dumps({"path": str(f), "error": str(e)}))
            continue
        name = bundle.display_name(r.label) if r.label else "-"
        if as_json:
            row = {
                "path": str(f), "label": r.label, "display_name": name, "confidence": round(r.confidence, 4),
                "verdict": r.verdict, "reason": r.decision.reason,
                "ood_score": None if r.ood_score is None else round(r.ood_score, 3),
                "latency_ms": round(r.latency_ms, 2),
            }
            if probs:
                # Exact figures, for comparing two machines (deploy/pi-check.sh, evaluate --arch aarch64).
                row.update(confidence=r.confidence, ood_score=r.ood_score, poisonous_mass=r.decision.poisonous_mass,
                           probs={lab: float(p) for lab, p in zip(bundle.labels, r.probs)})
            typer.echo(json.dumps(row))
        else:
            typer.echo(f"{r.verdict:<9}  {r.confidence:6.1%}  {name:<24}  {f}  ({r.decision.reason})")
    if not as_json:
        typer.echo("Never eat a mushroom on this advice alone.", err=True)
    raise typer.Exit(1 if failed else 0)


@app.command()
@one_line_errors
def selftest(
    model: ModelOption = None,
    require_signature: Annotated[bool, typer.Option(help="Refuse a bundle whose model.json.sig does not verify.")] = False,
    allowed_signers: Annotated[
        Optional[Path], typer.Option(help="ssh-keygen allowed-signers file for --require-signature.")
    ] = None,
    config: Annotated[
        Optional[Path], typer.Option(help="Take require_signature/allowed_signers from this config file.")
    ] = None,
) -> None:
    """Validate a bundle and check its sample photos give their expected labels (exit 0 pass, 1 fail)."""
    from device.bundle import load_bundle
    from device.config import load_config
    from device.selftest import require_samples_pass

    _setup_logging()
    if config is not None:
        cfg = load_config(config)
        require_signature = require_signature or cfg.require_signature
        allowed_signers = allowed_signers or Path(cfg.allowed_signers)
    bundle = load_bundle(_model_dir(model), require_signature=require_signature, allowed_signers=allowed_signers)
    checks = require_samples_pass(bundle)
    signed = f", signed by {bundle.signer}" if bundle.signer else ""
    typer.echo(f"selftest ok: {bundle.name} {bundle.version}, {len(checks)}/{len(checks)} samples{signed}")


@app.command("check-config")
@one_line_errors
def check_config(
    path: Annotated[Optional[Path], typer.Argument(help="Config file (default /etc/mushcam/config.toml).")] = None,
) -> None:
    """Validate a config file and print the settings in effect."""
    from dataclasses import asdict

    from device.config import load_config

    cfg = load_config(path)
    typer.echo(json.dumps(asdict(cfg), indent=2))
    typer.echo(f"config ok; model bundle: {cfg.resolved_model_dir()}", err=True)


@app.command()
@one_line_errors
def bench(
    model: ModelOption = None,
    image: Annotated[Optional[Path], typer.Option(help="Photo to time (default: the bundle's first sample).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    threads: Annotated[Optional[list[int]], typer.Option(help="Thread counts to time invoke() with (repeatable).")] = None,
    runs: Annotated[int, typer.Option(min=5, help="Timed runs per measurement.")] = 200,
    float_model: Annotated[Optional[Path], typer.Option(help="A float .tflite to compare invoke() with.")] = None,
) -> None:
    """Time each stage of a verdict (median and p95), invoke() by thread count, cold start and peak RSS."""
    from device.bench import format_table, run_bench, to_json
    from device.bundle import load_bundle

    bundle = load_bundle(_model_dir(model))
    if image is None:
        if not bundle.samples:
            _fail("the bundle has no samples: pass --image PHOTO", 2)
        image = bundle.samples[0].path
    res = run_bench(bundle, image, runs, threads, float_model)
    typer.echo(to_json(res) if as_json else format_table(res))


@app.command()
@one_line_errors
def run(
    config: Annotated[Optional[Path], typer.Option(help="TOML config (default /etc/mushcam/config.toml if present).")] = None,
    camera: Annotated[
        Optional[str], typer.Option(help="Camera: picamera2, opencv:INDEX|PATH, or fake:FILE|FOLDER|GLOB.")
    ] = None,
    model: ModelOption = None,
    once: Annotated[bool, typer.Option(help="Classify each fake-camera image once, then exit (the laptop demo).")] = False,
    display_dir: Annotated[
        Optional[Path], typer.Option(help="Write every display frame as a PNG here (laptop mode).")
    ] = None,
) -> None:
    """Run the camera daemon: wait for button presses, capture, classify, signal the verdict."""
    from device.daemon import main as daemon_main

    raise typer.Exit(daemon_main(config=config, camera=camera, model=model, once=once, display_dir=display_dir))


def main() -> None:
    """Console-script entry point."""
    app(prog_name="mushcam")
