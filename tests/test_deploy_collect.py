"""deploy/collect.sh over a real SSH connection (the throw-away sshd of the deploy tests), and the loop
collect -> mushcam-train import-captures -> mushcam-train prepare end to end."""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from device.captures import save_press
from tests.deploy_support.devices import REPO
from tests.deploy_support.sshd import SSHServer, sshd_missing_reason, start_sshd
from tests.make_tiny_bundle import colour_image
from train.cli import app as train_app

COLLECT = REPO / "deploy" / "collect.sh"
COLOURS = {"red": (210, 40, 30), "green": (40, 190, 50), "blue": (30, 50, 200), "yellow": (220, 200, 40)}


@pytest.fixture(scope="module")
def sshd(tmp_path_factory) -> SSHServer:
    reason = sshd_missing_reason()
    if reason:
        pytest.fail(f"the deploy tests need a real sshd: {reason} rsync")
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


def press(captures: Path, colour: str, seed: int, verdict: str = "UNSURE") -> Path:
    """A press as the daemon saves it: three frames of one scene + result.json, via device.captures."""
    frames = [np.asarray(colour_image(COLOURS[colour], size=(64, 48), seed=seed * 10 + i)) for i in range(3)]
    saved = save_press(captures, frames, {"verdict": verdict, "label": colour}, max_mb=100)
    assert saved is not None
    return saved


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def collect(sshd: SSHServer, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["bash", str(COLLECT), "-F", str(sshd.ssh_config), *args], capture_output=True, text=True, timeout=120,
    )
    print(result.stdout, result.stderr)
    return result


def row(result: subprocess.CompletedProcess, host: str) -> list[str]:
    rows = [line.split() for line in result.stdout.splitlines() if line.split(" ", 1)[0] == host]
    assert len(rows) == 1, result.stdout
    return rows[0]


@pytest.fixture
def fleet(tmp_path):
    """Two devices (ssh_config aliases dev1, dev2), each with a captures folder, and their inventory."""
    caps = {}
    for name, colours in (("dev1", ["red", "green"]), ("dev2", ["blue"])):
        caps[name] = tmp_path / name / "captures"
        caps[name].mkdir(parents=True)
        for i, c in enumerate(colours):
            press(caps[name], c, seed=i)
    inventory = tmp_path / "inventory"
    inventory.write_text("".join(f'{n} captures_dir="{c}" model_root=/ignored  # a device\n' for n, c in caps.items()))
    return caps, inventory


def test_collects_every_press_resumably_and_deletes_nothing(sshd, fleet, tmp_path):
    caps, inventory = fleet
    # What must not be collected: a press still being written, and a folder with a terminal escape in its name.
    (caps["dev1"] / ".tmp-20260101-000000-1").mkdir()
    (caps["dev1"] / ".tmp-20260101-000000-1" / "frame_0.jpg").write_bytes(b"half")
    weird = caps["dev1"] / "x\x1b]0;owned\x07"
    weird.mkdir()
    (weird / "result.json").write_text("{}")
    before = {n: tree(c) for n, c in caps.items()}
    out = tmp_path / "field"

    first = collect(sshd, "--inventory", str(inventory), "--out", str(out))
    assert first.returncode == 0
    assert row(first, "dev1")[1:5] == ["ok", "2", "0", "0"]
    assert row(first, "dev2")[1:5] == ["ok", "1", "0", "0"]
    assert "copying with rsync" in first.stderr
    for name, captures in caps.items():
        presses = sorted(p.name for p in captures.iterdir() if not p.name.startswith(".") and p.name != weird.name)
        assert sorted(p.name for p in (out / name).iterdir() if not p.name.startswith(".")) == presses
        for p in presses:
            assert tree(out / name / p) == tree(captures / p)
            assert sorted(tree(out / name / p)) == ["frame_0.jpg", "frame_1.jpg", "frame_2.jpg", "result.json"]
    assert not (out / "dev1" / ".incoming").exists() or not any((out / "dev1" / ".incoming").iterdir())
    assert "\x1b" not in first.stdout + first.stderr
    assert {n: tree(c) for n, c in caps.items()} == before  # nothing deleted or changed on the devices

    # Again, with one new press on dev1: only it is copied.
    new = press(caps["dev1"], "yellow", seed=7, verdict="EDIBLE")
    again = collect(sshd, "--inventory", str(inventory), "--out", str(out))
    assert again.returncode == 0
    assert row(again, "dev1")[1:5] == ["ok", "1", "2", "0"]
    assert row(again, "dev2")[1:5] == ["ok", "0", "1", "0"]
    assert tree(out / "dev1" / new.name) == tree(new)


