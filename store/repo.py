"""Async data access for the ingest pipeline and the CLI; no policy lives here."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.ingest.identify import TicketRef
from store.models import (
    Account,
    AccountDomain,
    Address,
    Agent,
    AgentDepartment,
    Attachment,
    Contact,
    Department,
    Event,
    Message,
    Quarantine,
    Raw,
    Ticket,
    UTCDateTime,
)


def insert_ignore(session: AsyncSession, table: Any) -> Any:
    """INSERT … ON CONFLICT DO NOTHING: safe when another instance inserts the same row."""
    dialect = session.bind.dialect.name if session.bind else "sqlite"
    return (pg_insert if dialect == "postgresql" else sqlite_insert)(table).on_conflict_do_nothing()


async def sync_departments(session: AsyncSession, departments: Iterable[Any]) -> dict[str, int]:
    """Make the departments and addresses of the config exist; returns slug -> id."""
    ids: dict[str, int] = {}
    for dept in departments:  # insert-or-ignore: instances starting together must not clash
        values = {"name": dept.name, "language": dept.language, "timezone": dept.timezone}
        await session.execute(insert_ignore(session, Department).values(slug=dept.slug,
                                                                          **values))
        await session.execute(update(Department).where(Department.slug == dept.slug)
                              .values(**values))
        dept_id = await session.scalar(select(Department.id).where(Department.slug == dept.slug))
        assert dept_id is not None
        ids[dept.slug] = dept_id
        for email in dept.addresses:
            await session.execute(insert_ignore(session, Address).values(
                email=email, department_id=dept_id, verification_state="pending"))
            await session.execute(update(Address).where(Address.email == email)
                                  .values(department_id=dept_id))
    return ids


def _ref_query() -> Any:
    return select(Ticket.id, Ticket.number, Department.slug, Ticket.status, Ticket.closed_at
                  ).join(Department, Department.id == Ticket.department_id)


def _ref(row: Any) -> TicketRef:
    return TicketRef(id=row[0], number=row[1], department=row[2], status=row[3],
                     closed_at=row[4])


async def find_by_fingerprint(session: AsyncSession, fingerprint: str) -> tuple[int, int] | None:
    row = (await session.execute(
        select(Message.id, Ticket.number).join(Ticket, Ticket.id == Message.ticket_id)
        .where(Message.fingerprint == fingerprint))).first()
    return (row[0], row[1]) if row else None


async def find_quarantined(session: AsyncSession, raw_sha256: str) -> int | None:
    return await session.scalar(select(Quarantine.id).where(Quarantine.raw_sha256 == raw_sha256))


async def tickets_by_message_ids(session: AsyncSession, ids: Sequence[str]
                                 ) -> dict[str, TicketRef]:
    if not ids:
        return {}
    rows = await session.execute(_ref_query().add_columns(Message.message_id)
                                 .join(Message, Message.ticket_id == Ticket.id)
                                 .where(Message.message_id.in_(list(ids)[:100])))
    return {row[5]: _ref(row) for row in rows}


async def sent_message_ids(session: AsyncSession, ids: Sequence[str]) -> frozenset[str]:
    """Which of these Message-IDs are of mail we sent (acknowledgements, agents' replies)."""
    found = await session.scalars(select(Message.message_id).where(
        Message.message_id.in_(list(ids)[:100]), Message.direction == "out"))
    return frozenset(i for i in found if i)


async def ticket_ref(session: AsyncSession, number: int) -> TicketRef | None:
    row = (await session.execute(_ref_query().where(Ticket.number == number))).first()
    return _ref(row) if row else None


async def is_participant(session: AsyncSession, ticket_id: int, email: str) -> bool:
    contact = await session.scalar(select(Contact.email).join(Ticket, Ticket.contact_id ==
                                   Contact.id).where(Ticket.id == ticket_id))
    if contact == email:
        return True
    found = await session.scalar(select(Message.id).where(Message.ticket_id == ticket_id,
                                 Message.from_addr == email).limit(1))
    return found is not None


async def upsert_contact(session: AsyncSession, email: str, name: str, now: datetime,
                         account_id: int | None = None) -> int:
    """The contact's id, made if new (insert-or-ignore: instances may race); a name fills an
    empty one. A known contact, the common case, costs one SELECT."""
    query = select(Contact.id, Contact.name).where(Contact.email == email)
    row = (await session.execute(query)).first()
    if row is None:
        await session.execute(insert_ignore(session, Contact).values(
            email=email, name=name, created_at=now, account_id=account_id))
        row = (await session.execute(query)).first()
        assert row is not None
    if name and not row[1]:
        await session.execute(update(Contact).where(Contact.id == row[0], Contact.name == "")
                              .values(name=name))
    return int(row[0])


async def put_raw(session: AsyncSession, sha256: str, content: bytes, now: datetime) -> None:
    await session.execute(insert_ignore(session, Raw).values(
        sha256=sha256, content=content, size=len(content), created_at=now))


async def next_ticket_number(session: AsyncSession) -> int:
    if session.bind and session.bind.dialect.name == "postgresql":
        return int(await session.scalar(text("SELECT nextval('ticket_number_seq')")))
    # SQLite: we hold the write lock (BEGIN IMMEDIATE), so MAX + 1 cannot race.
    return int(await session.scalar(select(func.coalesce(func.max(Ticket.number), 0) + 1)))


async def add(session: AsyncSession, row: Any) -> Any:
    session.add(row)
    await session.flush()
    return row


async def add_events(session: AsyncSession, ticket_id: int, now: datetime,
                     events: Iterable[tuple[str, dict[str, Any]]]) -> None:
    rows = [{"ticket_id": ticket_id, "type": kind, "data": data, "at": now}
            for kind, data in events]
    if rows:
        await session.execute(insert(Event), rows)


async def add_attachments(session: AsyncSession, rows: list[dict[str, Any]]) -> None:
    if rows:
        await session.execute(insert(Attachment), rows)


async def set_ticket_status(session: AsyncSession, ticket_id: int, status: str, now: datetime
                            ) -> None:
    values: dict[str, Any] = {"status": status, "updated_at": now}
    values["closed_at"] = now if status == "closed" else None
    await session.execute(update(Ticket).where(Ticket.id == ticket_id).values(**values))


async def touch_ticket(session: AsyncSession, ticket_id: int, now: datetime) -> None:
    await session.execute(update(Ticket).where(Ticket.id == ticket_id).values(updated_at=now))


async def department_id(session: AsyncSession, slug: str) -> int:
    found = await session.scalar(select(Department.id).where(Department.slug == slug))
    if found is None:
        raise LookupError(f"department {slug!r} is not in the database (run deskgate db upgrade)")
    return found


async def account_for_domain(session: AsyncSession, domain: str) -> tuple[int, str] | None:
    row = (await session.execute(select(Account.id, Account.name).join(
        AccountDomain, AccountDomain.account_id == Account.id).where(
        AccountDomain.domain == domain))).first()
    return (row[0], row[1]) if row else None


async def ensure_account(session: AsyncSession, name: str, domains: Iterable[str],
                         now: datetime) -> int:
    """The account of that name (made if new) owning these domains; insert-or-ignore so
    instances creating the same company at once agree."""
    await session.execute(insert_ignore(session, Account).values(name=name, created_at=now))
    account_id = await session.scalar(select(Account.id).where(Account.name == name))
    assert account_id is not None
    for domain in domains:
        await session.execute(insert_ignore(session, AccountDomain).values(
            domain=domain, account_id=account_id))
    return account_id


async def link_contacts_to_account(session: AsyncSession, account_id: int, domain: str) -> None:
    await session.execute(update(Contact).where(Contact.email.like(f"%@{domain}"))
                          .values(account_id=account_id))


async def agent_id(session: AsyncSession, email: str) -> int | None:
    return await session.scalar(select(Agent.id).where(Agent.email == email.lower(),
                                                       Agent.active.is_(True)))


async def assignment_candidates(session: AsyncSession, department_id: int) -> list[Any]:
    """Active agents of the department who may answer customers, with their load."""
    from gateway.tickets.assignment import Candidate

    open_count = (select(func.count(Ticket.id)).where(Ticket.owner_id == Agent.id,
                                                      Ticket.status != "closed")
                  .correlate(Agent).scalar_subquery())
    last = (select(func.max(Ticket.created_at, type_=UTCDateTime()))  # UTC on both stores
            .where(Ticket.owner_id == Agent.id)
            .correlate(Agent).scalar_subquery())
    rows = await session.execute(
        select(Agent.id, open_count, last).join(AgentDepartment,
                                                AgentDepartment.agent_id == Agent.id)
        .where(AgentDepartment.department_id == department_id, Agent.active.is_(True),
               Agent.profile != "light_agent"))
    return [Candidate(agent, count, at) for agent, count, at in rows]

