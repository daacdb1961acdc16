"""sd_notify(3) without libsystemd: datagrams to $NOTIFY_SOCKET (READY, STATUS, WATCHDOG…)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger("deskgate.sdnotify")


class Notifier:
    """Talks to the service manager; a silent no-op when not started by one."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self.address = _address(environ.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval_s = _watchdog_interval_s(environ)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """One datagram of VAR=value lines; never raises, never blocks the loop."""
        if self.address is None:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            try:
                sock.sendto("\n".join(assignments).encode(), self.address)
            except OSError as exc:
                log.warning("sdnotify.failed", error=exc.strerror or type(exc).__name__)
                return False
        return True


def _address(value: str) -> str | bytes | None:
    if value.startswith("@"):  # abstract namespace socket (sd_notify(3))
        return b"\0" + value[1:].encode()
    return value if value.startswith("/") else None


def _watchdog_interval_s(environ: Mapping[str, str]) -> float | None:
    """Half of WATCHDOG_USEC (sd_watchdog_enabled(3)), when the watchdog is meant for us."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2 / 1_000_000
