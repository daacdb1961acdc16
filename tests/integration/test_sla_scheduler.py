"""Due dates on creation, escalation, warnings and auto-close with an injected clock."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import func, select

from gateway.scheduler import Scheduler
from gateway.service import Gateway
from gateway.settings import parse_settings
from gateway.tickets import actions
from gateway.tickets.lifecycle import Status
from store import queries
from store.models import Event, Ticket
from tests.conftest import settings_text
from tests.mailbuild import make_mail, send

BERLIN = ZoneInfo("Europe/Berlin")
SUPPORT_SLA = '''slug = "support"
timezone = "Europe/Berlin"
default_priority = "medium"
business_hours.mon = ["09:00-18:00"]
business_hours.tue = ["09:00-18:00"]
business_hours.wed = ["09:00-18:00"]
business_hours.thu = ["09:00-18:00"]
business_hours.fri = ["09:00-18:00"]
holidays = ["2026-12-25"]
auto_close_waiting_days = 7
escalation_warning_min = 15
sla.medium = { first_response_min = 60, resolution_min = 480 }
sla.high = { first_response_min = 30, resolution_min = 120 }
priority_rules = [{ subject_words = ["urgent", "dringend"], priority = "high" }]'''


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime(2026, 11, 20, 17, 55, tzinfo=BERLIN).astimezone(UTC))  # a Friday


async def start(db_url: str, clock: Clock) -> Gateway:
    settings = parse_settings(settings_text(db_url).replace('slug = "support"', SUPPORT_SLA, 1),
                              "sla.toml")
    gateway = Gateway(settings, clock=clock)
    await gateway.start(port=0)
    return gateway


@pytest.fixture
async def gateway(db_url: str, clock: Clock) -> Any:
    gateway = await start(db_url, clock)
    yield gateway
    await gateway.stop(drain_timeout_s=5)


async def ticket(gw: Gateway, number: int = 1) -> Ticket:
    async with gw.store.transaction() as session:
        row = await session.scalar(select(Ticket).where(Ticket.number == number))
        assert row is not None
        return row


async def events(gw: Gateway, kind: str) -> int:
    async with gw.store.transaction() as session:
        return int(await session.scalar(select(func.count()).select_from(Event)
                                        .where(Event.type == kind)))


async def test_friday_evening_ticket_is_due_monday_morning(gateway: Gateway) -> None:
    await send(gateway.inbound_port, make_mail(subject="Printer broken"))
    row = await ticket(gateway)
    assert row.priority == "medium"
    assert row.first_response_due_at == datetime(2026, 11, 23, 9, 55, tzinfo=BERLIN)
    assert row.due_at == datetime(2026, 11, 23, 16, 55, tzinfo=BERLIN)


async def test_subject_word_raises_priority_and_tightens_targets(gateway: Gateway) -> None:
    await send(gateway.inbound_port, make_mail(subject="URGENT: site down"))
    row = await ticket(gateway)
    assert row.priority == "high"
    assert row.first_response_due_at == datetime(2026, 11, 23, 9, 25, tzinfo=BERLIN)


async def test_escalation_fires_once_not_on_every_tick(gateway: Gateway, clock: Clock) -> None:
    await send(gateway.inbound_port, make_mail())
    scheduler = Scheduler(gateway.settings, gateway.store, clock)
    clock.now = datetime(2026, 11, 23, 9, 56, tzinfo=BERLIN)
    assert (await scheduler.tick()).escalated == [1]
    clock.now += timedelta(hours=8)
    assert (await scheduler.tick()).escalated == []
    assert (await ticket(gateway)).status == "escalated"
    assert await events(gateway, "escalated") == 1
    async with gateway.store.transaction() as session:
        assert await queries.list_tickets(session, overdue_at=clock.now)


async def test_warning_comes_once_before_the_breach(gateway: Gateway, clock: Clock) -> None:
    await send(gateway.inbound_port, make_mail())
    scheduler = Scheduler(gateway.settings, gateway.store, clock)
    clock.now = datetime(2026, 11, 23, 9, 30, tzinfo=BERLIN)
    assert (await scheduler.tick()).warned == []
    clock.now = datetime(2026, 11, 23, 9, 45, tzinfo=BERLIN)
    assert (await scheduler.tick()).warned == [1]
    clock.now = datetime(2026, 11, 23, 9, 50, tzinfo=BERLIN)
    assert (await scheduler.tick()).warned == []


async def test_waiting_ticket_is_closed_after_the_configured_days(gateway: Gateway,
                                                                  clock: Clock) -> None:
    await send(gateway.inbound_port, make_mail())
    async with gateway.store.transaction() as session:
        await actions.change_status(session, gateway.settings, 1, Status.WAITING_ON_CUSTOMER,
                                    clock.now, "test")
    scheduler = Scheduler(gateway.settings, gateway.store, clock)
    rating_mails: list[int] = []

    async def rating_hook(session: Any, ticket_id: int, what: str, data: Any) -> None:
        if what == "auto_closed":
            rating_mails.append(ticket_id)

    scheduler.hooks.append(rating_hook)
    clock.now += timedelta(days=6)
    assert (await scheduler.tick()).auto_closed == []
    clock.now += timedelta(days=2)
    assert (await scheduler.tick()).auto_closed == [1]
    assert (await scheduler.tick()).auto_closed == []
    assert (await ticket(gateway)).status == "closed"
    assert len(rating_mails) == 1


async def test_on_hold_pauses_the_clock_until_the_customer_writes(gateway: Gateway,
                                                                  clock: Clock) -> None:
    clock.now = datetime(2026, 11, 23, 9, 0, tzinfo=BERLIN)  # Monday
    await send(gateway.inbound_port, make_mail(message_id="<held@example.org>"))
    assert (await ticket(gateway)).due_at == datetime(2026, 11, 23, 17, 0, tzinfo=BERLIN)
    async with gateway.store.transaction() as session:
        await actions.change_status(session, gateway.settings, 1, Status.ON_HOLD, clock.now,
                                    "test")
    clock.now = datetime(2026, 11, 24, 9, 0, tzinfo=BERLIN)  # a whole business day later
    await send(gateway.inbound_port, make_mail(subject="Re: news?",
                                               in_reply_to="<held@example.org>"))
    row = await ticket(gateway)
    assert row.status == "open"
    assert row.due_at == datetime(2026, 11, 24, 17, 0, tzinfo=BERLIN)


async def test_priority_change_recomputes_due_dates(gateway: Gateway, clock: Clock) -> None:
    await send(gateway.inbound_port, make_mail())
    async with gateway.store.transaction() as session:
        await actions.change_priority(session, gateway.settings, 1, "high", clock.now, "test")
    assert (await ticket(gateway)).due_at == datetime(2026, 11, 23, 10, 55, tzinfo=BERLIN)


async def test_two_schedulers_on_one_database_escalate_once(pg_url: str, clock: Clock) -> None:
    first, second = await start(pg_url, clock), await start(pg_url, clock)
    try:
        for i in range(5):
            await send(first.inbound_port, make_mail(subject=f"Mail {i}"))
        clock.now = datetime(2026, 11, 24, 9, 0, tzinfo=BERLIN)
        reports = await asyncio.gather(*(Scheduler(gw.settings, gw.store, clock).tick()
                                         for gw in (first, second, first, second)))
        assert sorted(n for r in reports for n in r.escalated) == [1, 2, 3, 4, 5]
        assert await events(first, "escalated") == 5
    finally:
        await first.stop(drain_timeout_s=5)
        await second.stop(drain_timeout_s=5)


async def test_sla_report_counts_met_breached_and_pending(gateway: Gateway, clock: Clock
                                                          ) -> None:
    clock.now = datetime(2026, 11, 23, 9, 0, tzinfo=BERLIN)
    for i in range(3):
        await send(gateway.inbound_port, make_mail(subject=f"Case {i}"))
    async with gateway.store.transaction() as session:
        await actions.change_status(session, gateway.settings, 1, Status.CLOSED,
                                    clock.now + timedelta(hours=2), "test")  # in time
    clock.now = datetime(2026, 11, 24, 9, 0, tzinfo=BERLIN)
    async with gateway.store.transaction() as session:
        await actions.change_status(session, gateway.settings, 2, Status.CLOSED, clock.now,
                                    "test")  # a day late
        rows = await queries.sla_report(session, clock.now - timedelta(days=7), clock.now)
    assert [(r["department"], r["priority"], r["tickets"]) for r in rows] == [
        ("support", "medium", 3)]
    assert rows[0]["resolution"] == {"met": 1, "breached": 2, "pending": 0, "met_share": 0.333}
    assert rows[0]["first_response"]["breached"] == 3  # nobody answered yet
