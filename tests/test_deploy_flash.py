"""deploy/flash.sh over a real SSH connection (a throw-away sshd on 127.0.0.1).

Each "device" is a directory with a fake systemctl that plays the daemon's reload, and the real
`mushcam selftest` of this checkout. Bundles are derived from the committed tiny real bundle.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.deploy_support.bundles import (
    allowed_signers_line,
    derive_bundle,
    make_ssh_key,
    read_card,
)
from tests.deploy_support.devices import FLASH, Device, release_name
from tests.deploy_support.sshd import SSHServer, sshd_missing_reason, start_sshd
from train.sign import sign_bundle


@pytest.fixture(scope="module")
def sshd(tmp_path_factory) -> SSHServer:
    reason = sshd_missing_reason()
    if reason:
        pytest.fail(f"the deploy tests need a real sshd: {reason} rsync")
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_bundle) -> dict[str, Path]:
    """Release A (what devices run), release B (the good new one) and broken variants of B."""
    root = tmp_path_factory.mktemp("bundles")
    a = derive_bundle(tiny_bundle, root / "A", version="1.0.0")
    b = derive_bundle(tiny_bundle, root / "B", version="2.0.0")

    def mislabel(card):
        card["samples"][0]["label"] = card["samples"][1]["label"]

    bad_selftest = derive_bundle(tiny_bundle, root / "bad-selftest", version="2.0.1", edit=mislabel)
    corrupt = derive_bundle(tiny_bundle, root / "corrupt", version="2.0.2")
    with open(corrupt / "model.tflite", "ab") as f:
        f.write(b"\0")  # the card's sha256 no longer matches the model
    return {"A": a, "B": b, "bad-selftest": bad_selftest, "corrupt": corrupt}


@pytest.fixture
def make_devices(tmp_path, sshd):
    """make_devices(n) -> n fresh devices dev1..devN and the inventory file listing them."""

    def make(n: int, **extra: str) -> tuple[list[Device], Path]:
        devices = [Device(tmp_path / f"dev{i}", f"dev{i}") for i in range(1, n + 1)]
        inventory = tmp_path / "inventory"
        inventory.write_text("# test fleet\n\n" + "".join(d.inventory_line(**extra) + "  # a device\n" for d in devices))
        return devices, inventory

    return make


def flash(sshd: SSHServer, *args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    """Run flash.sh with the test sshd's client config; output on failure helps debugging."""
    result = subprocess.run(
        ["bash", str(FLASH), "-F", str(sshd.ssh_config), "--timeout", "5", *args],
        capture_output=True, text=True, timeout=timeout,
    )
    print(result.stdout, result.stderr)
    return result


def summary_row(result: subprocess.CompletedProcess, host: str) -> str:
    rows = [line for line in result.stdout.splitlines() if line.split(" ", 1)[0] == host]
    assert len(rows) == 1, result.stdout
    return rows[0]


def test_good_push_switches_and_daemon_serves_it(sshd, bundles, make_devices):
    (dev,), inventory = make_devices(1)
    old = dev.seed(bundles["A"])
    new = release_name(bundles["B"])
    result = flash(sshd, str(bundles["B"]), "--inventory", str(inventory))
    assert result.returncode == 0
    assert " ok " in summary_row(result, "dev1")
    assert dev.current() == new
    assert dev.status()["model_version"] == "2.0.0"
    assert dev.status()["model_sha256"] == read_card(bundles["B"])["files"]["model.tflite"]
    assert dev.releases() == sorted([old, new])
    released = dev.models / "releases" / new
    for name in ("model.json", "model.tflite", "ood.npz", "samples/red_cap.jpg"):
        assert (released / name).read_bytes() == (bundles["B"] / name).read_bytes()
    # The switch is a relative symlink (the model root can move) made by rename, not in place.
    assert os.readlink(dev.models / "current") == f"releases/{new}"
    assert not list(dev.models.glob(".current.*"))


