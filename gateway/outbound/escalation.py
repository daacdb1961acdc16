"""Escalation and pre-breach warning mails to the department's supervisors (issue 8)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import structlog
from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.outbound import queue
from gateway.outbound.compose import Outgoing, compose
from gateway.outbound.render import Renderer
from gateway.settings import Settings
from store import repo
from store.models import Agent, AgentDepartment, Contact, Department, Ticket

log = structlog.get_logger("deskgate.escalation")
# Who hears of a breach: the department's supervisors, and support managers everywhere.
SUPERVISING = ("supervisor", "support_manager")


class EscalationMail:
    def __init__(self, settings: Settings, renderer: Renderer, clock: Callable[[], datetime],
                 queued: Callable[[], None] = lambda: None) -> None:
        self.settings, self.renderer, self.clock, self.queued = settings, renderer, clock, queued

    async def on_time_rule(self, session: AsyncSession, ticket_id: int, what: str,
                           data: dict[str, Any]) -> None:
        if what not in ("escalated", "sla_warning"):
            return
        ticket, slug, customer = (await session.execute(
            select(Ticket, Department.slug, Contact.email)
            .join(Department, Department.id == Ticket.department_id)
            .join(Contact, Contact.id == Ticket.contact_id).where(Ticket.id == ticket_id))).one()
        recipients = list(await session.scalars(
            select(Agent.email).outerjoin(AgentDepartment, AgentDepartment.agent_id == Agent.id)
            .where(Agent.active.is_(True), Agent.profile.in_(SUPERVISING),
                   or_(Agent.profile == "support_manager",
                       AgentDepartment.department_id == ticket.department_id)).distinct()))
        if not recipients:
            await repo.add_events(session, ticket_id, self.clock(), [(
                "escalation_unsent", {"reason": "the department has no supervisor"})])
            return
        dept = next(d for d in self.settings.departments if d.slug == slug)
        target = data.get("target") or _nearest_target(ticket)
        due = ticket.first_response_due_at if target == "first_response" else ticket.due_at
        local = due.astimezone(ZoneInfo(dept.sla.hours.timezone)) if due else None
        rendered = self.renderer.render("escalation", dept.language, {
            "department": dept.name, "ticket_number": ticket.number, "subject": ticket.subject,
            "customer": customer, "warning": what == "sla_warning", "target": target,
            "due_at": f"{local:%Y-%m-%d %H:%M} ({dept.sla.hours.timezone})" if local else "-",
        }, department=dept.slug)
        now = self.clock()
        for recipient in recipients:
            composed = compose(rendered, Outgoing(
                from_addr=dept.addresses[0], from_name=dept.name, to=recipient,
                hostname=self.settings.hostname, date=now, auto_submitted="auto-generated",
                language=dept.language))
            await queue.enqueue(session, kind=what, from_addr=dept.addresses[0], to=recipient,
                                message_id=composed.message_id, mime=composed.mime, now=now,
                                ticket_id=ticket_id)
        self.queued()
        log.info("escalation.queued", ticket=ticket.number, what=what, to=recipients)


def _nearest_target(ticket: Ticket) -> str:
    if ticket.first_response_at is None and ticket.first_response_due_at is not None:
        return "first_response"
    return "resolution"
