"""Escalation and pre-breach warning mails reach the department's supervisors, once."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from gateway.scheduler import Scheduler
from gateway.tickets.sla import SlaTarget
from store.models import Agent, AgentDepartment
from tests.integration.test_rating_mail import rated  # noqa: F401 — the fixture
from tests.mailbuild import make_mail, send


async def test_supervisor_gets_one_warning_and_one_escalation_mail(rated: Any) -> None:  # noqa: F811
    gw, relay, clock = rated
    support, billing = gw.settings.departments
    hourly = replace(support, notify="none", sla=replace(  # no new-ticket mail (issue 6)
        support.sla, escalation_warning_min=15,
        targets={"none": SlaTarget(timedelta(hours=1), None)}))
    settings = replace(gw.settings, departments=(hourly, billing))
    await gw.reload(settings)
    async with gw.store.transaction() as session:
        for email, profile in (("sue@example.test", "supervisor"),
                               ("al@example.test", "agent")):
            agent = Agent(email=email, name=email[:3], profile=profile, active=True,
                          created_at=datetime.now(UTC))
            session.add(agent)
            await session.flush()
            session.add(AgentDepartment(agent_id=agent.id,
                                        department_id=gw.pipeline.department_ids["support"]))
    await send(gw.inbound_port, make_mail(subject="Server down"))
    scheduler = Scheduler(settings, gw.store, clock)
    scheduler.hooks += [gw.escalation.on_time_rule]
    for minutes in (50, 52, 61, 70):  # warning window from 45 min; breach at 60 min
        clock.now = datetime(2026, 11, 23, 10, 0, tzinfo=UTC) + timedelta(minutes=minutes)
        await scheduler.tick()
    await gw.outbound.worker.run_until_idle()
    mails = [c for c in relay.caught if c.message["To"] == "sue@example.test"]
    subjects = sorted(m.message["Subject"] for m in mails)
    assert subjects == ["Due soon: ticket 1 – Server down", "Overdue: ticket 1 – Server down"]
    assert not [c for c in relay.caught if c.message["To"] == "al@example.test"]
