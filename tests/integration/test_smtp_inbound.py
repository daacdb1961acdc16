"""End to end over real sockets: a real SMTP client, the daemon's listener, a real store."""

from __future__ import annotations

import gc
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from gateway.ingest.addresses import reply_address
from store import queries
from store.models import Attachment, Event, Message, Quarantine, Raw, Ticket
from tests.conftest import SECRET
from tests.faults import store_fails
from tests.mailbuild import make_mail, send


async def _count(gateway: Any, model: Any) -> int:
    async with gateway.store.transaction() as session:
        return int(await session.scalar(select(func.count()).select_from(model)))


def _received(ticket: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in ticket["thread"] if m["direction"] == "in"]


async def _inbound(gateway: Any) -> int:
    """Received messages only: the acknowledgements we send are messages too."""
    async with gateway.store.transaction() as session:
        return int(await session.scalar(select(func.count()).select_from(Message)
                                        .where(Message.direction == "in")))


async def _ticket(gateway: Any, number: int) -> dict[str, Any]:
    async with gateway.store.transaction() as session:
        return await queries.ticket_detail(session, number)


async def test_new_mail_becomes_ticket_one(make_gateway: Any) -> None:
    gw = await make_gateway()
    reply = await send(gw.inbound_port, make_mail(subject="Refund needed"))
    assert (reply.code, reply.stage) == (250, "data")
    assert "ticket 1" in reply.message
    ticket = await _ticket(gw, 1)
    assert ticket["subject"] == "Refund needed"
    assert ticket["status"] == "open"
    assert ticket["department"] == "support"
    assert ticket["contact"] == "jess@example.org"
    assert [m["text"].strip() for m in _received(ticket)] == ["Hello, I need help."]
    assert ticket["events"][0]["type"] == "created"


async def test_raw_is_kept_verbatim(make_gateway: Any) -> None:
    gw = await make_gateway()
    mail = make_mail(body="Grüße,\r\n.leading dot line\r\n")
    await send(gw.inbound_port, mail)
    async with gw.store.transaction() as session:
        raw = (await session.scalars(select(Raw))).one()
    assert raw.content == mail


async def test_reply_with_in_reply_to_joins_the_ticket(make_gateway: Any) -> None:
    gw = await make_gateway()
    await send(gw.inbound_port, make_mail(message_id="<first@example.org>"))
    reply = await send(gw.inbound_port, make_mail(subject="Re: Refund needed",
                                                  sender="Other <other@example.net>",
                                                  in_reply_to="<first@example.org>"),
                       mail_from="other@example.net")
    assert reply.code == 250
    assert len(_received(await _ticket(gw, 1))) == 2
    assert await _count(gw, Ticket) == 1


async def test_subject_tag_from_a_stranger_starts_a_new_ticket(make_gateway: Any) -> None:
    gw = await make_gateway()
    await send(gw.inbound_port, make_mail())
    await send(gw.inbound_port, make_mail(subject="Re: [#1] Refund needed",
                                          sender="mallory@example.net"))
    assert await _count(gw, Ticket) == 2
    assert len(_received(await _ticket(gw, 1))) == 1


async def test_subject_tag_from_the_participant_joins_the_ticket(make_gateway: Any) -> None:
    gw = await make_gateway()
    await send(gw.inbound_port, make_mail())
    await send(gw.inbound_port, make_mail(subject="Re: [#1] Refund needed"))
    assert await _count(gw, Ticket) == 1
    assert len(_received(await _ticket(gw, 1))) == 2


async def test_reply_token_threads_a_stranger(make_gateway: Any) -> None:
    gw = await make_gateway()
    await send(gw.inbound_port, make_mail())
    token_address = reply_address("support@example.test", 1, SECRET.encode())
    reply = await send(gw.inbound_port, make_mail(sender="cfo@example.net", to=token_address),
                       rcpts=(token_address,))
    assert reply.code == 250
    assert len(_received(await _ticket(gw, 1))) == 2


async def _close(gw: Any, number: int, closed_at: datetime) -> None:
    async with gw.store.transaction() as session:
        ticket = await session.scalar(select(Ticket).where(Ticket.number == number))
        ticket.status, ticket.closed_at = "closed", closed_at


async def test_reply_to_closed_ticket_reopens_it(make_gateway: Any) -> None:
    gw = await make_gateway()
    await send(gw.inbound_port, make_mail(message_id="<first@example.org>"))
    await _close(gw, 1, datetime.now(UTC) - timedelta(days=1))
    await send(gw.inbound_port, make_mail(subject="Re: Refund needed",
                                          in_reply_to="<first@example.org>"))
    ticket = await _ticket(gw, 1)
    assert ticket["status"] == "open"
    reopened = [e for e in ticket["events"] if e["type"] == "reopened"]
    assert reopened and reopened[0]["data"]["from"] == "closed"


