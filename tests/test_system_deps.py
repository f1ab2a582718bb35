"""tests/system-deps.sh (what `make test` runs first): its decisions, against fake id/sudo/apt-get on PATH.

Nothing is installed: the fake apt-get records its arguments and "installs" a package by creating the
command the script looks for.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "system-deps.sh"
TOOLS = {"openssh-server": "sshd", "openssh-client": "ssh-keygen", "rsync": "rsync", "shellcheck": "shellcheck",
         "systemd": "systemd-analyze", "chromium": "chromium", "tmux": "tmux",
         # a module, not a command: looked for by "$MUSHCAM_SYSTEM_PYTHON -c 'import seccomp'", here a fake
         "python3-seccomp": "python3"}


def _exe(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)


@pytest.fixture
def fakebin(tmp_path):
    """A PATH with only fakes: `id -u` prints $FAKE_UID, `sudo -n true` succeeds iff $FAKE_SUDO=1."""
    b = tmp_path / "bin"
    b.mkdir()
    log = tmp_path / "apt.log"
    _exe(b / "id", 'echo "$FAKE_UID"')
    _exe(b / "sudo", f'echo "sudo $*" >>{log}; [[ $FAKE_SUDO == 1 ]] || exit 1; [[ $2 == true ]] && exit 0; shift; "$@"')
    # "install" = create each named package's command (as the real package would provide it).
    tools = " ".join(f"[{k}]={v}" for k, v in TOOLS.items())
    _exe(b / "apt-get", f'echo "apt-get $*" >>{log}; declare -A t=({tools}); '
                        f'for a in "$@"; do [[ -n ${{t[$a]:-}} ]] && printf "#!/bin/bash\\n" >{b}/${{t[$a]}} && chmod +x {b}/${{t[$a]}}; done; exit 0')
    _exe(b / "env", 'while [[ $1 == *=* ]]; do export "$1"; shift; done; "$@"')
    # The real chmod, so an "installed" fake is executable (the fake python3 must run, not just be found).
    (b / "chmod").symlink_to(shutil.which("chmod"))
    return b, log


def run(fakebin, *args, uid=1000, sudo=False, have=(), apt=True):
    b, log = fakebin
    for pkg in have:
        _exe(b / TOOLS[pkg], "")
    if not apt:
        (b / "apt-get").unlink(missing_ok=True)
    env = {"PATH": str(b), "MUSHCAM_SBIN_DIRS": "", "MUSHCAM_SYSTEM_PYTHON": "python3", "FAKE_UID": str(uid), "FAKE_SUDO": "1" if sudo else "0"}
    r = subprocess.run(["/bin/bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=30)
    return r, log.read_text() if log.exists() else ""


def test_everything_present_does_nothing(fakebin):
    r, log = run(fakebin, "--check", have=TOOLS)
    assert (r.returncode, r.stdout.strip()) == (0, "ok")
    r, log = run(fakebin, have=TOOLS)
    assert r.returncode == 0 and log == ""


def test_root_installs_only_the_missing(fakebin):
    have = [p for p in TOOLS if p not in ("rsync", "shellcheck")]
    r, _ = run(fakebin, "--check", uid=0, have=have)
    assert (r.returncode, r.stdout.strip()) == (0, "install: rsync shellcheck")
    r, log = run(fakebin, uid=0, have=have)
    assert r.returncode == 0, r.stderr
    lines = log.splitlines()
    assert lines[0].startswith("apt-get") and " update" in lines[0]  # the lists first: a fresh machine has none
    assert lines[1].startswith("apt-get") and lines[1].endswith("install -y -qq --no-install-recommends rsync shellcheck")
    assert "sudo" not in log


def test_a_user_with_passwordless_sudo_installs_through_it(fakebin):
    r, _ = run(fakebin, "--check", sudo=True, have=["tmux"])
    assert r.returncode == 0 and r.stdout.startswith("sudo: openssh-server openssh-client rsync")
    r, log = run(fakebin, sudo=True, have=["tmux"])
    assert r.returncode == 0, r.stderr
    assert "sudo -n apt-get" in log and "sudo -n env DEBIAN_FRONTEND=noninteractive apt-get" in log


@pytest.mark.parametrize("how", ["no sudo", "no apt-get"])
def test_otherwise_one_line_names_the_packages_and_fails(fakebin, how):
    kwargs = {"apt": False, "uid": 0} if how == "no apt-get" else {}
    r, log = run(fakebin, have=["tmux", "chromium"], **kwargs)
    assert r.returncode == 1 and log.count("apt-get") == 0
    msg = r.stderr.strip()
    assert len(msg.splitlines()) == 1
    assert "openssh-server openssh-client rsync shellcheck systemd" in msg and "apt-get install" in msg
    r, _ = run(fakebin, "--check", **kwargs)
    assert r.returncode == 1 and r.stdout.startswith("missing: ")


def test_named_packages_replace_the_test_list(fakebin):
    r, _ = run(fakebin, "--check", "tmux", uid=0)
    assert r.stdout.strip() == "install: tmux"
    r, _ = run(fakebin, "--check", "tmux", uid=0, have=["tmux"])
    assert r.stdout.strip() == "ok"


def test_the_makefile_runs_it_before_the_tests():
    makefile = (SCRIPT.parent.parent / "Makefile").read_text()
    assert "bash tests/system-deps.sh" in makefile
    assert "test: $(VENV)/.system-deps" in makefile


@pytest.mark.parametrize("script", ["tests/system-deps.sh", "deploy/pi-check.sh"])
def test_shellcheck(script):
    import shutil

    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck not found: apt-get install shellcheck (make test installs it)")
    path = SCRIPT.parent.parent / script
    check = subprocess.run([shellcheck, str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
