"""IMAP adapter: one poller per [[imap]] mailbox turns its mails into ingest calls (DESIGN 2).

Exactly once: a mail's ingest commits, then the checkpoint (UIDVALIDITY, last UID)
commits, and only then is the message flagged, moved or deleted. A crash in between
re-fetches the mail on restart and the ingest answers DUPLICATE.

The checkpoint is not folded into the ingest's transaction: the pipeline owns that
transaction and answers DUPLICATE, QUARANTINED or consumed without reaching the after-store
hooks, so a checkpoint written there would miss exactly the re-fetched mails. Commit, then
checkpoint, then flag keeps one rule for every outcome; the re-fetch costs one duplicate check.
"""

from __future__ import annotations

import asyncio
import hashlib
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
from gateway.inbound.imap_alert import AlertMail
from gateway.inbound.imap_oauth import TokenRevoked, TokenSource
from gateway.ingest.model import Envelope
from gateway.ingest.pipeline import Outcome, Pipeline
from gateway.settings import Settings
from gateway.settings_imap import ImapSettings
from gateway.web.metrics import Metrics
from store import imap_checkpoints, repo
from store.engine import Store
from store.models import Quarantine

log = structlog.get_logger("deskgate.imap")

LOCK_RETRY_S = 5.0
# Bodies fetched in one UID FETCH add up to at most this (one bigger mail goes alone):
# aioimaplib keeps a whole answer in memory, so this, not the mailbox, bounds the memory.
FETCH_BUDGET_BYTES = 8 * 2**20


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
        self.tokens = TokenSource(cfg)
        self.last_uid = 0
        self.history_below: int | None = None
        self.action_uid: int | None = None
        self.fetch_budget_bytes = FETCH_BUDGET_BYTES
        self.lock_retry_s = LOCK_RETRY_S
        self.stopping = False
        self.task: asyncio.Task[None] | None = None
        self._lock_conn: AsyncConnection | None = None
        self._client: aioimaplib.IMAP4 | None = None
        # Lock connections stay out of the store's pool: one per mailbox, held for hours.
        self.lock_engine: AsyncEngine | None = None
        self.metrics: Metrics | None = None
        self.alerts: AlertMail | None = None
        # Health (issue 7): failures in a row, since when, and the alert for a long outage.
        self.monotonic: Callable[[], float] = time.monotonic
        self.failures = 0
        self.last_error: str | None = None
        self.failing_since: datetime | None = None
        self.last_success_at: datetime | None = None
        self.last_success_s = self.monotonic()  # a fresh start gets the whole alert_after_s
        self.alerting = False
        self.alert_mailed = False
        self.waiting_for_lock = False

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
                delay = await self._failed(exc)
                await asyncio.sleep(delay)

    async def _failed(self, exc: Exception) -> float:
        self.failures += 1
        reason = self.last_error = describe(exc)
        self.failing_since = self.failing_since or self.clock()
        self.tokens.forget()  # a refused access token is not offered twice
        delay = plan.backoff_delay(self.failures, rand=random.random)
        if self.failures == plan.FAILING_AFTER:
            self.log.error("imap.failing", error=reason, attempts=self.failures,
                           since=self.failing_since.isoformat(), retry_in_s=round(delay, 1))
        else:
            self.log.warning("imap.failed", error=reason, attempt=self.failures,
                             retry_in_s=round(delay, 1))
        self._report()
        await self._record(last_error=reason)  # last_polled_at: last success only
        if isinstance(exc, TokenRevoked) and not self.alerting:
            await self._alert(reason)  # cannot mend itself: no point waiting alert_after_s
        return delay

    def health(self) -> dict[str, Any]:
        return {"error": self.last_error, "failures": self.failures, "alerting": self.alerting,
                "failing_since": _iso(self.failing_since),
                "last_success": _iso(self.last_success_at)}

    @property
    def failing(self) -> bool:
        return plan.is_failing(self.failures, self.alerting)

    async def check_alert(self) -> None:
        """The supervisor's tick: a mailbox without a successful fetch for alert_after_s."""
        if self.waiting_for_lock or self.stopping:
            return  # another instance reads this mailbox: its alert, not ours
        if plan.alert_due(self.monotonic(), self.last_success_s, self.cfg.alert_after_s,
                          self.alerting):
            silent_s = round(self.monotonic() - self.last_success_s)
            await self._alert(self.last_error or f"no successful fetch for {silent_s}s")
        elif self.alerting and not self.alert_mailed:
            await self._mail_alert(self.last_error or "no successful fetch")  # retry queueing

    async def _alert(self, reason: str) -> None:
        self.alerting, self.alert_mailed = True, False
        self.log.error("imap.alert", error=reason, alert_after_s=self.cfg.alert_after_s,
                       failing_since=_iso(self.failing_since),
                       last_success=_iso(self.last_success_at))
        self._report()
        await self._mail_alert(reason)

    async def _mail_alert(self, reason: str) -> None:
        if self.alerts is None:
            self.alert_mailed = True
            return
        try:
            await self.alerts.send(self.store, self.cfg, reason,
                                   self.failing_since or self.last_success_at)
            self.alert_mailed = True
        except Exception as exc:  # noqa: BLE001 — the store may be the outage: retry next tick
            self.log.error("imap.alert_not_queued", error=f"{type(exc).__name__}: {exc}"[:300])

    async def _succeeded(self, backlog: int) -> None:
        now = self.clock()
        if self.failures or self.alerting:
            self.log.info("imap.recovered", failures=self.failures, alerted=self.alerting,
                          failing_since=_iso(self.failing_since))
        values: dict[str, Any] = {"backlog": backlog, "last_error": None, "last_polled_at": now}
        if self.alerting:
            values["alerted_at"] = None
        self.failures, self.last_error, self.failing_since = 0, None, None
        self.alerting = self.alert_mailed = False
        self.last_success_at, self.last_success_s = now, self.monotonic()
        self._report()
        await self._record(**values)

    def _report(self) -> None:
        if self.metrics is not None:
            self.metrics.observe_imap(self.cfg.name, self.failures, self.alerting,
                                      self.last_success_at)

    @asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        """PostgreSQL: one poller per mailbox across instances (session advisory lock held on
        a dedicated connection; the server frees it when the holder's connection dies)."""
        if self.store.is_sqlite:
            yield
            return
        key = plan.lock_key(self.cfg.name)
        assert self.lock_engine is not None
        self.waiting_for_lock = False
        conn = await self.lock_engine.connect()
        try:
            while not await conn.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}):
                self.waiting_for_lock = True
                await conn.commit()
                await asyncio.sleep(self.lock_retry_s)
            await conn.commit()
            if self.waiting_for_lock:  # taken over: the outage clock starts now
                self.last_success_s = self.monotonic()
            self.waiting_for_lock = False
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
        client = self._client = await imap.connect(self.cfg, self.ssl_context,
                                                   secret=self.tokens.secret)
        try:
            info = await imap.select(client, self.cfg.folder)
            await self._resume(info, await imap.uidnext(client, info))
            if self.cfg.after_import.action == "move":
                await imap.ensure_folder(client, self.cfg.after_import.folder)
            if self.action_uid and self.action_uid <= self.last_uid:
                # A crash or failure between checkpoint and action left the last imported
                # group unflagged: finish the job (only that group: earlier ones were done).
                await imap.apply_action(client, self.cfg, f"{self.action_uid}:{self.last_uid}")
            while not self.stopping:
                await self._catch_up(client)
                await self._wait(client)
                await self._still_locked()
        finally:
            self._client = None
            await imap.logout(client)

    async def _resume(self, info: plan.FolderInfo, uidnext: int) -> None:
        assert info.uidvalidity is not None
        async with self.store.transaction() as session:
            row = await imap_checkpoints.load(session, self.cfg.name)
            start = plan.resume(row.uidvalidity, row.last_uid, info.uidvalidity, uidnext,
                                self.cfg.start_from, row.history_below)
            fresh = row.uidvalidity is None or start.reset
            if start.reset:
                self.log.warning("imap.uidvalidity_changed", old=row.uidvalidity,
                                 new=info.uidvalidity, last_uid=row.last_uid)
            elif fresh:
                self.log.info("imap.first_contact", start_from=self.cfg.start_from,
                              uidnext=uidnext, messages=info.exists,
                              history=uidnext - 1 if start.history_below else 0)
            self.action_uid = None if fresh else row.action_uid
            await imap_checkpoints.save(session, self.cfg.name, uidvalidity=info.uidvalidity,
                                        last_uid=start.last_uid,
                                        history_below=start.history_below,
                                        action_uid=self.action_uid)
        self.last_uid, self.history_below = start.last_uid, start.history_below

    async def _catch_up(self, client: aioimaplib.IMAP4) -> None:
        uids = await imap.search_uids(client, self.last_uid)
        total = len(uids)
        await self._succeeded(backlog=total)
        if total > self.cfg.batch_size:
            self.log.info("imap.import_started", pending=total, batch_size=self.cfg.batch_size)
        started, done = time.monotonic(), 0
        for batch in plan.batches(uids, self.cfg.batch_size):
            sized = await imap.sizes(client, batch)
            for step, group in plan.fetch_plan(sized, self.cfg.max_message_bytes,
                                               self.fetch_budget_bytes):
                if step == "skip":
                    await self._skip(client, *group[0])
                    done += 1
                    await self._checkpoint(group[0][0], total - done, action_uid=None)
                    continue
                imported = await self._import_group(client, [uid for uid, _ in group],
                                                    total - done)
                done += len(imported)
            if plan.progress_due(done, total, self.cfg.batch_size):
                elapsed = max(time.monotonic() - started, 1e-6)
                self.log.info("imap.progress", done=done, total=total,
                              rate_per_s=round(done / elapsed, 1))

    async def _import_group(self, client: aioimaplib.IMAP4, uids: list[int], backlog: int
                            ) -> list[int]:
        """Fetch, ingest each (its own commit), then one checkpoint and one action for the
        group: a crash re-fetches at most this group, and the duplicates are recognised."""
        imported: list[int] = []
        try:
            for uid, raw in await imap.fetch(client, uids):
                if uid > self.last_uid:
                    await self._import(uid, raw)
                    imported.append(uid)
        except Exception:
            if imported:  # keep what committed: the retry starts after it
                await self._checkpoint(imported[-1], backlog - len(imported), imported[0])
            raise
        if imported:
            await self._checkpoint(imported[-1], backlog - len(imported), imported[0])
            await imap.apply_action(client, self.cfg, plan.uid_set(imported))
        return imported

    async def _import(self, uid: int, raw: bytes) -> None:
        history = plan.is_history(uid, self.history_below)
        envelope = Envelope(mail_from=plan.envelope_sender(raw), rcpt_tos=(self.cfg.address,),
                            peer=f"imap:{self.cfg.name}", channel="imap", history=history)
        verdict = await self.pipeline().ingest(raw, envelope)
        if verdict.outcome is Outcome.REJECTED:
            raise imap.ImapProblem(f"uid {uid}: ingest rejected it: {verdict.reason}")
        if self.metrics is not None:
            self.metrics.imap_mail(self.cfg.name, verdict.outcome.value)
        self.log.info("imap.imported", uid=uid, outcome=verdict.outcome.value,
                      ticket=verdict.ticket_number, history=history or None)

    async def _skip(self, client: aioimaplib.IMAP4, uid: int, size: int) -> None:
        """Too big to import: left in the mailbox untouched, its header kept in quarantine
        so a person sees what it was (never a silent skip)."""
        limit = self.cfg.max_message_bytes
        header = await imap.fetch_header(client, uid)
        raw = (f"X-Deskgate-Imap-Skipped: mailbox={self.cfg.name}; uid={uid}; size={size}\r\n"
               .encode() + header.rstrip(b"\r\n") + b"\r\n\r\n")
        reason = (f"IMAP mailbox {self.cfg.name} UID {uid}: {size} bytes is over "
                  f"max_message_bytes ({limit}); not imported, left in the mailbox untouched "
                  "(only its header is kept here)")
        await record_skipped(self.store, raw, reason, self.cfg, self.clock())
        if self.metrics is not None:
            self.metrics.imap_mail(self.cfg.name, "skipped_too_big")
        self.log.warning("imap.message_skipped", uid=uid, size=size, limit=limit)

    async def _checkpoint(self, uid: int, backlog: int, action_uid: int | None) -> None:
        """action_uid: the first UID of the group ending at uid whose action is pending."""
        async with self.store.transaction() as session:
            await imap_checkpoints.save(session, self.cfg.name, last_uid=uid, backlog=backlog,
                                        last_polled_at=self.clock(), action_uid=action_uid)
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


