"""IMAP adapter: one poller per [[imap]] mailbox turns its mails into ingest calls (DESIGN 2).

Exactly once: a mail's ingest commits, then the checkpoint (UIDVALIDITY, last UID)
commits, and only then is the message flagged, moved or deleted. A crash in between
re-fetches the mail on restart and the ingest answers DUPLICATE.
"""

from __future__ import annotations

import asyncio
import os
import random
import shlex
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog
from aioimaplib import aioimaplib
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.inbound import imap_plan as plan
from gateway.ingest.model import Envelope
from gateway.ingest.pipeline import Outcome, Pipeline
from gateway.settings_imap import ImapSettings
from store import imap_checkpoints
from store.engine import Store

log = structlog.get_logger("deskgate.imap")

COMMAND_TIMEOUT_S = 60.0
LOCK_RETRY_S = 5.0
TOKEN_COMMAND_TIMEOUT_S = 30.0


class ImapProblem(Exception):
    """A readable reason a mailbox cannot be read now (stored in last_error)."""


def _text(response: Any) -> str:
    lines = [bytes(line) for line in response.lines if not isinstance(line, bytearray)]
    return (lines[-1] if lines else b"").decode("utf-8", "replace")[:200]


def _ok(response: Any, what: str) -> Any:
    if response.result != "OK":
        raise ImapProblem(f"{what} refused: {response.result} {_text(response)}")
    return response


def _quote(mailbox: str) -> str:
    """RFC 3501 9 (astring): quote a folder name with spaces or specials."""
    if mailbox and all(c.isalnum() or c in "._-/" for c in mailbox):
        return mailbox
    return '"' + mailbox.replace("\\", "\\\\").replace('"', '\\"') + '"'


async def read_secret(cfg: ImapSettings) -> str:
    """The password (file or environment) or an XOAUTH2 access token (command); never logged."""
    if cfg.auth == "xoauth2":
        assert cfg.token_command
        proc = await asyncio.create_subprocess_exec(
            *shlex.split(cfg.token_command), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), TOKEN_COMMAND_TIMEOUT_S)
        token = out.decode().strip()
        if proc.returncode != 0 or not token:
            raise ImapProblem(f"token_command failed (exit {proc.returncode}): "
                              f"{err.decode(errors='replace').strip()[:200]}")
        return token
    if cfg.password_file:
        try:
            return Path(cfg.password_file).read_text().strip()
        except OSError as exc:
            raise ImapProblem(f"password_file {cfg.password_file}: {exc.strerror}") from None
    value = os.environ.get(cfg.password_env or "")
    if not value:
        raise ImapProblem(f"environment variable {cfg.password_env} is not set")
    return value


async def _starttls(client: aioimaplib.IMAP4, host: str, context: ssl.SSLContext) -> None:
    """RFC 3501 6.2.1: STARTTLS, then forget the capabilities learnt in clear text."""
    protocol = client.protocol
    if "STARTTLS" not in protocol.capabilities:
        raise ImapProblem("the server does not offer STARTTLS")
    _ok(await protocol.execute(aioimaplib.Command("STARTTLS", protocol.new_tag(),
                                                  loop=protocol.loop)), "STARTTLS")
    transport = await protocol.loop.start_tls(protocol.transport, protocol, context,
                                              server_hostname=host)
    protocol.transport = transport
    await protocol.capability()


async def connect(cfg: ImapSettings, context: ssl.SSLContext | None = None,
                  timeout_s: float = COMMAND_TIMEOUT_S) -> aioimaplib.IMAP4:
    """A logged-in client; TLS as configured (plain text only when the config allows it)."""
    context = context or ssl.create_default_context()
    if cfg.tls == "implicit":
        client: aioimaplib.IMAP4 = aioimaplib.IMAP4_SSL(cfg.host, cfg.port, timeout=timeout_s,
                                                        ssl_context=context)
    else:
        client = aioimaplib.IMAP4(cfg.host, cfg.port, timeout=timeout_s)
    try:
        await client.wait_hello_from_server()
        if cfg.tls == "starttls":
            await _starttls(client, cfg.host, context)
        secret = await read_secret(cfg)
        if cfg.auth == "xoauth2":
            response = await client.xoauth2(cfg.user, secret)
        else:
            response = await client.login(cfg.user, secret)
        _ok(response, f"login as {cfg.user}")
        await client.protocol.capability()  # IDLE, MOVE, UIDPLUS are announced after login
    except BaseException:
        _close(client)
        raise
    return client


def _close(client: aioimaplib.IMAP4) -> None:
    transport = getattr(client.protocol, "transport", None)
    if transport is not None:
        transport.close()


async def select(client: aioimaplib.IMAP4, folder: str) -> int:
    """SELECT the folder and return its UIDVALIDITY."""
    response = _ok(await client.select(_quote(folder)), f"SELECT {folder}")
    uidvalidity = plan.parse_uidvalidity(response.lines)
    if uidvalidity is None:
        raise ImapProblem(f"SELECT {folder}: the server sent no UIDVALIDITY")
    return uidvalidity


async def search_uids(client: aioimaplib.IMAP4, after_uid: int) -> list[int]:
    response = _ok(await client.uid_search("UID", f"{after_uid + 1}:*", charset=None),
                   "UID SEARCH")
    return plan.pending_uids(plan.parse_search(response.lines), after_uid)


async def fetch(client: aioimaplib.IMAP4, uids: Sequence[int]) -> list[tuple[int, bytes]]:
    # BODY.PEEK: fetching must not set \Seen; only a committed import may (RFC 3501 6.4.5).
    response = _ok(await client.uid("fetch", plan.uid_set(uids), "(UID BODY.PEEK[])"),
                   "UID FETCH")
    return sorted(plan.parse_fetch(response.lines))


