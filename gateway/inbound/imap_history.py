"""A mailbox's history imported with from = "all" (issue 7): tickets end closed unless the
customer wrote last. An after-store hook; acknowledgements and notifications skip such mail
on their own (Envelope.history)."""

from __future__ import annotations

from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.ingest.model import MailKind
from gateway.ingest.pipeline import StoredMail
from gateway.settings import Settings
from gateway.tickets.actions import apply_status
from gateway.tickets.lifecycle import Status
from store.models import Agent, Ticket

log = structlog.get_logger("deskgate.imap")


def history_status(customer_wrote: bool, current: str) -> Status | None:
    """The status a history ticket takes after this mail; None: leave it.

    Mails come in UID order, so after the last one the ticket is open exactly when the
    customer has the last word (an answer is owed), and closed otherwise.
    """
    if customer_wrote:
        return None  # a new ticket is open, a customer reply reopens (lifecycle.decide)
    return None if current == Status.CLOSED.value else Status.CLOSED


class HistoryHook:
    def __init__(self, settings: Settings) -> None:
        self.departments = {d.slug: d for d in settings.departments}

    async def __call__(self, session: AsyncSession, stored: StoredMail
                       ) -> list[tuple[str, dict[str, Any]]]:
        if not stored.envelope.history:
            return []
        sender_is_agent = bool(stored.contact) and await session.scalar(
            select(Agent.id).where(Agent.email == stored.contact)) is not None
        customer_wrote = (stored.classification.kind is MailKind.CUSTOMER and
                          not stored.classification.automated and not sender_is_agent)
        ticket = await session.get(Ticket, stored.ticket_id)
        assert ticket is not None
        target = history_status(customer_wrote, ticket.status)
        if target is None:
            return []
        data = await apply_status(session, ticket, target, stored.now,
                                  self.departments[stored.department])
        log.info("imap.history_closed", ticket=stored.ticket_number)
        return [("status_changed", {**data, "by": "imap history import"})]
