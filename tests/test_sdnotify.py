"""device.sdnotify against a real AF_UNIX datagram socket standing in for systemd."""

import os
import socket
import time
import uuid

import pytest

from device.sdnotify import Notifier


@pytest.fixture
def systemd_socket(tmp_path):
    """A bound datagram socket like systemd's notify socket; yields (address, receive)."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)

    def receive() -> list[str]:
        return sock.recv(4096).decode().split("\n")

    yield str(path), receive
    sock.close()


def test_messages_reach_the_socket(systemd_socket, monkeypatch):
    address, receive = systemd_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    with Notifier() as notifier:
        assert notifier.enabled
        notifier.ready()
        assert receive() == ["READY=1"]
        notifier.status("waiting for\na press")
        assert receive() == ["STATUS=waiting for a press"]
        notifier.watchdog()
        assert receive() == ["WATCHDOG=1"]
        notifier.stopping()
        assert receive() == ["STOPPING=1"]


def test_reloading_carries_monotonic_time(systemd_socket):
    address, receive = systemd_socket
    notifier = Notifier(address)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = receive()
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    notifier.close()


def test_abstract_socket_address():
    name = f"mushcam-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        Notifier("@" + name).ready()
        assert sock.recv(100) == b"READY=1"
    finally:
        sock.close()


def test_everything_is_a_noop_without_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    notifier.ready()
    notifier.reloading()
    notifier.watchdog()
    notifier.status("x")
    notifier.stopping()
    notifier.close()
    notifier.close()


def test_a_vanished_socket_does_not_raise(tmp_path, caplog):
    notifier = Notifier(str(tmp_path / "gone"))
    notifier.ready()
    assert "could not notify systemd" in caplog.text


def test_relative_address_is_ignored(caplog):
    assert not Notifier("relative/path").enabled
    assert "neither a path nor @name" in caplog.text


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, None),
        ({"WATCHDOG_USEC": "10000000"}, 5.0),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}, 1.5),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval_is_half_the_period(environ, expected):
    assert Notifier(environ=environ).watchdog_interval() == expected


def test_watchdog_interval_reads_the_environment(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert Notifier().watchdog_interval() == 1.0
