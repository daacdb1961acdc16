"""Crash drill: SIGKILL the daemon K times at random moments while a client sends N mails.

The client behaves like an MTA: a mail that got no 250 (refused connection, dropped session,
4xx) is sent again later, so a mail whose 250 died with the daemon comes back and must be
answered as a duplicate, never become a second message or a second ticket.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib
import pytest
from sqlalchemy import func, select

from gateway.replies import R250_DUPLICATE
from store.engine import Store
from store.models import Attachment, Event, Message, Outbox, Raw, Ticket
from tests.daemon import Daemon, free_port, write_config
from tests.mailbuild import make_mail, send

pytestmark = pytest.mark.drill
MAILS = int(os.environ.get("DESKGATE_DRILL_MAILS", "200"))
KILLS = int(os.environ.get("DESKGATE_DRILL_KILLS", "3"))
CLIENTS = 8
SENDERS = 23  # few senders: contacts are shared between conversations, as in real life
# These drills send far more than one sender's or domain's allowance per window; the rate
# limits (and their 451 4.7.1) have their own tests.
NO_RATE_LIMITS = "\n[inbound.rate_limits]\nper_sender = 0\nper_domain = 0\nper_ip = 0\n"
DRILL_TOML = (NO_RATE_LIMITS + "[outbox]\nworker = false\n"  # acks stay where we count them
              "[acknowledgements]\nper_contact_per_hour = 1000000\n")


def seed() -> int:
    value = int(os.environ.get("DESKGATE_DRILL_SEED", "0")) or random.randrange(1, 10**6)
    print(f"\n[drill] seed={value} (DESKGATE_DRILL_SEED to repeat)")
    return value


@dataclass
class Mail:
    index: int
    message_id: str
    raw: bytes
    sender: str
    root: int  # index of the conversation's first mail (itself for a new one)
    attachments: int


@dataclass
class Tally:
    """What the client saw: every mail it got a 250 for, and how it got there."""

    acknowledged: dict[int, str] = field(default_factory=dict)  # index -> 250 text
    attempts: Counter[str] = field(default_factory=Counter)  # outcome -> count

    @property
    def resent_duplicates(self) -> int:
        return sum(1 for text in self.acknowledged.values() if text == R250_DUPLICATE)


def attachment_mail(message_id: str, sender: str, subject: str, in_reply_to: str | None,
                    files: int) -> bytes:
    head = (f"From: {sender}\r\nTo: support@example.test\r\nSubject: {subject}\r\n"
            f"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: {message_id}\r\n"
            + (f"In-Reply-To: {in_reply_to}\r\n" if in_reply_to else "")
            + 'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n')
    parts = ["--b\r\nContent-Type: text/plain\r\n\r\nFiles attached.\r\n"]
    for n in range(files):
        parts.append(f"--b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: "
                     f"attachment; filename=f{n}.bin\r\n\r\n" + (f"{n}" * 76 + "\r\n") * 100)
    return (head + "".join(parts) + "--b--\r\n").encode()


class Conversations:
    """Builds mail i when it is first sent: a reply only to a conversation that got its 250."""

    def __init__(self, rng: random.Random, tag: str) -> None:
        self.rng, self.tag = rng, tag
        self.mails: dict[int, Mail] = {}
        self.open_roots: list[int] = []

    def mail(self, i: int) -> Mail:
        if i in self.mails:  # a retry sends the very same bytes, as an MTA does
            return self.mails[i]
        files = self.rng.choice((0, 0, 0, 1, 2))
        message_id = f"<{self.tag}{i}@example.org>"
        if self.open_roots and self.rng.random() < 0.4:
            root = self.mails[self.rng.choice(self.open_roots)]
            sender, subject, parent = root.sender, f"Re: Crash {root.index}", root.message_id
        else:
            root = None
            sender, subject, parent = f"c{i % SENDERS}@example.org", f"Crash {i}", None
        raw = (attachment_mail(message_id, sender, subject, parent, files) if files else
               make_mail(subject=subject, sender=sender, message_id=message_id,
                         in_reply_to=parent, body=f"Mail {i}\r\n" * 40))
        made = Mail(i, message_id, raw, sender, root.index if root else i, files)
        self.mails[i] = made
        return made

    def acknowledged(self, mail: Mail) -> None:
        if mail.root == mail.index:
            self.open_roots.append(mail.index)


async def send_until_250(port: int, conversations: Conversations, count: int, tally: Tally,
                         clients: int = CLIENTS, pause_s: float = 0.1) -> None:
    """`clients` connections deliver mails 0..count-1, retrying each until it gets a 250."""
    todo: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        todo.put_nowait(i)

    async def client() -> None:
        while len(tally.acknowledged) < count:
            try:
                i = todo.get_nowait()
            except asyncio.QueueEmpty:
                await asyncio.sleep(pause_s)  # the rest is in flight; one may come back
                continue
            mail = conversations.mail(i)
            try:
                reply = await send(port, mail.raw, mail_from=mail.sender)
            except (OSError, aiosmtplib.SMTPException) as exc:
                tally.attempts[type(exc).__name__] += 1
                todo.put_nowait(i)
                await asyncio.sleep(pause_s)
                continue
            tally.attempts[str(reply.code)] += 1
            if reply.code == 250:
                tally.acknowledged[i] = reply.message
                conversations.acknowledged(mail)
            else:
                assert reply.code < 500, f"mail {i}: {reply}"  # never bounce a sender's mail
                todo.put_nowait(i)
                await asyncio.sleep(pause_s)

    async with asyncio.TaskGroup() as group:  # one client's failure stops the others
        for _ in range(clients):
            group.create_task(client())


@dataclass(frozen=True)
class Stored:
    messages: dict[str, list[tuple[int, int, str, int]]]  # Message-ID -> [(pk, ticket, raw, att)]
    raws: set[str]
    tickets: dict[int, int]  # ticket id -> its first message pk
    created_events: Counter[int]
    acks: Counter[int]  # ticket id -> acknowledgement rows in the outbox


async def read_store(db_url: str, tag: str) -> Stored:
    store = Store(db_url)
    try:
        async with store.read() as session:
            rows = (await session.execute(
                select(Message.message_id, Message.id, Message.ticket_id, Message.raw_sha256,
                       func.count(Attachment.id))
                .outerjoin(Attachment, Attachment.message_id == Message.id)
                .where(Message.message_id.like(f"{tag}%"), Message.direction == "in")
                .group_by(Message.id))).all()
            raws = set(await session.scalars(select(Raw.sha256)))
            tickets = dict((await session.execute(
                select(Ticket.id, func.min(Message.id))
                .outerjoin(Message, Message.ticket_id == Ticket.id)
                .group_by(Ticket.id))).all())
            created = Counter(await session.scalars(
                select(Event.ticket_id).where(Event.type == "created")))
            acks = Counter(await session.scalars(
                select(Outbox.ticket_id).where(Outbox.kind == "ack")))
    finally:
        await store.dispose()
    messages: dict[str, list[tuple[int, int, str, int]]] = {}
    for message_id, pk, ticket, raw, attachments in rows:
        messages.setdefault(f"<{message_id}>", []).append((pk, ticket, raw, attachments))
    return Stored(messages, raws, tickets, created, acks)


def check(stored: Stored, conversations: Conversations, tally: Tally) -> tuple[int, int]:
    """Every acknowledged mail exactly once with its ticket effects; returns (lost, duplicated)."""
    lost = [i for i in tally.acknowledged
            if conversations.mails[i].message_id not in stored.messages]
    duplicated = [mid for mid, rows in stored.messages.items() if len(rows) > 1]
    assert not lost, f"acknowledged but not stored: {sorted(lost)}"
    assert not duplicated, f"stored more than once: {duplicated}"
    ticket_of: dict[int, int] = {}
    for i in sorted(tally.acknowledged):
        mail = conversations.mails[i]
        (pk, ticket, raw, attachments), = stored.messages[mail.message_id]
        assert raw in stored.raws, f"mail {i}: raw bytes missing"
        assert attachments == mail.attachments, f"mail {i}: {attachments} attachments"
        if mail.root == i:
            assert stored.tickets[ticket] == pk, f"mail {i} does not open its ticket"
            ticket_of[i] = ticket
    for i in tally.acknowledged:  # a reply sits in its conversation's ticket
        mail = conversations.mails[i]
        assert stored.messages[mail.message_id][0][1] == ticket_of[mail.root], f"mail {i}"
    roots = set(ticket_of.values())
    assert len(roots) == len(ticket_of)  # one ticket per new conversation
    assert set(stored.tickets) == roots, "a ticket no new conversation explains"
    assert all(stored.created_events[t] == 1 for t in roots), stored.created_events
    assert stored.acks == Counter(roots), "not exactly one acknowledgement per new ticket"
    return len(lost), len(duplicated)


async def test_random_kills_lose_and_duplicate_nothing(db_url: str, tmp_path: Path) -> None:
    rng = random.Random(seed())
    port = free_port()
    config = write_config(tmp_path / "deskgate.toml", db_url, port, extra_departments=DRILL_TOML)
    subprocess.run([sys.executable, "-m", "gateway.cli", "--config", str(config), "db",
                    "upgrade"], check=True, capture_output=True)
    daemon = Daemon(config, tmp_path / "daemon.log")
    await daemon.start()
    conversations, tally = Conversations(rng, "crash"), Tally()
    # Kill points spread over the burst: each at a random count of acknowledged mails.
    kill_at = sorted(rng.sample(range(MAILS // 10, MAILS * 9 // 10), KILLS))
    downtime: list[float] = []

    async def killer() -> None:
        loop = asyncio.get_running_loop()
        for threshold in kill_at:
            while len(tally.acknowledged) < threshold:
                await asyncio.sleep(0.005)
            await asyncio.sleep(rng.uniform(0, 0.05))  # somewhere inside the next mails
            daemon.signal(signal.SIGKILL)
            assert await daemon.wait() == -signal.SIGKILL
            began = loop.time()
            await daemon.start()
            downtime.append(loop.time() - began)

    started = asyncio.get_running_loop().time()
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(killer())
            group.create_task(send_until_250(port, conversations, MAILS, tally))
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0
    finally:
        daemon.close()
    elapsed = asyncio.get_running_loop().time() - started
    stored = await read_store(db_url, "crash")
    lost, duplicated = check(stored, conversations, tally)
    roots = sum(1 for i in tally.acknowledged if conversations.mails[i].root == i)
    print(f"[drill] crash {db_url.split(':')[0]}: N={MAILS} K={len(downtime)} lost={lost} "
          f"duplicated={duplicated} tickets={len(stored.tickets)} conversations={roots} "
          f"replies={MAILS - roots} resent_250_lost={tally.resent_duplicates} "
          f"attempts={dict(tally.attempts)} restart_s={max(downtime):.2f} "
          f"elapsed_s={elapsed:.1f}")
    assert len(downtime) == KILLS
    assert len(tally.acknowledged) == MAILS
