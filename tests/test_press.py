"""Pressing without a button: `mushcam press` over the Unix socket, SIGUSR1, Enter on a terminal; and the
daemon's start-up errors. Real daemon processes with the fake camera and the tiny bundle."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from device.errors import MushcamError
from device.press import PressError, PressServer, press, socket_path
from tests.test_daemon import wait_for

ROOT = Path(__file__).resolve().parents[1]
VERDICTS = ("EDIBLE", "POISONOUS", "UNSURE")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def device(*args, cwd=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "device", *map(str, args)], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def write_config(tmp_path: Path, tiny_bundle: Path) -> Path:
    cfg = tmp_path / "config.toml"
    # No [captures]: laptop mode keeps the presses in ./captures (the daemon runs in tmp_path).
    cfg.write_text(
        f'model_dir = "{tiny_bundle}"\ncamera = "fake:{tiny_bundle / "samples"}"\n'
        f'status_file = "{tmp_path / "run" / "status.json"}"\n[gpio]\npin_factory = "mock"\n'
        f'[display]\nkind = "png"\npng_dir = "{tmp_path / "display"}"\n'
    )
    return cfg


def start_daemon(tmp_path: Path, cfg: Path, **popen) -> subprocess.Popen:
    popen.setdefault("stdin", subprocess.DEVNULL)
    p = subprocess.Popen([sys.executable, "-m", "device", "run", "--config", str(cfg)], cwd=tmp_path, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    sock = tmp_path / "run" / "press.sock"
    if not wait_for(lambda: sock.exists() or p.poll() is not None, 60) or p.poll() is not None:
        p.kill()
        pytest.fail(f"the daemon did not start: {p.communicate()[1]}")
    return p


def stop(p: subprocess.Popen) -> tuple[str, str]:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    try:
        return p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()


def saved_presses(tmp_path: Path) -> list[dict]:
    folder = tmp_path / "captures"
    if not folder.is_dir():
        return []
    return [json.loads((d / "result.json").read_text()) for d in sorted(folder.iterdir()) if not d.name.startswith(".")]


def status(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "run" / "status.json").read_text())


def test_three_presses_give_three_verdicts_each_from_one_photo_and_sigusr1_presses(tmp_path, tiny_bundle):
    cfg = write_config(tmp_path, tiny_bundle)
    p = start_daemon(tmp_path, cfg)
    try:
        lines = []
        for _ in range(3):
            r = device("press", "--wait", "--config", cfg, cwd=tmp_path)
            assert r.returncode == 0, r.stderr
            lines.append(r.stdout.strip())
        assert all(line.split()[0] in VERDICTS for line in lines), lines
        records = saved_presses(tmp_path)
        assert len(records) == 3
        photos = []
        for line, rec in zip(lines, records):
            assert len(rec["frame_sources"]) == len(rec["frames"]) == 3  # frames_per_press defaults to 3
            assert len(set(rec["frame_sources"])) == 1, rec["frame_sources"]  # one press = one photo
            photos.append(rec["frame_sources"][0])
            assert line.startswith(rec["verdict"]) and rec["press_id"] in line
        assert [Path(s).name for s in photos] == ["blue_cap.jpg", "green_cap.jpg", "red_cap.jpg"]  # next press, next photo
        # The jitter makes the frames of one press differ, as a real camera's do.
        first = tmp_path / "captures" / records[0]["press_id"]
        assert len({(first / f).read_bytes() for f in records[0]["frames"]}) == 3

        p.send_signal(signal.SIGUSR1)  # used to kill the daemon and leave the status at "running"
        assert wait_for(lambda: status(tmp_path)["presses_answered"] == 4, 20), "SIGUSR1 did not press"
        assert p.poll() is None and len(saved_presses(tmp_path)) == 4
        assert Path(saved_presses(tmp_path)[3]["frame_sources"][0]).name == "blue_cap.jpg"  # the cycle starts over
    finally:
        out, err = stop(p)
    assert p.returncode == 0, err
    assert "Traceback" not in err
    assert "`mushcam press`" in err and "kill -USR1" in err  # the start-up log says how to press
    assert status(tmp_path)["state"] == "stopped"
    assert not (tmp_path / "run" / "press.sock").exists()
    # No daemon now: one line and exit 1.
    r = device("press", "--wait", "--config", cfg, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.startswith("mushcam: error: no mushcam daemon") and r.stderr.count("\n") == 1


def test_enter_on_a_terminal_presses(tmp_path, tiny_bundle):
    cfg = write_config(tmp_path, tiny_bundle)
    master, slave = pty.openpty()
    try:
        p = start_daemon(tmp_path, cfg, stdin=slave)
        try:
            assert wait_for(lambda: status(tmp_path).get("state") == "running", 20)
            os.write(master, b"\n")
            assert wait_for(lambda: len(saved_presses(tmp_path)) == 1, 20), "Enter did not press"
            os.write(master, b"\n")
            assert wait_for(lambda: status(tmp_path)["presses_answered"] == 2, 20)
        finally:
            out, err = stop(p)
    finally:
        os.close(slave)
        while select.select([master], [], [], 0)[0]:  # drain the echo so closing never blocks
            try:
                if not os.read(master, 4096):
                    break
            except OSError:
                break
        os.close(master)
    assert p.returncode == 0, err
    assert "to press: Enter here" in err


def test_enter_is_not_read_when_stdin_is_not_a_terminal(tmp_path, tiny_bundle):
    cfg = write_config(tmp_path, tiny_bundle)
    p = start_daemon(tmp_path, cfg, stdin=subprocess.PIPE)
    try:
        p.stdin.write("\n\n")
        p.stdin.flush()
        time.sleep(1.0)
        assert saved_presses(tmp_path) == []  # piped input is not a keyboard
    finally:
        out, err = stop(p)  # communicate() closes stdin
    assert "Enter here" not in err


@pytest.mark.parametrize("what", ["model", "camera"])
def test_a_start_up_error_prints_one_line_and_leaves_no_display_folder(tmp_path, tiny_bundle, what):
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'status_file = "{tmp_path / "run" / "status.json"}"\n')  # display and captures: the defaults
    args = ["--model", tmp_path / "no-such-bundle"] if what == "model" else [
        "--model", tiny_bundle, "--camera", f"fake:{tmp_path / 'no-photos'}"]
    r = device("run", "--config", cfg, *args, cwd=tmp_path)
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if "no-such-bundle" in line or "no-photos" in line]
    assert len(errors) == 1 and errors[0].startswith("mushcam: error: "), r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "display").exists() and not (tmp_path / "captures").exists()


def test_press_server_protocol_and_permissions(tmp_path):
    path = socket_path(tmp_path / "status.json")
    pressed = []

    def on_press(reply):
        pressed.append(reply)
        if reply is not None:
            reply(True, "EDIBLE 97.0% red cap")

    server = PressServer(path, on_press)
    server.start()
    try:
        umask = os.umask(0)
        os.umask(umask)
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask  # as write_json_atomic makes the status file
        assert press(path) == "press queued"
        assert press(path, wait=True) == "EDIBLE 97.0% red cap"
        assert pressed[0] is None and callable(pressed[1])
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
            s.sendall(b"format disk\n")
            assert s.recv(200).startswith(b"error unknown request")
        with pytest.raises(PressError, match="already listening"):
            PressServer(path, on_press).start()  # a second daemon must not steal the socket
    finally:
        server.close()
        server.close()
    assert not path.exists()


def test_a_stale_socket_is_replaced_and_a_silent_daemon_times_out(tmp_path):
    path = tmp_path / "press.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # a killed daemon leaves the file, nobody listens
    with pytest.raises(PressError, match="stale socket"):
        press(path)
    waiting = []
    server = PressServer(path, waiting.append)  # never answers a waiting client
    server.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(PressError, match="no answer from the daemon"):
            press(path, wait=True, timeout=0.3)
        assert time.monotonic() - t0 < 5
    finally:
        server.close()
    assert issubclass(PressError, MushcamError)
    with pytest.raises(PressError, match="does not exist"):
        press(tmp_path / "nothing.sock")


def test_laptop_defaults_keep_captures_here_and_fall_back_to_a_user_runtime_dir(tmp_path, monkeypatch):
    from device import daemon
    from device.cli import _press_socket
    from device.config import CapturesConfig, Config

    monkeypatch.setattr(daemon, "is_raspberry_pi", lambda: False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    (tmp_path / "xdg").mkdir()
    monkeypatch.setattr(daemon, "_writable_dir", lambda path: False)  # an ordinary user and /run/mushcam
    cfg = daemon.laptop_defaults(Config(), captures=None, captures_dir=None)
    assert cfg.captures.enabled and cfg.captures.dir == "captures"
    runtime = tmp_path / "xdg" / f"mushcam-{os.getuid()}"
    assert cfg.status_file == str(runtime / "status.json")
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o700  # nobody else may press or rewrite the status
    (runtime / "press.sock").touch()
    assert _press_socket(None) == runtime / "press.sock"  # `mushcam press` finds it without a config

    assert not daemon.laptop_defaults(Config(), captures=False, captures_dir=None).captures.enabled
    own = Config(captures=CapturesConfig(enabled=False, dir="/srv/presses"))
    assert daemon.laptop_defaults(own, None, None).captures == own.captures  # a config's [captures] wins
    there = daemon.laptop_defaults(Config(), None, tmp_path / "elsewhere").captures
    assert there.enabled and there.dir == str(tmp_path / "elsewhere")
    monkeypatch.setattr(daemon, "is_raspberry_pi", lambda: True)
    assert daemon.laptop_defaults(Config(), None, None) == Config()  # a Pi keeps its config as it is
