"""Pressing the shutter without a button: `mushcam press`, SIGUSR1 and (laptop mode) Enter.

Every way in ends at the daemon's one press flag (``Daemon.request_press``), so presses from any source
coalesce like button presses do. `mushcam press` talks to the daemon over a Unix stream socket in its
runtime directory, beside the status file, with the status file's permissions: no network port, and
only the users who may read the status may press.

Protocol (one line each way): the client sends ``press`` or ``press wait``; the daemon answers
``ok <text>`` or ``error <text>``. For ``press wait`` the answer comes once the press that serves this
request has its verdict (``ok EDIBLE ...``), or ``error ...`` if that press failed.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from device.errors import MushcamError

log = logging.getLogger("mushcam.press")

SOCKET_NAME = "press.sock"
REQUEST_TIMEOUT_S = 2.0  # a client that connects and says nothing must not hold the accept loop


class PressError(MushcamError, OSError):
    """`mushcam press` could not reach a daemon, or the daemon could not answer."""


def socket_path(status_file: str | os.PathLike) -> Path:
    """The press socket of the daemon whose status file is ``status_file`` (same directory)."""
    return Path(status_file).parent / SOCKET_NAME


def _status_mode() -> int:
    # What write_json_atomic gives the status file: 0666 less the umask (0640 under the unit's UMask=0027).
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


class PressServer:
    """Accepts `mushcam press` connections on ``path`` and calls ``on_press(reply)`` for each press.

    ``reply`` is None for a plain press, or a callable taking (ok, text) that a waiting client's
    answer goes through (call it once; it closes the connection).
    """

    def __init__(self, path: str | os.PathLike, on_press: Callable[[Callable[[bool, str], None] | None], None]):
        self.path = Path(path)
        self.on_press = on_press
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._inode: int | None = None

    def start(self) -> None:
        """Bind and serve in a thread. Raises PressError if the socket cannot be made."""
        if self.path.exists() or self.path.is_symlink():
            if _answers(self.path):
                raise PressError(f"{self.path}: another mushcam daemon is already listening there")
            self.path.unlink()  # left by a daemon that was killed: nobody answers on it
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, _status_mode())
            sock.listen(8)
        except OSError as e:
            sock.close()
            raise PressError(f"cannot open the press socket {self.path}: {e}") from e
        self._inode = os.stat(self.path).st_ino
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="press-socket", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while self._sock is not None:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            try:
                self._handle(conn)
            except OSError as e:  # a client that went away mid-request costs nothing but its press
                log.warning("press socket: %s", e)
                conn.close()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(REQUEST_TIMEOUT_S)
        request = b""
        while b"\n" not in request and len(request) < 64:
            chunk = conn.recv(64)
            if not chunk:
                break
            request += chunk
        words = request.decode("ascii", "replace").split()
        if words == ["press"]:
            self.on_press(None)
            _send(conn, True, "press queued")
        elif words == ["press", "wait"]:
            conn.settimeout(None)
            self.on_press(lambda ok, text: _send(conn, ok, text))
        else:
            _send(conn, False, f"unknown request {request[:40]!r}; send 'press' or 'press wait'")

    def close(self) -> None:
        """Stop serving and remove the socket file (only if it is still ours); safe to call twice."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
        try:
            if os.stat(self.path).st_ino == self._inode:
                self.path.unlink()
        except OSError:
            pass


def _send(conn: socket.socket, ok: bool, text: str) -> None:
    try:
        conn.sendall(f"{'ok' if ok else 'error'} {text}\n".encode())
    except OSError as e:
        log.warning("press socket: could not answer a client (%s)", e)
    finally:
        conn.close()


def _answers(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def press(path: str | os.PathLike, wait: bool = False, timeout: float = 60.0) -> str:
    """Press the running daemon's shutter through ``path``; return its answer text.

    With ``wait`` the answer is the verdict line of the press. Raises PressError when there is no
    daemon, the daemon reports an error, or no answer comes within ``timeout`` seconds.
    """
    path = Path(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(path))
        except FileNotFoundError:
            raise PressError(f"no mushcam daemon: {path} does not exist; start one with `mushcam run`") from None
        except ConnectionRefusedError:
            raise PressError(f"no mushcam daemon is listening on {path} (it left a stale socket)") from None
        except PermissionError:
            raise PressError(f"not allowed to press through {path}: run as the daemon's user (or sudo)") from None
        except OSError as e:
            raise PressError(f"cannot reach the daemon at {path}: {e}") from None
        try:
            s.sendall(b"press wait\n" if wait else b"press\n")
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                answer += chunk
        except socket.timeout:
            raise PressError(f"no answer from the daemon at {path} within {timeout:g} s") from None
        except OSError as e:
            raise PressError(f"lost the daemon at {path}: {e}") from None
    finally:
        s.close()
    status, _, text = answer.decode("utf-8", "replace").strip().partition(" ")
    if status == "ok":
        return text
    raise PressError(text or f"the daemon at {path} closed the connection without an answer")


def watch_enter(on_press: Callable[[], None], stream=None) -> threading.Thread | None:
    """Laptop mode: every Enter on the terminal presses. Only when ``stream`` (stdin) is a terminal:
    under systemd, or with input piped in, stdin is not a keyboard."""
    stream = stream if stream is not None else sys.stdin
    try:
        if stream is None or not stream.isatty():
            return None
    except (ValueError, OSError):  # closed stdin
        return None

    if threading.current_thread() is threading.main_thread():
        # `mushcam run &` in a shell: a background process that reads its terminal gets SIGTTIN, whose
        # default action stops the whole daemon. Ignored, the read fails with EIO instead, and is retried.
        signal.signal(signal.SIGTTIN, signal.SIG_IGN)

    def read() -> None:
        while True:
            try:
                line = stream.readline()
            except OSError as e:
                if e.errno == errno.EIO:  # in the background for now: Enter works again once it is in front
                    time.sleep(1.0)
                    continue
                return
            except ValueError:  # stdin closed
                return
            if not line:
                return  # end of input (Ctrl-D): keep running, just without Enter
            on_press()

    thread = threading.Thread(target=read, name="enter-presses", daemon=True)
    thread.start()
    return thread

