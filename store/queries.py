"""Read models for people (CLI, later the web): plain dicts, ready for JSON or text."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.errors import NotFound
from store.models import Attachment, Contact, Department, Event, Message, Quarantine, Ticket


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


OPEN_STATUSES = ("open", "escalated")  # the SLA clock runs only while the ticket is open


def overdue(now: datetime) -> Any:
    """Open and past a due date: resolution, or first response not yet given."""
    return and_(Ticket.status.in_(OPEN_STATUSES), or_(
        Ticket.due_at < now,
        and_(Ticket.first_response_at.is_(None), Ticket.first_response_due_at < now)))


def ticket_summary(ticket: Ticket, department: str, contact: str, count: int) -> dict[str, Any]:
    return {"number": ticket.number, "subject": ticket.subject, "status": ticket.status,
            "priority": ticket.priority, "department": department, "contact": contact,
            "messages": count, "created_at": _iso(ticket.created_at),
            "first_response_due_at": _iso(ticket.first_response_due_at),
            "due_at": _iso(ticket.due_at), "first_response_at": _iso(ticket.first_response_at),
            "updated_at": _iso(ticket.updated_at), "closed_at": _iso(ticket.closed_at)}


def summary_query() -> Any:
    count = (select(func.count(Message.id)).where(Message.ticket_id == Ticket.id)
             .correlate(Ticket).scalar_subquery())
    return (select(Ticket, Department.slug, Contact.email, count)
            .join(Department, Department.id == Ticket.department_id)
            .join(Contact, Contact.id == Ticket.contact_id))


async def list_tickets(session: AsyncSession, status: str | None = None,
                       department: str | None = None, limit: int = 200,
                       overdue_at: datetime | None = None,
                       fields: dict[str, str] | None = None) -> list[dict[str, Any]]:
    query = summary_query().order_by(Ticket.number.desc()).limit(limit)
    for name, value in (fields or {}).items():
        query = query.where(Ticket.custom_fields[name].as_string() == value)
    if overdue_at is not None:
        query = query.where(overdue(overdue_at))
    if status:
        query = query.where(Ticket.status == status)
    if department:
        query = query.where(Department.slug == department)
    return [ticket_summary(*row) for row in await session.execute(query)]


async def _ticket_row(session: AsyncSession, number: int) -> Ticket:
    ticket = await session.scalar(select(Ticket).where(Ticket.number == number))
    if ticket is None:
        raise NotFound(f"there is no ticket {number}")
    return ticket


def _message(message: Message, attachments: list[Attachment]) -> dict[str, Any]:
    return {"direction": message.direction, "kind": message.kind, "from": message.from_addr,
            "from_name": message.from_name, "to": message.to, "cc": message.cc,
            "subject": message.subject, "date": _iso(message.date),
            "received_at": _iso(message.received_at), "message_id": message.message_id,
            "text": message.text, "visible_text": message.visible_text,
            "html_safe": message.html_safe, "language": message.language,
            "rules": message.rule_hits, "raw_sha256": message.raw_sha256,
            "attachments": [{"filename": a.filename, "content_type": a.content_type,
                             "size": a.size, "sha256": a.sha256, "inline": a.inline,
                             "content_id": a.content_id,
                             "kept": a.content is not None or a.parts > 0,
                             "not_kept_reason": a.not_kept_reason}
                            for a in attachments]}


async def ticket_detail(session: AsyncSession, number: int) -> dict[str, Any]:
    ticket = await _ticket_row(session, number)
    row = (await session.execute(summary_query().where(Ticket.id == ticket.id))).one()
    detail = ticket_summary(*row)
    messages = list(await session.scalars(select(Message).where(Message.ticket_id == ticket.id)
                                          .order_by(Message.received_at, Message.id)))
    attachments: dict[int, list[Attachment]] = {}
    for attachment in await session.scalars(select(Attachment).where(
            Attachment.message_id.in_([m.id for m in messages])).order_by(Attachment.id)):
        attachments.setdefault(attachment.message_id, []).append(attachment)
    events = await session.scalars(select(Event).where(Event.ticket_id == ticket.id)
                                   .order_by(Event.at, Event.id))
    follow_up_of = None
    if ticket.follow_up_of_id:
        follow_up_of = await session.scalar(select(Ticket.number).where(
            Ticket.id == ticket.follow_up_of_id))
    from store.models import Agent

    owner = await session.scalar(select(Agent.email).where(Agent.id == ticket.owner_id)) \
        if ticket.owner_id else None
    detail.update(owner=owner, category=ticket.category, subcategory=ticket.subcategory,
                  product=ticket.product, tags=ticket.tags, fields=ticket.custom_fields)
    detail.update(reply_to=ticket.reply_to, follow_up_of=follow_up_of,
                  thread=[_message(m, attachments.get(m.id, [])) for m in messages],
                  events=[{"type": e.type, "at": _iso(e.at), "data": e.data} for e in events])
    return detail


async def contact_detail(session: AsyncSession, email: str) -> dict[str, Any]:
    contact = await session.scalar(select(Contact).where(Contact.email == email.lower()))
    if contact is None:
        raise NotFound(f"there is no contact {email}")
    rows = await session.execute(summary_query().where(Ticket.contact_id == contact.id)
                                 .order_by(Ticket.created_at.desc()))
    return {"email": contact.email, "name": contact.name, "created_at": _iso(contact.created_at),
            "tickets": [ticket_summary(*row) for row in rows]}


def _quarantine(entry: Quarantine) -> dict[str, Any]:
    return {"id": entry.id, "reason": entry.reason, "state": entry.state,
            "envelope_from": entry.envelope_from, "envelope_to": entry.envelope_to,
            "peer": entry.peer, "channel": entry.channel, "received_at": _iso(entry.received_at),
            "raw_sha256": entry.raw_sha256, "released_to_ticket": entry.released_to_ticket}


async def list_quarantine(session: AsyncSession, state: str | None = "held"
                          ) -> list[dict[str, Any]]:
    query = select(Quarantine).order_by(Quarantine.id)
    if state:
        query = query.where(Quarantine.state == state)
    return [_quarantine(q) for q in await session.scalars(query)]


async def quarantine_entry(session: AsyncSession, entry_id: int) -> Quarantine:
    entry = await session.get(Quarantine, entry_id)
    if entry is None:
        raise NotFound(f"there is no quarantine entry {entry_id}")
    return entry


def quarantine_view(entry: Quarantine) -> dict[str, Any]:
    return _quarantine(entry)


async def sla_report(session: AsyncSession, since: datetime, now: datetime
                     ) -> list[dict[str, Any]]:
    """Share of tickets meeting first-response and resolution targets, per department and
    priority, for tickets created since `since`."""
    from gateway.tickets.sla import target_outcome

    rows = await session.execute(
        select(Department.slug, Ticket.priority, Ticket.first_response_at,
               Ticket.first_response_due_at, Ticket.closed_at, Ticket.due_at)
        .join(Department, Department.id == Ticket.department_id)
        .where(Ticket.created_at >= since))
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for slug, priority, responded, response_due, closed, due in rows:
        group = groups.setdefault((slug, priority), {
            "department": slug, "priority": priority, "tickets": 0,
            "first_response": {"met": 0, "breached": 0, "pending": 0},
            "resolution": {"met": 0, "breached": 0, "pending": 0}})
        group["tickets"] += 1
        for target, done, due_at in (("first_response", responded, response_due),
                                     ("resolution", closed, due)):
            outcome = target_outcome(done, due_at, now)
            if outcome:
                group[target][outcome] += 1
    for group in groups.values():
        for target in ("first_response", "resolution"):
            decided = group[target]["met"] + group[target]["breached"]
            group[target]["met_share"] = round(group[target]["met"] / decided, 3) \
                if decided else None
    return [groups[key] for key in sorted(groups)]


async def csat_report(session: AsyncSession, since: datetime, by: str) -> list[dict[str, Any]]:
    """Ratings per department or agent: counts per value, the Good share, the comments."""
    from store.models import Agent, Rating

    group = Department.slug if by == "department" else func.coalesce(Agent.email, "(unowned)")
    rows = await session.execute(
        select(group, Rating.value, Rating.comment, Ticket.number)
        .join(Ticket, Ticket.id == Rating.ticket_id)
        .join(Department, Department.id == Rating.department_id)
        .outerjoin(Agent, Agent.id == Rating.agent_id)
        .where(Rating.updated_at >= since).order_by(group, Ticket.number))
    report: dict[str, dict[str, Any]] = {}
    for key, value, comment, number in rows:
        entry = report.setdefault(key, {by: key, "good": 0, "okay": 0, "bad": 0,
                                        "comments": []})
        entry[value] += 1
        if comment:
            entry["comments"].append({"ticket": number, "value": value, "comment": comment})
    for entry in report.values():
        total = entry["good"] + entry["okay"] + entry["bad"]
        entry["ratings"] = total
        entry["score"] = round(entry["good"] / total, 3) if total else None
    return list(report.values())


async def tickets_report(session: AsyncSession, since: datetime) -> list[dict[str, Any]]:
    """New, reopened and closed tickets and the median first-response time per department."""
    from statistics import median

    report: dict[str, dict[str, Any]] = {}

    def entry(slug: str) -> dict[str, Any]:
        return report.setdefault(slug, {"department": slug, "new": 0, "reopened": 0,
                                        "closed": 0, "median_first_response_min": None,
                                        "_waits": []})

    created = await session.execute(select(Department.slug, Ticket.created_at,
                                           Ticket.first_response_at, Ticket.closed_at)
                                    .join(Department, Department.id == Ticket.department_id))
    for slug, created_at, responded, closed in created:
        if created_at >= since:
            entry(slug)["new"] += 1
            if responded:
                entry(slug)["_waits"].append((responded - created_at).total_seconds() / 60)
        if closed and closed >= since:
            entry(slug)["closed"] += 1
    reopened = await session.execute(
        select(Department.slug, func.count()).select_from(Event)
        .join(Ticket, Ticket.id == Event.ticket_id)
        .join(Department, Department.id == Ticket.department_id)
        .where(Event.type == "reopened", Event.at >= since).group_by(Department.slug))
    for slug, count in reopened:
        entry(slug)["reopened"] = count
    for item in report.values():
        waits = item.pop("_waits")
        item["median_first_response_min"] = round(median(waits), 1) if waits else None
    return [report[key] for key in sorted(report)]
