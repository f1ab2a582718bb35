"""A throw-away OpenSSH server on 127.0.0.1 for the deploy tests (Debian's openssh-server).

Host and user keys are generated in a temporary directory; sshd runs with its own config file
(`-D -e -f cfg`), key login only, no PAM, so the tests exercise flash.sh over a real SSH connection.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def sshd_missing_reason() -> str | None:
    """Why an sshd cannot be started here, or None. CI installs openssh-server rsync (see docs/deploy.md)."""
    for tool in (SSHD, "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} not found: apt-get install openssh-server openssh-client"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SSHServer:
    """A running sshd plus what a client needs to reach it."""

    port: int
    user: str
    key: Path
    ssh_config: Path
    process: subprocess.Popen
    log: Path

    @property
    def target(self) -> str:
        """user@127.0.0.1:PORT, the form flash.sh takes."""
        return f"{self.user}@127.0.0.1:{self.port}"

    def ssh_args(self) -> list[str]:
        """Options for flash.sh (and ssh) to log in without prompts or known_hosts."""
        return [
            "-i", str(self.key),
            "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR",
        ]

    def run(self, command: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a command on the server (a quick check that the connection works)."""
        return subprocess.run(
            ["ssh", *self.ssh_args(), "-o", "BatchMode=yes", "-p", str(self.port), f"{self.user}@127.0.0.1", command],
            capture_output=True, text=True, check=check, timeout=30,
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_sshd(workdir: Path) -> SSHServer:
    """Start sshd on a free port on 127.0.0.1, with keys and config under `workdir`."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    host_key = workdir / "host_ed25519"
    user_key = workdir / "user_ed25519"
    for key in (host_key, user_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    authorized = workdir / "authorized_keys"
    shutil.copy(str(user_key) + ".pub", authorized)
    # Debian's sshd refuses to start without its privilege-separation directory.
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    user = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    log = workdir / "sshd.log"
    for _attempt in range(5):
        port = _free_port()
        cfg = workdir / "sshd_config"
        cfg.write_text(
            f"""Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile {workdir}/sshd.pid
AuthorizedKeysFile {authorized}
StrictModes no
UsePAM no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
Subsystem sftp internal-sftp
MaxStartups 64
MaxSessions 64
LogLevel ERROR
"""
        )
        with open(log, "ab") as log_file:
            proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(cfg)], stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                    if s.recv(4).startswith(b"SSH-"):
                        break
            except OSError:
                time.sleep(0.05)
        if proc.poll() is None:
            ssh_config = workdir / "ssh_config"
            server = SSHServer(port, user, user_key, ssh_config, proc, log)
            ssh_config.write_text(
                "\n".join(
                    f"""Host {alias}
    HostName 127.0.0.1
    Port {port}
    User {user}
    IdentityFile {user_key}
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    LogLevel ERROR
"""
                    for alias in ("dev1", "dev2", "dev3", "dev4")
                )
            )
            return server
    raise RuntimeError(f"sshd did not start; see {log}: {log.read_text()[-500:]}")
