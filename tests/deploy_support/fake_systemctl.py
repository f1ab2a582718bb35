"""A stand-in `systemctl` for one test device: `reload` plays the mushcam daemon's SIGHUP.

Usage: fake_systemctl.py --device DIR {reload,start,is-active [--quiet],show -p MainPID --value} SERVICE

Like the real daemon (device/daemon.py), `reload` returns at once and the "daemon" writes its status
file a moment later: from the `current` bundle's card, or, if DIR/refuse_reload exists, it keeps
the old model and records `last_reload_error` (as the daemon does when a new bundle fails to load).
DIR/stopped makes the service inactive; `start` activates it and returns once the status is written
(Type=notify: start waits for READY=1). The "daemon's" pid is kept in DIR/mainpid: `show -p MainPID
--value` prints it (0 when stopped) and the status file reports it; DIR/wrong_pid makes the status
report another pid (a stray process writing the status). DIR/reload_delay holds a slower reload's
seconds. Every call is appended to DIR/systemctl.log.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

RELOAD_DELAY_S = 0.3


def status_path(device: Path) -> Path:
    return device / "run" / "status.json"


def main_pid(device: Path) -> int:
    """The fake daemon's pid: fixed per device (a real pid is not needed, only that it is consistent)."""
    path = device / "mainpid"
    if not path.exists():
        path.write_text(str(40000 + os.getpid() % 20000))
    return int(path.read_text())


def write_status(device: Path) -> None:
    """What the daemon writes after a SIGHUP: the new model, or the old one and the reason."""
    path = status_path(device)
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = {}
    status = dict(old)
    pid = main_pid(device) + (1 if (device / "wrong_pid").exists() else 0)
    status.update(state="running", pid=pid, updated=datetime.now(timezone.utc).isoformat())
    if (device / "refuse_reload").exists():
        status["last_reload_error"] = (device / "refuse_reload").read_text().strip() or "refused by the test"
    else:
        current = device / "models" / "current"
        card = json.loads((current / "model.json").read_text())
        status.update(
            model_name=card.get("name"), model_version=card["version"],
            model_sha256=card["files"]["model.tflite"], model_path=str(current), last_reload_error=None,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(status))
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", type=Path, required=True)
    parser.add_argument("command")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("-p", dest="property")
    parser.add_argument("--value", action="store_true")
    parser.add_argument("service")
    args = parser.parse_args(argv)
    device = args.device
    with open(device / "systemctl.log", "a") as log:
        log.write(f"{args.command} {args.service}\n")
    active = not (device / "stopped").exists()
    if args.command == "is-active":
        if not args.quiet:
            print("active" if active else "inactive")
        return 0 if active else 3
    if args.command == "show":
        if args.property != "MainPID" or not args.value:
            print("fake systemctl: only `show -p MainPID --value` is supported", file=sys.stderr)
            return 1
        print(main_pid(device) if active else 0)
        return 0
    if args.command == "reload":
        if not active:
            print(f"{args.service}.service is not active, cannot reload.", file=sys.stderr)
            return 1
        # SIGHUP is asynchronous: the daemon answers after systemctl has returned.
        subprocess.Popen(
            [sys.executable, __file__, "--device", str(device), "_write-status", args.service],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        return 0
    if args.command == "start":
        (device / "stopped").unlink(missing_ok=True)
        write_status(device)
        return 0
    if args.command == "_write-status":
        delay = device / "reload_delay"
        time.sleep(float(delay.read_text()) if delay.exists() else RELOAD_DELAY_S)
        write_status(device)
        return 0
    print(f"fake systemctl: unsupported command {args.command}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
