"""A capture relay for development and tests: every mail it is given becomes an .eml file."""

from __future__ import annotations

import asyncio
import os
from collections import deque
from dataclasses import dataclass
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

import structlog
from aiosmtpd.smtp import SMTP, Envelope, Session

log = structlog.get_logger("deskgate.catch")

R250_CAUGHT = "250 2.0.0 OK: caught"
R451_TEMPORARY = "451 4.3.0 Temporary failure, please try again later"
DISCONNECT = "disconnect"  # a fault that drops the connection after DATA, with no answer


@dataclass(frozen=True, slots=True)
class Caught:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes
    path: Path | None

    @property
    def message(self) -> Any:
        return message_from_bytes(self.content, policy=policy.default)


class CatchHandler:
    """aiosmtpd handler. `faults` answers the next DATAs (e.g. "451 …", DISCONNECT) for tests."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        self.caught: list[Caught] = []
        self.faults: deque[str] = deque()
        self.attempts = 0
        self.arrived = asyncio.Event()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.attempts += 1
        if self.faults:
            fault = self.faults.popleft()
            if fault == DISCONNECT:
                assert server.transport is not None
                server.transport.abort()
                return R451_TEMPORARY  # never reaches the client: the socket is gone
            return fault
        content = envelope.original_content or b""
        path = self._write(content) if self.directory else None
        caught = Caught(envelope.mail_from or "", tuple(envelope.rcpt_tos), content, path)
        self.caught.append(caught)
        self.arrived.set()
        log.info("catch.mail", to=list(caught.rcpt_tos), subject=caught.message["subject"],
                 file=str(path) if path else None)
        return R250_CAUGHT

    async def handle_exception(self, error: Exception) -> str:
        log.error("catch.error", error=type(error).__name__)
        return R451_TEMPORARY

    def _write(self, content: bytes) -> Path:
        assert self.directory is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{len(os.listdir(self.directory)) + 1:06d}-{os.urandom(4).hex()}.eml"
        tmp = self.directory / f".{name}.tmp"
        tmp.write_bytes(content)
        tmp.rename(self.directory / name)
        return self.directory / name


async def start_catcher(handler: CatchHandler, host: str, port: int) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: SMTP(handler, hostname="catcher.localhost", ident="deskgate catch"),
        host=host, port=port, reuse_address=True)


async def run_catcher(host: str, port: int, directory: Path) -> None:
    """`deskgate catch`: serve until SIGINT/SIGTERM."""
    server = await start_catcher(CatchHandler(directory), host, port)
    log.info("catch.ready", listen=f"{host}:{server.sockets[0].getsockname()[1]}",
             dir=str(directory))
    async with server:
        await server.serve_forever()
