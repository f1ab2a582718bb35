"""The device's model store, with one owner: install, activate, roll back and prune releases.

Layout under the model root (default /var/lib/mushcam/models; see docs/deploy.md):

    current -> releases/NAME   the daemon's model_dir: a relative link, switched by renaming a new one
    releases/NAME/             a verified bundle, NAME = <version>-<first 12 hex of model.tflite's sha256>
    releases/NAME.failed/      refused or abandoned: kept for a post-mortem, never served again
    releases/NAME.partial/     staging: what deploy/flash.sh copies in (a cut-off copy resumes here)
    releases/.tmp-*            an install in progress (a crash leaves one; the next install sweeps it)
    .lock                      flock(2): one mutating operation at a time

deploy/install.sh (`mushcam release install`) and deploy/flash.sh (`mushcam release receive`, which
holds the lock for the whole flash) both come through here, so the checks live in one place: a
bundle is copied in (regular files only, refused before any copy if it holds a symlink or a special
file), the *copy* is verified with `device.bundle.load_bundle`, and only that copy is ever served.
"""

from __future__ import annotations

import errno
import fcntl
import getpass
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

from device.bundle import CARD, Bundle, load_bundle, sha256_file
from device.errors import BundleError, LockError, ReleaseError

DEFAULT_ROOT = Path("/var/lib/mushcam/models")
LOCK_FILE = ".lock"
CURRENT = "current"
RELEASES = "releases"
FAILED = ".failed"
PARTIAL = ".partial"
TMP_PREFIX = ".tmp-"
SIGNATURE = "model.json.sig"
# A release name (and a card's version) is a plain file name: never a path, never hidden, never "..".
_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_COPY_CHUNK = 1 << 20


def plain_name(value: object, what: str = "release name") -> str:
    """`value` if it is a plain name (letters, digits, . _ + -; no leading dot), else ReleaseError."""
    if not isinstance(value, str) or not _PLAIN.fullmatch(value) or value.endswith((FAILED, PARTIAL)):
        raise ReleaseError(
            f"{what} {value!r} is not a plain name (letters, digits, . _ + -, at most 100); "
            "it would be used as a directory name on the device"
        )
    return value


def release_name(bundle: Bundle) -> str:
    """<version>-<sha12> of a verified bundle; the version is refused unless it is a plain name."""
    version = plain_name(bundle.card.get("version"), "the card's version")
    return f"{version}-{bundle.model_sha256[:12]}"


def check_tree(src: Path) -> list[tuple[str, bool]]:
    """(relative path, is_dir) of everything under `src`; ReleaseError on a symlink or special file.

    Runs before any copy, whatever brought the bundle here: a symlink in a bundle could make the copy
    read (and publish) a file the bundle's author never had, e.g. a private key.
    """
    src = Path(src)
    try:
        top = os.lstat(src)
    except OSError as e:
        raise ReleaseError(f"{src}: cannot read the bundle ({e.strerror})") from None
    if not stat.S_ISDIR(top.st_mode):
        raise ReleaseError(f"{src}: not a bundle directory")
    entries: list[tuple[str, bool]] = []
    pending = [""]
    while pending:
        rel = pending.pop()
        with os.scandir(src / rel if rel else src) as it:
            for entry in sorted(it, key=lambda e: e.name):
                path = f"{rel}/{entry.name}" if rel else entry.name
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    entries.append((path, True))
                    pending.append(path)
                elif stat.S_ISREG(mode):
                    entries.append((path, False))
                else:
                    kind = "a symlink" if stat.S_ISLNK(mode) else "a special file"
                    raise ReleaseError(
                        f"{src / path}: {kind}; a bundle holds only regular files and folders, "
                        "refused before any copy (re-export the bundle)"
                    )
    return entries


def _copy_file(src: Path, dest: Path) -> None:
    """Copy one regular file without following a symlink (a swap after check_tree is refused too)."""
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ReleaseError(f"{src}: not a regular file; refused")
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            while chunk := os.read(fd, _COPY_CHUNK):
                os.write(out, chunk)
            os.fsync(out)
        finally:
            os.close(out)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ReleaseError(f"{src}: a symlink; refused") from None
        raise ReleaseError(f"{src}: cannot copy it ({e.strerror})") from None
    finally:
        os.close(fd)
    # Readable by the daemon's user, writable only by whoever deploys, whatever the umask.
    os.chmod(dest, 0o644)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Entry:
    """One directory in releases/: its name, state (good, failed, partial) and arrival time."""

    name: str
    state: str
    mtime: float
    current: bool = False


