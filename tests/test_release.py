"""device/release.py and `mushcam release`: the device's model store, without SSH.

The daemon is the stand-in of the flash tests (tests/deploy_support/fake_systemctl.py), driven here
directly: a device directory, its fake systemctl, and the real store under it.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from device.cli import app
from device.errors import LockError, ReleaseError
from device.release import Operations, ReleaseStore, Service, Verify, check_tree
from device.bundle import load_bundle, sha256_file
from tests.deploy_support import fake_systemctl
from tests.deploy_support.bundles import derive_bundle
from tests.deploy_support.devices import Device, release_name

runner = CliRunner()


@pytest.fixture
def device(tmp_path) -> Device:
    return Device(tmp_path / "dev", "dev")


@pytest.fixture
def store(device) -> ReleaseStore:
    return ReleaseStore(device.models)


def service(device: Device, timeout: float = 5) -> Service:
    return Service(device.status_file, [str(device.systemctl)], "mushcam", timeout, poll_s=0.05)


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_install_copies_verifies_and_names_the_release(store, tiny_bundle):
    name, bundle = store.install(tiny_bundle)
    assert name == release_name(tiny_bundle)
    dest = store.releases / name
    assert bundle.path == dest and all(s.path.parent == dest / "samples" for s in bundle.samples)
    assert _tree(dest) == _tree(tiny_bundle)
    for f in dest.rglob("*"):
        # Readable by the daemon's user, writable by the deployer only, whatever the source's modes.
        assert stat.S_IMODE(f.stat().st_mode) == (0o755 if f.is_dir() else 0o644)
    assert store.current() is None  # installing is not activating
    assert not [p for p in store.releases.iterdir() if p.name.startswith(".tmp-")]


def test_the_copy_is_verified_not_the_source(store, bundle_copy, monkeypatch):
    """A source changed after its file was copied (a swap during install) does not reach the store."""
    import device.release as release

    real_copy = release._copy_file
    original = (bundle_copy / "model.tflite").read_bytes()

    def copy_then_swap(src, dest):
        real_copy(src, dest)
        if src.name == "model.tflite":
            src.write_bytes(b"evil" * 100)

    monkeypatch.setattr(release, "_copy_file", copy_then_swap)
    name, _ = store.install(bundle_copy)
    assert (store.releases / name / "model.tflite").read_bytes() == original

    # And a source that is wrong when copied is refused, leaving nothing behind.
    monkeypatch.setattr(release, "_copy_file", real_copy)
    other = derive_bundle(bundle_copy, bundle_copy.parent / "other", version="9.0.0")
    (other / "model.tflite").write_bytes(b"evil" * 100)
    with pytest.raises(Exception, match="sha256"):
        store.install(other)
    assert sorted(p.name for p in store.releases.iterdir()) == [name]


def test_symlink_or_special_file_refused_before_any_copy(store, bundle_copy, tmp_path):
    secret = tmp_path / "id_ed25519"
    secret.write_text("PRIVATE KEY")
    (bundle_copy / "samples" / "notes.jpg").symlink_to(secret)
    with pytest.raises(ReleaseError, match="notes.jpg: a symlink.*before any copy"):
        store.install(bundle_copy)
    assert not store.releases.exists() or list(store.releases.iterdir()) == []

    (bundle_copy / "samples" / "notes.jpg").unlink()
    os.mkfifo(bundle_copy / "pipe")
    with pytest.raises(ReleaseError, match="pipe: a special file"):
        check_tree(bundle_copy)


def test_a_version_that_is_a_path_is_refused(store, bundle_copy, edit_card, tmp_path):
    """Item 6: the card's version names a directory; `../../..` must never leave the store."""
    edit_card(bundle_copy, lambda c: c.update(version="../../../../../../ESCAPED"))
    with pytest.raises(ReleaseError, match="not a plain name"):
        store.install(bundle_copy)
    assert not list(tmp_path.rglob("*ESCAPED*"))
    assert list(store.releases.iterdir()) == []
    for bad in ("..", ".hidden", "a/b", "x.failed", "", "-rf"):
        with pytest.raises(ReleaseError):
            store.path(bad)


