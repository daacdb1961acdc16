"""IMAP drills with a real `deskgate serve` and a real Dovecot (issue 7): kill -9 between
commit and flag imports nothing twice; a big first import runs in flat memory.

DESKGATE_DRILL_MAILS sets the size of the memory drill (default 2000).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text

from store.engine import Store
from store.models import ImapMailbox, Message, Ticket
from tests.daemon import Daemon, free_port, write_config
from tests.dovecot import USERS, Dovecot, running
from tests.mailbuild import make_mail

pytestmark = pytest.mark.drill
MAILS = int(os.environ.get("DESKGATE_DRILL_MAILS", "2000"))


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    yield from running()


def config(tmp_path: Path, db_url: str, dovecot: Dovecot, **values: Any) -> Path:
    secret = tmp_path / "alice.password"
    secret.write_text(USERS["alice"] + "\n")
    table = {"name": "alice", "host": "127.0.0.1", "port": dovecot.port, "tls": "none",
             "allow_plaintext": True, "user": "alice", "password_file": str(secret),
             "department": "support", "poll_interval_s": 1} | values
    lines = ["[[imap]]"] + [
        f"{k} = {str(v).lower() if isinstance(v, bool) else v if isinstance(v, int) else repr(v)}"
        .replace("'", '"') for k, v in table.items()]
    return write_config(tmp_path / "deskgate.toml", db_url, free_port(),
                        extra_departments="\n" + "\n".join(lines) + "\n")


async def scalar(store: Store, query: Any) -> Any:
    async with store.read() as session:
        return await session.scalar(query)


async def until(check: Any, timeout_s: float = 30.0, daemon: Daemon | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if daemon is not None and daemon.process is not None and daemon.process.poll() is not None:
            raise AssertionError(f"deskgate exited: {daemon.log[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(0.1)


TRIGGER_SQLITE = ["CREATE TRIGGER fail_checkpoint BEFORE UPDATE OF last_uid ON imap_mailboxes "
                  "WHEN NEW.last_uid > 0 BEGIN SELECT RAISE(ABORT, 'injected failure'); END"]
TRIGGER_PG = ["CREATE FUNCTION fail_checkpoint() RETURNS trigger AS $$ BEGIN "
              "RAISE EXCEPTION 'injected failure'; END $$ LANGUAGE plpgsql",
              "CREATE TRIGGER fail_checkpoint BEFORE UPDATE OF last_uid ON imap_mailboxes "
              "FOR EACH ROW WHEN (NEW.last_uid > 0) EXECUTE FUNCTION fail_checkpoint()"]


async def _trigger(store: Store, create: bool) -> None:
    async with store.transaction() as session:
        if create:
            for statement in TRIGGER_SQLITE if store.is_sqlite else TRIGGER_PG:
                await session.execute(text(statement))
        else:
            await session.execute(text("DROP TRIGGER fail_checkpoint" +
                                       ("" if store.is_sqlite else " ON imap_mailboxes")))
            if not store.is_sqlite:
                await session.execute(text("DROP FUNCTION fail_checkpoint()"))


async def test_kill9_after_ingest_commit_before_checkpoint_imports_nothing_twice(
        dovecot: Dovecot, db_url: str, tmp_path: Path) -> None:
    store = Store(db_url)
    daemon = Daemon(config(tmp_path, db_url, dovecot), tmp_path / "serve.log")
    try:
        await _trigger(store, create=True)  # every checkpoint write fails from now on
        await daemon.start()
        await until(lambda: _first_contact(store), daemon=daemon)
        await asyncio.to_thread(dovecot.append, [
            make_mail(subject=f"Crash {i}", message_id=f"<crash-{i}@example.org>")
            for i in range(2)])
        # Ingest committed both mails (one fetch group); the checkpoint fails, so neither
        # is flagged.
        await until(lambda: _count(store, Ticket, 2), daemon=daemon)
        await asyncio.sleep(1.5)  # the poller retries: the same mails, duplicates each time
        assert await scalar(store, select(ImapMailbox.last_uid)) == 0
        assert not any(r"\Seen" in f for f in dovecot.flags().values())
        daemon.process.kill()  # type: ignore[union-attr]  # kill -9, mid-outage
        daemon.process.wait(10)  # type: ignore[union-attr]
        await _trigger(store, create=False)
        await daemon.start()
        await until(lambda: _done(store, dovecot, 2), daemon=daemon)
        assert await scalar(store, select(func.count()).select_from(Ticket)) == 2
        assert await scalar(store, select(func.count()).select_from(Message)
                            .where(Message.direction == "in")) == 2
    finally:
        daemon.close()
        await store.dispose()


async def test_kill9_after_checkpoint_before_move_imports_nothing_twice(
        dovecot: Dovecot, sqlite_url: str, tmp_path: Path) -> None:
    store = Store(sqlite_url)
    # A file where the Processed folder would go: CREATE and MOVE fail until it is removed.
    blocker = dovecot.root / "mail" / "alice" / ".Processed"
    dovecot.append([make_mail(subject="Moved 0", message_id="<moved-0@example.org>")])
    blocker.write_text("in the way\n")
    daemon = Daemon(config(tmp_path, sqlite_url, dovecot, after_import="move:Processed",
                           **{"from": "all"}), tmp_path / "serve.log")
    try:
        await daemon.start()
        await until(lambda: _count(store, Ticket, 1), daemon=daemon)
        await until(lambda: _checkpointed(store, 1), daemon=daemon)
        await asyncio.to_thread(dovecot.append, [
            make_mail(subject="Moved 1", message_id="<moved-1@example.org>")])
        await asyncio.sleep(1.5)  # the move keeps failing: mail 1 committed, never moved
        assert set(dovecot.flags()) == {1, 2}
        daemon.process.kill()  # type: ignore[union-attr]
        daemon.process.wait(10)  # type: ignore[union-attr]
        blocker.unlink()
        await daemon.start()
        await until(lambda: _folder(dovecot, "Processed", 2), daemon=daemon)
        assert dovecot.flags() == {}
        assert await scalar(store, select(func.count()).select_from(Ticket)) == 2
        assert await scalar(store, select(func.count()).select_from(Message)
                            .where(Message.direction == "in")) == 2
    finally:
        daemon.close()
        await store.dispose()


def _drill_mail(i: int) -> bytes:
    """Mostly small mails, every tenth with a 150 KB attachment: ~30 MB per 2,000."""
    if i % 10:
        return make_mail(subject=f"Drill {i}", sender=f"c{i % 97}@example.org",
                         message_id=f"<imap-drill-{i}@example.org>",
                         body=f"Question {i}\r\n" * 40)
    blob = ("QUJD" * 19 + "\r\n") * 2000
    return (f"From: c{i % 97}@example.org\r\nTo: support@example.test\r\n"
            f"Subject: Drill {i}\r\nMessage-ID: <imap-drill-{i}@example.org>\r\n"
            'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
            "--b\r\nContent-Type: text/plain\r\n\r\nScan attached.\r\n--b\r\n"
            "Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
            f"Content-Disposition: attachment; filename=scan{i}.pdf\r\n\r\n{blob}--b--\r\n"
            ).encode()


def _rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


@pytest.mark.timeout(900)
async def test_first_import_of_a_big_mailbox_runs_in_flat_memory(
        dovecot: Dovecot, db_url: str, tmp_path: Path) -> None:
    started = time.monotonic()
    await asyncio.to_thread(dovecot.append, (_drill_mail(i) for i in range(MAILS)))
    loaded = time.monotonic() - started
    total_bytes = sum(len(_drill_mail(i)) for i in range(MAILS))
    store = Store(db_url)
    daemon = Daemon(config(tmp_path, db_url, dovecot, batch_size=50, **{"from": "all"}),
                    tmp_path / "serve.log")
    samples: list[tuple[int, int]] = []  # (last UID, RSS KiB)
    try:
        await daemon.start()
        pid = daemon.process.pid  # type: ignore[union-attr]
        started = time.monotonic()
        while True:
            last_uid = await scalar(store, select(ImapMailbox.last_uid)) or 0
            samples.append((last_uid, _rss_kib(pid)))
            if last_uid >= MAILS:
                break
            if daemon.process.poll() is not None:  # type: ignore[union-attr]
                raise AssertionError(f"deskgate exited: {daemon.log[-2000:]}")
            assert time.monotonic() - started < 800, f"stuck at UID {last_uid}"
            await asyncio.sleep(0.25)
        elapsed = time.monotonic() - started
        peak = _rss_kib(pid, "VmHWM")
        assert await scalar(store, select(func.count()).select_from(Ticket)) == MAILS
    finally:
        daemon.close()
        await store.dispose()
    warm = next(rss for uid, rss in samples if uid >= MAILS // 4)  # after a quarter
    growth_mib = (max(rss for uid, rss in samples if uid >= MAILS // 4) - warm) / 1024
    print(f"\nIMAP drill ({db_url.split(':')[0]}): {MAILS} mails, {total_bytes / 2**20:.1f} MiB "
          f"(appended in {loaded:.1f}s), imported in {elapsed:.1f}s = "
          f"{MAILS / elapsed:.0f} mails/s; RSS after 25% {warm / 1024:.1f} MiB, "
          f"peak (VmHWM) {peak / 1024:.1f} MiB, growth after 25% {growth_mib:.1f} MiB")
    steps = [next(rss for uid, rss in samples if uid >= MAILS * k // 10) // 1024
             for k in range(1, 11)]
    print(f"RSS MiB at 10%, 20%, ... 100%: {steps}")
    # Flat: the last three quarters (three times the mail) add a few MiB at most, far less
    # than the mail they bring in.
    assert growth_mib < max(16.0, total_bytes / 2**20 / 4), steps


async def _first_contact(store: Store) -> bool:
    return await scalar(store, select(ImapMailbox.uidvalidity)) is not None


async def _count(store: Store, model: Any, n: int) -> bool:
    return await scalar(store, select(func.count()).select_from(model)) == n


async def _checkpointed(store: Store, uid: int) -> bool:
    return await scalar(store, select(ImapMailbox.last_uid)) == uid


async def _done(store: Store, dovecot: Dovecot, n: int) -> bool:
    flags = await asyncio.to_thread(dovecot.flags)
    return await _checkpointed(store, n) and len(flags) == n and all(
        r"\Seen" in f for f in flags.values())


async def _folder(dovecot: Dovecot, folder: str, n: int) -> bool:
    try:
        return len(await asyncio.to_thread(dovecot.flags, "alice", folder)) == n
    except Exception:  # noqa: BLE001 — the folder does not exist yet
        return False
