"""Agents working from their mail client (issue 6): replies, notes, commands, collisions,
agent-initiated tickets. The customer side is real SMTP into the inbound port, the agent side
the authenticated submission port over TLS, outgoing mail a capture relay."""

from __future__ import annotations

import hashlib
import re
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from email.message import Message as EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from sqlalchemy import select

from gateway.agents import hash_password
from gateway.outbound.catcher import CatchHandler, start_catcher
from store import blobs
from store.models import Agent, AgentDepartment, Department, Event, Message, Outbox, Raw, Ticket
from tests.mailbuild import make_mail, send

PASSWORD = "correct horse battery"


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def desk(make_gateway: Any, tmp_path: Path) -> AsyncIterator[tuple[Any, CatchHandler]]:
    """A gateway with a capture relay, its submission port on TLS, and five agents."""
    relay = CatchHandler()
    server = await start_catcher(relay, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    gateway = await make_gateway(clock=Clock(), extra=(
        f'[relay]\nlisten = "127.0.0.1:{port}"\ntimeout_s = 5\n[outbox]\nworker = false\n'
        f'[dev]\nbootstrap = true\ndir = "{tmp_path}"\n'
        f'[submission]\nlisten = "127.0.0.1:0"\n'))
    hashed = hash_password(PASSWORD)
    async with gateway.store.transaction() as session:
        departments = {d.slug: d.id for d in await session.scalars(select(Department))}
        for email_, name, profile, slug in (
                ("shawn@staff.test", "Shawn", "agent", "support"),
                ("kim@staff.test", "Kim", "agent", "support"),
                ("lee@staff.test", "Lee", "light_agent", "support"),
                ("nina@staff.test", "Nina", "newbie_agent", "support"),
                ("bert@staff.test", "Bert", "agent", "billing")):
            agent = Agent(email=email_, name=name, profile=profile, credential_hash=hashed,
                          active=True, created_at=gateway.pipeline.clock())
            session.add(agent)
            await session.flush()
            session.add(AgentDepartment(agent_id=agent.id, department_id=departments[slug]))
    yield gateway, relay
    server.close()


async def submit(gw: Any, agent: str, data: bytes, rcpts: tuple[str, ...]) -> tuple[int, str]:
    """One mail through the submission port: STARTTLS, AUTH, MAIL, RCPT, DATA."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # self-signed dev cert
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.submission.port, timeout=30,
                             start_tls=False, tls_context=context)
    await client.connect()
    try:
        await client.ehlo()
        await client.starttls()
        await client.login(agent, PASSWORD)
        await client.mail(agent)
        for rcpt in rcpts:
            await client.rcpt(rcpt)
        response = await client.data(data)
        return response.code, response.message
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code, exc.message
    finally:
        try:
            await client.quit()
        except aiosmtplib.SMTPException:
            client.close()


async def flush(gw: Any, relay: CatchHandler) -> list[EmailMessage]:
    await gw.outbound.worker.run_until_idle()
    return [c.message for c in relay.caught]


def to(mails: list[EmailMessage], address: str) -> list[EmailMessage]:
    return [m for m in mails if address in str(m["To"])]


def text(mail: EmailMessage) -> str:
    return mail.get_body(("plain",)).get_content()


async def customer_mail(gw: Any, relay: CatchHandler, subject: str = "Printer broken",
                        body: str = "My printer is broken.") -> tuple[str, EmailMessage]:
    """A customer opens a ticket; returns its Message-ID and the acknowledgement."""
    raw = make_mail(subject=subject, body=body)
    reply = await send(gw.inbound_port, raw)
    assert reply.code == 250, reply
    message_id = re.search(rb"Message-ID: <([^>]+)>", raw).group(1).decode()  # type: ignore
    [ack] = [m for m in await flush(gw, relay) if "jess@example.org" in str(m["To"])
             and m["Auto-Submitted"] == "auto-replied"][-1:]
    return message_id, ack


def agent_mail(sender: str, to_: str, body: str, subject: str = "Re: Printer broken",
               in_reply_to: str | None = None) -> bytes:
    return make_mail(subject=subject, sender=sender, to=to_, body=body,
                     in_reply_to=f"<{in_reply_to}>" if in_reply_to else None,
                     references=f"<{in_reply_to}>" if in_reply_to else None)


async def ticket(gw: Any, number: int = 1) -> Ticket:
    async with gw.store.read() as session:
        found = await session.scalar(select(Ticket).where(Ticket.number == number))
        assert found is not None
        return found


async def test_reply_reaches_the_customer_from_the_department_with_threading(desk: Any) -> None:
    gw, relay = desk
    customer_id, _ = await customer_mail(gw, relay)
    code, message = await submit(gw, "shawn@staff.test", agent_mail(
        "Shawn <shawn@staff.test>", "jess@example.org",
        "We are sending a new printer.\n\nOn Monday, Jess wrote:\n> My printer is broken.",
        in_reply_to=customer_id), ("jess@example.org",))
    assert code == 250, message
    [answer] = [m for m in to(await flush(gw, relay), "jess@example.org")
                if "new printer" in text(m)]
    assert answer["From"] == 'Shawn via Support <support@example.test>'
    assert answer["In-Reply-To"] == f"<{customer_id}>"
    assert f"<{customer_id}>" in answer["References"]
    assert re.match(r"Shawn via Support <support\+t1-[a-z2-7]{10}@example\.test>",
                    answer["Reply-To"])
    assert "[#1]" in answer["Subject"] and "My printer is broken" not in text(answer)
    assert answer["DKIM-Signature"] is not None
    found = await ticket(gw)
    assert found.first_response_at is not None
    async with gw.store.read() as session:
        shawn = await session.scalar(select(Agent.id).where(Agent.email == "shawn@staff.test"))
    assert found.owner_id == shawn  # the first to answer owns it

    # The customer's answer to the agent's reply threads back into ticket 1.
    reply = await send(gw.inbound_port, make_mail(
        subject=f"Re: {answer['Subject']}", body="Thanks!", in_reply_to=answer["Message-ID"]))
    assert reply.code == 250 and "ticket 1" in reply.message


async def test_note_is_never_sent_to_the_customer(desk: Any) -> None:
    gw, relay = desk
    customer_id, _ = await customer_mail(gw, relay)
    before = len(relay.caught)
    code, message = await submit(gw, "shawn@staff.test", agent_mail(
        "shawn@staff.test", "support@example.test",
        "#note\nCustomer called, the serial number is 4711.", in_reply_to=customer_id),
        ("support@example.test",))
    assert code == 250, message
    mails = (await flush(gw, relay))[before:]
    assert not to(mails, "jess@example.org")
    assert all("4711" not in text(m) or "jess" not in str(m["To"]) for m in mails)
    # Shared with the department's other agents, not with the billing agent.
    shared = {str(m["To"]) for m in mails if "4711" in text(m)}
    assert shared == {"kim@staff.test", "lee@staff.test", "nina@staff.test"}
    async with gw.store.read() as session:
        kinds = list(await session.scalars(select(Message.kind).where(
            Message.direction == "out").order_by(Message.id)))
    assert kinds[-1] == "note" and "agent_reply_sent" not in kinds


async def test_close_command_sends_the_reply_then_closes_and_asks_for_a_rating(
        desk: Any) -> None:
    gw, relay = desk
    customer_id, _ = await customer_mail(gw, relay)
    code, message = await submit(gw, "shawn@staff.test", agent_mail(
        "shawn@staff.test", "jess@example.org", "All fixed.\n#close",
        in_reply_to=customer_id), ("jess@example.org",))
    assert code == 250, message
    mails = to(await flush(gw, relay), "jess@example.org")
    answer = [m for m in mails if "All fixed" in text(m)]
    rating = [m for m in mails if "/rate/" in text(m)]
    assert len(answer) == 1 and len(rating) == 1 and "#close" not in text(answer[0])
    assert mails.index(answer[0]) < mails.index(rating[0])  # the answer first
    assert (await ticket(gw)).status == "closed"


async def test_commands_in_the_subject_and_unknown_commands_go_back_to_the_agent(
        desk: Any) -> None:
    gw, relay = desk
    customer_id, _ = await customer_mail(gw, relay)
    before = len(relay.caught)
    code, message = await submit(gw, "shawn@staff.test", agent_mail(
        "shawn@staff.test", "jess@example.org", "#priority high\n#tag printer\n#clsoe\n",
        subject="Re: Printer broken #hold", in_reply_to=customer_id), ("jess@example.org",))
    assert code == 250, message
    found = await ticket(gw)
    assert (found.status, found.priority, found.tags) == ("on_hold", "high", ["printer"])
    mails = (await flush(gw, relay))[before:]
    assert not to(mails, "jess@example.org")  # commands only: nothing for the customer
    [report] = to(mails, "shawn@staff.test")
    assert "#clsoe" in text(report)


async def test_light_agent_may_only_add_notes(desk: Any) -> None:
    gw, relay = desk
    customer_id, _ = await customer_mail(gw, relay)
    code, message = await submit(gw, "lee@staff.test", agent_mail(
        "lee@staff.test", "jess@example.org", "Here is the answer.", in_reply_to=customer_id),
        ("jess@example.org",))
    assert code == 550 and "5.7.1" in message and "note" in message
    code, message = await submit(gw, "lee@staff.test", agent_mail(
        "lee@staff.test", "support@example.test", "#note\nChecked the logs.",
        in_reply_to=customer_id), ("support@example.test",))
    assert code == 250, message


async def test_newbie_reply_waits_for_approval(desk: Any, tmp_path: Path) -> None:
    gw, relay = desk
    customer_id, _ = await customer_mail(gw, relay)
    before = len(relay.caught)
    code, message = await submit(gw, "nina@staff.test", agent_mail(
        "nina@staff.test", "jess@example.org", "Try turning it off and on.",
        in_reply_to=customer_id), ("jess@example.org",))
    assert code == 250, message
    mails = (await flush(gw, relay))[before:]
    assert not to(mails, "jess@example.org")
    [notice] = to(mails, "nina@staff.test")
    async with gw.store.read() as session:
        [row] = await session.scalars(select(Outbox).where(Outbox.kind == "agent_reply"))
    assert row.state == "approval" and f"outbox approve {row.id}" in text(notice)
    from gateway.outbound import queue

    async with gw.store.transaction() as session:
        assert "queued" in await queue.approve(session, row.id, gw.pipeline.clock())
    [answer] = to((await flush(gw, relay))[before:], "jess@example.org")
    assert "turning it off" in text(answer)


async def test_agent_outside_the_department_is_refused(desk: Any) -> None:
    gw, relay = desk
    customer_id, ack = await customer_mail(gw, relay)
    code, message = await submit(gw, "bert@staff.test", agent_mail(
        "bert@staff.test", "jess@example.org", "I am from billing.",
        in_reply_to=customer_id), ("jess@example.org",))
    assert code == 550 and "5.7.1" in message and "support" in message
    # Through the ticket's reply token the refusal comes at RCPT already.
    token = re.search(r"<([^>]+)>", ack["Reply-To"]).group(1)  # type: ignore[union-attr]
    code, message = await submit(gw, "bert@staff.test", agent_mail(
        "bert@staff.test", token, "Hello"), (token,))
    assert code == 550 and "5.7.1" in message and "ticket 1" in message


async def test_second_reply_after_the_first_is_held_with_a_collision_notice(desk: Any) -> None:
    gw, relay = desk
    customer_id, _ = await customer_mail(gw, relay)
    code, _ = await submit(gw, "shawn@staff.test", agent_mail(
        "shawn@staff.test", "jess@example.org", "Shawn's answer: a new printer is coming.",
        in_reply_to=customer_id), ("jess@example.org",))
    assert code == 250
    before = len(await flush(gw, relay))
    kim = agent_mail("kim@staff.test", "jess@example.org", "Kim's answer: reinstall the driver.",
                     in_reply_to=customer_id)
    code, message = await submit(gw, "kim@staff.test", kim, ("jess@example.org",))
    assert code == 250, message
    mails = (await flush(gw, relay))[before:]
    assert not to(mails, "jess@example.org")
    [notice] = to(mails, "kim@staff.test")
    assert "new printer is coming" in text(notice) and "#force" in text(notice)
    # Resent with #force, it goes out.
    forced = agent_mail("kim@staff.test", "jess@example.org",
                        "#force\nKim's answer: reinstall the driver.", in_reply_to=customer_id)
    code, message = await submit(gw, "kim@staff.test", forced, ("jess@example.org",))
    assert code == 250, message
    [answer] = to((await flush(gw, relay))[before:], "jess@example.org")
    assert "reinstall the driver" in text(answer) and "#force" not in text(answer)


async def test_agent_initiated_ticket_is_owned_by_the_agent(desk: Any) -> None:
    gw, relay = desk
    code, message = await submit(gw, "shawn@staff.test", make_mail(
        subject="Your call about the invoice", sender="Shawn <shawn@staff.test>",
        to="carla@customer.test", body="As discussed on the phone, here is the summary."),
        ("carla@customer.test",))
    assert code == 250 and "ticket 1" in message, message
    [mail] = to(await flush(gw, relay), "carla@customer.test")
    assert mail["Subject"] == "[#1] Your call about the invoice"
    assert mail["From"] == 'Shawn via Support <support@example.test>'
    found = await ticket(gw)
    async with gw.store.read() as session:
        shawn = await session.scalar(select(Agent.id).where(Agent.email == "shawn@staff.test"))
        events = list(await session.scalars(select(Event.type).where(
            Event.ticket_id == found.id)))
    assert found.owner_id == shawn and found.channel == "agent" and "created" in events
    # The customer's answer threads into it.
    reply = await send(gw.inbound_port, make_mail(
        sender="Carla <carla@customer.test>", subject=f"Re: {mail['Subject']}",
        body="Thanks, that helps.", in_reply_to=mail["Message-ID"]),
        mail_from="carla@customer.test")
    assert reply.code == 250 and "ticket 1" in reply.message


async def test_agent_cannot_write_as_someone_else(desk: Any) -> None:
    gw, relay = desk
    customer_id, _ = await customer_mail(gw, relay)
    code, message = await submit(gw, "shawn@staff.test", agent_mail(
        "Kim <kim@staff.test>", "jess@example.org", "Signed, Kim", in_reply_to=customer_id),
        ("jess@example.org",))
    assert code == 553 and "5.7.1" in message


async def test_a_resent_agent_mail_is_sent_once(desk: Any) -> None:
    gw, relay = desk
    customer_id, _ = await customer_mail(gw, relay)
    raw = agent_mail("shawn@staff.test", "jess@example.org", "Only once, please.",
                     in_reply_to=customer_id)
    for _ in range(2):
        code, message = await submit(gw, "shawn@staff.test", raw, ("jess@example.org",))
        assert code == 250, message
    assert len([m for m in to(await flush(gw, relay), "jess@example.org")
                if "Only once" in text(m)]) == 1


async def test_a_big_agent_reply_is_stored_in_pieces_and_sent(desk: Any) -> None:
    """Over 256 KiB an agent's mail goes to the store ahead in pieces, as a customer's does
    (store/blobs.py), and comes back whole."""
    gw, relay = desk
    customer_id, _ = await customer_mail(gw, relay)
    long_text = "The full log follows, line by line.\n" + "log line 0123456789\n" * 120_000
    raw = agent_mail("shawn@staff.test", "jess@example.org", long_text,
                     in_reply_to=customer_id)
    received = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")  # SMTP sends CRLF
    assert 2 * blobs.PART_BYTES < len(received) < 3 * blobs.PART_BYTES
    code, message = await submit(gw, "shawn@staff.test", raw, ("jess@example.org",))
    assert code == 250, message
    async with gw.store.read() as session:
        sha = await session.scalar(select(Message.raw_sha256)
                                   .where(Message.kind == "agent_reply"))
        stored = await session.get(Raw, sha)
        assert stored is not None and (stored.parts, stored.content) == (3, b"")
        assert await blobs.read_raw(session, sha) == received
    assert sha == hashlib.sha256(received).hexdigest()
    [sent] = [m for m in to(await flush(gw, relay), "jess@example.org")
              if "The full log follows" in text(m)]
    assert text(sent).count("log line 0123456789") == 120_000


async def test_reply_to_the_notification_answers_the_customer_without_our_internals(
        desk: Any) -> None:
    gw, relay = desk
    customer_id, _ = await customer_mail(gw, relay, body="The paper tray is jammed.")
    [notification] = to(relay.caught and [c.message for c in relay.caught], "shawn@staff.test")
    token = re.search(r"<([^>]+)>", notification["Reply-To"]).group(1)  # type: ignore[union-attr]
    quoted = "\n".join(f"> {line}" for line in text(notification).splitlines())
    code, message = await submit(gw, "shawn@staff.test", agent_mail(
        "shawn@staff.test", token, f"Open the back cover and pull the sheet.\n\n"
        f"On Mon, 23 Nov 2026, Support wrote:\n{quoted}",
        subject=f"Re: {notification['Subject']}",
        in_reply_to=notification["Message-ID"].strip("<>")), (token,))
    assert code == 250, message
    [answer] = [m for m in to(await flush(gw, relay), "jess@example.org")
                if "back cover" in text(m)]
    body = text(answer)
    assert "paper tray" not in body and "##-" not in body and "Reply to this" not in body
    assert answer["In-Reply-To"] == f"<{customer_id}>"  # it answers the customer's mail


async def test_reply_all_copies_the_cc_participants(desk: Any) -> None:
    gw, relay = desk
    customer_id, _ = await customer_mail(gw, relay)
    code, message = await submit(gw, "shawn@staff.test", agent_mail(
        "shawn@staff.test", "jess@example.org", "Copying your colleague.",
        in_reply_to=customer_id), ("jess@example.org", "boss@example.org", "kim@staff.test"))
    assert code == 250, message
    mails = [m for m in await flush(gw, relay) if "Copying" in text(m)]
    assert sorted(str(m["To"]) for m in mails) == ["jess@example.org", "jess@example.org"]
    assert all(m["Cc"] == "boss@example.org" for m in mails)  # the colleague is not copied
    assert len({m["Message-ID"] for m in mails}) == 1
