"""Stand-in mushcam devices for the flash.sh tests: a directory each, reached over the test sshd.

A device directory holds what a Pi keeps in /var/lib/mushcam/models and /run/mushcam, plus two
commands flash.sh runs on it: `bin/systemctl` (the fake daemon, fake_systemctl.py) and `bin/mushcam`
(the REAL `mushcam release receive` and selftest, i.e. `python -m device` from this checkout).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from tests.deploy_support import fake_systemctl
from tests.deploy_support.bundles import read_card

REPO = Path(__file__).resolve().parents[2]
FLASH = REPO / "deploy" / "flash.sh"


def release_name(bundle: Path) -> str:
    """<version>-<sha12>, as flash.sh names a bundle's release directory."""
    card = read_card(bundle)
    return f"{card['version']}-{card['files']['model.tflite'][:12]}"


def _script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


class Device:
    """One simulated Pi: models root, status file, fake systemctl and the real selftest."""

    def __init__(self, root: Path, alias: str):
        self.root = Path(root)
        self.alias = alias
        self.models = self.root / "models"
        self.status_file = fake_systemctl.status_path(self.root)
        self.allowed_signers = self.root / "allowed_signers"
        self.config = self.root / "config.toml"  # absent unless a test writes it
        bin_dir = self.root / "bin"
        bin_dir.mkdir(parents=True)
        self.models.mkdir()
        self.systemctl = _script(
            bin_dir / "systemctl",
            f'#!/bin/sh\nexec "{sys.executable}" "{fake_systemctl.__file__}" --device "{self.root}" "$@"\n',
        )
        # The device's `mushcam` is the real CLI of this checkout (device/ only, as on a Pi).
        self.mushcam = _script(
            bin_dir / "mushcam",
            f'#!/bin/sh\nPYTHONPATH="{REPO}" exec "{sys.executable}" -m device "$@"\n',
        )

    def inventory_line(self, **extra: str) -> str:
        """This device's line in a flash.sh inventory (host alias + its paths and commands)."""
        settings = {
            "model_root": str(self.models),
            "status_file": str(self.status_file),
            "systemctl": str(self.systemctl),
            "mushcam": str(self.mushcam),
            "allowed_signers": str(self.allowed_signers),
            "config": str(self.config),
            **extra,
        }
        return " ".join([self.alias, *(f'{k}="{v}"' for k, v in settings.items())])

    def options(self) -> list[str]:
        """The same settings as flash.sh options (for a device given as a plain HOST argument)."""
        return [
            "--model-root", str(self.models), "--status-file", str(self.status_file),
            "--systemctl", str(self.systemctl), "--mushcam", str(self.mushcam),
            "--allowed-signers", str(self.allowed_signers), "--device-config", str(self.config),
        ]

    def seed(self, bundle: Path, current: bool = True, mtime: float | None = None) -> str:
        """Install `bundle` as a release without flash.sh (and make it current and served)."""
        name = release_name(bundle)
        dest = self.models / "releases" / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(bundle, dest)
        if mtime is not None:
            os.utime(dest, (mtime, mtime))
        if current:
            link = self.models / ".current.seed"
            link.symlink_to(f"releases/{name}")
            os.replace(link, self.models / "current")
            fake_systemctl.write_status(self.root)
        return name

    def current(self) -> str | None:
        """Name of the release `current` points at."""
        link = self.models / "current"
        return os.readlink(link).rsplit("/", 1)[-1] if link.is_symlink() else None

    def releases(self) -> list[str]:
        """Sorted entries of releases/ (including .partial and .failed ones)."""
        rel = self.models / "releases"
        return sorted(p.name for p in rel.iterdir()) if rel.exists() else []

    def status(self) -> dict:
        """The status file the (fake) daemon wrote."""
        return json.loads(self.status_file.read_text())

    def reloads(self) -> int:
        """How many times `systemctl reload` was called."""
        log = self.root / "systemctl.log"
        return log.read_text().count("reload ") if log.exists() else 0
