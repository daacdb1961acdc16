"""Notifications: new tickets and customer replies mailed to the department's agents (issue 6).

An after-store hook, like the acknowledgement: its outbox rows commit with the customer's
mail. Replying to a notification answers the customer: it carries the ticket's Reply-To
token and its Message-ID is recorded on the ticket (DESIGN 3a, threading step 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

import structlog
from sqlalchemy import bindparam, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.agentmail.commands import REPLY_MARKER, REPLY_MARKERS
from gateway.ingest.addresses import reply_address
from gateway.ingest.pipeline import StoredMail
from gateway.outbound import queue
from gateway.outbound.compose import Outgoing, compose, new_message_id, tagged_subject
from gateway.outbound.render import Renderer
from gateway.settings import DepartmentSettings, Settings
from store import repo
from store.direct import direct
from store.models import Agent, AgentDepartment, Message, Ticket

log = structlog.get_logger("deskgate.notify")
Events = list[tuple[str, dict[str, Any]]]
PREVIOUS_TICKETS = 5
MAX_TEXT_CHARS = 20_000  # a notification is a pointer, not an archive: the raw mail is kept


@dataclass(frozen=True, slots=True)
class Recipient:
    id: int
    email: str


def recipients(mode: str, agents: Sequence[Recipient], owner: Recipient | None,
               sender: str | None) -> tuple[str, ...]:
    """Who hears of the mail: the department's active agents, or the ticket's active owner
    (the department's agents when it has none); never the one who wrote it."""
    if mode == "none":
        return ()
    chosen = [owner] if mode == "owner" and owner is not None else agents
    return tuple(a.email for a in chosen if a.email != sender)


def skip_reason(automated: bool, sender_is_agent: bool) -> str | None:
    """None when the mail is news for the agents, else why it is not (pure)."""
    if automated:  # auto-replies, bounces, lists: DESIGN 4, Loops
        return "automated mail"
    if sender_is_agent:
        return "the sender is an agent"
    return None


def event_of(stored: StoredMail) -> str:
    return "created" if stored.created else "reopened" if stored.reopened else "reply"


_A, _T = Agent.__table__, Ticket.__table__
_MEMBERS = (select(AgentDepartment.__table__.c.agent_id)
            .where(AgentDepartment.__table__.c.department_id == _T.c.department_id))
# Every agent the hook may need to know of, in one round trip (issue 10): the sender if an
# agent (any agent, active or not: their mail is never a customer's, DESIGN 3a), the
# ticket's department's agents and its owner. No agent at all: no row.
_PEOPLE = direct(select(_A.c.id, _A.c.email, _A.c.active, _A.c.email == bindparam("sender"),
                  _A.c.id.in_(_MEMBERS), _A.c.id == _T.c.owner_id)
           .select_from(_A.join(_T, _T.c.id == bindparam("ticket_id")))
           .where(or_(_A.c.email == bindparam("sender"), _A.c.id == _T.c.owner_id,
                      _A.c.id.in_(_MEMBERS)))
           .order_by(_A.c.id))
_TEXT = direct(select(Message.__table__.c.visible_text, Message.__table__.c.text).where(
    Message.__table__.c.id == bindparam("message_pk")))


@dataclass(frozen=True, slots=True)
class People:
    sender_is_agent: bool
    agents: list[Recipient]  # the department's active agents, by id
    owner: Recipient | None  # the ticket's owner, when active


async def _people(session: AsyncSession, ticket_id: int, sender: str | None) -> People:
    rows = (await session.execute(_PEOPLE, {"ticket_id": ticket_id, "sender": sender})).all()
    return People(
        sender_is_agent=any(bool(is_sender) for _, _, _, is_sender, _, _ in rows),
        agents=[Recipient(i, e) for i, e, active, _, member, _ in rows if active and member],
        owner=next((Recipient(i, e) for i, e, active, _, _, owns in rows if active and owns),
                   None))


class NotifyHook:
    """Pipeline after-store hook: one recorded notification, one outbox row per agent."""

    def __init__(self, settings: Settings, renderer: Renderer,
                 queued: Callable[[], None] = lambda: None) -> None:
        self.settings = settings
        self.renderer = renderer
        self.queued = queued  # nudges the worker; its poll is the guarantee
        self.departments = {d.slug: d for d in settings.departments}

    async def __call__(self, session: AsyncSession, stored: StoredMail) -> Events:
        dept = self.departments.get(stored.department)  # None: a department since removed
        if dept is None or dept.notify == "none" or stored.envelope.history:  # IMAP from = "all"
            return []
        automated = stored.classification.automated
        people = None if automated else await _people(session, stored.ticket_id, stored.contact)
        reason = skip_reason(automated, people is not None and people.sender_is_agent)
        if reason is not None:  # routine, not a problem: the ack hook logs automated mail
            log.debug("notify.skipped", ticket=stored.ticket_number, reason=reason)
            return []
        assert people is not None
        to = recipients(dept.notify, people.agents, people.owner, stored.contact)
        if not to:  # a department nobody works in yet: normal before agents are invited
            log.debug("notify.unsent", ticket=stored.ticket_number, reason="no active agent")
            return []
        ticket = await session.get(Ticket, stored.ticket_id)
        assert ticket is not None
        return await self._queue(session, stored, dept, ticket, to)

    async def _context(self, session: AsyncSession, stored: StoredMail,
                       dept: DepartmentSettings, ticket: Ticket) -> dict[str, Any]:
        message = (await session.execute(_TEXT, {"message_pk": stored.message_pk})).first()
        text = (message[0] or message[1]) if message else stored.mail.text
        if len(text) > MAX_TEXT_CHARS:
            text = text[:MAX_TEXT_CHARS] + "\n[…]"
        owner = await session.scalar(select(Agent.name).where(Agent.id == ticket.owner_id)) \
            if ticket.owner_id is not None else None
        previous = (await session.execute(
            select(Ticket.number, Ticket.subject, Ticket.status)
            .where(Ticket.contact_id == ticket.contact_id, Ticket.id != ticket.id)
            .order_by(Ticket.created_at.desc(), Ticket.id.desc()).limit(PREVIOUS_TICKETS))).all()
        due = ticket.due_at.astimezone(ZoneInfo(dept.timezone)) if ticket.due_at else None
        name, email = stored.mail.from_name, stored.contact or ""
        return {
            "marker": REPLY_MARKERS.get(dept.language, REPLY_MARKER), "event": event_of(stored),
            "department": dept.name, "ticket_number": ticket.number, "subject": ticket.subject,
            "tag": self.settings.tickets.tag_format.format(number=ticket.number),
            "customer": f"{name} <{email}>" if name else email, "customer_name": name,
            "customer_email": email, "text": text.strip(), "status": ticket.status,
            "priority": ticket.priority, "owner": owner,
            "due_at": f"{due:%Y-%m-%d %H:%M} ({dept.timezone})" if due else None,
            "previous": [{"number": n, "subject": s, "status": st} for n, s, st in previous],
        }

    async def _queue(self, session: AsyncSession, stored: StoredMail, dept: DepartmentSettings,
                     ticket: Ticket, to: tuple[str, ...]) -> Events:
        context = await self._context(session, stored, dept, ticket)
        rendered = self.renderer.render("notification", dept.language, context,
                                        department=dept.slug)
        secret = self.settings.tickets.reply_token_secret
        sender = dept.addresses[0]
        # The customer's name on our address: the agent sees who wrote, and answers us.
        from_name = f"{context['customer_name'] or context['customer_email']} via {dept.name}"
        # One Message-ID for all agents: any of their replies names it (threading step 1).
        message_id = new_message_id(self.settings.hostname)
        customer_id = stored.mail.message_id
        await repo.insert_row(session, Message, dict(
            ticket_id=stored.ticket_id, direction="out", kind="notification",
            message_id=message_id, in_reply_to=[customer_id] if customer_id else [],
            references=list(stored.mail.references)[-20:], from_addr=sender,
            from_name=from_name[:200], reply_to=[], to=list(to), cc=[],
            subject=tagged_subject(rendered.subject, context["tag"]), received_at=stored.now,
            text=rendered.text, html=rendered.html, language=dept.language,
            envelope_to=list(to), channel="outbox", rule_hits=[], defects=[]))
        rows = []
        verified = await queue.is_verified(session, sender)  # the same From for every agent
        for recipient in to:
            composed = compose(rendered, Outgoing(
                from_addr=sender, from_name=from_name, to=recipient,
                hostname=self.settings.hostname, date=stored.now, tag=context["tag"],
                reply_to=reply_address(sender, ticket.number, secret), in_reply_to=customer_id,
                references=stored.mail.references, auto_submitted="auto-generated",
                language=dept.language), message_id=message_id)
            rows.append(await queue.insert(
                session, kind="notification", from_addr=sender, to=recipient,
                message_id=message_id, mime=composed.mime, now=stored.now, verified=verified,
                ticket_id=stored.ticket_id,
                cause_message_id=stored.message_pk))
        self.queued()
        log.info("notify.queued", ticket=ticket.number, to=list(to), message_id=message_id,
                 cause=context["event"])
        return [("notification_queued", {"to": list(to), "outbox": [r.id for r in rows],
                                         "message_id": message_id})]
