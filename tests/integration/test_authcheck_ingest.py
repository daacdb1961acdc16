"""Anti-spoofing end to end: real SMTP into the running gateway, whose checker reads a local
DNS table; what threads where, and the Authentication-Results header stored with each mail."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from gateway.ingest.addresses import reply_address
from gateway.ingest.authcheck import TableResolver
from gateway.outbound.dkim import DkimKey, Signer, generate
from store.models import Event, Message, Ticket
from tests.conftest import SECRET
from tests.mailbuild import make_mail, send

KEY = generate("rsa-sha256", 1024)
SIGNER = Signer([DkimKey("example.org", "sel", "rsa-sha256", KEY.private)])
DNS = {"sel._domainkey.example.org": [KEY.dns_value],
       "_dmarc.example.org": ["v=DMARC1; p=reject"],
       "example.org": ["v=spf1 ip4:192.0.2.0/24 -all"]}  # our test client is not in it
FORWARDER = ('trusted_forwarders = [{ip = "127.0.0.0/8", authserv_id = "mx.acme.com"}]')
ELSEWHERE = ('trusted_forwarders = [{ip = "10.0.0.0/8", authserv_id = "mx.acme.com"}]')


async def gateway(make_gateway: Any, extra: str = "") -> Any:
    gw = await make_gateway(extra=extra)
    gw.pipeline.auth.resolver = TableResolver(DNS)
    return gw


def signed(raw: bytes) -> bytes:
    return SIGNER.sign(raw, "example.org")


async def tickets(gw: Any) -> int:
    async with gw.store.transaction() as session:
        return int(await session.scalar(select(func.count()).select_from(Ticket)))


async def received(gw: Any) -> list[tuple[int, str | None]]:
    """(ticket number, auth_results) of each received message, in order."""
    async with gw.store.transaction() as session:
        rows = await session.execute(
            select(Ticket.number, Message.auth_results).join(Ticket, Message.ticket_id == Ticket.id)
            .where(Message.direction == "in").order_by(Message.id))
        return [(n, a) for n, a in rows]


async def test_signed_mail_with_dmarc_pass_threads_by_tag(make_gateway: Any) -> None:
    gw = await gateway(make_gateway)
    assert (await send(gw.inbound_port, signed(make_mail()))).code == 250
    reply = await send(gw.inbound_port, signed(make_mail(subject="Re: [#1] Refund needed")))
    assert (reply.code, "ticket 1" in reply.message) == (250, True)
    stored = await received(gw)
    assert [n for n, _ in stored] == [1, 1]
    assert all(a is not None and a.startswith("deskgate.test; dkim=pass header.d=example.org")
               and "dmarc=pass header.from=example.org" in a for _, a in stored)


async def test_forged_sender_cannot_thread_by_tag_but_can_by_token(make_gateway: Any) -> None:
    gw = await gateway(make_gateway)
    await send(gw.inbound_port, signed(make_mail()))  # the real customer opens ticket 1
    forged = make_mail(subject="Re: [#1] Refund needed", body="Send the refund to my new IBAN")
    assert (await send(gw.inbound_port, forged)).code == 250
    assert [n for n, _ in await received(gw)] == [1, 2]  # a new ticket, not an injection
    async with gw.store.transaction() as session:
        created = await session.scalar(select(Event.data).join(Ticket).where(
            Ticket.number == 2, Event.type == "created"))
    assert "authentication failed" in created["thread"]
    _, header = (await received(gw))[1]
    assert header is not None and "spf=fail" in header and "dmarc=fail" in header
    token = reply_address("support@example.test", 1, SECRET.encode())
    reply = await send(gw.inbound_port, make_mail(to=token, body="Still the forger"),
                       rcpts=(token,))
    assert reply.code == 250 and "ticket 1" in reply.message  # the token is unguessable
    assert await tickets(gw) == 2


async def test_forged_results_header_from_an_untrusted_peer_is_ignored(make_gateway: Any
                                                                       ) -> None:
    gw = await gateway(make_gateway, ELSEWHERE)
    await send(gw.inbound_port, signed(make_mail()))
    forged = make_mail(subject="Re: [#1] Refund needed", headers={
        "Authentication-Results": "mx.acme.com; spf=pass smtp.mailfrom=jess@example.org; "
                                  "dmarc=pass header.from=example.org"})
    await send(gw.inbound_port, forged)
    stored = await received(gw)
    assert [n for n, _ in stored] == [1, 2]
    assert "mx.acme.com" not in (stored[1][1] or "")  # our own verdict, not the forged one


async def test_trusted_forwarders_header_is_used(make_gateway: Any) -> None:
    gw = await gateway(make_gateway, FORWARDER)  # our test client stands for the company MTA
    await send(gw.inbound_port, b"Authentication-Results: mx.acme.com; dmarc=pass\r\n"
               + make_mail())
    await send(gw.inbound_port, b"Authentication-Results: mx.acme.com; dmarc=pass\r\n"
               + make_mail(subject="Re: [#1] Refund needed"))  # unsigned: SPF alone would fail
    await send(gw.inbound_port, b"Authentication-Results: mx.acme.com; dmarc=fail\r\n"
               + make_mail(subject="Re: [#1] Refund needed", body="forged"))
    stored = await received(gw)
    assert [n for n, _ in stored] == [1, 1, 2]
    assert "dmarc=pass (from mx.acme.com)" in (stored[1][1] or "")
    assert "dmarc=fail (from mx.acme.com)" in (stored[2][1] or "")


async def test_record_mode_stores_the_verdict_but_threads_as_before(make_gateway: Any) -> None:
    gw = await gateway(make_gateway, '[inbound.authentication]\nmode = "record"')
    await send(gw.inbound_port, signed(make_mail()))
    await send(gw.inbound_port, make_mail(subject="Re: [#1] Refund needed"))
    stored = await received(gw)
    assert [n for n, _ in stored] == [1, 1]
    assert "dmarc=fail" in (stored[1][1] or "")


async def test_forged_sender_threads_only_by_a_message_id_we_sent(make_gateway: Any) -> None:
    """A customer's Message-ID travels to every Cc and list: it proves nothing. Ours (the
    acknowledgement's) reached only the customer, so a forger naming it is no risk."""
    gw = await gateway(make_gateway)
    original = signed(make_mail(message_id="<original.1@example.org>"))
    assert (await send(gw.inbound_port, original)).code == 250
    forged = make_mail(subject="Re: Refund needed", body="New IBAN, please",
                       in_reply_to="<original.1@example.org>")
    reply = await send(gw.inbound_port, forged)
    assert reply.code == 250 and "ticket 2" in reply.message
    async with gw.store.transaction() as session:
        ours = await session.scalar(select(Message.message_id).where(
            Message.ticket_id == 1, Message.direction == "out", Message.kind == "ack"))
    assert ours is not None
    answer = make_mail(subject="Re: Refund needed", body="Thanks", in_reply_to=f"<{ours}>")
    reply = await send(gw.inbound_port, answer)
    assert reply.code == 250 and "ticket 1" in reply.message


async def test_the_null_senders_helo_name_is_what_spf_checks(make_gateway: Any) -> None:
    gw = await make_gateway()
    gw.pipeline.auth.resolver = TableResolver(
        {**DNS, "mx.bounce.example": ["v=spf1 ip4:127.0.0.0/8 -all"]})
    reply = await send(gw.inbound_port, make_mail(), mail_from="", helo="mx.bounce.example")
    assert reply.code == 250
    [(_, header)] = await received(gw)
    assert header is not None and "spf=pass smtp.helo=mx.bounce.example" in header