async def test_reply_long_after_close_opens_a_linked_follow_up(make_gateway: Any) -> None:
    gw = await make_gateway()
    await send(gw.inbound_port, make_mail(message_id="<first@example.org>"))
    await _close(gw, 1, datetime.now(UTC) - timedelta(days=30))
    await send(gw.inbound_port, make_mail(subject="Re: Refund needed",
                                          in_reply_to="<first@example.org>"))
    assert (await _ticket(gw, 1))["status"] == "closed"
    follow_up = await _ticket(gw, 2)
    assert follow_up["follow_up_of"] == 1
    assert follow_up["status"] == "open"


async def test_an_idn_department_address_takes_mail_and_acknowledges_it(sqlite_url: str
                                                                        ) -> None:
    """Configured in Unicode, kept as an A-label: the acknowledgement's From is ASCII (it
    raised before, and every mail to the address got 451 while its sender retried)."""
    from gateway.ingest.model import Envelope
    from gateway.ingest.pipeline import Outcome
    from gateway.service import Gateway
    from gateway.settings import parse_settings
    from store.models import Address, Outbox
    from tests.conftest import settings_text

    text = settings_text(sqlite_url).replace('"support@example.test"', '"support@exämple.test"')
    gw = Gateway(parse_settings(text, "t.toml"))
    await gw.start(port=0)
    try:
        async with gw.store.transaction() as session:
            address = await session.scalar(select(Address).where(
                Address.email == "support@xn--exmple-cua.test"))
            assert address is not None
            address.verification_state = "verified"
        verdict = await gw.pipeline.ingest(
            make_mail(to="support@xn--exmple-cua.test"),
            Envelope(mail_from="jess@example.org", rcpt_tos=("support@exämple.test",),
                     peer="127.0.0.1:1", channel="smtp"))
        async with gw.store.read() as session:
            ack = await session.scalar(select(Outbox).where(Outbox.kind == "ack"))
    finally:
        await gw.stop(drain_timeout_s=5)
    assert verdict.outcome is Outcome.STORED
    assert ack is not None and ack.from_addr == "support@xn--exmple-cua.test"
    assert b"<support@xn--exmple-cua.test>" in ack.mime.split(b"\r\n\r\n", 1)[0]


async def test_unknown_recipient_is_refused_at_rcpt(make_gateway: Any) -> None:
    gw = await make_gateway()
    reply = await send(gw.inbound_port, make_mail(), rcpts=("nobody@example.test",))
    assert (reply.code, reply.stage) == (550, "rcpt")
    assert reply.message.startswith("5.1.1")


async def test_relay_attempt_is_refused(make_gateway: Any) -> None:
    gw = await make_gateway()
    reply = await send(gw.inbound_port, make_mail(), rcpts=("victim@elsewhere.example",))
    assert (reply.code, reply.stage) == (554, "rcpt")
    assert reply.message.startswith("5.7.1")


async def test_a_path_that_cannot_parse_is_malformed_not_a_temporary_failure(
        make_gateway: Any) -> None:
    """A 4xx would have the sender retry, for days, what can never parse."""
    from tests.integration.test_smtp_limits import Line

    gw = await make_gateway()
    line, _ = await Line.open(gw.inbound_port)
    assert (await line.command("EHLO client.example")).startswith("250")
    replies = [await line.command(f"MAIL FROM:{arg}") for arg in ("<", '<"', "<@")]
    assert (await line.command("MAIL FROM:<jess@example.org>")).startswith("250")
    replies += [await line.command(f"RCPT TO:{arg}") for arg in ("<", '<"', "<@")]
    assert (await line.command("RCPT TO:<support@example.test>")).startswith("250")
    await line.aclose()
    assert replies == ["553 5.1.3 Error: malformed address"] * 6


async def test_announced_size_over_limit_is_refused_at_mail(make_gateway: Any) -> None:
    gw = await make_gateway()
    reply = await send(gw.inbound_port, make_mail(), mail_options=("SIZE=5000000",))
    assert (reply.code, reply.stage) == (552, "mail")
    assert reply.message.startswith("5.3.4")


async def test_too_big_mail_is_refused_at_end_of_data(make_gateway: Any) -> None:
    gw = await make_gateway()
    body = ("x" * 76 + "\r\n") * 15000  # ~1.1 MiB, over the 1 MiB test limit
    reply = await send(gw.inbound_port, make_mail(body=body))
    assert (reply.code, reply.stage) == (552, "data")
    assert await _inbound(gw) == 0