@pytest.mark.parametrize("method", ["scp", "rsync"])
def test_copies_only_missing_presses_and_a_cut_off_copy_never_appears(sshd, tmp_path, method):
    """user@host:port with --captures-dir: a press half-copied by an earlier run is finished, never shown half."""
    captures = tmp_path / "dev" / "captures"
    a, b = press(captures, "red", 1), press(captures, "green", 2)
    out = tmp_path / "field"
    name = f"127.0.0.1_{sshd.port}"
    (out / name / ".incoming" / b.name).mkdir(parents=True)
    # What a copy cut off midway leaves: one file half there (rsync --partial resumes it).
    (out / name / ".incoming" / b.name / "frame_0.jpg").write_bytes((b / "frame_0.jpg").read_bytes()[:500])
    (out / name / a.name).mkdir(parents=True)  # "already collected" (a previous run)
    for f in a.iterdir():
        shutil.copy(f, out / name / a.name / f.name)

    result = subprocess.run(
        ["bash", str(COLLECT), *sshd.ssh_args(), "--transfer", method, "--captures-dir", str(captures),
         "--out", str(out), sshd.target],
        capture_output=True, text=True, timeout=120,
    )
    print(result.stdout, result.stderr)
    assert result.returncode == 0
    assert f"copying with {method}" in result.stderr
    assert row(result, sshd.target)[1:4] == ["ok", "1", "1"]
    assert tree(out / name / b.name) == tree(b)


def test_prune_collected_deletes_only_presses_verified_locally(sshd, tmp_path):
    captures = tmp_path / "dev1" / "captures"
    kept_safe, tampered = press(captures, "red", 1), press(captures, "green", 2)
    out = tmp_path / "field"
    assert collect(sshd, "--captures-dir", str(captures), "--out", str(out), "dev1").returncode == 0
    # The local copy of one press no longer matches the device: it must stay on the device.
    (out / "dev1" / tampered.name / "frame_1.jpg").write_bytes(b"not the same")
    new = press(captures, "blue", 3)

    result = collect(sshd, "--captures-dir", str(captures), "--out", str(out), "--prune-collected", "dev1")
    assert result.returncode == 0
    assert row(result, "dev1")[1:5] == ["ok", "1", "2", "2"]
    assert sorted(p.name for p in captures.iterdir()) == [tampered.name]
    assert tree(out / "dev1" / new.name)["result.json"]
    assert (out / "dev1" / kept_safe.name / "frame_0.jpg").is_file()


def test_a_failing_host_fails_the_run_not_the_others(sshd, fleet, tmp_path):
    caps, inventory = fleet
    missing = tmp_path / "nowhere"
    # dev4's rsync writes a terminal escape sequence and fails: shown cleaned, never raw.
    evil = tmp_path / "evil-rsync"
    evil.write_text("#!/bin/sh\nprintf '\\033]0;owned\\007 evil rsync\\n' >&2\nexit 3\n")
    evil.chmod(0o755)
    dev4 = tmp_path / "dev4" / "captures"
    press(dev4, "red", 1)
    inventory.write_text(inventory.read_text() + f'dev3 captures_dir="{missing}"\n'
                         + f'dev4 captures_dir="{dev4}" rsync_path="{evil}"\n')
    result = collect(sshd, "--inventory", str(inventory), "--out", str(tmp_path / "field"))
    assert result.returncode == 1
    assert row(result, "dev1")[1] == "ok" and row(result, "dev2")[1] == "ok"
    dev3 = " ".join(row(result, "dev3"))
    assert "FAILED" in dev3 and "does not exist on the device" in dev3
    dev4_row = " ".join(row(result, "dev4"))
    assert "FAILED" in dev4_row and "1 press(es) not copied completely" in dev4_row
    assert "evil rsync" in result.stderr and "\x1b" not in result.stdout + result.stderr and "\x07" not in result.stderr
    assert not any(p.name != ".incoming" for p in (tmp_path / "field" / "dev4").iterdir())


