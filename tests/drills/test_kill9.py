"""Crash drill: kill -9 the daemon mid-burst; every mail that got 250 survives, whole."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from sqlalchemy import func, select

from store.engine import Store
from store.models import Attachment, Message, Raw, Ticket
from tests.conftest import settings_text
from tests.mailbuild import make_mail, send

pytestmark = pytest.mark.drill
BURST = int(os.environ.get("DESKGATE_DRILL_MAILS", "300"))
KILL_AFTER = BURST // 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _mail(i: int) -> bytes:
    if i % 3:
        return make_mail(subject=f"Drill {i}", message_id=f"<drill{i}@example.org>",
                         sender=f"c{i % 17}@example.org", body=f"Body {i}\r\n" * 50)
    return (f"From: c{i % 17}@example.org\r\nTo: support@example.test\r\nSubject: Drill {i}\r\n"
            f"Message-ID: <drill{i}@example.org>\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
            "--b\r\nContent-Type: text/plain\r\n\r\nWith files.\r\n"
            "--b\r\nContent-Type: application/octet-stream\r\n"
            "Content-Disposition: attachment; filename=a.bin\r\n\r\n" + "A" * 20000 + "\r\n"
            "--b\r\nContent-Type: text/csv\r\nContent-Disposition: attachment; filename=b.csv"
            "\r\n\r\nx,y\r\n1,2\r\n--b--\r\n").encode()


async def _start(config: Path, port: int, *serve_args: str) -> subprocess.Popen[bytes]:
    """`deskgate serve` in its own process, returned once its port answers."""
    process = subprocess.Popen([sys.executable, "-m", "gateway.cli", "--config", str(config),
                                "serve", *serve_args], stderr=subprocess.DEVNULL)
    for _ in range(400):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return process
        except OSError:
            if process.poll() is not None:
                raise AssertionError(f"deskgate exited with {process.returncode}") from None
            await asyncio.sleep(0.05)
    raise AssertionError("deskgate did not start listening")


async def test_kill9_mid_burst_loses_no_acknowledged_mail(db_url: str, tmp_path: Path) -> None:
    port = _free_port()
    config = tmp_path / "deskgate.toml"
    config.write_text(settings_text(db_url).replace("127.0.0.1:0", f"127.0.0.1:{port}", 1)
                      .replace("max_attachment_bytes = 65536", "max_attachment_bytes = 10000")
                      # `make drill` sends 2000 mails: past the rate limits the kill never came
                      + "\n[inbound.rate_limits]\nper_sender = 0\nper_domain = 0\nper_ip = 0\n")
    subprocess.run([sys.executable, "-m", "gateway.cli", "--config", str(config), "db",
                    "upgrade"], check=True, capture_output=True)
    daemon = await _start(config, port)
    acknowledged: set[int] = set()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(BURST):
        queue.put_nowait(i)

    async def client() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            try:
                reply = await send(port, _mail(i), mail_from=f"c{i % 17}@example.org")
            except (OSError, aiosmtplib.SMTPException):
                continue
            if reply.code == 250:
                acknowledged.add(i)
                if len(acknowledged) == KILL_AFTER:
                    os.kill(daemon.pid, signal.SIGKILL)

    await asyncio.gather(*(client() for _ in range(10)))
    daemon.wait()
    assert daemon.returncode == -signal.SIGKILL
    assert KILL_AFTER <= len(acknowledged) < BURST

    restarted = await _start(config, port)  # recovers (WAL replay) and serves again
    try:
        assert (await send(port, make_mail(subject="after restart"))).code == 250
    finally:
        restarted.send_signal(signal.SIGTERM)
        assert restarted.wait(timeout=30) == 0
    await _check_store(db_url, acknowledged)


async def _check_store(db_url: str, acknowledged: set[int]) -> None:
    store = Store(db_url)
    try:
        async with store.transaction() as session:
            rows = (await session.execute(
                select(Message.message_id, Message.id, Message.raw_sha256, Message.ticket_id,
                       func.count(Attachment.id))
                .outerjoin(Attachment, Attachment.message_id == Message.id)
                .where(Message.message_id.like("drill%"))
                .group_by(Message.id))).all()
            raws = set(await session.scalars(select(Raw.sha256)))
            tickets = set(await session.scalars(select(Ticket.id)))
    finally:
        await store.dispose()
    stored: dict[int, Any] = {int(r[0][5:].split("@")[0]): r for r in rows}
    assert acknowledged <= stored.keys(), f"lost: {sorted(acknowledged - stored.keys())}"
    for i, row in stored.items():  # acknowledged or not, nothing is half-written
        assert row[2] in raws and row[3] in tickets, i
        assert row[4] == (0 if i % 3 else 2), f"drill{i}: {row[4]} attachments"
