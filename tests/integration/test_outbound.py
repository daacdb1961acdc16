"""Outbound end to end: real inbound SMTP, a capture relay with error injection, both stores."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import getaddresses
from pathlib import Path
from typing import Any

import dkim
import pytest
import structlog
from sqlalchemy import func, select, update

from gateway.ingest.addresses import bounce_address, reply_address
from gateway.ingest.offload import BIG_MAIL_BYTES
from gateway.outbound import queue, relay, verify
from gateway.outbound.catcher import DISCONNECT, CatchHandler, start_catcher
from gateway.service import Gateway
from store.models import Address, Event, Outbox, Ticket
from tests.conftest import SECRET, note_offloads
from tests.mailbuild import make_mail, send


class Clock:
    """A frozen clock the test moves forward."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class Setup:
    gateway: Gateway
    relay: CatchHandler
    clock: Clock
    relay_port: int
    servers: list[asyncio.Server] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.gateway.inbound_port

    async def drain(self) -> int:
        assert self.gateway.outbound.worker is not None
        return await self.gateway.outbound.worker.run_until_idle()

    async def rows(self, **where: Any) -> list[Outbox]:
        async with self.gateway.store.transaction() as session:
            query = select(Outbox).order_by(Outbox.id)
            for key, value in where.items():
                query = query.where(getattr(Outbox, key) == value)
            return list(await session.scalars(query))

    async def count(self, model: Any) -> int:
        async with self.gateway.store.transaction() as session:
            return int(await session.scalar(select(func.count()).select_from(model)) or 0)

    async def events(self, number: int) -> list[tuple[str, dict[str, Any]]]:
        async with self.gateway.store.transaction() as session:
            rows = await session.execute(select(Event.type, Event.data).join(
                Ticket, Ticket.id == Event.ticket_id).where(Ticket.number == number)
                .order_by(Event.id))
            return [(t, d) for t, d in rows]


@pytest.fixture
async def outbound(make_gateway: Callable[..., Any], tmp_path: Path
                   ) -> AsyncIterator[Callable[..., Any]]:
    servers: list[asyncio.Server] = []

    async def factory(bootstrap: bool = True, extra: str = "", relay_up: bool = True,
                      relay_extra: str = "") -> Setup:
        relay = CatchHandler()
        server = await start_catcher(relay, "127.0.0.1", 0)
        port = int(server.sockets[0].getsockname()[1])
        if relay_up:
            servers.append(server)
        else:
            server.close()
            await server.wait_closed()
        clock = Clock()
        gateway = await make_gateway(clock=clock, extra=(
            f'[relay]\nlisten = "127.0.0.1:{port}"\ntimeout_s = 5\n{relay_extra}'
            f'[outbox]\nworker = false\n'
            f'[dev]\nbootstrap = {str(bootstrap).lower()}\ndir = "{tmp_path}"\n{extra}'))
        return Setup(gateway, relay, clock, port, servers)

    yield factory
    for server in servers:
        server.close()


async def _new_ticket(setup: Setup, sender: str = "Jess <jess@example.org>",
                      subject: str = "Refund needed", **kw: Any) -> int:
    reply = await send(setup.port, make_mail(subject=subject, sender=sender, **kw),
                       mail_from=getaddresses([sender])[0][1],
                       rcpts=(kw.get("to", "support@example.test"),))
    assert reply.code == 250, reply
    return int(reply.message.rsplit(" ", 1)[1])


# --- relay answers ------------------------------------------------------------------------

async def test_451_twice_then_accepted_is_delivered_once(outbound: Any) -> None:
    setup = await outbound()
    setup.relay.faults.extend(["451 4.3.0 busy", "451 4.3.0 busy"])
    await _new_ticket(setup)
    for wait in (0, 60, 120):
        setup.clock.advance(wait)
        assert await setup.drain() == 1
    [row] = await setup.rows()
    assert (row.state, row.attempts, len(setup.relay.caught)) == ("sent", 3, 1)
    assert await setup.drain() == 0  # nothing left to send, nothing sent twice
    assert len(setup.relay.caught) == 1


async def test_retry_waits_for_its_backoff(outbound: Any) -> None:
    setup = await outbound()
    setup.relay.faults.append("451 4.3.0 busy")
    await _new_ticket(setup)
    await setup.drain()
    setup.clock.advance(30)
    assert await setup.drain() == 0  # due after 60 s, not before
    setup.clock.advance(30)
    assert await setup.drain() == 1