def test_a_second_run_into_the_same_folder_is_refused(sshd, fleet, tmp_path):
    """Two runs into one --out would race over its .incoming folders: the second stops before copying."""
    caps, inventory = fleet
    out = tmp_path / "field"
    out.mkdir()
    # Another collect.sh holding the lock (flock(2), as flock(1) takes it).
    with open(out / ".collect.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        busy = collect(sshd, "--inventory", str(inventory), "--out", str(out))
    assert busy.returncode == 2
    assert "another collect.sh is writing to" in busy.stderr
    assert not (out / "dev1").exists() and not (out / "dev2").exists()
    done = collect(sshd, "--inventory", str(inventory), "--out", str(out))
    assert done.returncode == 0 and row(done, "dev1")[1:3] == ["ok", "2"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "x", "--", "-oProxyCommand=touch /tmp/pwned"], "bad host"),
        (["--out", "x", "pi@-oProxyCommand=x"], "bad host"),
        # The user-name rule is flash.sh's too (deploy/ssh-common.sh): at most 32 characters.
        (["--out", "x", "a" * 33 + "@dev1"], "bad host"),
        (["dev1"], "no --out"),
        (["--out", "x", "--captures-dir", "rel/path", "dev1"], "plain absolute path"),
        (["--out", "x", "--transfer", "ftp", "dev1"], "--transfer"),
        (["--out", "x", "dev1", "dev1"], "listed twice"),
    ],
)
def test_usage_errors_exit_2(args, message, tmp_path):
    result = subprocess.run(["bash", str(COLLECT), *args], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_help_and_shellcheck():
    result = subprocess.run(["bash", str(COLLECT), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "--prune-collected" in result.stdout and "--inventory FILE" in result.stdout
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck not found: apt-get install shellcheck")
    check = subprocess.run([shellcheck, "-x", str(COLLECT)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


def test_collect_import_prepare_loop(sshd, tmp_path):
    """The loop of the README: collect from a device, label, import-captures, prepare ingests it."""
    captures = tmp_path / "dev1" / "captures"
    reds = [press(captures, "red", i) for i in range(3)]
    greens = [press(captures, "green", 10 + i) for i in range(2)]
    odd = press(captures, "yellow", 20)
    unlabelled = press(captures, "blue", 30)
    out = tmp_path / "field"
    assert collect(sshd, "--captures-dir", str(captures), "--out", str(out), "dev1").returncode == 0

    base = tmp_path / "pool"  # the existing photo set (stands in for ../shared/data/mushrooms)
    for k, (cls, colour) in enumerate((("red_cap", "red"), ("green_cap", "green"))):
        (base / cls).mkdir(parents=True)
        for i in range(3):
            # Seeds unlike the presses': the same noise on another colour hashes alike (a cross-class duplicate).
            colour_image(COLOURS[colour], size=(64, 48), seed=5000 + 100 * k + i).save(base / cls / f"pool_{i}.jpg")
    (base / "edibility.csv").write_text("class,edibility,common_name\nred_cap,poisonous,red cap\ngreen_cap,edible,green cap\n")
    labels = tmp_path / "labels.csv"
    runner = CliRunner()
    made = runner.invoke(train_app, ["import-captures", str(out), "--labels", str(labels), "--template"])
    assert made.exit_code == 0, made.output
    template = labels.read_text().splitlines()
    assert template[0] == "press,species,taxon,device_label,device_verdict"
    assert sorted(template[1:]) == sorted(f"dev1/{p.name},,,{c},UNSURE" for p, c in
                                          [*((r, "red") for r in reds), *((g, "green") for g in greens),
                                           (odd, "yellow"), (unlabelled, "blue")])
    again = runner.invoke(train_app, ["import-captures", str(out), "--labels", str(labels), "--template"])
    assert again.exit_code == 1 and "not overwriting" in again.stderr  # a person's half-filled file is safe
    labels.write_text(
        "press,species,taxon\n"
        + "".join(f"dev1/{p.name},red_cap,\n" for p in reds)
        + "".join(f"{p.name},green_cap,\n" for p in greens)
        + f"{odd.name},unknown,Hypholoma fasciculare\n"
        + f"{unlabelled.name},,\n"
    )
    data, other = tmp_path / "data", tmp_path / "other"
    result = runner.invoke(train_app, ["import-captures", str(out), "--labels", str(labels), "--out", str(data),
                                       "--base", str(base), "--other-out", str(other)])
    print(result.output)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (data / "red_cap").iterdir() if p.name.startswith("dev1-")) == sorted(
        f"dev1-{p.name}-frame_{i}.jpg" for p in reds for i in range(3))
    assert (data / "red_cap" / f"dev1-{reds[0].name}-frame_0.jpg").read_bytes() == (reds[0] / "frame_0.jpg").read_bytes()
    assert (data / "red_cap" / "pool_0.jpg").is_symlink()  # the pool is linked, never copied or written
    assert (data / "edibility.csv").read_bytes() == (base / "edibility.csv").read_bytes()
    assert sorted(p.name for p in (other / "hypholoma_fasciculare").iterdir()) == [
        f"dev1-{odd.name}-frame_{i}.jpg" for i in range(3)]
    assert "hypholoma_fasciculare,Hypholoma fasciculare,,unknown,3,field" in (other / "species.csv").read_text()
    assert not list(data.rglob(f"*{unlabelled.name}*"))

    work = tmp_path / "work"
    result = runner.invoke(train_app, ["prepare", str(data), "--out", str(work)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((work / "manifest.json").read_text())
    paths = {r["path"] for r in manifest["images"]} | {d["path"] for d in manifest["copies"] + manifest["dropped"]}
    assert f"red_cap/dev1-{reds[0].name}-frame_0.jpg" in paths
    assert manifest["labels"] == ["green_cap", "red_cap"]
    assert manifest["dropped"] == [] and manifest["skipped"] == []
    # The frames of one press are one scene: one duplicate group, one split, whatever their hashes.
    for p in reds + greens:
        frames = [r for r in manifest["images"] if f"-{p.name}-frame_" in r["path"]]
        assert len({r["group"] for r in frames}) == 1 and len({r["split"] for r in frames}) == 1, frames

    # Relabelling a press moves it; a misspelt species is one clear line.
    labels.write_text(f"press,species\n{reds[0].name},green_cap\n")
    assert runner.invoke(train_app, ["import-captures", str(out), "--labels", str(labels), "--out", str(data)]).exit_code == 0
    assert not list((data / "red_cap").glob(f"dev1-{reds[0].name}-*"))
    assert len(list((data / "green_cap").glob(f"dev1-{reds[0].name}-*"))) == 3
    labels.write_text(f"press,species\n{reds[0].name},gren_cap\n")
    bad = runner.invoke(train_app, ["import-captures", str(out), "--labels", str(labels), "--out", str(data)])
    assert bad.exit_code == 1
    assert "'gren_cap' is not a known class (red_cap, green_cap)" in bad.stderr
    assert "Traceback" not in bad.output


def test_prepare_groups_the_frames_of_a_press():
    from train import dataset

    def rec(path, phash):
        return dataset.ImageRecord(path, "x", path, f"{phash:016x}")

    far = [0x0, 0xFFFF, 0xFFFF0000FFFF0000]  # pairwise >= 16 bits apart: no near-duplicate link
    records = [rec(f"x/pi1-20260601-101500-1-UNSURE-frame_{i}.jpg", h) for i, h in enumerate(far)]
    records += [rec("x/pi1-20260601-101600-2-EDIBLE-frame_0.jpg", 0x00FF00FF00FF00FF), rec("x/frame_0.jpg", 0xF0F0F0F0F0F0F0F0)]
    groups = dataset.group_duplicates(records)
    assert groups[0] == groups[1] == groups[2]
    assert len({groups[0], groups[3], groups[4]}) == 3
