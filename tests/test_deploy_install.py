"""deploy/install.sh: the plan it prints (--dry-run), and a real run into a --root tree, twice."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from device.config import load_config
from tests.deploy_support.bundles import derive_bundle
from tests.deploy_support.devices import REPO, release_name

INSTALL = REPO / "deploy" / "install.sh"


def install(*args: str) -> subprocess.CompletedProcess:
    # With --skip venv the model step runs the checkout's `python3 -m device`: this venv's python3.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True, timeout=60, env=env)
    print(result.stdout, result.stderr)
    return result


def test_dry_run_prints_the_whole_plan_and_changes_nothing(tmp_path):
    result = install("--dry-run", "--source", str(REPO))
    assert result.returncode == 0
    out = result.stdout
    apt = next(line for line in out.splitlines() if "apt-get install" in line)
    for package in ("python3-picamera2", "python3-venv", "python3-lgpio", "i2c-tools"):
        assert package in apt.split()
    assert "--groups gpio,video,i2c mushcam" in out or "usermod --append --groups gpio,video,i2c mushcam" in out
    assert "-m venv --system-site-packages /opt/mushcam/venv" in out or "/opt/mushcam/venv/bin/python" in out
    pip = next(line for line in out.splitlines() if "pip install" in line)
    # The device gets the base package: no extras (the 'train' extra is where TensorFlow lives).
    assert pip.rstrip().endswith(f" {REPO}") and "[" not in pip and "tensorflow" not in pip
    assert "write /etc/systemd/system/mushcam.service" in out or "= /etc/systemd/system/mushcam.service" in out
    assert "+ systemctl enable mushcam" in out
    assert "dry run: nothing changed" in result.stderr

    # Under --root, a dry run creates nothing at all.
    plan = install("--dry-run", "--root", str(tmp_path / "pi"), "--skip", "venv")
    assert plan.returncode == 0
    assert "+ write" in plan.stdout
    assert not (tmp_path / "pi").exists()


def test_real_run_into_a_root_tree_is_idempotent(tmp_path, tiny_bundle):
    root = tmp_path / "pi"
    first = install("--root", str(root), "--skip", "venv", "--model", str(tiny_bundle))
    assert first.returncode == 0

    config = root / "etc" / "mushcam" / "config.toml"
    data = tomllib.loads(config.read_text())
    assert data["model_dir"] == "/var/lib/mushcam/models/current"
    assert data["status_file"] == "/run/mushcam/status.json"
    assert data["require_signature"] is False
    assert data["allowed_signers"] == "/etc/mushcam/allowed_signers"
    assert data["gpio"] == {"green": 17, "red": 27, "amber": 22, "button": 5}
    assert data["display"] == {"kind": "ssd1306", "i2c_port": 1, "i2c_address": 0x3C}
    assert data["captures"] == {"enabled": False, "dir": "/var/lib/mushcam/captures", "max_mb": 200}
    # The daemon's own loader accepts it as written.
    cfg = load_config(config)
    assert cfg.frames_per_press == 3 and cfg.camera == "picamera2"

    models = root / "var" / "lib" / "mushcam" / "models"
    assert (models / "releases").is_dir()
    captures = root / "var" / "lib" / "mushcam" / "captures"
    assert stat.S_IMODE(captures.stat().st_mode) == 0o750
    unit = root / "etc" / "systemd" / "system" / "mushcam.service"
    assert unit.read_text() == (REPO / "systemd" / "mushcam.service").read_text()
    assert "i2c-dev" in (root / "etc" / "modules-load.d" / "mushcam.conf").read_text().split()

    # The first model, laid out as flash.sh would: releases/<version>-<sha12> and a relative link.
    name = release_name(tiny_bundle)
    assert os.readlink(models / "current") == f"releases/{name}"
    assert (models / "current" / "model.tflite").read_bytes() == (tiny_bundle / "model.tflite").read_bytes()

    # Second run: the edited config and the deployed model survive; nothing is rewritten.
    config.write_text(config.read_text().replace("frames_per_press = 3", "frames_per_press = 5"))
    other = tmp_path / "other-model"
    shutil.copytree(tiny_bundle, other)
    second = install("--root", str(root), "--skip", "venv", "--model", str(other))
    assert second.returncode == 0
    assert "frames_per_press = 5" in config.read_text()
    assert "+ write" not in second.stdout
    assert os.readlink(models / "current") == f"releases/{name}"
    assert sorted(p.name for p in (models / "releases").iterdir()) == [name]


def test_rejects_unknown_steps_and_options(tmp_path):
    bad_step = install("--dry-run", "--skip", "apt,coffee")
    assert bad_step.returncode == 2 and "unknown step 'coffee'" in bad_step.stderr
    assert install("--frobnicate").returncode == 2
    not_checkout = install("--dry-run", "--source", str(tmp_path))
    assert not_checkout.returncode == 2 and "not a mushcam checkout" in not_checkout.stderr


def test_help_and_shellcheck():
    result = install("--help")
    assert result.returncode == 0 and "--dry-run" in result.stdout and "--root DIR" in result.stdout
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck not found: apt-get install shellcheck")
    check = subprocess.run([shellcheck, str(INSTALL)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


def test_a_card_version_that_is_a_path_is_refused(tmp_path, tiny_bundle):
    """Issue 12 item 6: version "../../../../../../ESCAPED" once made (and rm -rf'd) a directory outside --root."""
    bad = derive_bundle(tiny_bundle, tmp_path / "bad", version="../../../../../../ESCAPED")
    root = tmp_path / "sandbox" / "pi"
    result = install("--root", str(root), "--skip", "venv", "--model", str(bad))
    assert result.returncode == 2
    assert "not a plain name" in result.stderr and "nothing was installed" in result.stderr
    assert "Traceback" not in result.stderr
    assert not [p for p in tmp_path.rglob("*") if "ESCAPED" in p.name]
    models = root / "var" / "lib" / "mushcam" / "models"
    assert not (models / "current").exists() and list((models / "releases").iterdir()) == []


def test_mushcam_is_on_path_after_install(tmp_path, tiny_bundle):
    """/usr/local/bin/mushcam names the venv's (where it will be on the Pi), and the model step uses it."""
    root = tmp_path / "pi"
    venv_bin = root / "opt" / "mushcam" / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    # A stand-in venv: pip is a no-op, TensorFlow is absent, mushcam is this checkout's.
    (venv_bin / "python").write_text('#!/bin/sh\n[ "$1" = -c ] && exit 1\nexit 0\n')
    (venv_bin / "mushcam").write_text(f'#!/bin/sh\necho venv-mushcam >>"{tmp_path}/used"\n'
                                      f'PYTHONPATH="{REPO}" exec "{sys.executable}" -m device "$@"\n')
    for f in venv_bin.iterdir():
        f.chmod(0o755)
    result = install("--root", str(root), "--model", str(tiny_bundle))
    assert result.returncode == 0
    link = root / "usr" / "local" / "bin" / "mushcam"
    assert os.readlink(link) == "/opt/mushcam/venv/bin/mushcam"
    assert (tmp_path / "used").read_text().split() == ["venv-mushcam"]
    models = root / "var" / "lib" / "mushcam" / "models"
    assert os.readlink(models / "current") == f"releases/{release_name(tiny_bundle)}"
