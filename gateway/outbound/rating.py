"""The satisfaction-rating mail, queued in the transaction that closes the ticket (issue 5)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.ingest.addresses import reply_address
from gateway.outbound import queue
from gateway.outbound.ack import is_ours, is_robot
from gateway.outbound.compose import Outgoing, compose
from gateway.outbound.render import Renderer
from gateway.settings import Settings
from gateway.web.links import rating_links
from gateway.web.tokens import link_keys
from store import repo
from store.models import Contact, Department, Message, Outbox, Ticket

log = structlog.get_logger("deskgate.rating")
Events = list[tuple[str, dict[str, Any]]]
AUTOMATED_KINDS = frozenset({"auto_reply", "bulk", "bounce", "report", "own_mail"})


def decide_rating(recipient: str | None, opened_by: str | None, bounced: bool,
                  own: frozenset[str]) -> str | None:
    """None when the rating mail goes out, else why not (DESIGN 4, Loops)."""
    if not recipient:
        return "no address to write to"
    if is_ours(recipient, own):
        return "the contact is one of our own addresses"
    if is_robot(recipient):
        return "the contact is a robot address (RFC 3834 2)"
    if opened_by in AUTOMATED_KINDS:
        return f"the ticket was opened by automated mail ({opened_by})"
    if bounced:
        return "mail to this contact bounced"
    return None


class RatingMail:
    def __init__(self, settings: Settings, renderer: Renderer,
                 clock: Callable[[], datetime], queued: Callable[[], None] = lambda: None
                 ) -> None:
        self.settings, self.renderer, self.clock, self.queued = settings, renderer, clock, queued
        self.keys = link_keys(settings.tickets.reply_token_secret)

    async def on_time_rule(self, session: AsyncSession, ticket_id: int, what: str,
                           data: dict[str, Any]) -> None:
        """Scheduler hook: an auto-closed ticket asks for its rating too."""
        if what == "auto_closed":
            await repo.add_events(session, ticket_id, self.clock(),
                                  await self.on_closed(session, ticket_id, self.clock()))

    async def on_closed(self, session: AsyncSession, ticket_id: int, now: datetime) -> Events:
        row = (await session.execute(select(Ticket, Contact.email, Department).join(
            Contact, Contact.id == Ticket.contact_id).join(
            Department, Department.id == Ticket.department_id).where(Ticket.id == ticket_id))
               ).one()
        ticket, contact, department = row
        recipient = ticket.reply_to or contact
        opened_by = await session.scalar(select(Message.kind).where(
            Message.ticket_id == ticket_id, Message.direction == "in").order_by(Message.id)
            .limit(1))
        bounced = await session.scalar(select(Outbox.id).where(
            Outbox.recipient == recipient, Outbox.state == "failed").limit(1)) is not None
        reason = decide_rating(recipient, opened_by, bounced, self.settings.own_addresses)
        if reason is not None:
            log.info("rating.suppressed", ticket=ticket.number, reason=reason)
            return [("rating_suppressed", {"reason": reason})]
        return await self._queue(session, ticket, department, recipient, now)

    async def _queue(self, session: AsyncSession, ticket: Ticket, department: Department,
                     recipient: str, now: datetime) -> Events:
        dept = next(d for d in self.settings.departments if d.slug == department.slug)
        language = ticket.language or dept.language
        links = rating_links(self.settings.web_links.base_url, ticket.number, now,
                             self.settings.web_links.rating_window_days, self.keys)
        tag = self.settings.tickets.tag_format.format(number=ticket.number)
        name = await session.scalar(select(Contact.name).where(Contact.id == ticket.contact_id))
        rendered = self.renderer.render("rating_request", language, {
            "customer_name": name or "", "department": dept.name, "tag": tag,
            "ticket_number": ticket.number, "subject": ticket.subject,
            "good_url": links["good"], "okay_url": links["okay"], "bad_url": links["bad"],
        }, department=dept.slug)
        sender = dept.addresses[0]
        secret = self.settings.tickets.reply_token_secret
        composed = compose(rendered, Outgoing(
            from_addr=sender, from_name=dept.name, to=recipient, hostname=self.settings.hostname,
            date=now, tag=tag, reply_to=reply_address(sender, ticket.number, secret),
            auto_submitted="auto-generated", language=language))
        await repo.add(session, Message(
            ticket_id=ticket.id, direction="out", kind="rating_request",
            message_id=composed.message_id, in_reply_to=[], references=[], from_addr=sender,
            from_name=dept.name, reply_to=[], to=[recipient], cc=[], subject=composed.subject,
            received_at=now, text=rendered.text, html=rendered.html, language=language,
            envelope_to=[recipient], channel="outbox", rule_hits=[], defects=[]))
        row = await queue.enqueue(session, kind="rating_request", from_addr=sender,
                                  to=recipient, message_id=composed.message_id,
                                  mime=composed.mime, now=now, ticket_id=ticket.id)
        self.queued()
        log.info("rating.queued", ticket=ticket.number, outbox=row.id, language=language)
        return [("rating_queued", {"outbox": row.id, "language": language})]
