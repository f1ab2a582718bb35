"""The camera daemon: button press -> N frames -> verdict on LEDs and display. `main()` returns an exit code.

One thread does the work: the button's callback, `mushcam press` (a Unix socket), SIGUSR1, Enter in laptop
mode and the other signal handlers only set flags and wake it, so presses that arrive while it is busy are
coalesced into one (a bounded queue of one), SIGTERM is handled between steps, and the watchdog is pinged
only while the loop really runs (a hung capture stops the pings, and systemd restarts the service).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from device.bundle import Bundle, load_bundle, write_json_atomic
from device.classifier import Classifier, Result
from device.config import CapturesConfig, Config, load_config, with_overrides
from device.errors import BundleError, CameraError, ConfigError, MushcamError
from device.sdnotify import Notifier

log = logging.getLogger("mushcam.daemon")

EXIT_OK, EXIT_ERROR, EXIT_CAMERA = 0, 1, 3
# Camera re-open back-off: quick at first (a loose cable), then every few seconds, never blocking the loop.
CAMERA_BACKOFF_START, CAMERA_BACKOFF_MAX = 0.25, 4.0
CHILD_SELFTEST_TIMEOUT_S = 120
LAPTOP_CAPTURES_DIR = "captures"  # laptop mode keeps every press here (under the working directory)
# When the verdict screen names what else it may be: any poisonous look-alike from 1 % (the EDIBLE rule
# allows at most poisonous_max_mass, 2 % in the shipped card, so every such figure is worth seeing);
# a runner-up from 5 % (below that it is noise next to a top guess).
LOOK_ALIKE_MIN, RUNNER_UP_MIN = 0.01, 0.05
# Reasons (device.verdict) for "this looks like none of the species the model knows".
UNFAMILIAR_REASONS = ("unlike the species it knows", "not a species it knows", "no unknown-species score")


def _role(info) -> str:
    """A class's role; cards without one derive it from edibility (anything not edible counts as poisonous,
    as in device.verdict)."""
    role = getattr(info, "role", None)
    if role:
        return role
    return "edible" if info.edibility == "edible" else "poisonous"

# The status file is read by deploy/flash.sh as a deploy user outside mushcam's group: world-readable
# whatever the umask (the unit's UMask=0027 made it 0640, and every such flash waited out its timeout).
# It holds the model's name, version and hash, the pid and counters: nothing secret.
STATUS_FILE_MODE = 0o644
STATUS_DIR_MODE = 0o755


def is_raspberry_pi() -> bool:
    """True on a Raspberry Pi (the device tree names the board); decides the laptop-mode defaults."""
    try:
        return "raspberry pi" in Path("/proc/device-tree/model").read_text(errors="ignore").lower()
    except OSError:
        return False


class Daemon:
    """Owns the model, camera, LEDs, button, display and notifier for one run."""

    def __init__(self, cfg: Config, *, once: bool = False, display_dir: Path | None = None, notifier: Notifier | None = None,
                 enter_presses: bool = False):
        self.cfg = cfg
        self.once = once
        # Enter on stdin presses (laptop mode, stdin a terminal): `mushcam run` turns it on; a Daemon built
        # inside another program (a test under `pytest -s`) must not read that program's terminal.
        self.enter_presses = enter_presses
        self.display_dir = display_dir
        self.notifier = notifier or Notifier()
        self.on_pi = is_raspberry_pi()
        self.bundle: Bundle | None = None
        self.classifier: Classifier | None = None
        self.camera = self.signals = self.button = self.display = None
        self.mock_factory = None
        self._wake = threading.Event()
        self._press = threading.Event()
        self._stop = threading.Event()
        self._reload = threading.Event()
        # `mushcam press --wait` clients waiting for the next press's verdict; taken as the press starts.
        self._waiters: list = []
        self._waiters_lock = threading.Lock()
        self.press_server = None
        self.last_reload_error: str | None = None
        self._camera_down_since: float | None = None
        self._camera_next_try = 0.0
        self._camera_backoff = CAMERA_BACKOFF_START
        self.presses_answered = 0
        self.last_capture: Path | None = None

    # --- set-up -------------------------------------------------------------------------------
    def model_path(self) -> Path:
        # Resolve the `current` symlink once: the model in memory stays tied to one release directory.
        return self.cfg.resolved_model_dir().resolve()

    def load_model(self, path: Path, self_test: bool) -> tuple[Bundle, Classifier]:
        """Validate the bundle at `path`, optionally self-test it, and build its classifier (no swap)."""
        from device.selftest import require_samples_pass

        bundle = load_bundle(path, require_signature=self.cfg.require_signature, allowed_signers=self.cfg.allowed_signers)
        clf = Classifier(bundle, backend=self.cfg.engine, threads=self.cfg.threads or None)
        if self_test:
            require_samples_pass(bundle, clf)
        return bundle, clf

    def start(self) -> None:
        from device.camera import open_camera
        from device.display import open_display
        from device.signals import Button, GpioSignals, use_mock_pins

        self.bundle, self.classifier = self.load_model(self.model_path(), self.cfg.selftest_at_start)
        log.info("model %s %s loaded from %s (engine %s)", self.bundle.name, self.bundle.version, self.bundle.path,
                 self.classifier.engine.name)
        g = self.cfg.gpio
        factory = None
        if g.pin_factory == "mock" or (g.pin_factory == "auto" and not self.on_pi):
            self.mock_factory = factory = use_mock_pins(force=g.pin_factory == "mock")
            log.info("laptop mode: GPIO is gpiozero's MockFactory; LED changes are logged")
        elif g.pin_factory != "auto":
            os.environ["GPIOZERO_PIN_FACTORY"] = g.pin_factory
        self.signals = GpioSignals({"green": g.green, "red": g.red, "amber": g.amber}, pin_factory=factory)
        self.button = Button(g.button, bounce_time=g.bounce_ms / 1000, when_pressed=self.request_press, pin_factory=factory)
        self.camera = open_camera(self.cfg.camera, size=self._camera_size(), jitter=self.cfg.camera_jitter)
        # The display last: a start that fails earlier leaves no display folder behind in laptop mode.
        self.display = self._open_display(open_display)
        if self.cfg.captures.enabled:
            from device.captures import sweep_temporaries

            # Before the first press: nothing of ours is being written, so every .tmp-* is a crash's leftover.
            sweep_temporaries(Path(self.cfg.captures.dir))
        self.show_ready()
        self._write_status("running")
        if not self.once:
            self._open_press_ways()

    def _open_press_ways(self) -> None:
        """The ways to press besides the button; the log says which work here."""
        from device.press import PressError, PressServer, watch_enter

        ways = [f"the button on GPIO{self.cfg.gpio.button}"]
        if self.enter_presses and self.mock_factory is not None and watch_enter(self.request_press):
            ways.insert(0, "Enter here")
        if self.cfg.status_file:
            from device.press import socket_path

            server = PressServer(socket_path(self.cfg.status_file), self._press_from_socket)
            try:
                server.start()
            except PressError as e:
                log.warning("%s; `mushcam press` will not reach this daemon", e)
            else:
                self.press_server = server
                ways.append(f"`mushcam press` (socket {server.path})")
        ways.append(f"`kill -USR1 {os.getpid()}`")
        log.info("to press: %s", ", ".join(ways))

    def _press_from_socket(self, reply) -> None:
        if reply is not None:
            with self._waiters_lock:
                self._waiters.append(reply)
        self.request_press()

    def _take_waiters(self) -> list:
        with self._waiters_lock:
            waiters, self._waiters = self._waiters, []
        return waiters

    @staticmethod
    def _tell(waiters: list, ok: bool, text: str) -> None:
        for reply in waiters:
            reply(ok, text)

    def _camera_size(self) -> tuple[int, int]:
        h, w = self.bundle.input.size
        return (w, h)  # cameras (picamera2, PIL) take (width, height); the card says (height, width)

    def _open_display(self, open_display):
        d = self.cfg.display
        kind = d.kind
        if self.display_dir is not None:
            kind = "png"
        elif kind == "auto":
            kind = "ssd1306" if self.on_pi else "png"
        if kind == "png":
            folder = self.display_dir or Path(d.png_dir)
            log.info("display frames are written as PNG into %s", folder)
            return open_display("png", folder=folder)
        if kind in ("ssd1306", "sh1106"):
            return open_display(kind, port=d.i2c_port, address=d.i2c_address)
        return open_display(kind)

    # --- events (any thread) -----------------------------------------------------------------
    def request_press(self, *_) -> None:
        """Button callback (and SIGUSR1, Enter, `mushcam press`): flag one pending press; presses during work
        coalesce into it."""
        self._press.set()
        self._wake.set()

    def request_stop(self, *_):
        self._stop.set()
        self._wake.set()

    def request_reload(self, *_):
        self._reload.set()
        self._wake.set()

    # --- work (main thread) ------------------------------------------------------------------
    def capture(self, n: int) -> list:
        """The ``n`` frames of one press (one scene: the fake camera takes them all from one photo)."""
        return self.camera.capture_press(n)

    def answer(self, frames: list) -> Result:
        """Classify one press's frames and signal the verdict."""
        result = self.classifier.classify_frames(frames)
        self.signals.show(result.verdict)
        self._show(self.verdict_screen(result))
        log.info("verdict %s: %s %.1f%% (%s), %.0f ms", result.verdict, result.label, 100 * result.confidence,
                 result.decision.reason, result.latency_ms)
        self.presses_answered += 1
        return result

    def verdict_screen(self, r: Result):
        """The verdict, the species, the reason in display words, and, when it matters, what else it may be:
        for an edible-looking top guess the closest poisonous look-alike, otherwise the runner-up."""
        from device.display import Screen, name_with_percent, short_reason

        b = self.bundle
        note = ""
        alike = self._closest_poisonous(r)
        if alike is not None and alike[1] >= LOOK_ALIKE_MIN:
            note = name_with_percent(("looks like: ", "like: "), b.display_name(alike[0]), alike[1])
        elif alike is None and r.runner_up is not None and r.runner_up[1] >= RUNNER_UP_MIN:
            note = name_with_percent(("2nd: ",), b.display_name(r.runner_up[0]), r.runner_up[1])
        title = b.display_name(r.label) if r.label else ""
        confidence = r.confidence
        if r.verdict == "UNSURE" and r.decision.reason in UNFAMILIAR_REASONS:
            # A species name under UNSURE reads as "probably that one": for a photo unlike every species the
            # model knows, the title must not name one (the look-alike line may still say what is closest).
            # Its percentage goes too: "UNSURE 99%" over "Unknown mushroom" is that hidden species' score,
            # which reads as "99 % sure" of something (every unseen test photo was such a screen).
            title, confidence = "Unknown mushroom", None
        return Screen(title=title, verdict=r.verdict, confidence=confidence,
                      detail=short_reason(r.decision.reason), note=note, press=self.presses_answered + 1, kind="verdict")

    def _closest_poisonous(self, r: Result) -> tuple[str, float] | None:
        """The most likely poisonous label when the top guess is edible (the look-alike that matters), else None."""
        if not r.label or _role(self.bundle.classes[r.label]) != "edible":
            return None
        poisonous = [(lab, p) for lab, p in r.ranked() if _role(self.bundle.classes[lab]) == "poisonous"]
        return poisonous[0] if poisonous else None

    def _show(self, screen) -> None:
        """The LEDs already carry the verdict: a display fault (a full disk in laptop mode) must not stop it."""
        try:
            self.display.show(screen)
        except MushcamError as e:
            log.warning("display: %s", e)

    def handle_press(self) -> Result | None:
        """One press: busy pattern, capture, classify, signal. A camera failure shows the error pattern."""
        from device.display import Screen

        self.signals.busy()
        press = self.presses_answered + 1
        self._show(Screen(title="Hold still", verdict="LOOKING", detail=f"{self.cfg.frames_per_press} photos",
                          press=press, kind="busy"))
        try:
            frames = self.capture(self.cfg.frames_per_press)
        except CameraError as e:
            log.error("%s", e)
            self.show_error("camera error", "see the log / cable", press)
            raise
        sources = list(getattr(self.camera, "press_sources", []) or [])
        result = self.answer(frames)
        self.last_capture = None
        if self.cfg.captures.enabled:
            from device.captures import save_press

            self.last_capture = save_press(Path(self.cfg.captures.dir), frames, self.result_record(result, sources),
                                           self.cfg.captures.max_mb)
        return result

    def show_ready(self) -> None:
        """The model being served, and that a press is welcome (at start, after a reload, camera back)."""
        from device.display import Screen

        self._show(Screen(title=self.bundle.name, verdict="READY", detail=f"v{self.bundle.version}",
                          note="press to identify", kind="ready"))

    def show_error(self, title: str, detail: str, press: int | None = None) -> None:
        """The error pattern and screen: no verdict, and a screen that cannot be mistaken for one."""
        from device.display import Screen

        self.signals.error()
        self._show(Screen(title=title, verdict="ERROR", detail=detail, note="no verdict", press=press, kind="error"))

    def result_record(self, r: Result, sources: list[str] | None = None) -> dict:
        """What a saved press's result.json holds (the review page and import-captures read it)."""
        b = self.bundle

        def named(pair):
            return None if pair is None else {"label": pair[0], "display_name": b.display_name(pair[0]),
                                              "probability": pair[1]}

        return {**r.decision.to_dict(), "probs": dict(zip(b.labels, map(float, r.probs))),
                "top": [named(pair) for pair in r.ranked(3)], "runner_up": named(r.runner_up),
                "look_alike": named(self._closest_poisonous(r)), "thresholds": asdict(b.thresholds),
                "display_name": b.display_name(r.label) if r.label else None,
                "model": b.name, "model_version": b.version, "model_sha256": b.model_sha256,
                "latency_ms": r.latency_ms, "time": datetime.now(timezone.utc).isoformat(),
                "press": self.presses_answered, "camera": self.cfg.camera, "frame_sources": list(sources or [])}

    def verdict_line(self, r: Result) -> str:
        """One line per press, as `run --once` prints and `mushcam press --wait` answers."""
        name = self.bundle.display_name(r.label) if r.label else "-"
        line = f"{r.verdict:<9} {r.confidence:6.1%}  {name}  ({r.decision.reason})"
        if self.last_capture:
            line += f"  saved {self.last_capture}"
        return line

    def validate_in_child(self, path: Path, command: list[str] | None = None) -> None:
        """Self-test a bundle in a child process first: a damaged model can crash the TFLite runtime itself,
        and that must cost the child, not the daemon that is serving the old model."""
        cmd = command or [sys.executable, "-m", "device", "selftest", "--model", str(path)]
        if command is None and self.cfg.require_signature:
            cmd += ["--require-signature", "--allowed-signers", self.cfg.allowed_signers]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_SELFTEST_TIMEOUT_S,
                                 env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
        except subprocess.TimeoutExpired:
            raise BundleError(f"{path}: the self-test did not finish in {CHILD_SELFTEST_TIMEOUT_S} s") from None
        if out.returncode < 0:
            name = signal.Signals(-out.returncode).name
            raise BundleError(f"{path}: the self-test crashed the TFLite runtime ({name}); the bundle is damaged")
        if out.returncode != 0:
            lines = out.stderr.strip().splitlines() or [f"exit code {out.returncode}"]
            raise BundleError(lines[-1].removeprefix("mushcam: error: "))

    def reload(self) -> bool:
        """SIGHUP: validate and self-test the bundle now at model_dir (in a child process, then here);
        keep the old one on any failure."""
        self.notifier.reloading()
        try:
            path = self.model_path()
            self.validate_in_child(path)
            # The child ran the samples already; here the hashes are checked again, not the samples.
            bundle, clf = self.load_model(path, self_test=False)
        except MushcamError as e:
            self.last_reload_error = str(e)
            log.error("reload refused, still serving %s %s: %s", self.bundle.name, self.bundle.version, e)
            self._write_status("running")
            self.notifier.ready()
            return False
        self.bundle, self.classifier = bundle, clf
        self.last_reload_error = None
        log.info("reloaded: now serving %s %s from %s", bundle.name, bundle.version, bundle.path)
        self.show_ready()
        self._write_status("running")
        self.notifier.ready()
        return True

    def _write_status(self, state: str) -> None:
        """The status file deploy/flash.sh reads to see which model is being served."""
        if not self.cfg.status_file:
            return
        b = self.bundle
        status = {
            "state": state, "pid": os.getpid(), "updated": datetime.now(timezone.utc).isoformat(),
            "model_name": b.name if b else None, "model_version": b.version if b else None,
            "model_sha256": b.model_sha256 if b else None, "model_path": str(b.path) if b else None,
            "last_reload_error": self.last_reload_error, "presses_answered": self.presses_answered,
        }
        try:
            path = Path(self.cfg.status_file)
            if not path.parent.is_dir():
                path.parent.mkdir(parents=True)
                path.parent.chmod(STATUS_DIR_MODE)  # the unit's UMask=0027 would make it 0750
            write_json_atomic(path, status, mode=STATUS_FILE_MODE)
        except OSError as e:
            log.warning("cannot write status file %s: %s", self.cfg.status_file, e)

    def run_once(self) -> int:
        """Laptop demo: each fake-camera image once (or one press with a real camera), printed, then exit."""
        paths = getattr(self.camera, "paths", None)
        failed = 0
        if not paths:
            self.handle_press()
            return EXIT_OK
        for _ in paths:
            try:
                frame = self.camera.capture()
            except CameraError as e:
                failed += 1
                print(f"error     {e}", flush=True)
                continue
            r = self.answer([frame])
            name = self.bundle.display_name(r.label) if r.label else "-"
            print(f"{r.verdict:<9} {r.confidence:6.1%}  {name:<22} {self.camera.last_path}", flush=True)
        print("Never eat a mushroom on this advice alone: these verdicts are a prototype's guesses.", flush=True)
        return EXIT_ERROR if failed else EXIT_OK

    def loop(self) -> int:
        """Wait for presses until SIGTERM; ping the watchdog between steps; nurse a failing camera back."""
        interval = self.notifier.watchdog_interval() or 1.0
        self.notifier.ready()
        self.notifier.status(f"serving {self.bundle.name} {self.bundle.version}")
        self.signals.off()
        while not self._stop.is_set():
            timeout = interval
            if self._camera_down_since is not None:
                timeout = max(0.0, min(interval, self._camera_next_try - time.monotonic()))
            self._wake.wait(timeout=timeout)
            self._wake.clear()
            self.notifier.watchdog()
            if self._stop.is_set():
                break
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
            if self._camera_down_since is not None and not self._retry_camera():
                log.error("no camera for over %.0f s; exiting so systemd restarts mushcam", self.cfg.camera_retry_s)
                return EXIT_CAMERA
            if self._press.is_set():
                self._press.clear()
                waiters = self._take_waiters()  # this press answers every client that asked before it began
                if self._camera_down_since is not None:
                    self.show_error("no camera", "reconnecting...")  # the press is answered: the camera is still away
                    self._tell(waiters, False, "the camera is unavailable; see the daemon's log")
                    continue
                try:
                    result = self.handle_press()
                except CameraError as e:
                    self._camera_down_since = time.monotonic()
                    self._camera_backoff = CAMERA_BACKOFF_START
                    self._camera_next_try = time.monotonic()
                    self._tell(waiters, False, f"camera: {e}")
                except MushcamError as e:
                    # Anything else that fails in one press (e.g. the runtime) costs that press, not the service.
                    log.error("press failed: %s", e)
                    self.show_error("press failed", "see the log")
                    self._tell(waiters, False, f"press failed: {e}")
                else:
                    self._write_status("running")  # presses_answered: a press that reached its verdict
                    self._tell(waiters, True, self.verdict_line(result))
        self._tell(self._take_waiters(), False, "the daemon stopped before answering")
        return EXIT_OK

    def _retry_camera(self) -> bool:
        """Reopen the camera when its back-off has elapsed; False once it has been away too long."""
        from device.camera import open_camera

        now = time.monotonic()
        if now < self._camera_next_try:
            return True
        try:
            self.camera.close()
            self.camera = open_camera(self.cfg.camera, size=self._camera_size(), jitter=self.cfg.camera_jitter)
        except CameraError as e:
            if now - self._camera_down_since > self.cfg.camera_retry_s:
                return False
            self._camera_next_try = now + self._camera_backoff
            log.warning("camera still unavailable (next try in %.1f s): %s", self._camera_backoff, e)
            self._camera_backoff = min(self._camera_backoff * 2, CAMERA_BACKOFF_MAX)
            return True
        log.info("camera is back after %.1f s", now - self._camera_down_since)
        self._camera_down_since = None
        self.signals.off()
        self.show_ready()
        return True

    def close(self) -> None:
        """Safe to call twice and after a failed start: LEDs off, camera closed, status 'stopped'."""
        self.notifier.stopping()
        if self.press_server is not None:
            self.press_server.close()
            self.press_server = None
        self._tell(self._take_waiters(), False, "the daemon stopped before answering")  # asked as it stopped
        for part in (self.signals, self.button, self.display, self.camera):
            if part is not None:
                try:
                    part.close()
                except Exception as e:  # shutting down: report and carry on closing the rest
                    log.warning("closing %s: %s", type(part).__name__, e)
        if self.bundle is not None:
            self._write_status("stopped")


