"""Relay worker: claims due outbox rows, signs them, hands them to the smarthost, settles them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

import aiosmtplib
import structlog

from gateway.ingest.offload import BIG_MAIL_BYTES, in_process
from gateway.outbound import queue
from gateway.outbound.classify import Answer, Disposition, RetryPolicy, backoff, judge
from gateway.outbound.config import OutboundSettings
from gateway.outbound.dkim import Signer, sign_with
from gateway.settings import Listen
from store import repo
from store.engine import Store

log = structlog.get_logger("deskgate.outbound")

# What "no answer" looks like from aiosmtplib and the socket layer: all temporary.
NO_REPLY = (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPConnectError,
            aiosmtplib.SMTPTimeoutError, aiosmtplib.SMTPConnectTimeoutError, OSError,
            TimeoutError)


@dataclass(frozen=True, slots=True)
class Relay:
    """Where and how to connect; built from settings, swapped in tests (port 0 peers)."""

    host: str
    port: int
    security: str = "none"
    username: str | None = None
    password: str | None = None
    timeout_s: float = 30.0

    @classmethod
    def from_settings(cls, listen: Listen, outbound: OutboundSettings) -> Relay:
        r = outbound.relay
        return cls(listen.host, listen.port, r.security, r.username, r.password, r.timeout_s)

    def client(self, hostname: str) -> aiosmtplib.SMTP:
        return aiosmtplib.SMTP(hostname=self.host, port=self.port, local_hostname=hostname,
                               timeout=self.timeout_s, use_tls=self.security == "tls",
                               start_tls=True if self.security == "starttls" else False)


async def _deliver(client: aiosmtplib.SMTP, row: queue.Claimed, mime: bytes) -> Answer:
    try:
        errors, response = await client.sendmail(row.envelope_from, list(row.envelope_to), mime)
    except aiosmtplib.SMTPRecipientsRefused as exc:
        first = exc.recipients[0]
        return Answer(first.code, first.message)
    except aiosmtplib.SMTPResponseException as exc:
        return Answer(exc.code, exc.message)
    if errors:  # one recipient per row today; a partial refusal still counts as refused
        code, text = next(iter(errors.values())).code, str(errors)
        return Answer(code, text)
    code, _, text = response.partition(" ")
    return Answer(int(code) if code.isdigit() else 250, text)


class RelayWorker:
    """Claim → sign → send → settle. `run_until_idle()` is the burst mode tests drive."""

    def __init__(self, store: Store, outbound: OutboundSettings, relay: Relay, signer: Signer,
                 hostname: str, clock: Callable[[], datetime], bounce_secret: bytes) -> None:
        self.store, self.outbound, self.relay = store, outbound, relay
        self.bounce_secret = bounce_secret  # keys the VERP senders (addresses.bounce_address)
        self.signer, self.hostname, self.clock = signer, hostname, clock
        box = outbound.outbox
        self.policy = RetryPolicy(box.backoff_base_s, box.backoff_max_s, box.lifetime_s)
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()

    async def recover(self) -> int:
        async with self.store.transaction() as session:
            count = await queue.recover(session, self.clock())
        if count:
            log.warning("outbox.recovered", rows=count)
        return count

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="relay-worker")
        self._task.add_done_callback(_ended)

    def wake(self) -> None:
        self._wake.set()

    async def stop(self, timeout_s: float = 10.0) -> None:
        """The mail being sent finishes; the rest of a claimed batch is handed back. Not
        asyncio.wait_for on the task: on Python 3.11 its cancellation can be dropped (store/
        engine.py) and it then waits for the task without any limit."""
        self._stopping.set()
        self._wake.set()
        task = self._task
        if task is None:
            return
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        if done:
            return
        log.warning("outbox.stop_timeout", timeout_s=timeout_s)
        # Cancelled again and again: aiosmtplib waits with wait_for too, which may drop one.
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not task.done() and asyncio.get_running_loop().time() < deadline:
            task.cancel()
            await asyncio.wait({task}, timeout=0.2)
        if not task.done():
            log.error("outbox.worker_left_running")

    async def _loop(self) -> None:
        recovered = False
        while not self._stopping.is_set():
            # Cleared before the round, not after: a wake() that comes while we send (a mail
            # queued meanwhile) starts the next round at once instead of waiting out the poll.
            self._wake.clear()
            try:
                if not recovered:  # the store may not be up yet: retried with each round
                    await self.recover()
                    recovered = True
                await self.run_until_idle()
            except Exception:  # noqa: BLE001 — the store may be down; try again later
                log.exception("outbox.loop_error")
            if self._stopping.is_set():
                break
            try:  # asyncio.timeout: wait_for may drop a cancellation (store/engine.py)
                async with asyncio.timeout(self.outbound.outbox.poll_interval_s):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def run_until_idle(self) -> int:
        """Send every row due now, batch after batch; returns how many rows were attempted."""
        total = 0
        while not self._stopping.is_set():
            async with self.store.transaction() as session:
                rows = await queue.claim(session, self.clock(), self.outbound.outbox.lease_s,
                                         self.outbound.outbox.batch, self.bounce_secret)
            if not rows:
                return total
            total += len(rows)
            await self._send_batch(rows)
        return total

    async def _send_batch(self, rows: list[queue.Claimed]) -> None:
        # Spread the batch over up to `concurrency` connections, each reused for its share.
        relay = self.outbound.relay
        per = max(1, min(relay.max_per_connection, -(-len(rows) // relay.concurrency)))
        chunks = [rows[i:i + per] for i in range(0, len(rows), per)]
        limit = asyncio.Semaphore(self.outbound.relay.concurrency)

        unsent: list[queue.Claimed] = []

        async def run(chunk: list[queue.Claimed]) -> None:
            async with limit:
                await self._send_chunk(chunk, unsent)

        # Every chunk ends before the hand-back and before an error goes up: none is left
        # sending behind a stop that has returned.
        outcomes = await asyncio.gather(*(run(c) for c in chunks), return_exceptions=True)
        if unsent:
            await self._hand_back(unsent)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _hand_back(self, rows: list[queue.Claimed]) -> None:
        """Claimed rows not sent because we are stopping: due again now, for the next start
        or another instance, instead of after their lease."""
        try:
            async with self.store.transaction() as session:
                handed = await queue.hand_back(session, rows, self.clock())
        except Exception as exc:  # noqa: BLE001 — their lease expires: they are sent then
            log.warning("outbox.hand_back_failed", rows=len(rows), error=type(exc).__name__)
            return
        log.info("outbox.handed_back", rows=handed)

    async def _send_chunk(self, rows: list[queue.Claimed], unsent: list[queue.Claimed]
                          ) -> None:
        """One connection for several mails; a lost connection is reopened for the next.
        Once the worker is stopping, the rows not begun go to `unsent`."""
        client: aiosmtplib.SMTP | None = None
        for index, row in enumerate(rows):
            if self._stopping.is_set():
                unsent.extend(rows[index:])
                break
            try:
                if client is None or not client.is_connected:
                    client = self.relay.client(self.hostname)
                    await client.connect()
                    if self.relay.username:
                        await client.login(self.relay.username, self.relay.password or "")
                answer = await _deliver(client, row, await self._sign(row))
            except NO_REPLY as exc:
                answer = Answer.no_reply(f"{type(exc).__name__}: {exc}"[:300])
                client = _drop(client)
            except aiosmtplib.SMTPResponseException as exc:  # refused at connect or AUTH
                answer = Answer(exc.code, exc.message)
                client = _drop(client)
            except Exception as exc:  # noqa: BLE001 — our own bug: count it, shunt if it repeats
                await self._internal_error(row, exc)
                continue
            await self._settle(row, answer)
        if client is not None and client.is_connected:
            try:
                await client.quit()
            except aiosmtplib.SMTPException:
                client.close()

    async def _sign(self, row: queue.Claimed) -> bytes:
        domain = row.from_addr.rsplit("@", 1)[-1]
        key = self.signer.key_for(domain)
        if key is not None and len(row.mime) > BIG_MAIL_BYTES:  # off the loop and the GIL
            return await in_process(partial(sign_with, key), row.mime)
        return self.signer.sign(row.mime, domain)

    async def _settle(self, row: queue.Claimed, answer: Answer) -> None:
        now = self.clock()
        attempts = row.attempts + 1
        verdict = judge(answer, attempts, row.created_at, now, self.policy)
        values: dict[str, Any] = {"attempts": attempts, "last_error": None}
        if verdict.disposition is Disposition.SENT:
            values |= {"state": "sent", "sent_at": now}
        elif verdict.disposition is Disposition.RETRY:
            values |= {"state": "retry", "next_attempt_at": verdict.next_attempt_at,
                       "last_error": verdict.reason[:2000]}
        else:
            values |= {"state": "failed", "last_error": verdict.reason[:2000]}
        async with self.store.transaction() as session:
            await queue.settle(session, row.id, **values)
            if row.ticket_id is not None and verdict.disposition is not Disposition.RETRY:
                await repo.add_events(session, row.ticket_id, now, [(
                    f"outbound_{verdict.disposition.value}",
                    {"outbox": row.id, "kind": row.kind, "message_id": row.message_id,
                     "to": list(row.envelope_to), "answer": verdict.reason[:500]})])
        log.info("outbox.attempt", outbox=row.id, attempt=attempts, kind=row.kind,
                 outcome=verdict.disposition.value, answer=str(answer)[:200],
                 next_attempt_at=str(verdict.next_attempt_at or "") or None)

    async def _internal_error(self, row: queue.Claimed, exc: Exception) -> None:
        now = self.clock()
        errors = row.internal_errors + 1
        shunt = errors >= self.outbound.outbox.shunt_after
        reason = f"internal error {errors}: {type(exc).__name__}: {exc}"[:2000]
        async with self.store.transaction() as session:
            await queue.settle(session, row.id, internal_errors=errors, last_error=reason,
                               state="shunted" if shunt else "retry",
                               next_attempt_at=now + backoff(errors, self.policy))
        log.error("outbox.internal_error", outbox=row.id, errors=errors, shunted=shunt,
                  error=type(exc).__name__)


def _drop(client: aiosmtplib.SMTP | None) -> None:
    if client is not None:
        client.close()
    return None


def _ended(task: asyncio.Task[None]) -> None:
    """The worker only ends when stopped; anything else means outbound mail stopped, so it
    is logged (and the task's exception read) instead of lost with the task."""
    if task.cancelled():
        return
    error = task.exception()
    if error is not None:
        log.error("outbox.worker_died", error=type(error).__name__, detail=str(error)[:300])