async def test_store_failure_mid_transaction_answers_451_and_keeps_nothing(
        make_gateway: Any) -> None:
    gw = await make_gateway()
    async with store_fails(gw.store):
        reply = await send(gw.inbound_port, make_mail())
    assert (reply.code, reply.stage) == (451, "data")
    assert reply.message.startswith("4.3.0")
    assert "injected" not in reply.message
    for model in (Ticket, Message, Raw, Event):
        assert await _count(gw, model) == 0, model.__tablename__  # nothing half-written


# aiosqlite drops its half-made connection unclosed when opening the database fails; the
# ResourceWarning surfaces at some later GC. Not ours to close: ignore it for this test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
async def test_store_gone_answers_451(make_gateway: Any, sqlite_url: str, tmp_path: Path
                                      ) -> None:
    gw = await make_gateway(url=sqlite_url)
    database = Path(sqlite_url.split("///", 1)[1])
    await gw.store.engine.dispose()
    database.rename(database.with_suffix(".moved"))
    database.mkdir()  # the path now cannot be opened as a database
    reply = await send(gw.inbound_port, make_mail())
    assert (reply.code, reply.stage) == (451, "data")
    gc.collect()  # let the failed connection's warning surface here, where it is filtered
    database.rmdir()
    database.with_suffix(".moved").rename(database)
    assert await _inbound(gw) == 0
    assert (await send(gw.inbound_port, make_mail())).code == 250


async def test_redelivery_answers_250_and_adds_nothing(make_gateway: Any) -> None:
    gw = await make_gateway()
    mail = make_mail(message_id="<same@example.org>")
    first = await send(gw.inbound_port, mail)
    again = await send(gw.inbound_port, b"Received: from relay2\r\n" + mail)
    assert (first.code, again.code) == (250, 250)
    assert await _inbound(gw) == 1
    assert await _count(gw, Ticket) == 1


async def test_same_mail_forwarded_through_two_addresses_is_stored_once(
        make_gateway: Any) -> None:
    gw = await make_gateway()
    mail = make_mail(message_id="<both@example.org>", to="support@example.test, "
                     "billing@example.test")
    assert (await send(gw.inbound_port, mail)).code == 250
    second = await send(gw.inbound_port, mail, rcpts=("billing@example.test",))
    assert second.code == 250
    assert await _inbound(gw) == 1


async def test_different_mails_sharing_a_message_id_are_both_kept(make_gateway: Any) -> None:
    gw = await make_gateway()
    await send(gw.inbound_port, make_mail(subject="First", message_id="<reused@x>"))
    await send(gw.inbound_port, make_mail(subject="Second", message_id="<reused@x>",
                                          sender="someone@example.net"))
    assert await _inbound(gw) == 2


async def test_several_of_our_recipients_make_one_ticket_in_the_first_department(
        make_gateway: Any) -> None:
    gw = await make_gateway()
    reply = await send(gw.inbound_port, make_mail(), rcpts=("billing@example.test",
                                                            "support@example.test"))
    assert reply.code == 250
    assert await _count(gw, Ticket) == 1
    assert (await _ticket(gw, 1))["department"] == "billing"


async def test_unparseable_mail_is_quarantined_with_250(make_gateway: Any) -> None:
    gw = await make_gateway()
    garbage = b"\x00\x01\x02 this is not a mail at all \xff\xfe\r\n"
    reply = await send(gw.inbound_port, garbage)
    assert reply.code == 250
    async with gw.store.transaction() as session:
        entry = (await session.scalars(select(Quarantine))).one()
        raw = await session.get(Raw, entry.raw_sha256)
    assert raw is not None and raw.content == garbage
    assert entry.reason
    assert await _count(gw, Ticket) == 0


async def test_attachment_over_the_limit_is_left_in_the_raw_with_an_event(
        make_gateway: Any) -> None:
    import base64

    gw = await make_gateway()
    blob = base64.encodebytes(b"\x89PNG" + b"\x00" * 70000).decode().replace("\n", "\r\n")
    small = base64.encodebytes(b"%PDF-1.4 tiny").decode().replace("\n", "\r\n")
    mail = (
        "From: jess@example.org\r\nTo: support@example.test\r\nSubject: files\r\n"
        "Message-ID: <att@example.org>\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"
        "--b\r\nContent-Type: image/png\r\nContent-Disposition: attachment; filename=big.png\r\n"
        f"Content-Transfer-Encoding: base64\r\n\r\n{blob}"
        "--b\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; "
        f"filename=small.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n{small}--b--\r\n"
    ).encode()
    assert (await send(gw.inbound_port, mail)).code == 250
    async with gw.store.transaction() as session:
        rows = {a.filename: a for a in await session.scalars(select(Attachment))}
    assert rows["small.pdf"].content == b"%PDF-1.4 tiny"
    assert rows["big.png"].content is None and rows["big.png"].size == 70004
    events = [e["type"] for e in (await _ticket(gw, 1))["events"]]
    assert "attachment_not_kept" in events