def test_activate_switches_current_atomically_and_relatively(store, tiny_bundle, tmp_path):
    a, _ = store.install(derive_bundle(tiny_bundle, tmp_path / "a", version="1.0.0"))
    b, _ = store.install(derive_bundle(tiny_bundle, tmp_path / "b", version="2.0.0"))
    store.activate(a)
    store.activate(b)
    assert os.readlink(store.root / "current") == f"releases/{b}"
    assert store.current() == b
    assert not list(store.root.glob(".current.*"))
    with pytest.raises(ReleaseError, match="does not exist"):
        store.activate("9.9.9-000000000000")
    assert store.current() == b
    # An install of the current release replaces nothing under the running daemon.
    inode = (store.releases / b / "model.tflite").stat().st_ino
    assert store.install(tmp_path / "b")[0] == b
    assert (store.releases / b / "model.tflite").stat().st_ino == inode
    # The same name with another card (thresholds chosen again, version not bumped) is refused in one
    # line that says what to do, and the running copy is still untouched.
    stricter = derive_bundle(tmp_path / "b", tmp_path / "b2", edit=lambda c: c["thresholds"].update(
        edible_min_confidence=0.99))
    with pytest.raises(ReleaseError, match="is current on this device with another model.json.*new version"):
        store.install(stricter)
    assert (store.releases / b / "model.tflite").stat().st_ino == inode
    assert load_bundle(store.releases / b).thresholds.edible_min_confidence != 0.99
    assert not [p for p in store.releases.iterdir() if p.name.startswith(".tmp")]


def test_current_that_is_not_a_link_is_refused(store):
    (store.root / "current").mkdir()
    with pytest.raises(ReleaseError, match="not a symlink"):
        store.current()


def test_prune_keeps_k_never_current_and_sweeps_leftovers(store, tiny_bundle, tmp_path):
    names = []
    for i in range(4):
        name, _ = store.install(derive_bundle(tiny_bundle, tmp_path / f"r{i}", version=f"0.{i}.0"))
        os.utime(store.releases / name, (1000 + i, 1000 + i))
        names.append(name)
    store.activate(names[0])
    os.utime(store.releases / names[0], (900, 900))  # current is the oldest
    (store.releases / "0.9.0-abc.partial").mkdir()
    (store.releases / ".tmp-crashed").mkdir()
    for i in range(3):
        (store.releases / f"0.8.{i}-abc.failed").mkdir()
        os.utime(store.releases / f"0.8.{i}-abc.failed", (1000 + i, 1000 + i))
    removed = store.prune(2)
    left = sorted(p.name for p in store.releases.iterdir())
    assert left == sorted([names[0], names[3], "0.8.1-abc.failed", "0.8.2-abc.failed"])
    assert ".tmp-crashed" in removed and "0.9.0-abc.partial" in removed


def test_mark_failed_never_marks_current(store, tiny_bundle):
    name, _ = store.install(tiny_bundle)
    store.activate(name)
    with pytest.raises(ReleaseError, match="it is current"):
        store.mark_failed(name)
    store.activate(None)
    assert store.mark_failed(name) == f"{name}.failed"
    assert [e.state for e in store.entries()] == ["failed"]


_HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, b"pid %d, a flash of 2.0.0" % os.getpid())
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _hold_lock(root: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(root / ".lock"), str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_operation_fails_at_once_while_the_lock_is_held(store, tiny_bundle):
    holder = _hold_lock(store.root, 30)
    try:
        started = time.monotonic()
        with pytest.raises(LockError, match=r"locked by another release operation \(pid \d+, a flash of 2.0.0"):
            with store.locked("install"):
                pass
        assert time.monotonic() - started < 2
        result = runner.invoke(app, ["release", "install", str(tiny_bundle), "--root", str(store.root)])
        assert result.exit_code == 1 and "locked" in result.output
        assert not store.releases.exists() or list(store.releases.iterdir()) == []
    finally:
        holder.kill()
        holder.wait()
    # The lock goes with its process: nothing to clean up after a crash.
    with store.locked("install"):
        pass


def test_lock_waits_when_asked(store):
    holder = _hold_lock(store.root, 0.5)
    try:
        with store.locked("install", wait=10):
            pass
    finally:
        holder.wait()


# --- the daemon's status against the pushed release ---------------------------------------------------
def _served(device: Device, store: ReleaseStore, bundle_dir: Path) -> str:
    name, _ = store.install(bundle_dir)
    store.activate(name)
    fake_systemctl.write_status(device.root)
    return name


def test_health_wants_the_pushed_card_a_fresh_status_and_systemds_main_pid(device, store, tiny_bundle, tmp_path):
    a = derive_bundle(tiny_bundle, tmp_path / "a", version="1.0.0")
    b = derive_bundle(tiny_bundle, tmp_path / "b", version="2.0.0")
    _served(device, store, a)
    svc = service(device, timeout=1)
    bundle_a, bundle_b = load_bundle(a), load_bundle(b)
    assert svc.check(bundle_a, None)[0] is not None

    # Another release's card (a second flash switched `current` meanwhile): not ours.
    status, why = svc.check(bundle_b, None)
    assert status is None and "reports 1.0.0" in why
    # Right card, but written before the reload: the daemon has not answered yet.
    status, why = svc.check(bundle_a, time.time() + 60)
    assert status is None and "before the reload" in why
    # Right card, fresh, but by a process that is not systemd's MainPID.
    (device.root / "wrong_pid").touch()
    fake_systemctl.write_status(device.root)
    status, why = svc.check(bundle_a, None)
    assert status is None and "is not mushcam's MainPID" in why
    with pytest.raises(ReleaseError, match="does not report 1.0.0.*MainPID"):
        svc.wait_serving(bundle_a, None, timeout=0.5)


def test_health_reports_a_refusal_and_an_unreadable_status_file_at_once(device, store, tiny_bundle, monkeypatch):
    _served(device, store, tiny_bundle)
    svc = service(device)
    (device.root / "refuse_reload").write_text("camera on fire")
    since = svc.reload()
    bundle = load_bundle(tiny_bundle)
    other = derive_bundle(tiny_bundle, device.root / "other", version="3.0.0")
    started = time.monotonic()
    with pytest.raises(ReleaseError, match="refused the reload: camera on fire"):
        svc.wait_serving(load_bundle(other), since)
    assert time.monotonic() - started < 3
    # The refusal keeps the old model, which is what a rollback waits for: that counts as served.
    assert svc.wait_serving(bundle, since)["model_version"] == "0.0.1"

    def denied(*_a, **_k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(ReleaseError, match="not readable by .*0644"):
        svc.read_status()


# --- operations and the CLI ----------------------------------------------------------------------------
def _ops(device: Device, **kw) -> Operations:
    return Operations(ReleaseStore(device.models), service(device), Verify(), **kw)


def test_activate_of_a_release_the_daemon_refuses_goes_back(device, store, tiny_bundle, tmp_path):
    old = _served(device, store, derive_bundle(tiny_bundle, tmp_path / "a", version="1.0.0"))
    new, _ = store.install(derive_bundle(tiny_bundle, tmp_path / "b", version="2.0.0"))
    (device.root / "refuse_reload").write_text("no")
    with pytest.raises(ReleaseError, match=f"refused the reload: no; current back to {old}"):
        _ops(device).activate(new)
    assert store.current() == old


def test_rollback_goes_back_and_marks_the_release_it_left(device, store, tiny_bundle, tmp_path):
    old = _served(device, store, derive_bundle(tiny_bundle, tmp_path / "a", version="1.0.0"))
    ops = _ops(device)
    new, _ = store.install(derive_bundle(tiny_bundle, tmp_path / "b", version="2.0.0"))
    assert "now current" not in ops.activate(new)
    assert store.current() == new
    assert ops.rollback(dry_run=True) == ("would roll back", old, f"dry run: from {new}")
    status, target, detail = ops.rollback()
    assert (status, target) == ("rolled back", old) and f"{new} marked .failed" in detail
    assert store.current() == old and device.status()["model_version"] == "1.0.0"
    with pytest.raises(ReleaseError, match="no earlier good release"):
        ops.rollback()


def test_cli_install_activate_list_status(device, tiny_bundle, tmp_path):
    root = ["--root", str(device.models)]
    svc = ["--systemctl", str(device.systemctl), "--status-file", str(device.status_file), "--timeout", "5"]
    a = derive_bundle(tiny_bundle, tmp_path / "a", version="1.0.0")
    result = runner.invoke(app, ["release", "install", str(a), *root, "--activate", "--reload", *svc])
    assert result.exit_code == 0, result.output
    assert "installed 1.0.0-" in result.output and "now current (was nothing)" in result.output
    b = derive_bundle(tiny_bundle, tmp_path / "b", version="2.0.0")
    assert runner.invoke(app, ["release", "install", str(b), *root]).exit_code == 0
    listed = runner.invoke(app, ["release", "list", *root, "--json"])
    assert [(e["name"].split("-")[0], e["current"]) for e in json.loads(listed.output)] == [("2.0.0", False), ("1.0.0", True)]
    status = runner.invoke(app, ["release", "status", *root, "--status-file", str(device.status_file)])
    assert status.exit_code == 0 and "current: 1.0.0-" in status.output
    activated = runner.invoke(app, ["release", "activate", release_name(b), *root, *svc])
    assert activated.exit_code == 0, activated.output
    assert device.status()["model_version"] == "2.0.0"
    bad = runner.invoke(app, ["release", "activate", "../../etc", *root, *svc])
    assert bad.exit_code == 1 and "not a plain name" in bad.output and "Traceback" not in bad.output
    rolled = runner.invoke(app, ["release", "rollback", *root, *svc, "--porcelain"])
    assert rolled.output.splitlines()[-1].startswith("RESULT\trolled back\t1.0.0-")


def _receive(device: Device, bundle: Path, stdin: str, *extra: str):
    card_sha = sha256_file(bundle / "model.json")
    return runner.invoke(app, [
        "release", "receive", release_name(bundle), "--card-sha256", card_sha, "--root", str(device.models),
        "--systemctl", str(device.systemctl), "--status-file", str(device.status_file), "--timeout", "5",
        "--config", str(device.config), *extra,
    ], input=stdin)


def test_receive_speaks_the_flash_protocol(device, tiny_bundle, tmp_path):
    old = device.seed(derive_bundle(tiny_bundle, tmp_path / "a", version="1.0.0"))
    b = derive_bundle(tiny_bundle, tmp_path / "b", version="2.0.0")
    name = release_name(b)
    # What flash.sh's copy leaves: the bundle in releases/NAME.partial.
    shutil.copytree(b, device.models / "releases" / f"{name}.partial")
    result = _receive(device, b, "go\n")
    lines = result.output.splitlines()
    assert lines[0] == f"READY\tcurrent={old}\tcopy=1\trsync={int(shutil.which('rsync') is not None)}"
    assert lines[-1].startswith(f"RESULT\tok\t{name}\tserving 2.0.0 (") and lines[-1].endswith(f"(was {old})")
    assert result.exit_code == 0
    assert device.current() == name and device.releases() == sorted([old, name])

    # The workstation's card is not the one that arrived: refused, marked failed, current untouched.
    c = derive_bundle(tiny_bundle, tmp_path / "c", version="3.0.0")
    shutil.copytree(c, device.models / "releases" / f"{release_name(c)}.partial")
    (device.models / "releases" / f"{release_name(c)}.partial" / "model.json").write_text(
        (c / "model.json").read_text().replace('"name"', '"name" ', 1))
    refused = _receive(device, c, "go\n")
    assert refused.exit_code == 1 and "differs from the card that was pushed" in refused.output
    assert device.current() == name and f"{release_name(c)}.failed" in device.releases()

    # The current release's name with another card (recalibrated, version not bumped): one line saying
    # what to do, nothing marked failed, current untouched.
    recal = derive_bundle(b, tmp_path / "b-recal", edit=lambda card: card["thresholds"].update(edible_min_confidence=0.99))
    assert release_name(recal) == name
    same_name = _receive(device, recal, "go\n")
    assert same_name.exit_code == 1 and "give the bundle a new version" in same_name.output
    assert device.current() == name and not [r for r in device.releases() if r.startswith(name) and r != name]

    # A release on the device (not current) under the same name with another card is copied again, so
    # the pushed card is the one checked and served, never the stale copy.
    old_recal = derive_bundle(tmp_path / "a", tmp_path / "a-recal",
                              edit=lambda card: card["thresholds"].update(edible_min_confidence=0.99))
    assert release_name(old_recal) == old and device.current() != old
    shutil.copytree(old_recal, device.models / "releases" / f"{old}.partial")
    again = _receive(device, old_recal, "go\n")
    assert again.output.splitlines()[0].split("\t")[2] == "copy=1", again.output
    assert again.exit_code == 0 and device.current() == old
    assert load_bundle(device.models / "releases" / old).thresholds.edible_min_confidence == 0.99
    # No `go` (the copy failed): nothing changes, the .partial stays to be resumed.
    shutil.copytree(c, device.models / "releases" / f"{release_name(c)}.partial")
    aborted = _receive(device, c, "abort\n")
    assert aborted.exit_code == 1 and "current untouched" in aborted.output
    assert f"{release_name(c)}.partial" in device.releases()


def test_receive_fails_at_once_when_another_flash_holds_the_lock(device, tiny_bundle):
    holder = _hold_lock(device.models, 30)
    try:
        result = _receive(device, tiny_bundle, "go\n")
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 1
    # One RESULT line and no READY: the workstation copies nothing.
    assert len(result.output.splitlines()) == 1 and result.output.startswith("RESULT\tFAILED\t")
    assert "prepare: " in result.output and "locked by another release operation" in result.output
