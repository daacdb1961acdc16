"""Ticket statuses and what an inbound mail does to a ticket; pure."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from gateway.ingest.identify import ThreadDecision, TicketRef
from gateway.ingest.model import MailKind


class Status(StrEnum):
    OPEN = "open"
    ON_HOLD = "on_hold"
    WAITING_ON_CUSTOMER = "waiting_on_customer"
    ESCALATED = "escalated"  # an open state, as helpdesks treat it
    CLOSED = "closed"


class Action(StrEnum):
    CREATE = "create"  # a new ticket
    APPEND = "append"  # add to the threaded ticket
    FOLLOW_UP = "follow-up"  # new ticket linked to a long-closed one
    QUARANTINE = "quarantine"  # keep raw, tie to no ticket


# A customer writing again wakes the ticket up from these (Zammad, Zoho Desk behave so).
REOPENED_BY_CUSTOMER = frozenset({Status.ON_HOLD, Status.WAITING_ON_CUSTOMER, Status.CLOSED})
# Mail that never opens a ticket on its own (DESIGN 3: a DSN never opens a ticket).
NEVER_OPENS = frozenset({MailKind.BOUNCE, MailKind.REPORT, MailKind.OWN_MAIL})


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    ticket: TicketRef | None = None  # the ticket appended to, or linked from (FOLLOW_UP)
    new_status: Status | None = None  # set when the mail changes the ticket's status
    events: tuple[tuple[str, dict[str, Any]], ...] = field(default=())
    reason: str = ""


def decide(thread: ThreadDecision, kind: MailKind, now: datetime,
           follow_up_window: timedelta) -> Decision:
    ticket = thread.ticket
    if ticket is None:
        if kind in NEVER_OPENS:
            return Decision(Action.QUARANTINE, reason=f"{kind}: not tied to any ticket")
        return Decision(Action.CREATE, new_status=Status.OPEN)
    if kind is not MailKind.CUSTOMER:  # an out-of-office must not reopen anything
        return Decision(Action.APPEND, ticket)
    status = Status(ticket.status)
    if status is Status.CLOSED and ticket.closed_at and now - ticket.closed_at > follow_up_window:
        return Decision(Action.FOLLOW_UP, ticket, Status.OPEN,
                        reason=f"#{ticket.number} closed longer than the follow-up window")
    if status in REOPENED_BY_CUSTOMER:
        return Decision(Action.APPEND, ticket, Status.OPEN,
                        events=(("reopened", {"from": status.value, "by": "customer reply"}),))
    return Decision(Action.APPEND, ticket)


def transition(current: str, target: Status) -> Status:
    """Validate a status change asked for by a person (CLI, agent command)."""
    if Status(current) is target:
        raise ValueError(f"the ticket is already {target.value}")
    return target
