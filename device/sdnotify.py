"""A tiny systemd notifier: tell systemd we are ready, reloading, stopping or alive.

systemd hands a service the address of a datagram socket in ``NOTIFY_SOCKET`` (a path, or ``@name``
for the abstract namespace) and, when the unit sets ``WatchdogSec=``, the watchdog period in
``WATCHDOG_USEC``. Outside systemd (a laptop, a test) neither is set and every method is a no-op, so
the daemon calls them unconditionally.

No libsystemd binding: the protocol is one ``KEY=VALUE`` datagram per message, which is less code
than a dependency.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("mushcam.sdnotify")


class Notifier:
    """Send sd_notify messages to systemd, or do nothing when not run by systemd.

    Call :meth:`ready` only once the camera, model and signals are set up (``Type=notify`` units
    count the service as started from then on), and :meth:`watchdog` every
    :meth:`watchdog_interval` seconds from the main loop, so a hung loop gets the service restarted.
    """

    def __init__(self, address: str | None = None, environ: dict[str, str] | None = None):
        self._environ = os.environ if environ is None else environ
        if address is None:
            address = self._environ.get("NOTIFY_SOCKET") or None
        self._address = None
        self._socket = None
        if address is None:
            return
        if address.startswith("@"):
            # Abstract namespace sockets are spelt with a leading NUL byte in the socket API.
            address = "\0" + address[1:]
        elif not address.startswith("/"):
            log.warning("ignoring NOTIFY_SOCKET=%r: neither a path nor @name", address)
            return
        self._address = address
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        """True when running under systemd with a notify socket."""
        return self._socket is not None

    def notify(self, *fields: str) -> None:
        """Send one message made of ``KEY=VALUE`` fields (one per line); no-op outside systemd.

        A lost notification must never take the camera down, so send errors are logged, not raised.
        """
        if self._socket is None:
            return
        message = "\n".join(fields).encode("utf-8")
        try:
            self._socket.sendto(message, self._address)
        except OSError as e:
            log.warning("could not notify systemd (%s): %s", " ".join(fields), e)

    def ready(self) -> None:
        """Startup (or a reload) is complete: the service is up."""
        self.notify("READY=1")

    def reloading(self) -> None:
        """A reload has started; call :meth:`ready` when it is done.

        ``Type=notify-reload`` (systemd >= 253) wants the CLOCK_MONOTONIC time of the reload start
        alongside ``RELOADING=1`` to match it with the ``READY=1`` that ends it.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        """The service is shutting down."""
        self.notify("STOPPING=1")

    def watchdog(self) -> None:
        """Ping the watchdog: the main loop is alive."""
        self.notify("WATCHDOG=1")

    def status(self, text: str) -> None:
        """Set the one-line status shown by ``systemctl status`` (newlines are flattened)."""
        self.notify("STATUS=" + " ".join(text.splitlines()))

    def watchdog_interval(self) -> float | None:
        """Seconds between :meth:`watchdog` pings, or None when no watchdog is set.

        Half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3) recommends, so one slow iteration does
        not cost a restart. Ignored when ``WATCHDOG_PID`` names another process (the variables were
        inherited, not meant for us).
        """
        usec = self._environ.get("WATCHDOG_USEC")
        pid = self._environ.get("WATCHDOG_PID")
        if not usec:
            return None
        try:
            if pid and int(pid) != os.getpid():
                return None
            value = int(usec)
        except ValueError:
            log.warning("ignoring WATCHDOG_USEC=%r / WATCHDOG_PID=%r: not integers", usec, pid)
            return None
        return value / 2 / 1_000_000 if value > 0 else None

    def close(self) -> None:
        """Close the socket; safe to call twice."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
