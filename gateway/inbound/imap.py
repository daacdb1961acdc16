"""IMAP adapter: one poller per [[imap]] mailbox turns its mails into ingest calls (DESIGN 2).

Exactly once: a mail's ingest commits, then the checkpoint (UIDVALIDITY, last UID)
commits, and only then is the message flagged, moved or deleted. A crash in between
re-fetches the mail on restart and the ingest answers DUPLICATE.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from datetime import datetime
from typing import Any

import structlog
from aioimaplib import aioimaplib
from aioimaplib.aioimaplib import CommandTimeout
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from gateway.inbound import imap_client as imap
from gateway.inbound import imap_plan as plan
from gateway.ingest.model import Envelope
from gateway.ingest.pipeline import Outcome, Pipeline
from gateway.settings_imap import ImapSettings
from store import imap_checkpoints
from store.engine import Store

log = structlog.get_logger("deskgate.imap")

LOCK_RETRY_S = 5.0


class MailboxPoller:
    """Reads one mailbox for ever: connect, catch up, IDLE or sleep, reconnect on failure."""

    def __init__(self, cfg: ImapSettings, pipeline: Callable[[], Pipeline], store: Store,
                 clock: Callable[[], datetime], ssl_context: ssl.SSLContext | None = None
                 ) -> None:
        self.cfg = cfg
        self.pipeline = pipeline  # read per mail: SIGHUP swaps the gateway's pipeline
        self.store = store
        self.clock = clock
        self.ssl_context = ssl_context
        self.log = log.bind(mailbox=cfg.name, department=cfg.department)
        self.failures = 0
        self.last_uid = 0
        self.lock_retry_s = LOCK_RETRY_S
        self.stopping = False
        self._lock_conn: AsyncConnection | None = None
        self._client: aioimaplib.IMAP4 | None = None
        # Lock connections stay out of the store's pool: one per mailbox, held for hours.
        self.lock_engine: AsyncEngine | None = None

    async def run(self) -> None:
        while not self.stopping:
            try:
                async with self._exclusive():
                    await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 — any failure: record, back off, retry
                if self.stopping:  # a driver turned our cancellation into its own error
                    raise asyncio.CancelledError from exc
                self.failures += 1
                reason = _describe(exc)
                delay = plan.backoff_delay(self.failures, rand=random.random)
                self.log.warning("imap.failed", error=reason, attempt=self.failures,
                                 retry_in_s=round(delay, 1))
                await self._record(last_error=reason)  # last_polled_at: last success only
                await asyncio.sleep(delay)

    @asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        """PostgreSQL: one poller per mailbox across instances (session advisory lock held on
        a dedicated connection; the server frees it when the holder's connection dies)."""
        if self.store.is_sqlite:
            yield
            return
        key = plan.lock_key(self.cfg.name)
        assert self.lock_engine is not None
        conn = await self.lock_engine.connect()
        try:
            while not await conn.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}):
                await conn.commit()
                await asyncio.sleep(self.lock_retry_s)
            await conn.commit()
            self.log.info("imap.lock_acquired")
            self._lock_conn = conn
            yield
        finally:
            self._lock_conn = None
            await asyncio.shield(_release(conn))

    async def abort(self) -> None:
        """Last resort at shutdown: drop the IMAP socket and the lock connection."""
        if self._client is not None:
            imap.close(self._client)
        if self._lock_conn is not None:
            with suppress(Exception):
                await asyncio.wait_for(self._lock_conn.invalidate(), 2)

    async def _still_locked(self) -> None:
        if self._lock_conn is not None:
            await self._lock_conn.execute(text("SELECT 1"))
            await self._lock_conn.commit()

    async def _session(self) -> None:
        client = self._client = await imap.connect(self.cfg, self.ssl_context)
        try:
            uidvalidity = await imap.select(client, self.cfg.folder)
            await self._resume(uidvalidity)
            if self.cfg.after_import.action == "move":
                await imap.ensure_folder(client, self.cfg.after_import.folder)
            if self.last_uid:
                # A crash between checkpoint and action left mails unflagged: finish the job.
                await imap.apply_action(client, self.cfg, f"1:{self.last_uid}")
            while not self.stopping:
                await self._catch_up(client)
                self.failures = 0
                await self._wait(client)
                await self._still_locked()
        finally:
            self._client = None
            await imap.logout(client)

    async def _resume(self, uidvalidity: int) -> None:
        async with self.store.transaction() as session:
            row = await imap_checkpoints.load(session, self.cfg.name)
            start = plan.resume(row.uidvalidity, row.last_uid, uidvalidity)
            if start.reset:
                self.log.warning("imap.uidvalidity_changed", old=row.uidvalidity,
                                 new=uidvalidity, last_uid=row.last_uid)
            await imap_checkpoints.save(session, self.cfg.name, uidvalidity=uidvalidity,
                                        last_uid=start.last_uid)
        self.last_uid = start.last_uid

    async def _catch_up(self, client: aioimaplib.IMAP4) -> None:
        uids = await imap.search_uids(client, self.last_uid)
        total = len(uids)
        await self._record(backlog=total, last_error=None, last_polled_at=self.clock())
        if total > self.cfg.batch_size:
            self.log.info("imap.import_started", pending=total, batch_size=self.cfg.batch_size)
        started, done = time.monotonic(), 0
        for batch in plan.batches(uids, self.cfg.batch_size):
            for uid, raw in await imap.fetch(client, batch):
                if uid <= self.last_uid:
                    continue
                await self._import(uid, raw)
                done += 1
                await self._checkpoint(uid, backlog=total - done)
                await imap.apply_action(client, self.cfg, str(uid))
            if plan.progress_due(done, total, self.cfg.batch_size):
                elapsed = max(time.monotonic() - started, 1e-6)
                self.log.info("imap.progress", done=done, total=total,
                              rate_per_s=round(done / elapsed, 1))

    async def _import(self, uid: int, raw: bytes) -> None:
        envelope = Envelope(mail_from=plan.envelope_sender(raw), rcpt_tos=(self.cfg.address,),
                            peer=f"imap:{self.cfg.name}", channel="imap")
        verdict = await self.pipeline().ingest(raw, envelope)
        if verdict.outcome is Outcome.REJECTED:
            raise imap.ImapProblem(f"uid {uid}: ingest rejected it: {verdict.reason}")
        self.log.info("imap.imported", uid=uid, outcome=verdict.outcome.value,
                      ticket=verdict.ticket_number)

    async def _checkpoint(self, uid: int, backlog: int) -> None:
        async with self.store.transaction() as session:
            await imap_checkpoints.save(session, self.cfg.name, last_uid=uid, backlog=backlog,
                                        last_polled_at=self.clock())
        self.last_uid = uid

    async def _wait(self, client: aioimaplib.IMAP4) -> None:
        """IDLE (RFC 2177) until the server reports new mail or the poll interval passes."""
        if not client.has_capability("IDLE"):
            await asyncio.sleep(self.cfg.poll_interval_s)
            return
        idle = await client.idle_start(timeout=self.cfg.poll_interval_s)
        while client.has_pending_idle() and not self.stopping:
            pushed = await client.wait_server_push()
            if pushed == aioimaplib.STOP_WAIT_SERVER_PUSH or any(
                    b"EXISTS" in bytes(line) for line in pushed):
                client.idle_done()
                break
        await asyncio.wait_for(idle, imap.COMMAND_TIMEOUT_S)

    async def _record(self, **values: Any) -> None:
        """Status for `deskgate imap status`; a store outage must not stop the poller."""
        try:
            async with self.store.transaction() as session:
                await imap_checkpoints.load(session, self.cfg.name)
                await imap_checkpoints.save(session, self.cfg.name, **values)
        except Exception as exc:  # noqa: BLE001 — status is best effort
            self.log.warning("imap.status_not_saved", error=type(exc).__name__)


