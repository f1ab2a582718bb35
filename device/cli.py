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

# .heic/.heif (the iPhone default) decode with the `heic` extra; without it each gets a line saying so.
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".heic", ".heif"}

ModelOption = Annotated[
    Optional[Path],
    typer.Option("--model", "-m", help="Model bundle directory (default: the installed or shipped bundle)."),
]


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mushcam")
    except PackageNotFoundError:  # run from a checkout without pip install (python -m device)
        from device import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"mushcam {_package_version()}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Offline mushroom-identification camera."""


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


def _expand(paths: list[Path], skipped: list[Path] | None = None) -> list[Path]:
    """Files as given; folders searched recursively for image files, in a stable order.

    A folder's other files are appended to `skipped` (if given), so the summary can count them.
    """
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file())
            out.extend(f for f in found if f.suffix.lower() in IMAGE_EXTENSIONS)
            if skipped is not None:
                skipped.extend(f for f in found if f.suffix.lower() not in IMAGE_EXTENSIONS)
        else:
            out.append(p)
    return out


def _summary(classified: int, failed: int, skipped: list[Path]) -> str:
    """'3 photos classified, 1 could not be decoded, 2 other files skipped (.json, .txt)'."""
    parts = [f"{classified} photo{'s' if classified != 1 else ''} classified"]
    if failed:
        parts.append(f"{failed} could not be decoded")
    if skipped:
        kinds = sorted({f.suffix.lower() or f.name for f in skipped})
        shown = ", ".join(kinds[:4]) + (", ..." if len(kinds) > 4 else "")
        parts.append(f"{len(skipped)} other file{'s' if len(skipped) != 1 else ''} skipped, not images ({shown})")
    return ", ".join(parts)


def _labelled(bundle, pair: tuple[str, float] | None) -> dict | None:
    """{"label", "display_name", "probability"} for a (label, probability) pair, or None."""
    if pair is None:
        return None
    label, p = pair
    return {"label": label, "display_name": bundle.display_name(label), "probability": round(p, 4)}


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
    skipped: list[Path] = []
    files = _expand(paths, skipped)
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
                "runner_up": _labelled(bundle, r.runner_up),
                "latency_ms": round(r.latency_ms, 2),
            }
            if probs:
                # Exact figures, for comparing two machines (deploy/pi-check.sh, evaluate --arch aarch64).
                row.update(confidence=r.confidence, ood_score=r.ood_score, poisonous_mass=r.decision.poisonous_mass,
                           probs={lab: float(p) for lab, p in zip(bundle.labels, r.probs)})
            typer.echo(json.dumps(row))
        else:
            typer.echo(f"{r.verdict:<9}  {r.confidence:6.1%}  {name:<24}  {f}  ({r.decision.reason})")
    # --json keeps stderr quiet for machines, except that skipped files (which have no JSON row) are said:
    # a script must not take a partly classified folder for a whole one.
    if skipped or not as_json:
        typer.echo(f"mushcam: {_summary(len(files) - failed, failed, skipped)}", err=True)
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
    """Validate a bundle and check its sample photos give their expected labels and verdicts (exit 0 pass, 1 fail).

    Prints the thresholds in effect after the result line.
    """
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
    typer.echo(bundle.thresholds_line())


@app.command("check-config")
@one_line_errors
def check_config(
    path: Annotated[Optional[Path], typer.Argument(help="Config file (default /etc/mushcam/config.toml).")] = None,
) -> None:
    """Validate a config file and print the settings in effect.

    Exit 1 on an error: anything that would stop the daemon (a bad key, type, value, camera or path), or
    `require_signature` with no allowed-signers file on this machine. Warnings (a `model_dir` not there yet)
    are printed and do not change the exit code.
    """
    from dataclasses import asdict

    from device.config import load_config, machine_problems

    cfg = load_config(path)
    errors, warnings = machine_problems(cfg)
    for w in warnings:
        typer.echo(f"mushcam: warning: {w}", err=True)
    if errors:
        for e in errors[1:]:
            typer.echo(f"mushcam: error: {e}", err=True)
        _fail(errors[0])
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
    captures_dir: Annotated[
        Optional[Path], typer.Option(help="Keep every press (frames + result.json) here (laptop default: ./captures).")
    ] = None,
    no_captures: Annotated[bool, typer.Option("--no-captures", help="Keep no presses, whatever the config says.")] = False,
) -> None:
    """Run the camera daemon: wait for button presses, capture, classify, signal the verdict.

    Press with the button, `mushcam press`, `kill -USR1 PID`, or (laptop mode, in a terminal) Enter.
    """
    from device.daemon import main as daemon_main

    raise typer.Exit(daemon_main(config=config, camera=camera, model=model, once=once, display_dir=display_dir,
                                 captures=False if no_captures else None, captures_dir=captures_dir))