async def test_550_fails_for_good_with_an_event_on_the_ticket(outbound: Any) -> None:
    setup = await outbound()
    setup.relay.faults.append("550 5.1.1 no such user")
    number = await _new_ticket(setup)
    await setup.drain()
    [row] = await setup.rows()
    assert row.state == "failed" and "550" in (row.last_error or "")
    failed = [d for t, d in await setup.events(number) if t == "outbound_failed"]
    assert failed and failed[0]["outbox"] == row.id and "550" in failed[0]["answer"]


async def test_disconnect_mid_data_is_retried(outbound: Any) -> None:
    setup = await outbound()
    setup.relay.faults.append(DISCONNECT)
    await _new_ticket(setup)
    await setup.drain()
    [row] = await setup.rows()
    assert row.state == "retry" and "Disconnected" in (row.last_error or "")
    setup.clock.advance(60)
    await setup.drain()
    assert [r.state for r in await setup.rows()] == ["sent"]
    assert len(setup.relay.caught) == 1


async def test_relay_down_then_up_delivers_everything_once(outbound: Any) -> None:
    setup = await outbound(relay_up=False)
    for i in range(6):
        await _new_ticket(setup, sender=f"c{i}@example.org", subject=f"Question {i}")
    await setup.drain()
    assert {r.state for r in await setup.rows()} == {"retry"}
    setup.clock.advance(60)
    await setup.drain()  # still down: backoff doubles
    server = await start_catcher(setup.relay, "127.0.0.1", setup.relay_port)
    setup.servers.append(server)
    setup.clock.advance(120)
    await setup.drain()
    rows = await setup.rows()
    assert {r.state for r in rows} == {"sent"}
    caught_ids = [c.message["Message-ID"].strip("<>") for c in setup.relay.caught]
    assert sorted(caught_ids) == sorted(r.message_id for r in rows)  # each exactly once


async def test_our_own_exception_is_shunted_after_repeating(outbound: Any,
                                                            monkeypatch: Any) -> None:
    setup = await outbound()
    await _new_ticket(setup)
    worker = setup.gateway.outbound.worker
    assert worker is not None

    def broken(row: Any) -> bytes:
        raise RuntimeError("signer bug")

    monkeypatch.setattr(worker, "_sign", broken)
    for _ in range(3):
        await setup.drain()
        setup.clock.advance(3600)
    [row] = await setup.rows()
    assert row.state == "shunted" and "signer bug" in (row.last_error or "")
    assert setup.relay.caught == []


# --- stopping -----------------------------------------------------------------------------

async def test_a_stop_mid_batch_hands_the_unsent_rows_back(outbound: Any) -> None:
    """One connection for the whole batch; the stop comes while its first mail is at the
    relay: that one is sent, the rest are due again at once instead of after their lease,
    and a later round sends each of them once."""
    setup = await outbound(relay_extra="concurrency = 1\n")
    worker = setup.gateway.outbound.worker
    assert worker is not None
    for i in range(4):
        await _new_ticket(setup, sender=f"c{i}@example.org", subject=f"Question {i}")
    draining = asyncio.create_task(setup.drain())
    await asyncio.wait_for(setup.relay.arrived.wait(), 10)
    await worker.stop()
    await asyncio.wait_for(draining, 10)
    rows = await setup.rows()
    states = sorted(r.state for r in rows)
    assert states.count("sent") == len(setup.relay.caught) >= 1
    handed_back = [r for r in rows if r.state == "retry"]
    assert handed_back and len(handed_back) + len(setup.relay.caught) == 4
    assert all(r.lease_until is None and r.next_attempt_at <= setup.clock()
               for r in handed_back)
    worker._stopping.clear()  # started again (the next start, or another instance)
    await setup.drain()
    assert sorted(r.state for r in await setup.rows()) == ["sent"] * 4
    caught_ids = [c.message["Message-ID"].strip("<>") for c in setup.relay.caught]
    assert sorted(caught_ids) == sorted(r.message_id for r in rows)  # each exactly once