def test_first_push_to_an_empty_device_as_user_at_host_port_with_scp(sshd, bundles, tmp_path):
    """A fresh device (no current yet, service not running), addressed as user@host:port, via scp."""
    dev = Device(tmp_path / "fresh", "fresh")
    (dev.root / "stopped").touch()
    result = subprocess.run(
        ["bash", str(FLASH), *sshd.ssh_args(), "--transfer", "scp", "--timeout", "5", *dev.options(), str(bundles["B"]), sshd.target],
        capture_output=True, text=True, timeout=60,
    )
    print(result.stdout, result.stderr)
    assert result.returncode == 0
    assert "copying with scp" in result.stderr
    assert dev.current() == release_name(bundles["B"])
    assert dev.status()["model_version"] == "2.0.0"
    assert "(was nothing)" in result.stdout
    assert "start mushcam" in (dev.root / "systemctl.log").read_text()  # started, not reloaded


def test_sha_mismatch_is_refused_and_current_untouched(sshd, bundles, make_devices):
    (dev,), inventory = make_devices(1)
    old = dev.seed(bundles["A"])
    reloads = dev.reloads()
    result = flash(sshd, str(bundles["corrupt"]), "--inventory", str(inventory))
    assert result.returncode == 1
    row = summary_row(result, "dev1")
    assert "FAILED" in row and "sha256" in row and "model.tflite" in row
    assert dev.current() == old
    assert dev.status()["model_version"] == "1.0.0"
    assert dev.reloads() == reloads  # never switched, so nothing to reload
    assert f"{release_name(bundles['corrupt'])}.failed" in dev.releases()


def test_failing_selftest_keeps_the_old_release(sshd, bundles, make_devices):
    (dev,), inventory = make_devices(1)
    old = dev.seed(bundles["A"])
    result = flash(sshd, str(bundles["bad-selftest"]), "--inventory", str(inventory))
    assert result.returncode == 1
    row = summary_row(result, "dev1")
    # The real selftest's one line says what went wrong.
    assert "selftest:" in row and "self-test failed on 1/3 samples" in row
    assert dev.current() == old
    assert dev.status()["model_version"] == "1.0.0"
    assert dev.releases() == sorted([old, f"{release_name(bundles['bad-selftest'])}.failed"])


def test_daemon_refusing_the_reload_is_rolled_back(sshd, bundles, make_devices):
    """Health check: the daemon keeps the old model and says why; flash.sh puts the old release back."""
    (dev,), inventory = make_devices(1)
    old = dev.seed(bundles["A"])
    (dev.root / "refuse_reload").write_text("tiny-colours 2.0.0: camera on fire")
    started = time.monotonic()
    result = flash(sshd, str(bundles["B"]), "--inventory", str(inventory))
    assert result.returncode == 1
    row = summary_row(result, "dev1")
    assert "refused the reload: tiny-colours 2.0.0: camera on fire" in row
    assert f"current back to {old}" in row
    assert time.monotonic() - started < 5 + 5  # the refusal is seen at once, not after the timeout
    assert dev.current() == old
    assert dev.status()["model_version"] == "1.0.0"
    assert f"{release_name(bundles['B'])}.failed" in dev.releases()


def test_transfer_cut_off_midway_leaves_current_untouched_then_resumes(sshd, bundles, make_devices, tmp_path):
    (dev,), inventory = make_devices(1)
    old = dev.seed(bundles["A"])
    new = release_name(bundles["B"])
    size = sum(p.stat().st_size for p in bundles["B"].rglob("*") if p.is_file())
    # The device's rsync loses its input stream half way through the bundle (a dropped link). dd with
    # bs=1 passes bytes on as they come (head -c would hold them back until it has them all).
    dying_rsync = tmp_path / "dying-rsync"
    dying_rsync.write_text(f'#!/bin/sh\ndd bs=1 count={size // 2} status=none | rsync "$@"\n')
    dying_rsync.chmod(0o755)
    result = flash(sshd, str(bundles["B"]), "--inventory", str(inventory), "--rsync-path", str(dying_rsync))
    assert result.returncode == 1
    assert "copy (rsync) failed" in summary_row(result, "dev1")
    assert dev.current() == old
    assert dev.status()["model_version"] == "1.0.0"
    assert dev.releases() == sorted([old, f"{new}.partial"])
    partial = dev.models / "releases" / f"{new}.partial"
    copied = sum(p.stat().st_size for p in partial.rglob("*") if p.is_file())
    assert copied < size

    again = flash(sshd, str(bundles["B"]), "--inventory", str(inventory))
    assert again.returncode == 0
    assert dev.current() == new
    assert dev.releases() == sorted([old, new])