def laptop_runtime_dir() -> Path:
    """Where a laptop daemon that may not write /run/mushcam keeps its status file and press socket."""
    return Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()) / f"mushcam-{os.getuid()}"


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def laptop_defaults(cfg: Config, captures: bool | None, captures_dir: Path | None) -> Config:
    """Off a Pi: keep each press in ./captures (unless the config sets [captures] or --no-captures), and
    put the status file and press socket in a per-user runtime directory when /run/mushcam is not ours."""
    if captures_dir is not None:
        cfg = with_overrides(cfg, captures=CapturesConfig(enabled=True, dir=str(captures_dir), max_mb=cfg.captures.max_mb))
    elif captures is False:
        cfg = with_overrides(cfg, captures=CapturesConfig(enabled=False))
    elif not is_raspberry_pi() and cfg.captures == CapturesConfig():
        cfg = with_overrides(cfg, captures=CapturesConfig(enabled=True, dir=LAPTOP_CAPTURES_DIR))
    if (not is_raspberry_pi() and cfg.status_file == Config().status_file
            and not _writable_dir(Path(cfg.status_file).parent)):
        runtime = laptop_runtime_dir()
        runtime.mkdir(mode=0o700, exist_ok=True)  # per user: nobody else may press or rewrite the status
        cfg = with_overrides(cfg, status_file=str(runtime / "status.json"))
    return cfg