async def test_a_hand_back_leaves_a_row_another_worker_took_since(outbound: Any) -> None:
    """A chunk may outlast its lease: by the time the stop comes, another worker may have
    claimed a row and sent it. Handing that row back would send it twice."""
    setup = await outbound()
    for i in range(2):
        await _new_ticket(setup, sender=f"c{i}@example.org", subject=f"Question {i}")
    async with setup.gateway.store.transaction() as session:
        claimed = await queue.claim(session, setup.clock(), 300, 10, SECRET.encode())
    assert len(claimed) == 2
    async with setup.gateway.store.transaction() as session:
        await session.execute(update(Outbox).where(Outbox.id == claimed[1].id).values(
            state="sent", lease_until=None))
    async with setup.gateway.store.transaction() as session:
        assert await queue.hand_back(session, claimed, setup.clock()) == 1
    rows = {r.id: r for r in await setup.rows()}
    assert rows[claimed[0].id].state == "retry" and rows[claimed[0].id].lease_until is None
    assert rows[claimed[1].id].state == "sent"


async def test_the_worker_recovers_leases_once_the_store_answers(outbound: Any,
                                                                 monkeypatch: Any) -> None:
    """The store not answering as the worker starts (PostgreSQL still starting) used to end
    the worker's task for good, silently: outbound mail stopped until a restart."""
    setup = await outbound()
    worker = setup.gateway.outbound.worker
    assert worker is not None
    real = worker.recover
    tries: list[int] = []

    async def flaky() -> int:
        tries.append(1)
        if len(tries) == 1:
            raise OSError("connection refused")
        return await real()

    monkeypatch.setattr(worker, "recover", flaky)
    await _new_ticket(setup)
    worker.start()
    try:
        for _ in range(500):
            if tries:
                break
            await asyncio.sleep(0.01)
        worker.wake()  # the next round now, not after the poll interval
        await asyncio.wait_for(setup.relay.arrived.wait(), 10)
    finally:
        await worker.stop()
    assert len(tries) == 2 and len(setup.relay.caught) == 1


async def test_a_worker_that_died_says_so() -> None:
    async def broken() -> None:
        raise RuntimeError("bug")

    task = asyncio.create_task(broken())
    await asyncio.gather(task, return_exceptions=True)
    with structlog.testing.capture_logs() as logs:
        relay._ended(task)
    assert [(e["event"], e["error"]) for e in logs] == [("outbox.worker_died", "RuntimeError")]


# --- acknowledgements ---------------------------------------------------------------------

async def test_ack_in_the_customers_language_threads_and_stops_robots(outbound: Any) -> None:
    setup = await outbound()
    number = await _new_ticket(setup, message_id="<first@example.org>",
                               headers={"Content-Language": "de-DE"})
    await setup.drain()
    [caught] = setup.relay.caught
    msg = caught.message
    assert msg["Subject"] == f"[#{number}] Wir haben Ihre Anfrage erhalten: Refund needed"
    assert msg["In-Reply-To"] == "<first@example.org>"
    assert msg["References"] == "<first@example.org>"
    assert msg["Reply-To"].addresses[0].addr_spec == reply_address(
        "support@example.test", number, SECRET.encode())
    assert str(msg["From"]) == "Support <support@example.test>"
    assert (msg["Auto-Submitted"], msg["X-Auto-Response-Suppress"]) == ("auto-replied", "All")
    assert caught.rcpt_tos == ("jess@example.org",)
    async with setup.gateway.store.read() as session:
        row = await session.scalar(select(Outbox).where(Outbox.kind == "ack"))
    assert row is not None
    assert caught.mail_from == row.envelope_from == bounce_address("example.test", row.id,
                                                                   SECRET.encode())
    assert "ack_queued" in [t for t, _ in await setup.events(number)]


async def test_the_verp_sender_is_set_by_the_first_claim_and_kept(outbound: Any) -> None:
    """The INSERT cannot know the row's id: the first claim sets the sender, and a retry
    sends from the same one, so a late bounce of the first attempt still finds its row."""
    setup = await outbound()
    store, now = setup.gateway.store, setup.clock()
    async with store.transaction() as session:
        queued = await queue.insert(session, kind="ack", from_addr="Support@Example.test",
                                    to="jess@example.org", message_id="m1@example.test",
                                    mime=b"MIME", now=now, verified=True)
    async with store.read() as session:
        assert (await session.get(Outbox, queued.id)).envelope_from == ""  # type: ignore
    async with store.transaction() as session:
        [first] = await queue.claim(session, now, 60, 10, b"k1" * 16)
        await session.execute(update(Outbox).values(state="retry"))
    async with store.transaction() as session:
        [again] = await queue.claim(session, now, 60, 10, b"k2" * 16)
    assert first.envelope_from == again.envelope_from == bounce_address(
        "example.test", queued.id, b"k1" * 16)