def _press_socket(config: Path | None) -> Path:
    """The running daemon's press socket: beside the config's status file, or a laptop's fallback."""
    from device.config import Config, load_config
    from device.daemon import is_raspberry_pi, laptop_runtime_dir
    from device.press import SOCKET_NAME, socket_path

    cfg = load_config(config)
    if not cfg.status_file:
        _fail("the config has no status_file, so its daemon has no press socket; pass --socket")
    path = socket_path(cfg.status_file)
    fallback = laptop_runtime_dir() / SOCKET_NAME
    if not path.exists() and cfg.status_file == Config().status_file and not is_raspberry_pi() and fallback.exists():
        return fallback  # a laptop daemon that could not write /run/mushcam put it here
    return path


@app.command()
@one_line_errors
def press(
    wait: Annotated[bool, typer.Option(help="Wait for the verdict and print it (exit 1 if none comes).")] = False,
    config: Annotated[Optional[Path], typer.Option(help="The daemon's config (its status_file locates the socket).")] = None,
    socket: Annotated[Optional[Path], typer.Option(help="The daemon's press socket (default: beside its status file).")] = None,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for the daemon.")] = 60.0,
) -> None:
    """Press the running daemon's shutter button (over its Unix socket; no network).

    Exit 0 when the press was taken (with --wait: the verdict line was printed), 1 when there is no
    daemon, the press failed, or no verdict came within --timeout.
    """
    from device.press import press as send_press

    typer.echo(send_press(socket or _press_socket(config), wait=wait, timeout=timeout))