def test_three_devices_in_parallel_one_failing(sshd, bundles, make_devices):
    devices, inventory = make_devices(3)
    for dev in devices:
        dev.seed(bundles["A"])
    (devices[1].root / "refuse_reload").write_text("out of memory")
    old, new = release_name(bundles["A"]), release_name(bundles["B"])
    result = flash(sshd, str(bundles["B"]), "--inventory", str(inventory), "--parallel", "3")
    assert result.returncode == 1
    assert " ok " in summary_row(result, "dev1")
    assert "FAILED" in summary_row(result, "dev2")
    assert " ok " in summary_row(result, "dev3")
    assert [d.current() for d in devices] == [new, old, new]
    assert [d.status()["model_version"] for d in devices] == ["2.0.0", "1.0.0", "2.0.0"]
    # One summary table, hosts in inventory order, after the per-host log lines.
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["HOST", "RESULT", "RELEASE", "DETAIL"]
    assert [line.split()[0] for line in lines[1:]] == ["dev1", "dev2", "dev3"]
    # All three started before any finished: they really ran side by side.
    log = result.stderr.splitlines()
    started = [log.index(f"[{host}] connecting") for host in ("dev1", "dev2", "dev3")]
    first_done = min(i for i, line in enumerate(log) if "] ok: serving" in line or "] FAILED" in line)
    assert max(started) < first_done


def test_rerun_is_harmless(sshd, bundles, make_devices):
    (dev,), inventory = make_devices(1)
    dev.seed(bundles["A"])
    first = flash(sshd, str(bundles["B"]), "--inventory", str(inventory))
    assert first.returncode == 0
    releases, reloads = dev.releases(), dev.reloads()
    again = flash(sshd, str(bundles["B"]), "--inventory", str(inventory))
    assert again.returncode == 0
    row = summary_row(again, "dev1")
    assert "unchanged" in row and "already current" in row
    assert dev.releases() == releases
    assert dev.reloads() == reloads  # the daemon already reports it: no reload needed
    assert dev.current() == release_name(bundles["B"])


def test_signatures_required(sshd, bundles, make_devices, tmp_path):
    (dev,), inventory = make_devices(1)
    old = dev.seed(bundles["A"])
    trusted = make_ssh_key(tmp_path / "trusted", "release@lab")
    stranger = make_ssh_key(tmp_path / "stranger", "someone@elsewhere")
    dev.allowed_signers.write_text(allowed_signers_line(trusted, "release@lab"))

    # Unsigned: refused before any device is touched.
    unsigned = flash(sshd, str(bundles["B"]), "--inventory", str(inventory), "--require-signature")
    assert unsigned.returncode == 2
    assert "unsigned" in unsigned.stderr
    assert dev.releases() == [old]

    # Signed by a key the device does not trust: the device's selftest refuses it.
    by_stranger = derive_bundle(bundles["B"], tmp_path / "by-stranger", version="2.1.0")
    sign_bundle(by_stranger, stranger)
    refused = flash(sshd, str(by_stranger), "--inventory", str(inventory), "--require-signature")
    assert refused.returncode == 1
    assert "not in" in summary_row(refused, "dev1") and "allowed_signers" in summary_row(refused, "dev1")
    assert dev.current() == old

    # Signed by the trusted key: accepted, the signature travels with the bundle.
    signed = derive_bundle(bundles["B"], tmp_path / "signed", version="2.2.0")
    sign_bundle(signed, trusted)
    accepted = flash(sshd, str(signed), "--inventory", str(inventory), "--require-signature")
    assert accepted.returncode == 0
    assert dev.current() == release_name(signed)
    assert (dev.models / "current" / "model.json.sig").is_file()


