"""The daemon as systemd runs it: sd_notify, SIGTERM drains, SIGHUP reloads (issue 9)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from sqlalchemy import select

from store import queries
from store.engine import Store
from store.models import Message
from tests.daemon import Daemon, free_port, write_config
from tests.mailbuild import make_mail, send

SALES = """
[[departments]]
name = "Sales"
slug = "sales"
addresses = ["sales@example.test"]
"""


async def _tickets(db_url: str) -> list[dict[str, Any]]:
    store = Store(db_url)
    try:
        async with store.transaction() as session:
            return await queries.list_tickets(session)
    finally:
        await store.dispose()


async def _message_ids(db_url: str) -> list[str]:
    store = Store(db_url)
    try:
        async with store.transaction() as session:
            return list(await session.scalars(select(Message.message_id)))
    finally:
        await store.dispose()


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Factory: a started daemon on a free port; killed at the end whatever happened."""
    started: list[Daemon] = []

    async def factory(db_url: str, extra_top: str = "", env: dict[str, str] | None = None,
                      log_level: str = "warning") -> tuple[Daemon, int]:
        port = free_port()
        config = write_config(tmp_path / f"deskgate{len(started)}.toml", db_url, port, extra_top)
        config.write_text(config.read_text().replace(
            'log_level = "warning"', f'log_level = "{log_level}"'))
        process = Daemon(config, tmp_path / f"deskgate{len(started)}.log", env)
        started.append(process)
        await process.start()
        return process, port

    yield factory
    for process in started:
        process.close()


