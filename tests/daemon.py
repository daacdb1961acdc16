"""A real `deskgate serve` subprocess with a test NOTIFY_SOCKET: start, signal, observe."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

from tests.conftest import settings_text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(path: Path, db_url: str, port: int, extra_top: str = "",
                 extra_departments: str = "") -> Path:
    # Only the first listen (inbound); [web] keeps port 0.
    text = settings_text(db_url).replace("127.0.0.1:0", f"127.0.0.1:{port}", 1)
    path.write_text(extra_top + text + extra_departments)
    return path


class NotifyListener:
    """The service manager's side of sd_notify: an AF_UNIX datagram socket (abstract name)."""

    def __init__(self) -> None:
        self.name = f"@deskgate-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + self.name[1:].encode())
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    async def expect(self, key: str, value: str | None = None, timeout_s: float = 30.0,
                     process: subprocess.Popen[bytes] | None = None) -> dict[str, str]:
        """The next datagram (from now) that sets `key` (to `value`); all are kept in order."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), 0.5)
            except TimeoutError:
                if process is not None and process.poll() is not None:
                    raise AssertionError(f"deskgate exited with {process.returncode}") from None
                continue
            message = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            self.messages.append(message)
            if key in message and (value is None or message[key] == value):
                return message
        raise AssertionError(f"no {key}={value or '*'} within {timeout_s}s: {self.messages}")

    def close(self) -> None:
        self.sock.close()


class Daemon:
    """`deskgate serve` as systemd would run it; always killed by `close()`."""

    def __init__(self, config: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log_path = log_path
        self.notify = NotifyListener()
        self.env = {**os.environ, "NOTIFY_SOCKET": self.notify.name, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> dict[str, str]:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "--config", str(self.config), "serve"],
                stderr=log, env=self.env)
        return await self.expect("READY", "1")

    async def expect(self, key: str, value: str | None = None,
                     timeout_s: float = 30.0) -> dict[str, str]:
        return await self.notify.expect(key, value, timeout_s, self.process)

    def signal(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def wait(self, timeout_s: float = 30.0) -> int:
        assert self.process is not None
        return await asyncio.to_thread(self.process.wait, timeout_s)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def events(self) -> list[str]:
        """The names of the events logged so far, in order (the log's JSON lines)."""
        return [json.loads(line)["event"] for line in self.log.splitlines()
                if line.startswith("{")]

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.notify.close()