@app.command()
@one_line_errors
def review(
    captures_dir: Annotated[
        Optional[Path], typer.Argument(help="Captures folder (default: ./captures on a laptop, the config's on a Pi).")
    ] = None,
    out: Annotated[Path, typer.Option(help="The HTML file to write.")] = Path("review.html"),
    limit: Annotated[Optional[int], typer.Option(min=1, help="Show only the newest N presses.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="Take the captures folder from this config file.")] = None,
) -> None:
    """Write one static HTML page of the saved presses, newest first (no server, no network).

    Per press: its frames, the verdict, the top-3 species, the unknown-species score against its limit,
    the model, the time and where each frame came from.
    """
    from device.config import load_config
    from device.daemon import LAPTOP_CAPTURES_DIR, is_raspberry_pi
    from device.review import write_review

    if captures_dir is None:
        cfg = load_config(config)
        laptop = not is_raspberry_pi() and config is None and not cfg.captures.enabled
        captures_dir = Path(LAPTOP_CAPTURES_DIR if laptop else cfg.captures.dir)
    n = write_review(captures_dir, out, limit)
    typer.echo(f"wrote {out}: {n} press(es) from {captures_dir}")


release_app = typer.Typer(
    help="The device's model store: releases/<version>-<sha12>/ and the `current` link (docs/deploy.md).",
    no_args_is_help=True,
)
app.add_typer(release_app, name="release")

RootOption = Annotated[Path, typer.Option("--root", help="Model root on the device.")]


def _os_errors(fn):
    """A file system error in the store (a full disk, a mode) is one line too, naming the file."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from device.errors import ReleaseError

        try:
            return fn(*args, **kwargs)
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise ReleaseError(f"{where}{e.strerror or e}; nothing else was changed") from None

    return wrapper
ReleaseConfigOption = Annotated[
    Optional[Path],
    typer.Option("--config", help="The daemon's config (require_signature, allowed_signers, status_file); "
                 "ignored if the file does not exist."),
]
SystemctlOption = Annotated[str, typer.Option(help='systemctl command, e.g. "sudo -n systemctl".')]
ServiceOption = Annotated[str, typer.Option("--service", help="systemd service of the daemon.")]
StatusFileOption = Annotated[Optional[Path], typer.Option(help="The daemon's status file (default: the config's).")]
TimeoutOption = Annotated[float, typer.Option(min=0.5, help="Seconds to wait for the daemon to report the release.")]
SignatureOption = Annotated[bool, typer.Option(help="Refuse a bundle whose model.json.sig does not verify.")]
SignersOption = Annotated[Optional[Path], typer.Option(help="Allowed-signers file (default: the config's).")]


def _release_ops(root: Path, config: Path | None, require_signature: bool, allowed_signers: Path | None,
                 systemctl: str | None, service: str, status_file: Path | None, timeout: float,
                 selftest: bool = True, card_sha: str | None = None, sig_sha: str | None = None, log=None):
    from device.config import Config, load_config
    from device.release import Operations, ReleaseStore, Service, Verify

    cfg = load_config(config) if config is not None and config.exists() else Config()
    policy = Verify(
        require_signature=require_signature or cfg.require_signature,
        allowed_signers=allowed_signers or Path(cfg.allowed_signers),
        card_sha256=card_sha, signature_sha256=sig_sha,
    )
    svc = None
    if systemctl is not None:
        svc = Service.from_options(status_file or Path(cfg.status_file), systemctl, service, timeout)
    return Operations(ReleaseStore(root), svc, policy, selftest=selftest, log=log or (lambda m: typer.echo(m, err=True)))


@release_app.command("install")
@one_line_errors
@_os_errors
def release_install(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory to copy in.")],
    root: RootOption = Path("/var/lib/mushcam/models"),
    activate: Annotated[bool, typer.Option(help="Also make it current (without --reload: the daemon is not told).")] = False,
    reload: Annotated[bool, typer.Option(help="With --activate: reload the daemon and wait until it serves the release.")] = False,
    selftest: Annotated[bool, typer.Option(help="Run the bundle's sample photos before accepting it.")] = True,
    keep: Annotated[Optional[int], typer.Option(min=1, help="Then keep only this many releases (current included).")] = None,
    config: ReleaseConfigOption = Path("/etc/mushcam/config.toml"),
    require_signature: SignatureOption = False,
    allowed_signers: SignersOption = None,
    systemctl: SystemctlOption = "systemctl",
    service: ServiceOption = "mushcam",
    status_file: StatusFileOption = None,
    timeout: TimeoutOption = 30.0,
) -> None:
    """Copy a bundle into the store as releases/<version>-<sha12>, verify the copy, optionally activate it."""
    ops = _release_ops(root, config, require_signature, allowed_signers, systemctl if reload else None,
                       service, status_file, timeout, selftest)
    typer.echo(ops.install(bundle, activate=activate, keep=keep))


@release_app.command("activate")
@one_line_errors
@_os_errors
def release_activate(
    name: Annotated[str, typer.Argument(help="Release name (see `mushcam release list`).")],
    root: RootOption = Path("/var/lib/mushcam/models"),
    reload: Annotated[bool, typer.Option(help="Reload the daemon and wait until it serves the release (else go back).")] = True,
    selftest: Annotated[bool, typer.Option(help="Run the release's sample photos first.")] = True,
    config: ReleaseConfigOption = Path("/etc/mushcam/config.toml"),
    require_signature: SignatureOption = False,
    allowed_signers: SignersOption = None,
    systemctl: SystemctlOption = "systemctl",
    service: ServiceOption = "mushcam",
    status_file: StatusFileOption = None,
    timeout: TimeoutOption = 30.0,
) -> None:
    """Make an installed release current (atomically), and check the daemon serves it."""
    ops = _release_ops(root, config, require_signature, allowed_signers, systemctl if reload else None,
                       service, status_file, timeout, selftest)
    typer.echo(ops.activate(name))


@release_app.command("rollback")
@one_line_errors
@_os_errors
def release_rollback(
    root: RootOption = Path("/var/lib/mushcam/models"),
    dry_run: Annotated[bool, typer.Option(help="Say which release it would go back to; change nothing.")] = False,
    porcelain: Annotated[bool, typer.Option(hidden=True, help="One RESULT line for deploy/flash.sh.")] = False,
    config: ReleaseConfigOption = Path("/etc/mushcam/config.toml"),
    require_signature: SignatureOption = False,
    allowed_signers: SignersOption = None,
    systemctl: SystemctlOption = "systemctl",
    service: ServiceOption = "mushcam",
    status_file: StatusFileOption = None,
    timeout: TimeoutOption = 30.0,
) -> None:
    """Point `current` back at the newest other good release, check the daemon serves it, mark the left one failed."""
    from device.release import _safe

    def out(kind: str, *fields: str) -> None:
        typer.echo("\t".join([kind, *(_safe(f) for f in fields)]))

    log = (lambda m: out("LOG", m)) if porcelain else None
    ops = _release_ops(root, config, require_signature, allowed_signers, systemctl, service, status_file, timeout, log=log)
    try:
        status, target, detail = ops.rollback(dry_run=dry_run)
    except MushcamError as e:
        if not porcelain:
            raise
        out("RESULT", "FAILED", "-", f"rollback: {e}")
        raise typer.Exit(1)
    if porcelain:
        out("RESULT", status, target, detail)
    else:
        typer.echo(f"{status} to {target}: {detail}")


@release_app.command("list")
@one_line_errors
@_os_errors
def release_list(
    root: RootOption = Path("/var/lib/mushcam/models"),
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array.")] = False,
) -> None:
    """The releases on this device, newest first (current marked with *)."""
    from dataclasses import asdict

    from device.release import ReleaseStore

    entries = ReleaseStore(root).entries()
    if as_json:
        typer.echo(json.dumps([asdict(e) for e in entries]))
        return
    for e in entries:
        typer.echo(f"{'*' if e.current else ' '} {e.name}  {e.state}")


@release_app.command("status")
@one_line_errors
@_os_errors
def release_status(
    root: RootOption = Path("/var/lib/mushcam/models"),
    config: ReleaseConfigOption = Path("/etc/mushcam/config.toml"),
    status_file: StatusFileOption = None,
) -> None:
    """The current release, and whether the daemon's status file says it is being served (exit 1 if not)."""
    from device.bundle import load_bundle
    from device.config import Config, load_config
    from device.release import ReleaseStore, Service

    store = ReleaseStore(root)
    name = store.current()
    if name is None:
        _fail(f"{root}/current does not exist: no release is current (deploy one with deploy/flash.sh)")
    bundle = load_bundle(store.path(name), check_sha=False)
    cfg = load_config(config) if config is not None and config.exists() else Config()
    status = Service(status_file or Path(cfg.status_file)).read_status() or {}
    serves = status.get("model_version") == bundle.version and status.get("model_sha256") == bundle.model_sha256
    typer.echo(f"current: {name} ({bundle.name} {bundle.version})")
    typer.echo(f"daemon: {status.get('state', 'no status file')}, serving {status.get('model_version')} "
               f"({str(status.get('model_sha256'))[:12]})" + ("" if serves else " -- NOT the current release"))
    raise typer.Exit(0 if serves else 1)


@release_app.command("receive")
@one_line_errors
@_os_errors
def release_receive(
    name: Annotated[str, typer.Argument(help="The release deploy/flash.sh pushes (<version>-<sha12>).")],
    card_sha256: Annotated[str, typer.Option(help="sha256 of the model.json pushed.")],
    signature_sha256: Annotated[Optional[str], typer.Option(help="sha256 of the model.json.sig pushed.")] = None,
    root: RootOption = Path("/var/lib/mushcam/models"),
    keep: Annotated[int, typer.Option(min=1, help="Releases to keep, current included.")] = 3,
    config: ReleaseConfigOption = Path("/etc/mushcam/config.toml"),
    require_signature: SignatureOption = False,
    allowed_signers: SignersOption = None,
    systemctl: SystemctlOption = "systemctl",
    service: ServiceOption = "mushcam",
    status_file: StatusFileOption = None,
    timeout: TimeoutOption = 30.0,
) -> None:
    """The device side of deploy/flash.sh: one flash under the lock, talking tab-separated lines on stdin/stdout.

    Prints READY (whether to copy into releases/NAME.partial), waits for `go` on stdin, then installs,
    self-tests, switches, checks the daemon (putting the old release back on failure) and prunes;
    the last line is RESULT<TAB>STATUS<TAB>NAME<TAB>DETAIL.
    """
    from device.release import _safe

    def out(kind: str, *fields: str) -> None:
        typer.echo("\t".join([kind, *fields]))
        sys.stdout.flush()

    try:
        ops = _release_ops(root, config, require_signature, allowed_signers, systemctl, service, status_file,
                           timeout, card_sha=card_sha256, sig_sha=signature_sha256, log=lambda m: out("LOG", _safe(m)))
        status, detail = ops.receive(name, keep, read_go=sys.stdin.readline,
                                     say=lambda kind, text: out(kind, text))
    except MushcamError as e:
        status, detail = "FAILED", f"prepare: {e}"
    except OSError as e:
        status, detail = "FAILED", f"device error: {e}"
    out("RESULT", status, _safe(name), _safe(detail))
    raise typer.Exit(0 if status in ("ok", "unchanged") else 1)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="mushcam")