class RawSession:
    """A hand-driven SMTP client: lets a test stop in the middle of DATA."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> tuple[RawSession, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        session = cls(reader, writer)
        return session, await session.reply()

    async def reply(self) -> str:
        lines = []
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), 30)).decode()
            lines.append(line.rstrip())
            if len(line) < 4 or line[3] != "-":
                return "\n".join(lines)

    async def command(self, line: str) -> str:
        self.writer.write(line.encode() + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()


async def test_notify_sends_ready_status_watchdog_then_stopping(daemon: Any,
                                                                sqlite_url: str) -> None:
    process, _ = await daemon(sqlite_url, env={"WATCHDOG_USEC": "200000"}, log_level="info")
    ready = process.notify.messages[-1]
    assert ready["READY"] == "1" and ready["STATUS"] == "0 mails today"
    # the language model is loaded before the first mail, and frozen with the rest
    events = process.events
    assert events.index("ingest.language_model_ready") < events.index("memory.frozen")
    await process.expect("WATCHDOG", "1", timeout_s=5)
    await process.expect("WATCHDOG", "1", timeout_s=5)  # keeps pinging at half the interval
    process.signal(signal.SIGTERM)
    await process.expect("STOPPING", "1")
    assert await process.wait() == 0
    keys = [next(iter(m)) for m in process.notify.messages]
    assert keys[0] == "READY" and keys[-1] == "STOPPING"
    assert set(keys[1:-1]) == {"WATCHDOG"}, keys


async def test_sigterm_during_slow_data_stores_that_mail_and_refuses_new_clients(
        daemon: Any, sqlite_url: str) -> None:
    process, port = await daemon(sqlite_url)
    slow, banner = await RawSession.open(port)
    assert banner.startswith("220")
    try:
        assert (await slow.command("EHLO client.example.org")).startswith("250")
        assert (await slow.command("MAIL FROM:<jess@example.org>")).startswith("250")
        assert (await slow.command("RCPT TO:<support@example.test>")).startswith("250")
        assert (await slow.command("DATA")).startswith("354")
        mail = make_mail(subject="Slow one", message_id="<slow@example.org>")
        await slow.write(mail[:40])

        process.signal(signal.SIGTERM)
        await process.expect("STOPPING", "1")
        late, late_banner = await RawSession.open(port)
        late.close()
        assert late_banner.startswith("421 4.3.2"), late_banner

        await slow.write(mail[40:] + b".\r\n")
        assert (await slow.reply()).startswith("250 2.0.0 OK: ticket 1")
    finally:
        slow.close()
    assert await process.wait() == 0
    assert [t["subject"] for t in await _tickets(sqlite_url)] == ["Slow one"]


async def test_open_session_hears_421_at_its_next_mail_while_draining(
        daemon: Any, sqlite_url: str) -> None:
    process, port = await daemon(sqlite_url)
    idle, _ = await RawSession.open(port)
    busy, _ = await RawSession.open(port)
    try:
        await idle.command("EHLO client.example.org")
        await busy.command("EHLO client.example.org")
        await busy.command("MAIL FROM:<jess@example.org>")  # keeps the drain waiting
        process.signal(signal.SIGTERM)
        await process.expect("STOPPING", "1")
        assert (await idle.command("MAIL FROM:<jess@example.org>")).startswith("421 4.3.2")
        assert await idle.reader.read() == b""  # and the server hung up (RFC 5321 3.8)
        assert (await busy.command("RSET")).startswith("250")  # transaction over: drain ends
    finally:
        idle.close()
        busy.close()
    assert await process.wait() == 0


async def test_sigterm_during_a_burst_loses_nothing_and_exits_within_the_drain(
        daemon: Any, db_url: str) -> None:
    process, port = await daemon(db_url, extra_top="drain_timeout_s = 10\n")
    acknowledged: set[int] = set()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(80):
        queue.put_nowait(i)
    signalled_at: list[float] = []

    async def client() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            try:
                reply = await send(port, make_mail(subject=f"Burst {i}",
                                                   message_id=f"<burst{i}@example.org>"))
            except (OSError, aiosmtplib.SMTPException):
                continue  # refused (421) or gone: the sender would retry later
            if reply.code == 250:
                acknowledged.add(i)
                if len(acknowledged) == 20:
                    signalled_at.append(time.monotonic())
                    process.signal(signal.SIGTERM)

    await asyncio.gather(*(client() for _ in range(8)))
    assert await process.wait() == 0
    assert time.monotonic() - signalled_at[0] < 10
    stored = [m for m in await _message_ids(db_url) if m.startswith("burst")]
    assert len(stored) == len(set(stored)), "a mail was stored twice"
    assert {int(m[5:].split("@")[0]) for m in stored} >= acknowledged
    assert 20 <= len(acknowledged) < 80


async def test_sighup_adds_a_department_without_dropping_an_open_session(
        daemon: Any, sqlite_url: str) -> None:
    process, port = await daemon(sqlite_url)
    assert (await send(port, make_mail(to="sales@example.test"),
                       rcpts=("sales@example.test",))).code == 550
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=30, start_tls=False)
    await client.connect()
    try:
        await client.ehlo()
        process.config.write_text(process.config.read_text() + SALES)
        process.signal(signal.SIGHUP)
        await process.expect("RELOADING", "1")
        await process.expect("READY", "1")
        await client.mail("jess@example.org")
        assert (await client.rcpt("sales@example.test")).code == 250
        response = await client.data(make_mail(to="sales@example.test", subject="New dept"))
        assert response.code == 250
        await client.quit()
    finally:
        client.close()
    assert [(t["subject"], t["department"]) for t in await _tickets(sqlite_url)] == [
        ("New dept", "sales")]


async def test_sighup_with_a_broken_config_keeps_the_old_one_and_names_the_problem(
        daemon: Any, sqlite_url: str) -> None:
    process, port = await daemon(sqlite_url)
    process.config.write_text(process.config.read_text().replace(
        "max_message_bytes = 1048576", 'max_message_bytes = "lots"'))
    process.signal(signal.SIGHUP)
    await process.expect("RELOADING", "1")
    ready = await process.expect("READY", "1")
    assert ready["STATUS"].startswith("reload failed, previous configuration kept")
    assert (await send(port, make_mail(subject="Still here"))).code == 250
    assert "service.reload_failed" in process.events
    assert "inbound.max_message_bytes: must be an integer" in process.log
    process.signal(signal.SIGTERM)
    assert await process.wait() == 0


async def test_mails_today_in_status_counts_stored_mail(daemon: Any, sqlite_url: str) -> None:
    process, port = await daemon(sqlite_url)
    assert (await send(port, make_mail())).code == 250
    process.signal(signal.SIGHUP)  # a reload re-announces READY with a fresh STATUS
    assert (await process.expect("READY", "1"))["STATUS"] == "1 mails today"