def test_device_config_requiring_signatures_refuses_at_selftest(sshd, bundles, make_devices, tmp_path):
    """No --require-signature here: the device's own config.toml says so, and the selftest obeys it."""
    (dev,), inventory = make_devices(1)
    old = dev.seed(bundles["A"])
    trusted = make_ssh_key(tmp_path / "trusted", "release@lab")
    dev.allowed_signers.write_text(allowed_signers_line(trusted, "release@lab"))
    dev.config.write_text(f'require_signature = true\nallowed_signers = "{dev.allowed_signers}"\n')
    reloads = dev.reloads()
    result = flash(sshd, str(bundles["B"]), "--inventory", str(inventory))
    assert result.returncode == 1
    row = summary_row(result, "dev1")
    assert "selftest:" in row and "unsigned" in row
    assert dev.current() == old
    assert dev.reloads() == reloads  # refused before the switch

    signed = derive_bundle(bundles["B"], tmp_path / "signed", version="2.3.0")
    sign_bundle(signed, trusted)
    assert flash(sshd, str(signed), "--inventory", str(inventory)).returncode == 0
    assert dev.current() == release_name(signed)


def test_rollback_goes_back_one_release_at_a_time(sshd, bundles, make_devices):
    (dev, other), inventory = make_devices(2)
    old = dev.seed(bundles["A"])
    other.seed(bundles["A"])
    new = release_name(bundles["B"])
    assert flash(sshd, str(bundles["B"]), "--inventory", str(inventory)).returncode == 0
    assert dev.current() == other.current() == new

    # Only the host named with --rollback; its settings come from the inventory.
    result = flash(sshd, "--rollback", "dev1", "--inventory", str(inventory))
    assert result.returncode == 0
    assert "rolled back" in summary_row(result, "dev1")
    assert "dev2" not in result.stdout
    assert dev.current() == old
    assert dev.status()["model_version"] == "1.0.0"
    assert f"{new}.failed" in dev.releases()
    assert other.current() == new

    nothing_left = flash(sshd, "--rollback", dev.alias, *dev.options())
    assert nothing_left.returncode == 1
    assert "no earlier good release" in summary_row(nothing_left, "dev1")
    assert dev.current() == old


def test_keeps_the_last_k_releases_and_never_current(sshd, bundles, make_devices, tmp_path):
    (dev,), inventory = make_devices(1)
    now = time.time()
    names = []
    for i in range(3):
        old = derive_bundle(bundles["A"], tmp_path / f"old{i}", version=f"0.{i}.0")
        names.append(dev.seed(old, current=(i == 0), mtime=now - 1000 + i))
    # A leftover from a cut-off copy of another release is not worth keeping.
    (dev.models / "releases" / "0.9.0-abc.partial").mkdir()
    result = flash(sshd, str(bundles["B"]), "--inventory", str(inventory), "--keep", "2")
    assert result.returncode == 0
    # Kept: the new current and the newest other release; the old current (oldest) went too.
    assert dev.releases() == sorted([release_name(bundles["B"]), names[2]])


def test_dry_run_touches_nothing(sshd, bundles, make_devices):
    (dev,), inventory = make_devices(1)
    old = dev.seed(bundles["A"])
    result = flash(sshd, str(bundles["B"]), "--inventory", str(inventory), "--dry-run")
    assert result.returncode == 0
    assert "would flash" in summary_row(result, "dev1")
    assert release_name(bundles["B"]) in result.stderr
    assert dev.releases() == [old]
    assert dev.current() == old


