"""device.config: a typed TOML config where every error names its key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from device import config as config_mod
from device.config import Config, load_config, parse_config, with_overrides
from device.errors import ConfigError

FULL = """
model_dir = "/srv/models/current"
camera = "opencv:0"
engine = "cpu"
threads = 2
frames_per_press = 5
require_signature = true
log_level = "debug"
camera_retry_s = 10

[gpio]
green = 23
red = 24
amber = 25
button = 6
pin_factory = "mock"

[display]
kind = "png"
i2c_address = 0x3D

[captures]
enabled = true
max_mb = 50
"""


def test_defaults_and_empty_file():
    assert parse_config("") == Config()
    c = Config()
    assert (c.engine, c.frames_per_press, c.gpio.button, c.display.kind, c.captures.enabled) == ("auto", 3, 5, "auto", False)


def test_full_file():
    c = parse_config(FULL, "full.toml")
    assert c.model_dir == "/srv/models/current" and c.camera == "opencv:0" and c.engine == "cpu"
    assert c.threads == 2 and c.frames_per_press == 5 and c.require_signature is True and c.log_level == "debug"
    assert c.camera_retry_s == 10.0 and isinstance(c.camera_retry_s, float)  # a TOML integer is fine for a float
    assert (c.gpio.green, c.gpio.red, c.gpio.amber, c.gpio.button, c.gpio.pin_factory) == (23, 24, 25, 6, "mock")
    assert c.gpio.bounce_ms == 100  # unset keys in a table keep their defaults
    assert c.display.kind == "png" and c.display.i2c_address == 0x3D
    assert c.captures.enabled and c.captures.max_mb == 50


def error_of(text: str, source="/etc/mushcam/config.toml") -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(text, source)
    msg = str(e.value)
    assert msg.startswith(source + ": ") and "\n" not in msg, msg
    return msg


def test_unknown_top_level_key_is_named():
    msg = error_of('enigne = "cpu"\n')
    assert "unknown key `enigne`" in msg and "engine" in msg  # lists the known keys


def test_unknown_key_in_a_table_is_named():
    msg = error_of("[gpio]\ngreen = 17\nbuton = 5\n")
    assert "unknown key `gpio.buton`" in msg and "button" in msg


def test_unknown_table_is_named():
    assert "unknown key `camera_settings`" in error_of("[camera_settings]\nfps = 30\n")


@pytest.mark.parametrize(
    "text, words",
    [
        ('threads = "two"', "`threads` must be int"),
        ("threads = 2.0", "`threads` must be int"),
        ("threads = true", "`threads` must be int"),
        ("require_signature = 1", "`require_signature` must be bool"),
        ("camera = 0", "`camera` must be str"),
        ('camera_retry_s = "30s"', "`camera_retry_s` must be float"),
        ("[captures]\nenabled = \"yes\"", "`captures.enabled` must be bool"),
        ("gpio = 17", "`gpio` must be a table"),
    ],
)
def test_wrong_type(text, words):
    assert words in error_of(text)


@pytest.mark.parametrize(
    "text, words",
    [
        ("frames_per_press = 0", "`frames_per_press` = 0 is outside 1..20"),
        ("frames_per_press = 21", "outside 1..20"),
        ("threads = -1", "`threads` = -1 is outside 0..64"),
        ("camera_retry_s = -0.5", "`camera_retry_s`"),
        ("[gpio]\nbutton = 54", "`gpio.button` = 54 is outside 0..53"),
        ("[display]\ni2c_address = 0x78", "`display.i2c_address`"),
        ("[captures]\nmax_mb = 0", "`captures.max_mb`"),
    ],
)
def test_out_of_range(text, words):
    assert words in error_of(text)


@pytest.mark.parametrize(
    "text, words",
    [
        ('engine = "tpu"', "`engine` = 'tpu'; valid: auto, cpu, edgetpu"),
        ('log_level = "verbose"', "`log_level`"),
        ('[gpio]\npin_factory = "fake"', "`gpio.pin_factory`"),
        ('[display]\nkind = "hdmi"', "`display.kind` = 'hdmi'; valid: auto, ssd1306, sh1106, png, none"),
    ],
)
def test_bad_choice(text, words):
    assert words in error_of(text)


def test_duplicate_pins():
    msg = error_of("[gpio]\ngreen = 5\n")  # the button's default pin
    assert "`gpio` pins must all differ" in msg and "'green': 5" in msg and "'button': 5" in msg


def test_empty_camera():
    assert "`camera` is empty" in error_of('camera = ""')


@pytest.mark.parametrize("text", ['engine = "cpu', "[gpio\n", "threads = 2\nthreads = 3\n", "= 3"])
def test_invalid_toml(text):
    assert "not valid TOML" in error_of(text)


def test_load_config_reads_a_file(tmp_path):
    p = tmp_path / "config.toml"
    p.write_text(FULL)
    assert load_config(p).engine == "cpu"


def test_load_config_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file") as e:
        load_config(tmp_path / "nope.toml")
    assert str(tmp_path / "nope.toml") in str(e.value)
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'camera = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="cannot read it"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read it"):
        load_config(tmp_path)  # a folder


def test_load_config_without_a_file_gives_defaults(monkeypatch, tmp_path):
    monkeypatch.setattr(config_mod, "DEFAULT_CONFIG", tmp_path / "absent.toml")
    assert load_config() == Config()
    (tmp_path / "absent.toml").write_text('engine = "cpu"\n')
    assert load_config().engine == "cpu"


def test_overrides_keep_file_values_for_none():
    c = with_overrides(parse_config(FULL), engine="edgetpu", camera=None)
    assert c.engine == "edgetpu" and c.camera == "opencv:0"


def test_resolved_model_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("MUSHCAM_MODEL", raising=False)
    monkeypatch.setattr(config_mod, "DEVICE_MODEL_DIR", tmp_path / "current")
    assert Config().resolved_model_dir() == config_mod.SHIPPED_MODEL  # a laptop: the bundle in the repo
    (tmp_path / "current").mkdir()
    assert Config().resolved_model_dir() == tmp_path / "current"  # an installed Pi
    monkeypatch.setenv("MUSHCAM_MODEL", "/env/model")
    assert Config().resolved_model_dir() == Path("/env/model")
    assert Config(model_dir="/explicit").resolved_model_dir() == Path("/explicit")  # the file wins


# --- issue 12 item 12 (and 11): what a config can abuse -------------------------------------------------


@pytest.mark.parametrize(
    "text, words",
    [
        ('model_dir = "models/current"', "`model_dir` = 'models/current' must be an absolute path"),
        ('allowed_signers = "signers"', "`allowed_signers` = 'signers' must be an absolute path"),
        ('status_file = "status.json"', "`status_file` = 'status.json' must be an absolute path"),
        ('[captures]\ndir = "captures"', "`captures.dir` = 'captures' must be an absolute path"),
        ('require_signature = true\nallowed_signers = ""', "`require_signature = true` needs `allowed_signers`"),
        ('[captures]\ndir = "/"', "`captures.dir` = '/' is a system folder"),
        ('[captures]\ndir = "/etc"', "`captures.dir` = '/etc' is a system folder"),
        ('[captures]\ndir = "/usr/share/mushcam"', "is a system folder"),
        ('[captures]\ndir = "/var/lib"', "is a system folder"),
        ('[captures]\ndir = "/var/lib/mushcam/../../lib"', "is a system folder"),
        ('[captures]\ndir = "/var/lib/mushcam/models"', "overlaps the model store"),
        ('[captures]\ndir = "/var/lib/mushcam/models/releases/x"', "overlaps the model store"),
        ('model_dir = "/srv/m/current"\n[captures]\ndir = "/srv/m"', "overlaps the model store"),
        ('status_file = "/etc/passwd"', "`status_file` = '/etc/passwd' is outside a runtime or state folder"),
        ('status_file = "/home/pi/status.json"', "outside a runtime or state folder"),
        ('status_file = "/run"', "outside a runtime or state folder"),
        ('status_file = "/var/lib/mushcam/models/current/model.json"', "inside the model store"),
        ('camera = "webcam"', "`camera`: unknown camera 'webcam'; valid kinds: fake, opencv, picamera2"),
        ('camera = "fake:"', "`camera`: camera 'fake' needs a path"),
        ('camera = "picamera2:left"', "picamera2 takes a camera number"),
    ],
)
def test_paths_and_camera_a_config_could_abuse_are_refused(text, words):
    assert words in error_of(text)


@pytest.mark.parametrize("camera", ["picamera2", "picamera2:1", "opencv", "opencv:0", "opencv:/dev/video0", "fake:/x/*.jpg"])
def test_valid_camera_specs(camera):
    assert parse_config(f'camera = "{camera}"').camera == camera


def test_the_installed_defaults_pass(tmp_path):
    c = parse_config('model_dir = "/var/lib/mushcam/models/current"\nstatus_file = "/run/mushcam/status.json"\n'
                     f'[captures]\nenabled = true\ndir = "{tmp_path / "captures"}"\n')
    assert c.captures.enabled and c.status_file == "/run/mushcam/status.json"


def test_a_captures_dir_that_is_a_symlink_to_root_is_refused(tmp_path):
    (tmp_path / "cap").symlink_to("/")
    assert "is a system folder" in error_of(f'[captures]\ndir = "{tmp_path / "cap"}"')


def test_machine_problems(tmp_path):
    from device.config import machine_problems

    c = parse_config(f'require_signature = true\nallowed_signers = "{tmp_path / "nope"}"\nmodel_dir = "{tmp_path / "m"}"\n')
    errors, warnings = machine_problems(c)
    assert len(errors) == 1 and "`allowed_signers`" in errors[0] and "refuse every bundle" in errors[0]
    assert len(warnings) == 1 and "`model_dir`" in warnings[0] and "does not exist yet" in warnings[0]
    (tmp_path / "nope").write_text("")
    (tmp_path / "m").mkdir()
    assert machine_problems(c) == ([], [])