@dataclass(frozen=True)
class Verify:
    """What a release must satisfy: the signature policy and, from a flash, the workstation's card."""

    require_signature: bool = False
    allowed_signers: Path | None = None
    card_sha256: str | None = None  # sha256 of the model.json the workstation pushed
    signature_sha256: str | None = None  # sha256 of its model.json.sig, if it had one


class ReleaseStore:
    """The release store under one model root."""

    def __init__(self, root: str | os.PathLike = DEFAULT_ROOT):
        self.root = Path(root)
        self.releases = self.root / RELEASES

    # --- lock --------------------------------------------------------------------------------------
    @contextmanager
    def locked(self, what: str, wait: float = 0.0) -> Iterator[None]:
        """Hold the model root's flock for one mutating operation (or a whole flash).

        `wait` seconds at most; then LockError naming the holder. The lock goes with the process, so a
        crashed or cut-off flash never leaves the device locked.
        """
        self._require_root()
        path = self.root / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            writable = True
        except PermissionError:
            # Made by another account (root during install.sh): flock works on a read-only handle.
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            writable = False
        try:
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
                        raise LockError(
                            f"{self.root} is locked by another release operation ({holder}); "
                            "try again when it has finished"
                        ) from None
                    time.sleep(0.1)
            if writable:
                info = f"pid {os.getpid()}, {what}, since {datetime.now().astimezone().isoformat(timespec='seconds')}"
                os.ftruncate(fd, 0)
                os.pwrite(fd, info.encode(), 0)
            yield
        finally:
            os.close(fd)  # closing the last handle releases the flock

    # --- reading ------------------------------------------------------------------------------------
    def _require_root(self) -> None:
        if not self.root.is_dir():
            raise ReleaseError(
                f"model root {self.root} does not exist on the device: run deploy/install.sh there, or check --model-root"
            )

    def current(self) -> str | None:
        """Name of the release `current` points at, or None; ReleaseError if `current` is not a link."""
        link = self.root / CURRENT
        if not link.is_symlink():
            if link.exists():
                raise ReleaseError(f"{link} is not a symlink; move it into {self.releases}/ and link it")
            return None
        return os.readlink(link).rstrip("/").rsplit("/", 1)[-1]

    def entries(self) -> list[Entry]:
        """Everything in releases/ (temporaries aside), newest first."""
        if not self.releases.is_dir():
            return []
        current = self.current()
        out = []
        for p in self.releases.iterdir():
            if p.name.startswith(".") or p.is_symlink() or not p.is_dir():
                continue
            state = "failed" if p.name.endswith(FAILED) else "partial" if p.name.endswith(PARTIAL) else "good"
            out.append(Entry(p.name, state, p.stat().st_mtime, p.name == current))
        return sorted(out, key=lambda e: (-e.mtime, e.name))

    def path(self, name: str) -> Path:
        return self.releases / plain_name(name)

    def exists(self, name: str) -> bool:
        p = self.path(name)
        return p.is_dir() and not p.is_symlink()

    def rollback_target(self) -> tuple[str, str]:
        """(current, the newest good release that is not current); ReleaseError if there is none."""
        current = self.current()
        if current is None:
            raise ReleaseError(f"{self.root / CURRENT} does not exist: nothing to roll back")
        for e in self.entries():
            if e.state == "good" and not e.current and (self.releases / e.name / CARD).is_file():
                return current, e.name
        raise ReleaseError(f"no earlier good release in {self.releases} to roll back to")

    # --- verifying ----------------------------------------------------------------------------------
    def verify(self, path: Path, policy: Verify) -> Bundle:
        """load_bundle on `path` (hashes, signature policy) and the workstation's card, if given."""
        bundle = load_bundle(
            path, check_sha=True, require_signature=policy.require_signature, allowed_signers=policy.allowed_signers
        )
        # Compare the hashes of the very bytes load_bundle verified and parsed (never a second read).
        if policy.card_sha256 is not None and bundle.card_sha256 != policy.card_sha256:
            raise ReleaseError(f"{path / CARD}: sha256 differs from the card that was pushed; the copy was changed")
        if policy.signature_sha256 is not None and bundle.signature_sha256 != policy.signature_sha256:
            raise ReleaseError(f"{path / SIGNATURE}: missing or differs from the signature that was pushed")
        release_name(bundle)  # the version must be a plain name before it names a directory
        return bundle

    # --- mutating (call these with the lock held) ------------------------------------------------
    def sweep_temporaries(self) -> list[str]:
        """Remove .tmp-* left by an install that crashed (only ever ours: the lock is held)."""
        removed = []
        if self.releases.is_dir():
            for p in self.releases.iterdir():
                if p.name.startswith(TMP_PREFIX) and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p.name)
        return removed

    def install(self, src: Path, policy: Verify = Verify(), expect_name: str | None = None,
                check: Callable[[Bundle], None] | None = None) -> tuple[str, Bundle]:
        """Copy bundle `src` in as releases/<version>-<sha12>; return (name, the verified copy).

        `check(bundle)` (the selftest) runs on the verified copy before it gets its final name. An
        install of the release that is current changes nothing (the running copy is never replaced).
        """
        src = Path(src)
        entries = check_tree(src)  # before any copy
        self._require_root()
        self.releases.mkdir(mode=0o755, exist_ok=True)
        self.sweep_temporaries()
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=self.releases))
        try:
            os.chmod(tmp, 0o755)
            for rel, is_dir in entries:
                if is_dir:
                    (tmp / rel).mkdir(mode=0o755)
                    os.chmod(tmp / rel, 0o755)
                else:
                    _copy_file(src / rel, tmp / rel)
            bundle = self.verify(tmp, policy)
            name = release_name(bundle)
            if expect_name is not None and name != expect_name:
                raise ReleaseError(f"{src}: the card makes release {name}, not {expect_name}")
            if check is not None:
                check(bundle)
            dest = self.releases / name
            if name == self.current():
                running = load_bundle(dest, check_sha=True)
                if running.card_sha256 != bundle.card_sha256:
                    # Same version and model file, another card (e.g. thresholds chosen again by
                    # `mushcam-train recalibrate`): serving either silently would be wrong, and the
                    # running copy is never replaced under the daemon. Say what to do instead.
                    raise ReleaseError(
                        f"{src}: release {name} is current on this device with another model.json (same "
                        "version and model file, other card); give the new bundle a new version (the "
                        "card's `version`) and push it again")
                shutil.rmtree(tmp)
                return name, self.verify(dest, policy)
            if dest.exists() or dest.is_symlink():
                old = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=self.releases))
                os.replace(dest, old / "old")
                os.rename(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, dest)
            os.utime(dest)  # arrival time: pruning and rollback order releases by it
            _fsync_dir(self.releases)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # The bundle now lives at dest: re-point the verified object there (same bytes, renamed).
        return name, _moved(bundle, dest)

    def activate(self, name: str | None) -> None:
        """Point `current` at releases/NAME atomically (a new link renamed over the old), or remove it."""
        self.current()  # refuses a `current` that is not a link
        link = self.root / CURRENT
        if name is None:
            link.unlink(missing_ok=True)
            return
        if not self.exists(name):
            raise ReleaseError(f"{self.releases / name} does not exist")
        tmp = self.root / f".current.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(f"{RELEASES}/{name}", tmp)
        os.replace(tmp, link)
        _fsync_dir(self.root)
        os.utime(self.releases / name)

    def mark_failed(self, name: str) -> str | None:
        """Rename releases/NAME (or NAME.partial) to NAME.failed; never the current one."""
        plain_name(name)
        if name == self.current():
            raise ReleaseError(f"not marking {name} failed: it is current")
        failed = self.releases / f"{name}{FAILED}"
        for src in (self.releases / name, self.releases / f"{name}{PARTIAL}"):
            if src.is_dir() and not src.is_symlink():
                if failed.exists():
                    shutil.rmtree(failed)
                os.rename(src, failed)
                os.utime(failed)
                return failed.name
        return None

    def prune(self, keep: int) -> list[str]:
        """Keep the newest `keep` good releases (current counts, never removed), the newest `keep`
        failed ones (for a post-mortem), no .partial copies and no temporaries."""
        if keep < 1:
            raise ReleaseError("keep must be at least 1")
        removed = self.sweep_temporaries()
        good = 1 if self.current() else 0
        failed = 0
        for e in self.entries():
            if e.current:
                continue
            if e.state == "partial":
                drop = True
            elif e.state == "failed":
                failed += 1
                drop = failed > keep
            else:
                good += 1
                drop = good > keep
            if drop:
                shutil.rmtree(self.releases / e.name)
                removed.append(e.name)
        return removed