async def _release(conn: AsyncConnection) -> None:
    """Unlock before the connection goes back to the pool: a pooled session keeps its
    advisory locks. If unlocking fails, drop the connection so the server ends the session."""
    try:
        await conn.execute(text("SELECT pg_advisory_unlock_all()"))
        await conn.commit()
        await conn.close()
    except Exception:  # noqa: BLE001 — the connection is broken: the lock died with it
        with suppress(Exception):
            await conn.invalidate()
            await conn.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, imap.ImapProblem):
        return str(exc)
    if isinstance(exc, TimeoutError | CommandTimeout):
        return "timed out waiting for the server"
    if isinstance(exc, OSError):
        return f"cannot connect: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"[:300]


class ImapPollers:
    """The supervised poller tasks of one instance; a failing mailbox never stops the others."""

    def __init__(self, mailboxes: Sequence[ImapSettings], pipeline: Callable[[], Pipeline],
                 store: Store,
                 clock: Callable[[], datetime], ssl_context: ssl.SSLContext | None = None
                 ) -> None:
        self.pollers = [MailboxPoller(m, pipeline, store, clock, ssl_context) for m in mailboxes]
        self.tasks: list[asyncio.Task[None]] = []
        self.lock_engine: AsyncEngine | None = None
        if self.pollers and not store.is_sqlite:
            self.lock_engine = create_async_engine(store.url, poolclass=NullPool)
            for poller in self.pollers:
                poller.lock_engine = self.lock_engine

    def start(self) -> None:
        for poller in self.pollers:
            task = asyncio.create_task(poller.run(), name=f"imap:{poller.cfg.name}")
            task.add_done_callback(_died)
            self.tasks.append(task)

    async def stop(self, timeout_s: float = 10.0) -> None:
        for poller in self.pollers:
            poller.stopping = True
        # Python 3.11's wait_for (inside aioimaplib) can swallow a cancellation that races
        # a reply; the stopping flag ends the loops, and a repeated cancel does the rest.
        deadline = asyncio.get_running_loop().time() + timeout_s
        pending = {task for task in self.tasks if not task.done()}
        while pending and asyncio.get_running_loop().time() < deadline:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.2)
        for poller, task in zip(self.pollers, self.tasks, strict=False):
            if task in pending:
                where = [f"{f.f_code.co_filename.rsplit('/', 1)[-1]}:{f.f_lineno}"
                         for f in task.get_stack(limit=8)]
                log.error("imap.poller_did_not_stop", task=task.get_name(), at=where)
                await poller.abort()
        self.tasks.clear()
        if self.lock_engine is not None:
            await self.lock_engine.dispose()


def _died(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("imap.poller_died", task=task.get_name(), error=repr(task.exception()))
