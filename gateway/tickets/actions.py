"""Ticket changes asked for by people or time (CLI, scheduler, agent commands): one place
that keeps status, SLA clock and timeline consistent."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.errors import DeskgateError, NotFound
from gateway.settings import DepartmentSettings, Settings
from gateway.tickets.lifecycle import Status, transition
from gateway.tickets.sla import SlaClock, due_dates, on_status_change
from gateway.tickets.sla_config import PRIORITIES
from store import repo
from store.models import Department, Ticket

OnClose = Callable[[AsyncSession, int, datetime], Awaitable[list[tuple[str, dict[str, Any]]]]]


async def load(session: AsyncSession, settings: Settings, number: int
               ) -> tuple[Ticket, DepartmentSettings]:
    row = (await session.execute(select(Ticket, Department.slug).join(
        Department, Department.id == Ticket.department_id).where(Ticket.number == number))
           ).first()
    if row is None:
        raise NotFound(f"there is no ticket {number}")
    department = next((d for d in settings.departments if d.slug == row[1]), None)
    if department is None:
        raise DeskgateError(f"ticket {number}: department {row[1]!r} is not in the config")
    return row[0], department


async def apply_status(session: AsyncSession, ticket: Ticket, target: Status, now: datetime,
                       department: DepartmentSettings) -> dict[str, Any]:
    """Write the new status and its SLA effect; returns the status_changed event data."""
    clock = on_status_change(
        SlaClock(ticket.first_response_due_at, ticket.due_at, ticket.sla_paused_at),
        ticket.status, target.value, now, department.sla.hours,
        department.sla.pause_when_waiting)
    old = ticket.status
    await session.execute(update(Ticket).where(Ticket.id == ticket.id).values(
        status=target.value, updated_at=now,
        closed_at=now if target is Status.CLOSED else None,
        first_response_due_at=clock.first_response_due_at, due_at=clock.due_at,
        sla_paused_at=clock.paused_at))
    return {"from": old, "to": target.value}


async def change_status(session: AsyncSession, settings: Settings, number: int, target: Status,
                        now: datetime, by: str, on_close: OnClose | None = None) -> None:
    """`on_close` runs in the same transaction when the ticket closes: the rating mail
    commits with the close, or neither happens."""
    ticket, department = await load(session, settings, number)
    try:
        transition(ticket.status, target)
    except ValueError as exc:
        raise DeskgateError(f"ticket {number}: {exc}") from None
    data = await apply_status(session, ticket, target, now, department)
    events: list[tuple[str, dict[str, Any]]] = [("status_changed", data | {"by": by})]
    if target is Status.CLOSED and on_close is not None:
        events += await on_close(session, ticket.id, now)
    await repo.add_events(session, ticket.id, now, events)


async def change_priority(session: AsyncSession, settings: Settings, number: int,
                          priority: str, now: datetime, by: str) -> None:
    """A new priority means new targets: due dates are recomputed from the creation time."""
    if priority not in PRIORITIES:
        raise DeskgateError(f"priority must be one of {', '.join(PRIORITIES)}")
    ticket, department = await load(session, settings, number)
    if ticket.priority == priority:
        raise DeskgateError(f"ticket {number} already has priority {priority}")
    dates = due_dates(ticket.created_at, department.sla.targets.get(priority),
                      department.sla.hours)
    await session.execute(update(Ticket).where(Ticket.id == ticket.id).values(
        priority=priority, updated_at=now, first_response_due_at=dates.first_response_due_at,
        due_at=dates.due_at, sla_warned_at=None))
    await repo.add_events(session, ticket.id, now, [(
        "priority_changed", {"from": ticket.priority, "to": priority, "by": by,
                             "due_at": dates.due_at.isoformat() if dates.due_at else None})])