async def apply_action(client: aioimaplib.IMAP4, cfg: ImapSettings, uids: str) -> None:
    """The after-import action on a UID set: flag \\Seen, move, or delete and expunge."""
    action = cfg.after_import
    if action.action == "seen":
        _ok(await client.uid("store", uids, "+FLAGS.SILENT", r"(\Seen)"), "UID STORE \\Seen")
        return
    if action.action == "move" and client.has_capability("MOVE"):  # RFC 6851
        _ok(await client.uid("move", uids, _quote(action.folder)), f"UID MOVE {action.folder}")
        return
    if action.action == "move":
        _ok(await client.uid("copy", uids, _quote(action.folder)), f"UID COPY {action.folder}")
    _ok(await client.uid("store", uids, "+FLAGS.SILENT", r"(\Deleted)"), "UID STORE \\Deleted")
    if client.has_capability("UIDPLUS"):  # RFC 4315: expunge only what we deleted
        _ok(await client.uid("expunge", uids), "UID EXPUNGE")
    else:
        _ok(await client.expunge(), "EXPUNGE")


async def ensure_folder(client: aioimaplib.IMAP4, folder: str) -> None:
    """Create the move target; "already exists" is the usual, harmless answer."""
    await client.create(_quote(folder))


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
                await self._record(last_error=reason, last_polled_at=self.clock())
                await asyncio.sleep(delay)

    @asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        """PostgreSQL: one poller per mailbox across instances (session advisory lock held on
        a dedicated connection; the server frees it when the holder's connection dies)."""
        if self.store.is_sqlite:
            yield
            return
        key = plan.lock_key(self.cfg.name)
        conn = await self.store.engine.connect()
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

    async def _still_locked(self) -> None:
        if self._lock_conn is not None:
            await self._lock_conn.execute(text("SELECT 1"))
            await self._lock_conn.commit()

    async def _session(self) -> None:
        client = await connect(self.cfg, self.ssl_context)
        try:
            uidvalidity = await select(client, self.cfg.folder)
            await self._resume(uidvalidity)
            if self.cfg.after_import.action == "move":
                await ensure_folder(client, self.cfg.after_import.folder)
            if self.last_uid:
                # A crash between checkpoint and action left mails unflagged: finish the job.
                await apply_action(client, self.cfg, f"1:{self.last_uid}")
            while True:
                await self._catch_up(client)
                self.failures = 0
                await self._wait(client)
                await self._still_locked()
        finally:
            await _logout(client)

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
        uids = await search_uids(client, self.last_uid)
        total = len(uids)
        await self._record(backlog=total, last_error=None, last_polled_at=self.clock())
        if total > self.cfg.batch_size:
            self.log.info("imap.import_started", pending=total, batch_size=self.cfg.batch_size)
        started, done = time.monotonic(), 0
        for batch in plan.batches(uids, self.cfg.batch_size):
            for uid, raw in await fetch(client, batch):
                if uid <= self.last_uid:
                    continue
                await self._import(uid, raw)
                done += 1
                await self._checkpoint(uid, backlog=total - done)
                await apply_action(client, self.cfg, str(uid))
            if plan.progress_due(done, total, self.cfg.batch_size):
                elapsed = max(time.monotonic() - started, 1e-6)
                self.log.info("imap.progress", done=done, total=total,
                              rate_per_s=round(done / elapsed, 1))

    async def _import(self, uid: int, raw: bytes) -> None:
        envelope = Envelope(mail_from=plan.envelope_sender(raw), rcpt_tos=(self.cfg.address,),
                            peer=f"imap:{self.cfg.name}", channel="imap")
        verdict = await self.pipeline().ingest(raw, envelope)
        if verdict.outcome is Outcome.REJECTED:
            raise ImapProblem(f"uid {uid}: ingest rejected it: {verdict.reason}")
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
        while client.has_pending_idle():
            pushed = await client.wait_server_push()
            if pushed == aioimaplib.STOP_WAIT_SERVER_PUSH or any(
                    b"EXISTS" in bytes(line) for line in pushed):
                client.idle_done()
                break
        await asyncio.wait_for(idle, COMMAND_TIMEOUT_S)

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
    if isinstance(exc, ImapProblem):
        return str(exc)
    if isinstance(exc, TimeoutError | aioimaplib.CommandTimeout):
        return "timed out waiting for the server"
    if isinstance(exc, OSError):
        return f"cannot connect: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"[:300]


async def _logout(client: aioimaplib.IMAP4) -> None:
    with suppress(Exception):
        if not client.has_pending_idle():
            await asyncio.wait_for(client.logout(), 2)
    _close(client)


class ImapPollers:
    """The supervised poller tasks of one instance; a failing mailbox never stops the others."""

    def __init__(self, mailboxes: Sequence[ImapSettings], pipeline: Callable[[], Pipeline],
                 store: Store,
                 clock: Callable[[], datetime], ssl_context: ssl.SSLContext | None = None
                 ) -> None:
        self.pollers = [MailboxPoller(m, pipeline, store, clock, ssl_context) for m in mailboxes]
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for poller in self.pollers:
            task = asyncio.create_task(poller.run(), name=f"imap:{poller.cfg.name}")
            task.add_done_callback(_died)
            self.tasks.append(task)

    async def stop(self, timeout_s: float = 10.0) -> None:
        for poller in self.pollers:
            poller.stopping = True
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            _, pending = await asyncio.wait(self.tasks, timeout=timeout_s)
            for task in pending:
                log.error("imap.poller_did_not_stop", task=task.get_name())
        self.tasks.clear()


def _died(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("imap.poller_died", task=task.get_name(), error=repr(task.exception()))
