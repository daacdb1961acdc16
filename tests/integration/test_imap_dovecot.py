"""IMAP ingestion against a real Dovecot on 127.0.0.1 (issue 7), on SQLite and PostgreSQL."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from sqlalchemy import func, select, update

from gateway.cli_imap import cmd_imap_status
from gateway.errors import StoreUnavailable
from store.models import ImapMailbox, Message, Ticket
from tests.dovecot import USERS, Dovecot, running
from tests.mailbuild import make_mail


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    yield from running()


def imap_table(dovecot: Dovecot, tmp_path: Path, user: str = "alice", password: str = "",
               **overrides: Any) -> str:
    secret = tmp_path / f"{user}.password"
    secret.write_text((password or USERS[user]) + "\n")
    values: dict[str, Any] = {
        "name": user, "host": "127.0.0.1", "port": dovecot.port, "tls": "none",
        "allow_plaintext": True, "user": user, "password_file": str(secret),
        "department": "support", "after_import": "seen", "poll_interval_s": 1,
        "batch_size": 50,
        # The tests preload mails before deskgate starts: import them (the default "now"
        # would start after them; test_imap_features.py covers both choices).
        "from": "all",
    } | overrides
    lines = ["[[imap]]"]
    for key, value in values.items():
        rendered = ("true" if value else "false") if isinstance(value, bool) else (
            str(value) if isinstance(value, int) else f'"{value}"')
        lines.append(f"{key} = {rendered}")
    return "\n".join(lines) + "\n"


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(0.05)


async def count(gw: Any, model: Any) -> int:
    query = select(func.count()).select_from(model)
    if model is Message:  # acknowledgements are messages too: count what came in
        query = query.where(Message.direction == "in")
    async with gw.store.transaction() as session:
        return int(await session.scalar(query))


async def checkpoint(gw: Any, name: str) -> ImapMailbox | None:
    async with gw.store.transaction() as session:
        return await session.scalar(select(ImapMailbox).where(ImapMailbox.name == name))


def mails(n: int, prefix: str = "Question") -> list[bytes]:
    return [make_mail(subject=f"{prefix} {i}", sender=f"Customer {i} <c{i}@example.org>",
                      message_id=f"<{prefix.lower()}-{i}-{time.monotonic_ns()}@example.org>")
            for i in range(n)]


async def test_new_mail_becomes_ticket_and_is_seen_only_after_commit(
        dovecot: Dovecot, make_gateway: Any, tmp_path: Path) -> None:
    dovecot.append(mails(2))
    gw = await make_gateway(extra=imap_table(dovecot, tmp_path))
    real_ingest = gw.pipeline.ingest
    failures = []

    async def store_down_once(raw: bytes, envelope: Any) -> Any:
        if not failures:
            failures.append(envelope)
            raise StoreUnavailable("store unavailable: test")
        return await real_ingest(raw, envelope)

    gw.pipeline.ingest = store_down_once
    await until(lambda: _has_error(gw, "alice"))
    flags = dovecot.flags()
    assert set(flags) == {1, 2} and not any(r"\Seen" in f for f in flags.values())
    assert await count(gw, Ticket) == 0
    await until(lambda: _tickets(gw, 2))
    await until(lambda: _flagged(dovecot, {1, 2}))
    assert failures[0].channel == "imap"
    assert failures[0].rcpt_tos == ("support@example.test",)
    row = await checkpoint(gw, "alice")
    assert row is not None and (row.last_uid, row.backlog, row.last_error) == (2, 0, None)
    assert row.uidvalidity == dovecot.uidvalidity("INBOX")


async def test_idle_wakes_the_poller_for_new_mail(dovecot: Dovecot, make_gateway: Any,
                                                  tmp_path: Path) -> None:
    # A 5-minute poll interval: only IDLE can bring the mail in within the few seconds.
    gw = await make_gateway(extra=imap_table(dovecot, tmp_path, poll_interval_s=300))
    await until(lambda: _polled(gw, "alice"))
    await asyncio.sleep(0.3)  # let the poller enter IDLE
    started = time.monotonic()
    await asyncio.to_thread(dovecot.append, mails(1, "Live"))
    await until(lambda: _tickets(gw, 1), timeout_s=10)
    assert time.monotonic() - started < 10


async def test_restart_after_crash_between_commit_and_flag_imports_nothing_twice(
        dovecot: Dovecot, make_gateway: Any, tmp_path: Path) -> None:
    dovecot.append(mails(3))
    table = imap_table(dovecot, tmp_path)
    gw = await make_gateway(extra=table)
    await until(lambda: _flagged(dovecot, {1, 2, 3}))
    await gw.stop(drain_timeout_s=5)
    # The crash: tickets committed, but neither the checkpoint nor the flags were written.
    dovecot.unflag(r"\Seen")
    async with gw.store.transaction() as session:
        await session.execute(update(ImapMailbox).values(last_uid=0))
    dovecot.append(mails(1, "After"))
    gw2 = await make_gateway(extra=table)
    await until(lambda: _flagged(dovecot, {1, 2, 3, 4}))
    await until(lambda: _last_uid(gw2, "alice", 4))
    assert await count(gw2, Ticket) == 4
    assert await count(gw2, Message) == 4


async def test_move_after_import_moves_to_processed(dovecot: Dovecot, make_gateway: Any,
                                                    tmp_path: Path) -> None:
    dovecot.append(mails(2))
    gw = await make_gateway(extra=imap_table(dovecot, tmp_path, after_import="move:Processed"))
    await until(lambda: _tickets(gw, 2))
    await until(lambda: _in_folder(dovecot, "INBOX", 0))
    assert len(dovecot.flags(folder="Processed")) == 2


async def test_delete_after_import_expunges(dovecot: Dovecot, make_gateway: Any,
                                            tmp_path: Path) -> None:
    dovecot.append(mails(2))
    gw = await make_gateway(extra=imap_table(dovecot, tmp_path, after_import="delete"))
    await until(lambda: _tickets(gw, 2))
    await until(lambda: _in_folder(dovecot, "INBOX", 0))


async def test_uidvalidity_change_reimports_nothing_twice(dovecot: Dovecot, make_gateway: Any,
                                                          tmp_path: Path) -> None:
    dovecot.create("Support")
    first = mails(2)
    dovecot.append(first, folder="Support")
    table = imap_table(dovecot, tmp_path, folder="Support")
    gw = await make_gateway(extra=table)
    await until(lambda: _last_uid(gw, "alice", 2))
    await gw.stop(drain_timeout_s=5)
    old = dovecot.uidvalidity("Support")
    dovecot.recreate("Support")  # same mails, new UIDVALIDITY, UIDs from 1 again
    dovecot.append([*first, *mails(1, "New")], folder="Support")
    assert dovecot.uidvalidity("Support") != old
    gw2 = await make_gateway(extra=table)
    await until(lambda: _last_uid(gw2, "alice", 3))
    assert await count(gw2, Ticket) == 3
    assert await count(gw2, Message) == 3
    row = await checkpoint(gw2, "alice")
    assert row is not None and row.uidvalidity == dovecot.uidvalidity("Support")


async def test_wrong_password_is_reported_and_other_mailbox_keeps_working(
        dovecot: Dovecot, make_gateway: Any, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    dovecot.append(mails(2), user="alice")
    dovecot.append(mails(1, "Bob"), user="bob")
    tables = (imap_table(dovecot, tmp_path, "alice")
              + imap_table(dovecot, tmp_path, "bob", password="wrong", department="billing"))
    gw = await make_gateway(extra=tables)
    await until(lambda: _has_error(gw, "bob"))
    await until(lambda: _tickets(gw, 2))
    bob = await checkpoint(gw, "bob")
    assert bob is not None and bob.last_error is not None
    assert "login as bob refused" in bob.last_error
    assert "wrong" not in bob.last_error  # never the password
    alice = await checkpoint(gw, "alice")
    assert alice is not None and alice.last_error is None and alice.last_uid == 2
    assert r"\Seen" not in dovecot.flags(user="bob")[1]
    capsys.readouterr()
    assert await cmd_imap_status(gw.settings, argparse.Namespace(json=True)) == 0
    out = capsys.readouterr().out  # the pollers' log lines share stdout in tests
    status = {row["name"]: row for row in json.loads(out[out.index("[\n"):])}
    assert (status["alice"]["last_uid"], status["alice"]["backlog"]) == (2, 0)
    assert status["alice"]["last_error"] is None and status["alice"]["last_poll"]
    assert "login as bob refused" in status["bob"]["last_error"]
    assert status["bob"]["last_poll"] is None  # never fetched successfully


async def test_first_import_of_500_mails_in_batches_reports_progress(
        dovecot: Dovecot, make_gateway: Any, tmp_path: Path, db_url: str) -> None:
    dovecot.append(mails(500, "Bulk"))
    with structlog.testing.capture_logs() as logs:
        started = time.monotonic()
        gw = await make_gateway(extra=imap_table(dovecot, tmp_path, batch_size=40))
        await until(lambda: _last_uid(gw, "alice", 500), timeout_s=100)
        elapsed = time.monotonic() - started

        async def progress_logged() -> bool:  # the last group's checkpoint commits first
            return any(e["event"] == "imap.progress" and e["done"] == 500 for e in logs)

        await until(progress_logged, timeout_s=10)
    assert await count(gw, Ticket) == 500
    progress = [e for e in logs if e["event"] == "imap.progress"]
    assert [e["done"] for e in progress][:3] == [40, 80, 120]
    assert progress[-1]["done"] == progress[-1]["total"] == 500
    assert any(e["event"] == "imap.import_started" and e["pending"] == 500 for e in logs)
    print(f"\nIMAP first import ({db_url.split(':')[0]}): 500 mails in {elapsed:.1f}s = "
          f"{500 / elapsed:.0f} mails/s")


async def _tickets(gw: Any, n: int) -> bool:
    return await count(gw, Ticket) == n


async def _has_error(gw: Any, name: str) -> bool:
    row = await checkpoint(gw, name)
    return row is not None and row.last_error is not None


async def _polled(gw: Any, name: str) -> bool:
    row = await checkpoint(gw, name)
    return row is not None and row.last_polled_at is not None


async def _last_uid(gw: Any, name: str, uid: int) -> bool:
    row = await checkpoint(gw, name)
    return row is not None and row.last_uid == uid


async def _flagged(dovecot: Dovecot, uids: set[int]) -> bool:
    flags = await asyncio.to_thread(dovecot.flags)
    return set(flags) == uids and all(r"\Seen" in f for f in flags.values())


async def _in_folder(dovecot: Dovecot, folder: str, n: int) -> bool:
    return len(await asyncio.to_thread(dovecot.flags, "alice", folder)) == n


async def test_two_instances_on_postgres_one_poller_and_takeover(
        dovecot: Dovecot, pg_url: str, tmp_path: Path) -> None:
    from gateway.service import Gateway
    from tests.conftest import make_settings

    settings = make_settings(pg_url, extra=imap_table(dovecot, tmp_path))
    first, second = Gateway(settings), Gateway(settings)
    second.imap.pollers[0].lock_retry_s = 0.2
    try:
        await first.start(port=0)
        await until(lambda: _polled(first, "alice"))
        await second.start(port=0)
        await asyncio.sleep(0.5)
        assert first.imap.pollers[0]._lock_conn is not None
        assert second.imap.pollers[0]._lock_conn is None  # waits for the lock
        await asyncio.to_thread(dovecot.append, mails(1, "One"))
        await until(lambda: _tickets(first, 1))
        await first.stop(drain_timeout_s=5)  # the holder goes away: its lock with it
        await asyncio.to_thread(dovecot.append, mails(1, "Two"))
        await until(lambda: _tickets(second, 2))
        assert second.imap.pollers[0]._lock_conn is not None
        assert await count(second, Message) == 2
    finally:
        await first.stop(drain_timeout_s=5)
        await second.stop(drain_timeout_s=5)


@pytest.fixture
def dovecot_tls() -> Iterator[Dovecot]:
    yield from running(tls=True)


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
async def test_tls_modes_log_in_and_import(dovecot_tls: Dovecot, make_gateway: Any,
                                           tmp_path: Path, tls: str) -> None:
    dovecot_tls.append(mails(1))
    port = dovecot_tls.tls_port if tls == "implicit" else dovecot_tls.port
    gw = await make_gateway(extra=imap_table(dovecot_tls, tmp_path, tls=tls, port=port,
                                             allow_plaintext=False,
                                             ca_file=str(dovecot_tls.ca_file)))
    await until(lambda: _tickets(gw, 1))
    row = await checkpoint(gw, "alice")
    assert row is not None and row.last_error is None


async def test_untrusted_certificate_is_a_clear_error(dovecot_tls: Dovecot, make_gateway: Any,
                                                      tmp_path: Path) -> None:
    dovecot_tls.append(mails(1))
    gw = await make_gateway(extra=imap_table(dovecot_tls, tmp_path, tls="implicit",
                                             port=dovecot_tls.tls_port, allow_plaintext=False))
    await until(lambda: _has_error(gw, "alice"))
    row = await checkpoint(gw, "alice")
    assert row is not None and "CERTIFICATE_VERIFY_FAILED" in (row.last_error or "")
    assert await count(gw, Ticket) == 0