def test_usage_errors_exit_2_before_connecting(sshd, bundles, tmp_path):
    inventory = tmp_path / "inventory"
    inventory.write_text("dev1 colour=blue\n")
    bad_key = flash(sshd, str(bundles["B"]), "--inventory", str(inventory))
    assert bad_key.returncode == 2
    assert "unknown setting 'colour=blue'" in bad_key.stderr and "model_root" in bad_key.stderr

    not_a_bundle = flash(sshd, str(tmp_path), "dev1")
    assert not_a_bundle.returncode == 2 and "model.json not found" in not_a_bundle.stderr

    odd = derive_bundle(bundles["A"], tmp_path / "odd", version="../../etc")
    bad_version = flash(sshd, str(odd), "dev1")
    assert bad_version.returncode == 2 and "not a plain name" in bad_version.stderr

    assert flash(sshd, str(bundles["B"])).returncode == 2
    assert flash(sshd, str(bundles["B"]), "dev1", "--parallel", "0").returncode == 2
    twice = flash(sshd, str(bundles["B"]), "dev1", "dev1")
    assert twice.returncode == 2 and "listed twice" in twice.stderr


def test_missing_model_root_is_refused(sshd, bundles, make_devices):
    (dev,), _ = make_devices(1)
    result = flash(sshd, str(bundles["B"]), "dev1", *dev.options(), "--model-root", str(dev.root / "typo"))
    assert result.returncode == 1
    assert "does not exist on the device" in summary_row(result, "dev1")
    assert not (dev.root / "typo").exists()


