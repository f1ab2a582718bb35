"""Faults and load: a hung loop starves the watchdog, SIGTERM mid-press, a storm of presses."""

from __future__ import annotations

import os
import socket
import threading
import time

import gpiozero
import pytest

from device.config import CapturesConfig
from device.daemon import Daemon
from device.sdnotify import Notifier
from tests.test_daemon import BUTTON, GREEN, Running, bundle, led, make_cfg, mock_pins, wait_for  # noqa: F401


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class BlockingCamera:
    """Wraps a camera so that capture_press() blocks until released: a hung camera driver."""

    def __init__(self, inner):
        self.inner, self.release, self.entered = inner, threading.Event(), threading.Event()

    def capture_press(self, n):
        self.entered.set()
        self.release.wait(30)
        return self.inner.capture_press(n)

    def close(self):
        self.release.set()
        self.inner.close()


@pytest.fixture
def notify_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(0.05)
    yield path, s
    s.close()


def drain(s, seconds: float) -> list[str]:
    end, got = time.monotonic() + seconds, []
    while time.monotonic() < end:
        try:
            got.append(s.recv(4096).decode())
        except socket.timeout:
            pass
    return got


def test_a_hung_capture_stops_the_watchdog_pings(tmp_path, bundle, mock_pins, notify_socket):
    path, sock = notify_socket
    notifier = Notifier(environ={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    d = Daemon(make_cfg(tmp_path, bundle), notifier=notifier)
    d.start()
    t = threading.Thread(target=d.loop, daemon=True)
    t.start()
    try:
        healthy = drain(sock, 0.6)
        assert "READY=1" in healthy
        assert sum("WATCHDOG=1" in m for m in healthy) >= 3  # every 0.1 s while healthy
        cam = d.camera = BlockingCamera(d.camera)
        d.request_press()
        assert cam.entered.wait(5)
        drain(sock, 0.15)  # a ping already in flight
        hung = drain(sock, 0.8)
        assert not any("WATCHDOG=1" in m for m in hung), "pings went on while the loop was stuck"
        cam.release.set()
        assert any("WATCHDOG=1" in m for m in drain(sock, 0.6)), "pings did not resume"
    finally:
        d.request_stop()
        t.join(10)
        d.close()


def test_sigterm_in_the_middle_of_a_press_finishes_it_cleanly(tmp_path, bundle, mock_pins):
    cap = tmp_path / "captures"
    d = Daemon(make_cfg(tmp_path, bundle, captures=CapturesConfig(enabled=True, dir=str(cap), max_mb=10)))
    d.start()
    code = {}
    t = threading.Thread(target=lambda: code.setdefault("rc", d.loop()), daemon=True)
    t.start()
    cam = d.camera = BlockingCamera(d.camera)
    d.request_press()
    assert cam.entered.wait(5)
    d.request_stop()  # what the SIGTERM handler does, while the capture is in progress
    cam.release.set()
    t.join(10)
    d.close()
    assert code["rc"] == 0
    entries = list(cap.iterdir())
    assert len(entries) == 1 and not entries[0].name.startswith("."), entries  # the press was finished, whole
    assert sorted(f.name for f in entries[0].iterdir()) == ["frame_0.jpg", "frame_1.jpg", "result.json"]
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".status")], "a temp status file was left"
    assert gpiozero.Device.pin_factory.pin(GREEN).state == 0  # LEDs off after the stop


def test_100_presses_a_second_for_10_s(tmp_path, bundle, mock_pins):
    r = Running(make_cfg(tmp_path, bundle))
    with r as d:
        pin = gpiozero.Device.pin_factory.pin(BUTTON)
        r.press()
        base = rss_mb()
        t0 = time.monotonic()
        for i in range(1000):
            pin.drive_low()
            pin.drive_high()
            time.sleep(max(0.0, t0 + (i + 1) / 100 - time.monotonic()))
        assert wait_for(lambda: not d._press.is_set(), 10)
        time.sleep(0.2)
        grown = rss_mb() - base
        print(f"storm: {d.button.presses} presses, {d.presses_answered} answered, RSS {grown:+.1f} MB")
        assert r.t.is_alive()
        assert d.button.presses == 1001
        # Every press was answered or coalesced into one being answered: at most one ever waits.
        assert 50 <= d.presses_answered <= 1001
        assert grown < 25, f"memory grew {grown:.1f} MB"
        assert led(GREEN) == 1


def test_waiting_presses_during_a_press_coalesce_into_one_more_and_all_get_a_verdict(tmp_path, bundle, mock_pins):
    from device.press import press

    r = Running(make_cfg(tmp_path, bundle))
    with r as d:
        cam = d.camera = BlockingCamera(d.camera)
        sock = d.press_server.path
        answers = {}

        def ask(name):
            answers[name] = press(sock, wait=True, timeout=30)

        first = threading.Thread(target=ask, args=("first",))
        first.start()
        assert cam.entered.wait(5)  # the first press is being captured
        later = [threading.Thread(target=ask, args=(n,)) for n in ("b", "c", "d")]
        for t in later:
            t.start()
        assert wait_for(lambda: len(d._waiters) == 3)
        cam.release.set()
        for t in [first, *later]:
            t.join(30)
        assert set(answers) == {"first", "b", "c", "d"}
        assert all(a.startswith("EDIBLE") for a in answers.values()), answers
        assert d.presses_answered == 2  # the three presses asked during the first became one