async def test_ack_falls_back_to_the_departments_language(outbound: Any) -> None:
    setup = await outbound()
    await _new_ticket(setup, to="billing@example.test", headers={"Content-Language": "fr"})
    await setup.drain()
    assert "Wir haben Ihre Anfrage erhalten" in setup.relay.caught[0].message["Subject"]


async def test_ack_goes_to_reply_to_when_the_customer_sets_one(outbound: Any) -> None:
    setup = await outbound()
    await _new_ticket(setup, headers={"Reply-To": "jess.private@example.org"})
    await setup.drain()
    assert setup.relay.caught[0].rcpt_tos == ("jess.private@example.org",)


async def test_no_ack_past_the_per_contact_rate(outbound: Any) -> None:
    setup = await outbound()
    for i in range(5):
        await _new_ticket(setup, subject=f"Question {i}")
    assert len(await setup.rows(kind="ack")) == 3  # per_contact_per_hour defaults to 3
    setup.clock.advance(3601)
    await _new_ticket(setup, subject="An hour later")
    assert len(await setup.rows(kind="ack")) == 4


async def test_no_ack_for_the_corpus_auto_replies_and_bounces(outbound: Any,
                                                              corpus_dir: Path) -> None:
    from gateway.ingest.model import Envelope

    setup = await outbound()
    files = sorted((corpus_dir / "autoreplies").glob("*.eml")) + sorted(
        (corpus_dir / "bounces").glob("*.eml"))
    assert len(files) > 10
    for path in files:
        # Bounces come with the null reverse-path (RFC 5321 4.5.5), responders with theirs.
        sender = "" if path.parent.name == "bounces" else "someone@example.org"
        await setup.gateway.pipeline.ingest(path.read_bytes(), Envelope(
            sender, ("support@example.test",), "test", "smtp"))
    assert await setup.rows(kind="ack") == []
    assert await setup.count(Ticket) > 0  # they were stored, just not acknowledged


async def test_a_reply_using_only_the_reply_to_token_threads(outbound: Any) -> None:
    setup = await outbound()
    number = await _new_ticket(setup)
    await setup.drain()
    token = setup.relay.caught[0].message["Reply-To"].addresses[0].addr_spec
    reply = await send(setup.port, make_mail(subject="something unrelated", to=token),
                       rcpts=(token,))
    assert reply.code == 250 and reply.message.endswith(f"ticket {number}")
    assert await setup.count(Ticket) == 1
    assert len(await setup.rows(kind="ack")) == 1  # a reply is not acknowledged


async def test_a_vacation_responder_loop_ends_with_at_most_one_ack(outbound: Any) -> None:
    """The customer's RFC 3834 responder answers every mail it gets, including our ack."""
    setup = await outbound()
    await _new_ticket(setup)
    answered = 0
    for _ in range(6):
        await setup.drain()
        for mail in setup.relay.caught[answered:]:
            msg = mail.message
            target = msg["Reply-To"].addresses[0].addr_spec if msg["Reply-To"] else \
                msg["From"].addresses[0].addr_spec
            auto = make_mail(subject=f"Out of office: {msg['Subject']}", to=target,
                             in_reply_to=msg["Message-ID"],
                             headers={"Auto-Submitted": "auto-replied"})
            await send(setup.port, auto, rcpts=(target,))
        answered = len(setup.relay.caught)
    assert len(await setup.rows(kind="ack")) <= 1
    assert await setup.count(Ticket) == 1


# --- DKIM ---------------------------------------------------------------------------------

async def test_sent_mail_carries_a_dkim_signature_that_verifies(outbound: Any,
                                                                tmp_path: Path) -> None:
    setup = await outbound()
    await _new_ticket(setup)
    await setup.drain()
    record = (tmp_path / "dkim" / "example.test.dev.txt").read_text().strip().encode()

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return record if name == b"dev._domainkey.example.test." else None

    content = setup.relay.caught[0].content
    assert content.startswith(b"DKIM-Signature:")
    assert dkim.verify(content, dnsfunc=dnsfunc)
    [row] = await setup.rows()
    assert not row.mime.startswith(b"DKIM-Signature")  # signed at send time, not stored


