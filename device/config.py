"""The daemon's TOML configuration (/etc/mushcam/config.toml): typed, validated, every error names its key."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from device.errors import ConfigError

DEFAULT_CONFIG = Path("/etc/mushcam/config.toml")
DEVICE_MODEL_DIR = Path("/var/lib/mushcam/models/current")
REPO_ROOT = Path(__file__).resolve().parent.parent
# The bundle shipped in the repository (models/<name>/): what a laptop and `make demo` use.
SHIPPED_MODEL = REPO_ROOT / "models" / "mushcam-mnv2-7sp"


@dataclass
class GpioConfig:
    """BCM pin numbers (see the README's wiring table) and the pin factory."""

    green: int = 17
    red: int = 27
    amber: int = 22
    button: int = 5
    bounce_ms: int = 100
    pin_factory: str = "auto"  # auto: real pins on a Pi, gpiozero's MockFactory elsewhere; or "mock"


@dataclass
class DisplayConfig:
    kind: str = "auto"  # auto: ssd1306 on a Pi, png elsewhere; or ssd1306, sh1106, png, none
    i2c_port: int = 1
    i2c_address: int = 0x3C
    png_dir: str = "display"


@dataclass
class CapturesConfig:
    enabled: bool = False
    dir: str = "/var/lib/mushcam/captures"
    max_mb: int = 200


@dataclass
class Config:
    """All daemon settings; defaults suit a Pi installed by deploy/install.sh."""

    model_dir: str = ""  # empty: /var/lib/mushcam/models/current if present, else the shipped model
    camera: str = "picamera2"
    camera_jitter: bool = True  # fake camera only: the frames of one press differ slightly, as a real camera's do
    engine: str = "auto"
    threads: int = 0  # 0: one interpreter thread per core (device.engine.default_threads)
    frames_per_press: int = 3
    status_file: str = "/run/mushcam/status.json"
    require_signature: bool = False
    allowed_signers: str = "/etc/mushcam/allowed_signers"
    selftest_at_start: bool = True
    log_level: str = "info"
    camera_retry_s: float = 30.0  # give up (exit non-zero, systemd restarts us) after this long without frames
    gpio: GpioConfig = field(default_factory=GpioConfig)
    display: DisplayConfig = field(default_factory=DisplayConfig)
    captures: CapturesConfig = field(default_factory=CapturesConfig)

    def resolved_model_dir(self) -> Path:
        if self.model_dir:
            return Path(self.model_dir)
        env = os.environ.get("MUSHCAM_MODEL")
        if env:
            return Path(env)
        return DEVICE_MODEL_DIR if DEVICE_MODEL_DIR.exists() else SHIPPED_MODEL


_RANGES = {
    "frames_per_press": (1, 20),
    "threads": (0, 64),
    "bounce_ms": (0, 2000),
    "max_mb": (1, 1_000_000),
    "i2c_port": (0, 32),
    "i2c_address": (0x03, 0x77),
    "green": (0, 53),
    "red": (0, 53),
    "amber": (0, 53),
    "button": (0, 53),
    "camera_retry_s": (0, 86400),
}
_CHOICES = {
    "engine": ("auto", "cpu", "edgetpu"),
    "log_level": ("debug", "info", "warning", "error"),
    "pin_factory": ("auto", "mock", "lgpio", "rpigpio", "pigpio", "native"),
    "kind": ("auto", "ssd1306", "sh1106", "png", "none"),
}


def _build(cls, data: dict, prefix: str, source: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: `{prefix.rstrip('.')}` must be a table")
    known = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{source}: unknown key `{prefix}{key}` (known: {', '.join(known)})")
    values: dict[str, Any] = {}
    for name, f in known.items():
        if name not in data:
            continue
        value, key = data[name], f"{prefix}{name}"
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            values[name] = _build(type(default), value, key + ".", source)
            continue
        expected = type(default)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not expected:
            raise ConfigError(f"{source}: `{key}` must be {expected.__name__}, got {value!r}")
        if name in _RANGES and not _RANGES[name][0] <= value <= _RANGES[name][1]:
            lo, hi = _RANGES[name]
            raise ConfigError(f"{source}: `{key}` = {value} is outside {lo}..{hi}")
        if name in _CHOICES and value not in _CHOICES[name]:
            raise ConfigError(f"{source}: `{key}` = {value!r}; valid: {', '.join(_CHOICES[name])}")
        values[name] = value
    return cls(**values)


# Folders the captures must never be (pruning deletes inside it), nor be inside of (the system's own files).
_SYSTEM_DIRS = ("/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64", "/media", "/mnt", "/opt",
                "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var", "/var/lib", "/var/log",
                "/var/tmp", "/var/lib/mushcam")
_SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/sbin", "/sys", "/usr")
MODEL_STORE = DEVICE_MODEL_DIR.parent  # /var/lib/mushcam/models: releases/ and the `current` link


def _inside(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip("/") + "/")


def _real(path: str) -> str:
    """The path with symlinks resolved as far as they exist (a link to / is /)."""
    return os.path.realpath(path)


def _state_dirs() -> tuple[str, ...]:
    """Where a status file may live: runtime and state folders (and the temp folder, for tests and laptops)."""
    import tempfile

    dirs = ["/run", "/var/run", "/var/lib", "/var/tmp", "/tmp", tempfile.gettempdir()]
    if os.environ.get("XDG_RUNTIME_DIR"):
        dirs.append(os.environ["XDG_RUNTIME_DIR"])
    return tuple(_real(d) for d in dirs)


def _check_paths(cfg: Config, source: str) -> None:
    """Paths a config can abuse: each must be absolute, and the daemon's writes must stay in their place."""
    for key, value in (("model_dir", cfg.model_dir), ("allowed_signers", cfg.allowed_signers),
                       ("status_file", cfg.status_file), ("captures.dir", cfg.captures.dir)):
        if value and not os.path.isabs(value):
            raise ConfigError(f"{source}: `{key}` = {value!r} must be an absolute path (the service runs in /)")
    if cfg.require_signature and not cfg.allowed_signers:
        raise ConfigError(f"{source}: `require_signature = true` needs `allowed_signers` (the trusted keys' file)")
    cap = _real(cfg.captures.dir)
    if cap in _SYSTEM_DIRS or any(_inside(cap, t) for t in _SYSTEM_TREES):
        raise ConfigError(f"{source}: `captures.dir` = {cfg.captures.dir!r} is a system folder; use e.g. /var/lib/mushcam/captures")
    models = [_real(str(MODEL_STORE))] + ([_real(cfg.model_dir)] if cfg.model_dir else [])
    if any(_inside(cap, m) or _inside(m, cap) for m in models):
        raise ConfigError(f"{source}: `captures.dir` = {cfg.captures.dir!r} overlaps the model store; keep captures apart")
    if cfg.status_file:
        status = _real(cfg.status_file)
        if not any(_inside(status, d) and status != d for d in _state_dirs()):
            raise ConfigError(
                f"{source}: `status_file` = {cfg.status_file!r} is outside a runtime or state folder "
                "(/run, /var/lib, /tmp...); the daemon overwrites it"
            )
        if any(_inside(status, m) for m in models):
            raise ConfigError(f"{source}: `status_file` = {cfg.status_file!r} is inside the model store; the daemon overwrites it")


def machine_problems(cfg: Config) -> tuple[list[str], list[str]]:
    """(errors, warnings) about this machine rather than the file: what `check-config` adds to parsing.

    Error: `require_signature` with no allowed-signers file here (the daemon would refuse every bundle).
    Warning: `model_dir` does not exist (yet: deploy/flash.sh creates releases and the `current` link).
    """
    errors, warnings = [], []
    if cfg.require_signature and cfg.allowed_signers and not os.path.isfile(cfg.allowed_signers):
        errors.append(f"`allowed_signers` {cfg.allowed_signers} does not exist, and `require_signature = true` "
                      "makes the daemon refuse every bundle without it; create it with the trusted public keys")
    if cfg.model_dir and not os.path.isdir(cfg.model_dir):
        warnings.append(f"`model_dir` {cfg.model_dir} does not exist yet; the daemon will not start until a bundle is there")
    return errors, warnings


def parse_config(text: str, source: str = "<config>") -> Config:
    """Parse TOML text into a validated Config."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML ({e})") from None
    cfg = _build(Config, data, "", source)
    pins = {k: getattr(cfg.gpio, k) for k in ("green", "red", "amber", "button")}
    if len(set(pins.values())) != len(pins):
        raise ConfigError(f"{source}: `gpio` pins must all differ, got {pins}")
    if not cfg.camera:
        raise ConfigError(f"{source}: `camera` is empty")
    from device.camera import parse_camera_spec

    try:
        parse_camera_spec(cfg.camera)
    except ConfigError as e:
        raise ConfigError(f"{source}: `camera`: {e}") from None
    _check_paths(cfg, source)
    return cfg


def load_config(path: Path | None = None) -> Config:
    """Load `path`, or /etc/mushcam/config.toml when it exists, else the defaults (a laptop)."""
    if path is None:
        if not DEFAULT_CONFIG.exists():
            return Config()
        path = DEFAULT_CONFIG
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it ({e})") from None
    return parse_config(text, str(path))


def with_overrides(cfg: Config, **overrides: Any) -> Config:
    """A copy with command-line overrides applied (None means: keep the file's value)."""
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