def main(config: Path | None = None, camera: str | None = None, model: Path | None = None, once: bool = False,
         display_dir: Path | None = None, captures: bool | None = None, captures_dir: Path | None = None) -> int:
    """Run the daemon; return the process exit code (0 clean stop, 1 error, 3 camera gone).

    ``captures``/``captures_dir``: None keeps the config's [captures] (on a laptop: ./captures); False
    keeps none; a directory keeps them there.
    """
    try:
        cfg = with_overrides(load_config(config), camera=camera, model_dir=str(model) if model else None)
    except ConfigError as e:
        print(f"mushcam: error: {e}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # What `check-config` says about this machine (a missing model_dir or allowed_signers) is not logged
    # here: the start then fails on it with its own one line, and two lines for one fault read as two faults.
    if once:
        # A one-shot demo is not the service: leave its status alone, and keep no captures.
        cfg = with_overrides(cfg, status_file="", captures=CapturesConfig(enabled=False))
    else:
        cfg = laptop_defaults(cfg, captures, captures_dir)
        if cfg.captures.enabled:
            log.info("keeping each press in %s (see them: mushcam review %s --out review.html)", cfg.captures.dir,
                     cfg.captures.dir)
    d = Daemon(cfg, once=once, display_dir=display_dir, enter_presses=True)
    handled = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGUSR1)
    old = {s: signal.getsignal(s) for s in handled}
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, d.request_stop)
        signal.signal(signal.SIGINT, d.request_stop)
        signal.signal(signal.SIGHUP, d.request_reload)
        # SIGUSR1 presses (its default action would kill the daemon and leave the status at "running").
        signal.signal(signal.SIGUSR1, d.request_press)
    try:
        d.start()
        return d.run_once() if once else d.loop()
    except MushcamError as e:
        # One line: the logging handler writes to the same stderr, so logging it too would print it twice.
        print(f"mushcam: error: {e}", file=sys.stderr, flush=True)
        if d.signals is not None:
            d.signals.error()
        return EXIT_ERROR
    finally:
        d.close()
        if threading.current_thread() is threading.main_thread():
            for s, h in old.items():
                signal.signal(s, h)