def test_unreachable_host_fails_cleanly(sshd, bundles, tmp_path):
    result = subprocess.run(
        ["bash", str(FLASH), "-o", "ConnectTimeout=2", "-o", "StrictHostKeyChecking=no", "-i", str(sshd.key),
         str(bundles["B"]), f"root@127.0.0.1:{_closed_port()}"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert "connect/prepare" in result.stdout


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_help_and_shellcheck():
    result = subprocess.run(["bash", str(FLASH), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "--rollback HOST" in result.stdout and "--inventory FILE" in result.stdout
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck not found: apt-get install shellcheck")
    check = subprocess.run([shellcheck, "-x", str(FLASH)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


def test_a_symlink_to_flash_sh_still_finds_its_shared_ssh_code(tmp_path):
    link = tmp_path / "bin" / "mushcam-flash"
    link.parent.mkdir()
    link.symlink_to(FLASH)
    result = subprocess.run(["bash", str(link), "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--inventory FILE" in result.stdout


# --- integrity under attack (issue 12) ------------------------------------------------------------------
def test_two_flashes_to_one_device_cannot_both_report_ok(sshd, bundles, make_devices, tmp_path):
    """The device's lock is held for a whole flash: a second one fails at once instead of racing."""
    (dev,), inventory = make_devices(1)
    dev.seed(bundles["A"])
    (dev.root / "reload_delay").write_text("2")
    c = derive_bundle(bundles["B"], tmp_path / "C", version="3.0.0")
    cmd = ["bash", str(FLASH), "-F", str(sshd.ssh_config), "--timeout", "10", "--inventory", str(inventory)]
    first = subprocess.Popen([*cmd, str(bundles["B"])], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    second = subprocess.Popen([*cmd, str(c)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    for name, proc in (("B", first), ("C", second)):
        out, err = proc.communicate(timeout=90)
        print(out, err)
        results[name] = (proc.returncode, out)
    oks = [name for name, (rc, out) in results.items() if rc == 0]
    assert len(oks) == 1, results
    loser = "C" if oks == ["B"] else "B"
    assert "locked by another release operation" in results[loser][1]
    winner = bundles["B"] if oks == ["B"] else c
    assert dev.current() == release_name(winner)
    assert dev.status()["model_version"] == read_card(winner)["version"]


def test_one_device_under_three_names_is_refused(sshd, bundles, make_devices):
    (dev,), _ = make_devices(1)
    dev.seed(bundles["A"])
    hosts = ["dev1", f"{sshd.user}@127.0.0.1:{sshd.port}", f"127.0.0.1:{sshd.port}"]
    result = flash(sshd, str(bundles["B"]), *hosts, *dev.options())
    assert result.returncode == 2
    assert "are the same device" in result.stderr and "listed twice" in result.stderr
    assert dev.releases() == [release_name(bundles["A"])]
    assert dev.reloads() == 0


def test_symlink_in_a_bundle_is_refused_before_any_copy(sshd, bundles, make_devices, tmp_path):
    """scp follows symlinks: a bundle's link to a private key would publish it on the device."""
    (dev,), inventory = make_devices(1)
    dev.seed(bundles["A"])
    secret = tmp_path / "id_ed25519"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    evil = derive_bundle(bundles["B"], tmp_path / "evil", version="2.5.0")
    (evil / "samples" / "notes.jpg").symlink_to(secret)
    result = flash(sshd, str(evil), "--inventory", str(inventory), "--transfer", "scp")
    assert result.returncode == 2
    assert "samples/notes.jpg is a symlink" in result.stderr and "before any copy" in result.stderr
    assert dev.releases() == [release_name(bundles["A"])]
    assert not list(dev.root.rglob("notes.jpg"))


def test_hosts_that_would_be_ssh_options_are_refused(sshd, bundles, make_devices, tmp_path):
    (dev,), _ = make_devices(1)
    marker = tmp_path / "pwned"
    for host in (f"-oProxyCommand=touch {marker}@dev2", "-oProxyCommand=x", "dev2:-1", "-v"):
        inventory = tmp_path / "hostile"
        inventory.write_text(f"'{host}'\n")
        result = flash(sshd, str(bundles["B"]), "--inventory", str(inventory))
        assert result.returncode == 2, host
        assert "bad host" in result.stderr
    assert not marker.exists()


def test_device_output_cannot_drive_the_terminal(sshd, bundles, make_devices, tmp_path):
    """A compromised device answers with escape sequences: they are printed as '?'."""
    (dev,), _ = make_devices(1)
    liar = tmp_path / "liar"
    liar.write_text(
        "#!/bin/sh\nprintf 'LOG\\t\\033[2Jcleared\\n\\033]0;title\\007\\n'\n"
        "printf 'RESULT\\tFAILED\\tx\\t\\033[31mred\\033[0m \\r\\bdone\\n'\nexit 1\n"
    )
    liar.chmod(0o755)
    result = flash(sshd, str(bundles["B"]), "dev1", *dev.options(), "--mushcam", str(liar))
    assert result.returncode == 1
    for stream in (result.stdout, result.stderr):
        assert not any(ch in stream for ch in "\x1b\x07\r\b"), repr(stream)
    assert "?[31mred?[0m" in summary_row(result, "dev1")
    assert "?[2Jcleared" in result.stderr


def test_status_from_a_process_that_is_not_the_services_main_pid_is_not_trusted(sshd, bundles, make_devices):
    (dev,), inventory = make_devices(1)
    old = dev.seed(bundles["A"])
    (dev.root / "wrong_pid").touch()
    result = flash(sshd, str(bundles["B"]), "--inventory", str(inventory))
    assert result.returncode == 1
    row = summary_row(result, "dev1")
    assert "health:" in row and "MainPID" in row and f"current back to {old}" in row
    assert dev.current() == old


def test_a_device_whose_mushcam_predates_release_says_what_to_do(sshd, bundles, make_devices, tmp_path):
    (dev,), _ = make_devices(1)
    old = tmp_path / "old-mushcam"
    old.write_text("#!/bin/sh\necho \"Error: No such command 'release'.\" >&2\nexit 2\n")
    old.chmod(0o755)
    result = flash(sshd, str(bundles["B"]), "dev1", *dev.options(), "--mushcam", str(old))
    assert result.returncode == 1
    row = summary_row(result, "dev1")
    assert "connect/prepare: Error: No such command 'release'." in row and "run deploy/install.sh there again" in row


def test_a_deep_or_huge_card_is_refused_in_one_line(sshd, bundles, tmp_path):
    deep = derive_bundle(bundles["B"], tmp_path / "deep")
    (deep / "model.json").write_text("[" * 100_000 + "]" * 100_000)
    result = flash(sshd, str(deep), "dev1")
    assert result.returncode == 2 and "model.json: unreadable" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    huge = derive_bundle(bundles["B"], tmp_path / "huge")
    with open(huge / "model.json", "a") as f:
        f.write(" " * (2 << 20))
    result = flash(sshd, str(huge), "dev1")
    assert result.returncode == 2 and "larger than 1 MB" in result.stderr
