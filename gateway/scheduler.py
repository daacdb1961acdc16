"""Time-based rules: escalate overdue tickets, warn before a breach, close tickets left
waiting on the customer. Each change is claimed by a conditional UPDATE, so with several
instances on one database exactly one of them acts, once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.settings import Settings
from store import blobs, repo
from store.engine import Store
from store.models import Department, Ticket
from store.queries import overdue

log = structlog.get_logger("deskgate.scheduler")
ORPHAN_SWEEP_EVERY = timedelta(hours=1)

# Called inside the claiming transaction with (session, ticket_id, what, data): the outbound
# side queues escalation, warning and rating mails here, atomically with the change.
TimeHook = Callable[[AsyncSession, int, str, dict[str, Any]], Awaitable[None]]


@dataclass
class TickReport:
    escalated: list[int] = field(default_factory=list)
    warned: list[int] = field(default_factory=list)
    auto_closed: list[int] = field(default_factory=list)
    orphan_values: int = 0  # big values whose pieces no mail came back for (store/blobs.py)


def _breach(ticket: Ticket, now: datetime) -> dict[str, Any]:
    if ticket.first_response_at is None and ticket.first_response_due_at and \
            ticket.first_response_due_at < now:
        return {"target": "first_response", "due_at": ticket.first_response_due_at.isoformat()}
    return {"target": "resolution", "due_at": ticket.due_at.isoformat() if ticket.due_at else None}


class Scheduler:
    def __init__(self, settings: Settings, store: Store, clock: Callable[[], datetime],
                 tick_s: float = 30.0) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.tick_s = tick_s
        self.hooks: list[TimeHook] = []
        self._swept_at: datetime | None = None  # blobs.drop_orphans()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                report = await self.tick()
                if report.escalated or report.warned or report.auto_closed or \
                        report.orphan_values:
                    log.info("scheduler.tick", escalated=report.escalated, warned=report.warned,
                             auto_closed=report.auto_closed, orphan_values=report.orphan_values)
            except SQLAlchemyError as exc:  # the store is down: try again next tick
                log.warning("scheduler.store_unavailable", error=type(exc).__name__)

    async def tick(self) -> TickReport:
        now = self.clock()
        report = TickReport()
        async with self.store.transaction() as session:
            report.escalated = await self._escalate(session, now)
        for department in self.settings.departments:
            async with self.store.transaction() as session:
                report.warned += await self._warn(session, department.slug,
                                                  department.sla.escalation_warning_min, now)
                report.auto_closed += await self._auto_close(
                    session, department.slug, department.sla.auto_close_waiting_days, now)
        if self._swept_at is None or now - self._swept_at >= ORPHAN_SWEEP_EVERY:
            self._swept_at = now
            try:
                report.orphan_values = await blobs.drop_orphans(self.store, now)
            except SQLAlchemyError as exc:  # the tick's own changes are committed: report them
                log.warning("scheduler.orphan_sweep_failed", error=type(exc).__name__)
        return report

    async def _claim(self, session: AsyncSession, ticket: Ticket, condition: Any,
                     values: dict[str, Any]) -> bool:
        result = await session.execute(update(Ticket).where(Ticket.id == ticket.id, condition)
                                       .values(**values))
        return bool(result.rowcount)

    async def _fire(self, session: AsyncSession, ticket: Ticket, what: str,
                    data: dict[str, Any], now: datetime) -> None:
        await repo.add_events(session, ticket.id, now, [(what, data)])
        for hook in self.hooks:
            await hook(session, ticket.id, what, data)

    async def _escalate(self, session: AsyncSession, now: datetime) -> list[int]:
        escalated = []
        candidates = await session.scalars(select(Ticket).where(overdue(now),
                                                                Ticket.status == "open"))
        for ticket in list(candidates):
            if await self._claim(session, ticket, Ticket.status == "open",
                                 {"status": "escalated", "updated_at": now}):
                await self._fire(session, ticket, "escalated", _breach(ticket, now), now)
                escalated.append(ticket.number)
        return escalated

    async def _warn(self, session: AsyncSession, slug: str, minutes: int, now: datetime
                    ) -> list[int]:
        if minutes <= 0:
            return []
        soon = now + timedelta(minutes=minutes)
        due_soon = or_(and_(Ticket.due_at >= now, Ticket.due_at < soon),
                       and_(Ticket.first_response_at.is_(None),
                            Ticket.first_response_due_at >= now,
                            Ticket.first_response_due_at < soon))
        candidates = await session.scalars(
            select(Ticket).join(Department, Department.id == Ticket.department_id).where(
                Department.slug == slug, Ticket.status == "open",
                Ticket.sla_warned_at.is_(None), due_soon))
        warned = []
        for ticket in list(candidates):
            if await self._claim(session, ticket, Ticket.sla_warned_at.is_(None),
                                 {"sla_warned_at": now}):
                await self._fire(session, ticket, "sla_warning", {"minutes": minutes}, now)
                warned.append(ticket.number)
        return warned

    async def _auto_close(self, session: AsyncSession, slug: str, days: int, now: datetime
                          ) -> list[int]:
        if days <= 0:
            return []
        candidates = await session.scalars(
            select(Ticket).join(Department, Department.id == Ticket.department_id).where(
                Department.slug == slug, Ticket.status == "waiting_on_customer",
                Ticket.updated_at < now - timedelta(days=days)))
        closed = []
        for ticket in list(candidates):
            if await self._claim(session, ticket, Ticket.status == "waiting_on_customer",
                                 {"status": "closed", "closed_at": now, "updated_at": now,
                                  "sla_paused_at": None}):
                await self._fire(session, ticket, "auto_closed",
                                 {"after_days": days, "from": "waiting_on_customer"}, now)
                closed.append(ticket.number)
        return closed
