"""Run a command under the unit's SystemCallFilter=, as systemd would apply it, without systemd.

`python3 syscall_filter.py UNIT -- COMMAND...` (Debian's python3-seccomp, i.e. libseccomp): every
SystemCallFilter= line of UNIT is expanded with `systemd-analyze syscall-filter` (allow-list lines add,
`~` lines remove), any other call fails with the unit's SystemCallErrorNumber=, then COMMAND is
exec'd with the filter in place (it survives exec, with no_new_privs as under NoNewPrivileges=yes).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys


def expand(names: list[str]) -> set[str]:
    """System call names of groups (@...) and single calls, nested groups included."""
    out: set[str] = set()
    for name in names:
        if not name.startswith("@"):
            out.add(name)
            continue
        listing = subprocess.run(["systemd-analyze", "syscall-filter", name], capture_output=True, text=True,
                                 check=True).stdout
        members = [line.strip() for line in listing.splitlines()[1:] if line.strip() and not line.strip().startswith("#")]
        out |= expand(members)
    return out


def unit_filter(unit_text: str) -> tuple[set[str], int]:
    allowed: set[str] = set()
    error = errno.EPERM
    for raw in unit_text.splitlines():
        key, _, value = raw.strip().partition("=")
        if key == "SystemCallFilter":
            if value.startswith("~"):
                allowed -= expand(value[1:].split())
            else:
                allowed |= expand(value.split())
        elif key == "SystemCallErrorNumber":
            error = getattr(errno, value)
    return allowed, error


def main(argv: list[str]) -> int:
    import seccomp  # Debian: python3-seccomp

    unit, sep, command = argv[0], argv[1], argv[2:]
    assert sep == "--" and command, __doc__
    with open(unit, encoding="utf-8") as f:
        allowed, error = unit_filter(f.read())
    flt = seccomp.SyscallFilter(defaction=seccomp.ERRNO(error))
    for name in sorted(allowed):
        try:
            flt.add_rule(seccomp.ALLOW, name)
        except (RuntimeError, ValueError):
            pass  # not a system call on this architecture
    flt.load()
    os.execvp(command[0], command)
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