async def test_a_big_mail_is_signed_in_the_parser_process(outbound: Any, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """An agent's reply with a big attachment: signing it on the loop stalled every session."""
    offloaded = note_offloads(monkeypatch, relay)
    setup = await outbound()
    big = make_mail(sender="support@example.test", to="jess@example.org",
                    body="An attachment's worth of text, line after line.\r\n"
                    * (BIG_MAIL_BYTES // 40))
    assert len(big) > BIG_MAIL_BYTES
    async with setup.gateway.store.transaction() as session:
        await queue.enqueue(session, kind="reply", from_addr="support@example.test",
                            to="jess@example.org", message_id="big@deskgate.test", mime=big,
                            now=setup.clock(), exempt_from_hold=True)
    await setup.drain()
    record = (tmp_path / "dkim" / "example.test.dev.txt").read_text().strip().encode()
    [caught] = setup.relay.caught
    assert caught.content.startswith(b"DKIM-Signature:") and caught.content.endswith(big)
    assert dkim.verify(caught.content, dnsfunc=lambda name, timeout=5: record
                       if name == b"dev._domainkey.example.test." else None)
    assert [getattr(call, "func", None) for call in offloaded] == [relay.sign_with]


# --- bounces ------------------------------------------------------------------------------

def _dsn(verp: str, failed: str, original_id: str) -> bytes:
    return (f"From: MAILER-DAEMON@mx.example.org\r\nTo: {verp}\r\n"
            f"Subject: Undelivered Mail Returned to Sender\r\n"
            f"Message-ID: <dsn-{original_id}>\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
            "--B\r\nContent-Type: text/plain\r\n\r\nThis is the mail system at host mx.\r\n"
            "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
            "Reporting-MTA: dns; mx.example.org\r\n\r\n"
            f"Final-Recipient: rfc822; {failed}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
            "Diagnostic-Code: smtp; 550 5.1.1 user unknown\r\n"
            "--B--\r\n").encode()


async def test_a_dsn_is_recorded_on_its_row_and_ticket_and_opens_nothing(outbound: Any) -> None:
    setup = await outbound()
    number = await _new_ticket(setup)
    await setup.drain()
    caught = setup.relay.caught[0]
    dsn = _dsn(caught.mail_from, "jess@example.org", caught.message["Message-ID"].strip("<>"))
    for _ in range(2):  # a redelivered DSN changes nothing
        reply = await send(setup.port, dsn, mail_from="", rcpts=(caught.mail_from,))
        assert reply.code == 250
    [row] = await setup.rows()
    assert row.state == "bounced"
    assert row.bounce is not None and row.bounce["status"] == "5.1.1"
    assert row.bounce["recipients"] == ["jess@example.org"]
    bounces = [d for t, d in await setup.events(number) if t == "bounce"]
    assert len(bounces) == 1 and bounces[0]["outbox"] == row.id
    assert await setup.count(Ticket) == 1
    assert len(setup.relay.caught) == 1  # never acknowledged


# --- verification -------------------------------------------------------------------------

async def test_verification_round_trip_over_smtp_releases_held_mail(outbound: Any) -> None:
    setup = await outbound(bootstrap=False)
    await _new_ticket(setup)
    [ack] = await setup.rows(kind="ack")
    assert ack.state == "held" and "support@example.test is not verified" in ack.last_error
    await setup.drain()
    assert setup.relay.caught == []  # nothing leaves From an unverified address
    async with setup.gateway.store.transaction() as session:
        await verify.start(session, setup.gateway.settings, setup.gateway.outbound.renderer,
                           "support@example.test", None, setup.clock())
    await setup.drain()
    [mail] = setup.relay.caught
    assert mail.rcpt_tos == ("support@example.test",)
    # The company's mail server forwards support@ to deskgate: the code comes back.
    reply = await send(setup.port, mail.content, mail_from=mail.mail_from,
                       rcpts=("support@example.test",))
    assert reply.code == 250
    async with setup.gateway.store.transaction() as session:
        state = await session.scalar(select(Address.verification_state).where(
            Address.email == "support@example.test"))
    assert state == "verified"
    await setup.drain()
    assert [c.rcpt_tos for c in setup.relay.caught[1:]] == [("jess@example.org",)]
    assert await setup.count(Ticket) == 1  # the verification mail made no ticket