async def record_skipped(store: Store, raw: bytes, reason: str, cfg: ImapSettings,
                         now: datetime) -> None:
    """A quarantine row for a mail deskgate did not import; once, however often it is seen."""
    sha = hashlib.sha256(raw).hexdigest()
    async with store.transaction() as session:
        if await repo.find_quarantined(session, sha) is not None:
            return
        await repo.put_raw(session, sha, raw, now)
        await repo.add(session, Quarantine(
            raw_sha256=sha, reason=reason, envelope_from=None, envelope_to=[cfg.address],
            peer=f"imap:{cfg.name}", channel="imap", received_at=now, state="held"))


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


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


def describe(exc: BaseException) -> str:
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
        self.pipeline, self.store, self.clock = pipeline, store, clock
        self.ssl_context = ssl_context
        self.metrics: Metrics | None = None
        self.alerts: AlertMail | None = None
        self.lock_engine: AsyncEngine | None = None
        self.pollers = [self._poller(m) for m in mailboxes]
        self._watchdog: asyncio.Task[None] | None = None

    def _poller(self, cfg: ImapSettings) -> MailboxPoller:
        poller = MailboxPoller(cfg, self.pipeline, self.store, self.clock, self.ssl_context)
        if self.lock_engine is None and not self.store.is_sqlite:
            self.lock_engine = create_async_engine(self.store.url, poolclass=NullPool)
        poller.lock_engine = self.lock_engine
        poller.metrics, poller.alerts = self.metrics, self.alerts
        return poller

    def attach(self, metrics: Metrics | None, alerts: AlertMail | None) -> None:
        """The gateway's metrics and alert mail, once they exist (before start)."""
        self.metrics, self.alerts = metrics, alerts
        for poller in self.pollers:
            poller.metrics, poller.alerts = metrics, alerts

    def degraded(self) -> dict[str, Any]:
        """For /healthz: each mailbox that keeps failing, with its last error."""
        failing = {p.cfg.name: p.health() for p in self.pollers if p.failing}
        return {"imap": failing} if failing else {}

    def start(self) -> None:
        for poller in self.pollers:
            self._start(poller)
        if self._watchdog is None:
            self._watchdog = asyncio.create_task(self._watch(), name="imap:watchdog")

    def _start(self, poller: MailboxPoller) -> None:
        poller.task = asyncio.create_task(poller.run(), name=f"imap:{poller.cfg.name}")
        poller.task.add_done_callback(_died)

    async def _watch(self) -> None:
        """Alerts for mailboxes without a successful fetch for their alert_after_s."""
        while True:
            shortest = min((p.cfg.alert_after_s for p in self.pollers), default=60)
            await asyncio.sleep(max(0.2, min(5.0, shortest / 4)))
            for poller in list(self.pollers):
                try:
                    await poller.check_alert()
                except Exception as exc:  # noqa: BLE001 — the watchdog must outlive a bad tick
                    log.error("imap.watchdog_failed", mailbox=poller.cfg.name,
                              error=f"{type(exc).__name__}: {exc}"[:300])

    async def reload(self, mailboxes: Sequence[ImapSettings],
                     alerts_settings: Settings | None = None) -> None:
        """SIGHUP: pollers of unchanged mailboxes carry on; changed ones restart with their
        new settings, removed ones stop, new ones start. Checkpoints stay in the store."""
        if alerts_settings is not None and self.alerts is not None:
            self.alerts.settings = alerts_settings
        wanted = {m.name: m for m in mailboxes}
        keep = {p.cfg.name: p for p in self.pollers if wanted.get(p.cfg.name) == p.cfg}
        drop = [p for p in self.pollers if p.cfg.name not in keep]
        await self._stop(drop)
        for poller in drop:
            if self.metrics is not None and poller.cfg.name not in wanted:
                self.metrics.forget_imap(poller.cfg.name)
        self.pollers = [keep.get(m.name) or self._poller(m) for m in mailboxes]
        started = [p for p in self.pollers if p.task is None]
        for poller in started:
            self._start(poller)
        if self._watchdog is None and self.pollers:
            self._watchdog = asyncio.create_task(self._watch(), name="imap:watchdog")
        log.info("imap.reloaded", kept=sorted(keep), started=[p.cfg.name for p in started],
                 stopped=sorted(p.cfg.name for p in drop if p.cfg.name not in wanted))

    async def stop(self, timeout_s: float = 10.0) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
            self._watchdog = None
        await self._stop(self.pollers, timeout_s)
        if self.lock_engine is not None:
            await self.lock_engine.dispose()

    async def _stop(self, pollers: Sequence[MailboxPoller], timeout_s: float = 10.0) -> None:
        for poller in pollers:
            poller.stopping = True
        # Python 3.11's wait_for (inside aioimaplib) can swallow a cancellation that races
        # a reply; the stopping flag ends the loops, and a repeated cancel does the rest.
        deadline = asyncio.get_running_loop().time() + timeout_s
        tasks = {p.task for p in pollers if p.task is not None}
        pending = {task for task in tasks if not task.done()}
        while pending and asyncio.get_running_loop().time() < deadline:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.2)
        for poller in pollers:
            if poller.task in pending:
                assert poller.task is not None
                where = [f"{f.f_code.co_filename.rsplit('/', 1)[-1]}:{f.f_lineno}"
                         for f in poller.task.get_stack(limit=8)]
                log.error("imap.poller_did_not_stop", task=poller.task.get_name(), at=where)
                await poller.abort()


def _died(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("imap.poller_died", task=task.get_name(), error=repr(task.exception()))