def _moved(bundle: Bundle, dest: Path) -> Bundle:
    from dataclasses import replace

    samples = [replace(s, path=dest / s.path.relative_to(bundle.path)) for s in bundle.samples]
    return replace(bundle, path=dest, samples=samples)


# --- the running service ----------------------------------------------------------------------------
@dataclass
class Service:
    """The daemon as systemd runs it, and the status file it writes (device/daemon.py)."""

    status_file: Path = Path("/run/mushcam/status.json")
    systemctl: list[str] = field(default_factory=lambda: ["systemctl"])
    name: str = "mushcam"
    timeout: float = 30.0
    poll_s: float = 0.25

    @classmethod
    def from_options(cls, status_file: Path, systemctl: str, name: str, timeout: float) -> "Service":
        return cls(Path(status_file), shlex.split(systemctl), name, timeout)

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([*self.systemctl, *args], capture_output=True, text=True, timeout=60,
                                  stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ReleaseError(f"'{shlex.join(self.systemctl)} {' '.join(args)}' failed: {e}") from None

    def is_active(self) -> bool:
        return self._run("is-active", "--quiet", self.name).returncode == 0

    def state(self) -> str:
        return self._run("is-active", self.name).stdout.strip() or "unknown"

    def main_pid(self) -> int:
        """systemd's MainPID of the service (0 if it has none)."""
        out = self._run("show", "-p", "MainPID", "--value", self.name)
        try:
            return int(out.stdout.strip())
        except ValueError:
            return 0

    def reload(self) -> float:
        """Reload (SIGHUP) or, if it is not running, start the service; return when it was asked."""
        action = "reload" if self.is_active() else "start"
        since = time.time()
        out = self._run(action, self.name)
        if out.returncode != 0:
            why = (out.stderr or out.stdout).strip().splitlines()
            raise ReleaseError(f"'{shlex.join(self.systemctl)} {action} {self.name}' failed" + (f": {why[-1]}" if why else ""))
        return since

    def read_status(self) -> dict | None:
        try:
            with open(self.status_file, encoding="utf-8") as f:
                data = json.loads(f.read(1 << 20))
        except FileNotFoundError:
            return None
        except PermissionError:
            # Fails at once rather than after the timeout: waiting cannot fix a mode.
            raise ReleaseError(
                f"{self.status_file}: not readable by {getpass.getuser()}; the daemon writes it 0644 in "
                "RuntimeDirectory=/run/mushcam (mode 0755): is the unit the one deploy/install.sh installs?"
            ) from None
        except (OSError, ValueError, RecursionError):
            return None
        return data if isinstance(data, dict) else None

    def check(self, bundle: Bundle, since: float | None) -> tuple[dict | None, str]:
        """(status, "") if the daemon serves `bundle` (and wrote so after `since`), else (None, why).

        ReleaseError if the daemon wrote after `since` that it refused the reload.
        """
        status = self.read_status()
        if status is None:
            return None, f"no readable {self.status_file}"
        updated = status.get("updated")
        try:
            when = datetime.fromisoformat(updated).timestamp() if isinstance(updated, str) else None
        except ValueError:
            when = None
        fresh = since is None or (when is not None and when >= since)
        matches = (status.get("state") == "running" and status.get("model_version") == bundle.version
                   and status.get("model_sha256") == bundle.model_sha256)
        if not matches:
            # A refusal that keeps the old model still leaves `bundle` unserved: say why at once.
            if since is not None and fresh and status.get("last_reload_error"):
                raise ReleaseError(f"the daemon refused the reload: {status['last_reload_error']}")
            if status.get("state") != "running":
                return None, f"the status file says {status.get('state')!r}"
            return None, f"it reports {status.get('model_version')} ({str(status.get('model_sha256'))[:12]})"
        if not fresh:
            return None, "it was last written before the reload"
        pid = status.get("pid")
        main_pid = self.main_pid()
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or pid != main_pid:
            return None, f"its pid {pid!r} is not {self.name}'s MainPID {main_pid}"
        return status, ""

    def wait_serving(self, bundle: Bundle, since: float | None, timeout: float | None = None) -> dict:
        """Wait until the service is active and its status file reports `bundle` (see `check`)."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        why = "it is not active"
        while True:
            if self.is_active():
                status, why = self.check(bundle, since)
                if status is not None:
                    return status
            else:
                why = "it is not active"
            if time.monotonic() >= deadline:
                raise ReleaseError(
                    f"after {timeout:g}s {self.name} is '{self.state()}' and does not report "
                    f"{bundle.version} ({bundle.model_sha256[:12]}): {why}"
                )
            time.sleep(self.poll_s)


def serving(status: dict) -> str:
    """'VERSION (sha12), pid N' for a summary line."""
    return f"{status.get('model_version')} ({str(status.get('model_sha256'))[:12]}), pid {status.get('pid')}"


def _safe(text: str) -> str:
    """One line without control characters (a device's messages end up on a workstation's terminal)."""
    return re.sub(r"[\x00-\x1f\x7f-\x9f]", "?", " ".join(str(text).splitlines()))


# --- the operations behind the CLI --------------------------------------------------------------------
class Operations:
    """install / activate / rollback / receive, each under the lock, reporting through `log`."""

    def __init__(self, store: ReleaseStore, service: Service | None, policy: Verify,
                 selftest: bool = True, log: Callable[[str], None] = lambda _m: None):
        self.store, self.service, self.policy, self.selftest, self.log = store, service, policy, selftest, log

    def _check(self, bundle: Bundle) -> None:
        if self.selftest:
            from device.selftest import require_samples_pass

            require_samples_pass(bundle)

    def _serve(self, name: str, reload: bool, timeout: float | None = None) -> dict:
        """Wait until the daemon serves releases/NAME (after a reload if `reload`)."""
        assert self.service is not None
        bundle = load_bundle(self.store.path(name), check_sha=False)
        since = self.service.reload() if reload else None
        return self.service.wait_serving(bundle, since, timeout)

    def switch(self, name: str | None, previous: str | None) -> str:
        """Activate NAME and wait for the daemon to serve it; on failure go back to PREVIOUS.

        Returns what the daemon serves; ReleaseError(why; what was done about it) otherwise.
        """
        self.store.activate(name)
        if self.service is None or name is None:
            return "not checked (no service)"
        try:
            return serving(self._serve(name, reload=True))
        except ReleaseError as e:
            why = str(e)
        note = self._restore(previous)
        raise ReleaseError(f"{why}; {note}")

    def _restore(self, previous: str | None) -> str:
        try:
            self.store.activate(previous)
        except (ReleaseError, OSError) as e:
            return f"COULD NOT restore current to {previous or 'nothing'}: {e}"
        note = f"current back to {previous or 'nothing'}"
        if previous is not None and self.service is not None:
            try:
                note += f", serving {serving(self._serve(previous, reload=True))}"
            except ReleaseError as e:
                note += f", BUT the daemon does not report it: {e}"
        return note

    def install(self, src: Path, activate: bool, keep: int | None) -> str:
        with self.store.locked(f"install {src}"):
            previous = self.store.current()
            name, _bundle = self.store.install(src, self.policy, check=self._check)
            if name == previous:
                return f"{name} is already current"
            msg = f"installed {name}"
            if activate:
                try:
                    now = self.switch(name, previous)
                except ReleaseError as e:
                    self.store.mark_failed(name)
                    raise ReleaseError(f"{name}: {e}; marked failed") from None
                msg += f", now current (was {previous or 'nothing'}); daemon: {now}"
            if keep is not None:
                for removed in self.store.prune(keep):
                    self.log(f"removed {removed}")
            return msg

    def activate(self, name: str) -> str:
        with self.store.locked(f"activate {name}"):
            previous = self.store.current()
            self.verify_release(name)
            now = self.switch(name, previous)
            return f"{name} is current (was {previous or 'nothing'}); daemon: {now}"

    def verify_release(self, name: str) -> Bundle:
        if not self.store.exists(name):
            raise ReleaseError(f"{self.store.path(name)} does not exist (see `mushcam release list`)")
        bundle = self.store.verify(self.store.path(name), self.policy)
        self._check(bundle)
        return bundle

    def rollback(self, dry_run: bool = False) -> tuple[str, str, str]:
        """(status, release, detail) of rolling current back to the newest other good release."""
        with self.store.locked("rollback"):
            current, target = self.store.rollback_target()
            if dry_run:
                return "would roll back", target, f"dry run: from {current}"
            self.log(f"rolling back from {current} to {target}")
            try:
                self.verify_release(target)
                now = self.switch(target, current)
            except (ReleaseError, BundleError) as e:
                raise ReleaseError(f"{target} did not come up ({e})") from None
            # The release left behind is marked so that a second rollback goes further back, not forth.
            self.store.mark_failed(current)
            return "rolled back", target, f"serving {now}; {current} marked .failed"

    def receive(self, name: str, keep: int, read_go: Callable[[], str], say: Callable[[str, str], None]) -> tuple[str, str]:
        """The device side of one flash (deploy/flash.sh), under the lock from start to end.

        say("READY", ...) tells the workstation whether to copy into releases/NAME.partial; read_go()
        returns its next line: "clear" (empty the .partial), then "go" when the copy is complete (anything
        else: stop, changing nothing). Returns (status, detail) for the summary.
        """
        plain_name(name)
        with self.store.locked(f"flash of {name}"):
            previous = self.store.current()
            self.store.releases.mkdir(mode=0o755, exist_ok=True)
            if not os.access(self.store.releases, os.W_OK):
                raise ReleaseError(f"{self.store.releases} is not writable by {getpass.getuser()}")
            # A release of that name with another card (thresholds chosen again under the same version):
            # copied again, so the pushed card is what gets checked and served, never the stale one.
            need_copy = name != previous and not (self.store.exists(name) and self._same_card(name))
            say("READY", f"current={previous or ''}\tcopy={int(need_copy)}\trsync={int(shutil.which('rsync') is not None)}")
            while (command := read_go().strip()) == "clear":
                # Before an scp (which would nest a copy inside an existing directory).
                shutil.rmtree(self.store.releases / f"{name}{PARTIAL}", ignore_errors=True)
                say("CLEARED", name)
            if command != "go":
                return "FAILED", "the copy did not complete; current untouched"
            if name == previous:
                if not self._same_card(name):
                    return "FAILED", (f"{name} is current with another model.json (same version and model file, "
                                      "other card); give the bundle a new version and flash it again; current untouched")
                return self._check_current(name)
            was = previous or "nothing"
            self.log("checking the copy and running the selftest")
            try:
                if need_copy:
                    staged = self.store.releases / f"{name}{PARTIAL}"
                    self.store.install(staged, self.policy, expect_name=name, check=self._check)
                    shutil.rmtree(staged, ignore_errors=True)
                else:
                    self.log(f"{name} already on the device; not copying again")
                    self.verify_release(name)
            except (ReleaseError, BundleError) as e:
                self.store.mark_failed(name)
                return "FAILED", f"selftest: {e}; current untouched ({previous or 'none'})"
            self.log(f"switching current from {was} to {name}")
            try:
                now = self.switch(name, previous)
            except ReleaseError as e:
                self.store.mark_failed(name)
                return "FAILED", f"health: {e}"
            try:
                for removed in self.store.prune(keep):
                    self.log(f"removed {removed}")
            except (ReleaseError, OSError) as e:
                self.log(f"warning: pruning old releases failed: {e}")
            return "ok", f"serving {now} (was {was})"

    def _same_card(self, name: str) -> bool:
        """Whether releases/NAME holds the card the workstation pushed (True when none was named)."""
        if self.policy.card_sha256 is None:
            return True
        try:
            return sha256_file(self.store.path(name) / CARD) == self.policy.card_sha256
        except OSError:
            return False

    def _check_current(self, name: str) -> tuple[str, str]:
        self.log(f"{name} is already current; checking it")
        try:
            self.store.verify(self.store.path(name), self.policy)
        except (ReleaseError, BundleError) as e:
            # Not undone: it is what the device runs, and there is nothing better to go back to here.
            return "FAILED", f"already current but its files differ from the card: {e}; flash another release or fix by hand"
        if self.service is None:
            return "unchanged", "already current"
        try:
            try:
                status = self._serve(name, reload=False, timeout=2)
            except ReleaseError:
                status = self._serve(name, reload=True)
        except ReleaseError as e:
            return "FAILED", f"already current but the daemon does not report it: {e}"
        return "unchanged", f"already current, serving {serving(status)}"
