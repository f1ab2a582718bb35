"""The daemon end to end: button presses through gpiozero's MockFactory, SIGTERM, SIGHUP, status, captures."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import gpiozero
import pytest

from device.config import CapturesConfig, Config, DisplayConfig, GpioConfig
from device.daemon import EXIT_CAMERA, Daemon

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "tiny_bundle"
GREEN, RED, AMBER, BUTTON = 17, 27, 22, 5


@pytest.fixture
def mock_pins():
    saved = gpiozero.Device.pin_factory
    yield
    if gpiozero.Device.pin_factory is not None:
        gpiozero.Device.pin_factory.reset()
    gpiozero.Device.pin_factory = saved


@pytest.fixture
def bundle(tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(TINY, dst)
    return dst


def make_cfg(tmp_path, bundle, camera=None, **kw) -> Config:
    return Config(
        model_dir=str(bundle),
        camera=camera or f"fake:{bundle / 'samples' / 'red_cap.jpg'}",
        frames_per_press=2,
        # The tiny model's 3-value embedding reads a 3 % brightness change as a new species: no jitter here.
        camera_jitter=False,
        status_file=str(tmp_path / "status.json"),
        gpio=GpioConfig(pin_factory="mock", bounce_ms=0),
        display=DisplayConfig(kind="png", png_dir=str(tmp_path / "display")),
        **kw,
    )


def wait_for(pred, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return False


class Running:
    """A started daemon looping in a thread, stopped and closed on exit."""

    def __init__(self, cfg):
        self.d = Daemon(cfg)

    def __enter__(self):
        self.d.start()
        self.code = None
        self.t = threading.Thread(target=lambda: setattr(self, "code", self.d.loop()), daemon=True)
        self.t.start()
        return self.d

    def press(self):
        pin = gpiozero.Device.pin_factory.pin(BUTTON)
        n = self.d.presses_answered
        pin.drive_low()
        pin.drive_high()
        assert wait_for(lambda: self.d.presses_answered > n), "press was not answered"

    def __exit__(self, *exc):
        self.d.request_stop()
        self.t.join(10)
        self.d.close()


def led(pin):
    return gpiozero.Device.pin_factory.pin(pin).state


def test_button_press_lights_the_verdict_and_draws_the_display(tmp_path, bundle, mock_pins):
    r = Running(make_cfg(tmp_path, bundle))
    with r as d:
        assert (led(GREEN), led(RED), led(AMBER)) == (0, 0, 0)
        r.press()
        assert (led(GREEN), led(RED), led(AMBER)) == (1, 0, 0)  # red_cap is the edible class
        status = json.loads((tmp_path / "status.json").read_text())
        assert status["state"] == "running" and status["model_sha256"] == d.bundle.model_sha256
    pngs = sorted((tmp_path / "display").glob("*.png"))
    assert pngs, "no display frame written"
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "stopped"
    assert (led(GREEN), led(RED), led(AMBER)) == (0, 0, 0) or gpiozero.Device.pin_factory is None


def test_poisonous_press_lights_red(tmp_path, bundle, mock_pins):
    r = Running(make_cfg(tmp_path, bundle, camera=f"fake:{bundle / 'samples' / 'blue_cap.jpg'}"))
    with r:
        r.press()
        assert (led(GREEN), led(RED), led(AMBER)) == (0, 1, 0)


def test_a_burst_of_presses_is_coalesced_and_every_press_answered_or_merged(tmp_path, bundle, mock_pins):
    r = Running(make_cfg(tmp_path, bundle))
    with r as d:
        pin = gpiozero.Device.pin_factory.pin(BUTTON)
        for _ in range(200):
            pin.drive_low()
            pin.drive_high()
        assert wait_for(lambda: d.presses_answered >= 1)
        time.sleep(0.3)
        # At most one press can be pending while one is handled: the queue is bounded at one.
        assert 1 <= d.presses_answered <= 200
        assert d.button.presses == 200


def test_captures_are_saved_atomically_and_a_full_disk_still_answers(tmp_path, bundle, mock_pins, monkeypatch):
    cap = tmp_path / "captures"
    r = Running(make_cfg(tmp_path, bundle, captures=CapturesConfig(enabled=True, dir=str(cap), max_mb=50)))
    with r:
        r.press()
        # The verdict is signalled before the record is written: wait for the record.
        assert wait_for(lambda: cap.is_dir() and any(not p.name.startswith(".") for p in cap.iterdir()))
        saved = [p for p in cap.iterdir() if not p.name.startswith(".")]
        assert len(saved) == 1 and saved[0].name.endswith("EDIBLE")
        assert sorted(f.name for f in saved[0].iterdir()) == ["frame_0.jpg", "frame_1.jpg", "result.json"]
        assert json.loads((saved[0] / "result.json").read_text())["verdict"] == "EDIBLE"

        def full(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr("PIL.Image.Image.save", full)
        r.press()  # still answered
        assert led(GREEN) == 1
        time.sleep(0.2)  # let the failed save finish its clean-up
        assert len([p for p in cap.iterdir()]) == 1, "a failed capture left something behind"


def test_camera_that_disappears_shows_error_then_recovers_when_it_returns(tmp_path, bundle, mock_pins):
    r = Running(make_cfg(tmp_path, bundle))
    with r as d:
        good = d.cfg.camera
        d.cfg.camera = f"fake:{tmp_path / 'unplugged'}"  # re-opening fails while it is "unplugged"
        d.camera.fail(1)
        pin = gpiozero.Device.pin_factory.pin(BUTTON)
        pin.drive_low()
        pin.drive_high()
        assert wait_for(lambda: d.signals.state == "error")
        assert d.presses_answered == 0 and led(GREEN) == 0
        time.sleep(0.6)  # a few back-off rounds: still down, still the error pattern
        assert d.signals.state == "error" and d._camera_backoff > 0.25
        d.cfg.camera = good  # plugged back in
        assert wait_for(lambda: d._camera_down_since is None, 10)
        r.press()
        assert led(GREEN) == 1


def test_camera_gone_for_too_long_exits_non_zero(tmp_path, bundle, mock_pins):
    r = Running(make_cfg(tmp_path, bundle, camera_retry_s=0.0))
    with r as d:
        d.camera.fail(100)
        d.cfg.camera = "fake:/nonexistent/folder"  # reopening fails too
        pin = gpiozero.Device.pin_factory.pin(BUTTON)
        for _ in range(2):
            pin.drive_low()
            pin.drive_high()
            time.sleep(0.1)
        r.t.join(5)
        assert r.code == EXIT_CAMERA


def test_reload_keeps_the_old_model_when_the_new_one_is_bad(tmp_path, bundle, mock_pins):
    r = Running(make_cfg(tmp_path, bundle))
    with r as d:
        old = d.bundle
        (bundle / "model.tflite").write_bytes(b"garbage")
        assert d.reload() is False
        assert d.bundle is old
        assert "sha256" in json.loads((tmp_path / "status.json").read_text())["last_reload_error"]
        r.press()  # the old model still answers
        assert led(GREEN) == 1


def test_reload_survives_a_model_that_crashes_the_runtime(tmp_path, bundle, mock_pins):
    """The child self-test takes the crash; the daemon refuses the reload and keeps serving."""
    r = Running(make_cfg(tmp_path, bundle))
    with r as d:
        crash = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
        with pytest.raises(Exception, match="crashed the TFLite runtime .SIGSEGV."):
            d.validate_in_child(bundle, crash)
        d.validate_in_child = lambda path, command=None: Daemon.validate_in_child(d, path, crash)
        old = d.bundle
        assert d.reload() is False and d.bundle is old
        assert "SIGSEGV" in json.loads((tmp_path / "status.json").read_text())["last_reload_error"]
        r.press()
        assert led(GREEN) == 1


def test_reload_refuses_a_truncated_model_even_with_a_matching_card(tmp_path, bundle, mock_pins):
    import hashlib

    r = Running(make_cfg(tmp_path, bundle))
    with r as d:
        model = bundle / "model.tflite"
        model.write_bytes(model.read_bytes()[:700])
        card = json.loads((bundle / "model.json").read_text())
        card["files"]["model.tflite"] = hashlib.sha256(model.read_bytes()).hexdigest()
        (bundle / "model.json").write_text(json.dumps(card))
        assert d.reload() is False
        assert "cannot load" in d.last_reload_error
        r.press()
        assert led(GREEN) == 1


def _daemon_process(tmp_path, bundle):
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'model_dir = "{tmp_path / "current"}"\ncamera = "fake:{bundle / "samples"}"\n'
        f'status_file = "{tmp_path / "status.json"}"\n'
        f'[gpio]\npin_factory = "mock"\n[display]\nkind = "png"\npng_dir = "{tmp_path / "display"}"\n'
    )
    os.symlink(bundle, tmp_path / "current")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "device", "run", "--config", str(cfg)], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    status = tmp_path / "status.json"
    assert wait_for(lambda: status.exists(), 30), p.stderr.read() if p.poll() is not None else "no status file"
    return p, status


def test_sighup_reloads_a_new_release_and_sigterm_exits_cleanly(tmp_path, bundle):
    p, status = _daemon_process(tmp_path, bundle)
    try:
        # A new release: same model, new version; switch `current` as flash.sh does, then SIGHUP.
        new = tmp_path / "release2"
        shutil.copytree(bundle, new)
        card = json.loads((new / "model.json").read_text())
        card["version"] = "0.0.2"
        (new / "model.json").write_text(json.dumps(card))
        os.symlink(new, tmp_path / "current.new")
        os.replace(tmp_path / "current.new", tmp_path / "current")
        p.send_signal(signal.SIGHUP)
        assert wait_for(lambda: json.loads(status.read_text()).get("model_version") == "0.0.2", 20)
        # A garbage release is refused and the old one keeps serving.
        bad = tmp_path / "release3"
        shutil.copytree(new, bad)
        (bad / "model.tflite").write_bytes((bad / "model.tflite").read_bytes()[:500])
        os.symlink(bad, tmp_path / "current.new")
        os.replace(tmp_path / "current.new", tmp_path / "current")
        p.send_signal(signal.SIGHUP)
        assert wait_for(lambda: json.loads(status.read_text()).get("last_reload_error"), 20)
        assert json.loads(status.read_text())["model_version"] == "0.0.2"
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert "Traceback" not in err
    assert json.loads(status.read_text())["state"] == "stopped"


def test_run_once_is_the_laptop_demo(tmp_path, bundle):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "device", "run", "--once", "--model", str(bundle), "--camera",
                          f"fake:{bundle / 'samples'}", "--display-dir", str(tmp_path / "d")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.split()[0] in ("EDIBLE", "POISONOUS", "UNSURE")]
    assert len(lines) == 3
    # The ready screen, then one verdict screen per photo, named by press.
    names = sorted(p.name for p in (tmp_path / "d").glob("*.png"))
    assert names[0] == "frame-000001-ready.png" and len(names) == 4, names
    assert [n.split("-")[2] for n in names[1:]] == ["press0001", "press0002", "press0003"]


def test_run_with_a_bad_config_is_one_line(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("frames_per_press = 0\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "device", "run", "--config", str(cfg)], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1
    assert "frames_per_press" in out.stderr and "Traceback" not in out.stderr


def shown(d) -> list:
    """Record every Screen the daemon shows (the PNG display still saves them)."""
    screens = []
    real = d.display.show
    d.display.show = lambda screen: (screens.append(screen), real(screen))
    return screens


def test_screens_ready_busy_verdict_and_an_error_that_is_not_unsure(tmp_path, bundle, mock_pins):
    r = Running(make_cfg(tmp_path, bundle))
    with r as d:
        ready = sorted((tmp_path / "display").glob("*.png"))
        assert [p.name for p in ready] == ["frame-000001-ready.png"]  # before any press
        screens = shown(d)
        r.press()
        assert [s.kind for s in screens] == ["busy", "verdict"]
        assert screens[1].verdict == "EDIBLE" and screens[1].title == "red cap" and screens[1].press == 1
        d.camera.fail(1)
        pin = gpiozero.Device.pin_factory.pin(BUTTON)
        pin.drive_low()
        pin.drive_high()
        assert wait_for(lambda: any(s.kind == "error" for s in screens))
        error = next(s for s in screens if s.kind == "error")
        assert error.verdict == "ERROR" and "UNSURE" not in (error.title + error.detail + error.note)
    names = [p.name for p in sorted((tmp_path / "display").glob("*.png"))]
    assert names[1:4] == ["frame-000002-press0001-busy.png", "frame-000003-press0001-edible.png",
                          "frame-000004-press0002-busy.png"]
    assert names[4].endswith("-error.png")


def test_the_verdict_screen_names_the_poisonous_look_alike_or_the_runner_up(tmp_path, bundle):
    import numpy as np

    from device.bundle import load_bundle
    from device.classifier import Result
    from device.verdict import decide

    d = Daemon(make_cfg(tmp_path, bundle))
    d.bundle = b = load_bundle(bundle)

    def screen(probs):
        decision = decide(probs, b.labels, b.classes, b.thresholds, 1.0)
        return d.verdict_screen(Result(decision, np.array(probs), 1.0, 1.0, 3, tuple(b.labels)))

    # red_cap is edible; green_cap and blue_cap are poisonous.
    s = screen([0.90, 0.07, 0.03])
    assert (s.verdict, s.detail, s.note) == ("UNSURE", "toxic look-alike likely", "looks like: green cap 7%")
    s = screen([0.97, 0.005, 0.025])
    assert s.verdict == "EDIBLE" and s.note == "looks like: blue cap 2%"  # every poisonous figure >= 1 % is shown
    assert screen([0.995, 0.003, 0.002]).note == ""  # nothing worth naming
    s = screen([0.05, 0.55, 0.40])
    assert s.verdict == "POISONOUS" and s.note == "2nd: blue cap 40%"
    assert screen([0.01, 0.97, 0.02]).note == ""  # a runner-up under 5 % is noise


def test_an_unfamiliar_photo_is_titled_unknown_not_by_its_nearest_species(tmp_path, bundle):
    import numpy as np

    from device.bundle import load_bundle
    from device.classifier import Result
    from device.verdict import decide

    d = Daemon(make_cfg(tmp_path, bundle))
    d.bundle = b = load_bundle(bundle)
    far = b.thresholds.ood_max_score * 10  # far past the unknown-species threshold
    decision = decide([0.99, 0.005, 0.005], b.labels, b.classes, b.thresholds, far)
    s = d.verdict_screen(Result(decision, np.array([0.99, 0.005, 0.005]), far, 1.0, 3, tuple(b.labels)))
    assert (s.verdict, s.title) == ("UNSURE", "Unknown mushroom")
    assert s.confidence is None  # the 99 % belongs to the species it does not name
    familiar = decide([0.99, 0.005, 0.005], b.labels, b.classes, b.thresholds, 1.0)
    s = d.verdict_screen(Result(familiar, np.array([0.99, 0.005, 0.005]), 1.0, 1.0, 3, tuple(b.labels)))
    assert s.title == "red cap" and s.confidence == pytest.approx(0.99)


def test_status_file_is_world_readable_under_the_units_umask(tmp_path, bundle, mock_pins):
    """Issue 12 item 7: under the unit's UMask=0027 the status file was 0640 mushcam:mushcam, so a deploy
    user outside the group could never confirm a flash. Its mode (and a folder the daemon makes for it)
    is set explicitly."""
    import stat

    old = os.umask(0o027)
    try:
        cfg = make_cfg(tmp_path, bundle)
        cfg.status_file = str(tmp_path / "run" / "mushcam" / "status.json")
        d = Daemon(cfg)
        try:
            d.start()
        finally:
            d.close()
    finally:
        os.umask(old)
    status = Path(cfg.status_file)
    assert json.loads(status.read_text())["state"] == "stopped"
    assert stat.S_IMODE(status.stat().st_mode) == 0o644
    assert stat.S_IMODE(status.parent.stat().st_mode) == 0o755


def test_start_sweeps_the_captures_a_crash_left_unfinished(tmp_path, bundle, mock_pins):
    cap = tmp_path / "captures"
    stale = cap / ".tmp-20260101-000000-000000001"
    stale.mkdir(parents=True)
    (stale / "frame_0.jpg").write_bytes(b"\0" * 1000)
    keep = cap / "holiday-2019"
    keep.mkdir()
    d = Daemon(make_cfg(tmp_path, bundle, captures=CapturesConfig(enabled=True, dir=str(cap), max_mb=1)))
    try:
        d.start()
    finally:
        d.close()
    assert not stale.exists() and keep.is_dir()
