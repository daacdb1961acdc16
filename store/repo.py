"""Async data access for the ingest pipeline and the CLI; no policy lives here."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, delete, func, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.ingest.identify import TicketRef
from store.direct import direct
from store.models import (
    Account,
    AccountDomain,
    Address,
    Agent,
    AgentDepartment,
    Attachment,
    BlobValue,
    Contact,
    Department,
    Event,
    Message,
    Quarantine,
    Raw,
    Ticket,
    UTCDateTime,
)


def _dialect(session: AsyncSession) -> str:
    return session.bind.dialect.name if session.bind else "sqlite"


def insert_ignore(session: AsyncSession, table: Any) -> Any:
    """INSERT … ON CONFLICT DO NOTHING: safe when another instance inserts the same row."""
    dialect = _dialect(session)
    return (pg_insert if dialect == "postgresql" else sqlite_insert)(table).on_conflict_do_nothing()


# Statements run for every mail are built once, from the tables (Core, no ORM layer):
# building one (coercions, cache key) costs more event-loop CPU than its round trip
# (issue 10). Values go in as bind parameters.
_M, _T, _C = Message.__table__, Ticket.__table__, Contact.__table__
_FIND_BY_FINGERPRINT = direct(select(_M.c.id, _T.c.number).join(_T, _T.c.id == _M.c.ticket_id)
                              .where(_M.c.fingerprint == bindparam("fingerprint")))
_CONTACT_BY_EMAIL = direct(select(_C.c.id, _C.c.name).where(_C.c.email == bindparam("email")))
_ACCOUNT_FOR_DOMAIN = direct(select(Account.__table__.c.id, Account.__table__.c.name)
                       .join(AccountDomain.__table__,
                             AccountDomain.__table__.c.account_id == Account.__table__.c.id)
                       .where(AccountDomain.__table__.c.domain == bindparam("domain")))
_TOUCH_TICKET = direct(update(_T).where(_T.c.id == bindparam("ticket_id"))
                 .values(updated_at=bindparam("now", type_=_T.c.updated_at.type)))


def _ticket_insert(number: Any) -> Any:
    return direct(insert(_T).values(number=number).returning(_T.c.id, _T.c.number))


_INSERT_TICKET = {  # the number as next_ticket_number gives it, inside the INSERT
    "sqlite": _ticket_insert(select(func.coalesce(func.max(_T.c.number), 0) + 1)
                             .scalar_subquery()),
    "postgresql": _ticket_insert(func.nextval("ticket_number_seq")),
}
_INSERT_EVENTS = direct(insert(Event.__table__))
_INSERT_ATTACHMENTS = direct(insert(Attachment.__table__))
_CLAIM_PIECES = direct(delete(BlobValue.__table__)
                       .where(BlobValue.__table__.c.sha256 == bindparam("sha256")))
_RETURNING_ID: dict[Any, Any] = {}
_PUT_RAW: dict[str, Any] = {}


async def insert_row(session: AsyncSession, model: Any, values: dict[str, Any]) -> int:
    """A plain INSERT … RETURNING id: no ORM object, no unit of work, for rows nobody
    reads back through the session; column defaults apply as with session.add."""
    statement = _RETURNING_ID.get(model)
    if statement is None:
        table = model.__table__
        statement = _RETURNING_ID[model] = direct(insert(table).returning(table.c.id))
    return int((await session.execute(statement, values)).scalar_one())


async def insert_ticket(session: AsyncSession, values: dict[str, Any]) -> tuple[int, int]:
    """A new ticket with the next number, in one statement: (id, number). The number is
    what next_ticket_number would have given (we hold SQLite's write lock)."""
    statement = _INSERT_TICKET["postgresql" if _dialect(session) == "postgresql" else "sqlite"]
    row = (await session.execute(statement, values)).one()
    return int(row[0]), int(row[1])


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
    departments = Department.__table__
    return select(_T.c.id, _T.c.number, departments.c.slug, _T.c.status, _T.c.closed_at
                  ).join(departments, departments.c.id == _T.c.department_id)


def _ref(row: Any) -> TicketRef:
    return TicketRef(id=row[0], number=row[1], department=row[2], status=row[3],
                     closed_at=row[4])


async def find_by_fingerprint(session: AsyncSession, fingerprint: str) -> tuple[int, int] | None:
    row = (await session.execute(_FIND_BY_FINGERPRINT, {"fingerprint": fingerprint})).first()
    return (row[0], row[1]) if row else None


async def find_quarantined(session: AsyncSession, raw_sha256: str) -> int | None:
    return await session.scalar(select(Quarantine.id).where(Quarantine.raw_sha256 == raw_sha256))


_BY_MESSAGE_IDS = (_ref_query().add_columns(_M.c.message_id)
                   .join(_M, _M.c.ticket_id == _T.c.id)
                   .where(_M.c.message_id.in_(bindparam("ids", expanding=True))))


async def tickets_by_message_ids(session: AsyncSession, ids: Sequence[str]
                                 ) -> dict[str, TicketRef]:
    if not ids:
        return {}
    rows = await session.execute(_BY_MESSAGE_IDS, {"ids": list(ids)[:100]})
    return {row[5]: _ref(row) for row in rows}


async def sent_message_ids(session: AsyncSession, ids: Sequence[str]) -> frozenset[str]:
    """Which of these Message-IDs are of mail we sent (acknowledgements, agents' replies)."""
    found = await session.scalars(select(Message.message_id).where(
        Message.message_id.in_(list(ids)[:100]), Message.direction == "out"))
    return frozenset(i for i in found if i)


_TICKET_REF = direct(_ref_query().where(_T.c.number == bindparam("number")))


async def ticket_ref(session: AsyncSession, number: int) -> TicketRef | None:
    row = (await session.execute(_TICKET_REF, {"number": number})).first()
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
                         account_of_new: Callable[[], Awaitable[int | None]] | None = None
                         ) -> int:
    """The contact's id, made if new (insert-or-ignore: instances may race); a name fills an
    empty one. A known contact, the common case, costs one SELECT; a new one an INSERT, and
    whatever account_of_new() costs to find (or make) its company: only a new one asks."""
    row = (await session.execute(_CONTACT_BY_EMAIL, {"email": email})).first()
    if row is None:
        account_id = await account_of_new() if account_of_new is not None else None
        added = (await session.execute(insert_ignore(session, Contact).values(
            email=email, name=name, created_at=now, account_id=account_id)
            .returning(Contact.id, Contact.name))).first()
        # Nothing returned: another instance made it first; read what it wrote.
        row = added or (await session.execute(_CONTACT_BY_EMAIL, {"email": email})).first()
        assert row is not None
    if name and not row[1]:
        await session.execute(update(Contact).where(Contact.id == row[0], Contact.name == "")
                              .values(name=name))
    return int(row[0])


async def put_raw(session: AsyncSession, sha256: str, content: bytes, now: datetime,
                  parts: int = 0) -> None:
    """parts: the bytes are stored already, in that many pieces (store/blobs.py)."""
    dialect = _dialect(session)
    statement = _PUT_RAW.get(dialect)
    if statement is None:
        statement = _PUT_RAW[dialect] = direct(insert_ignore(session, Raw.__table__))
    added = await session.execute(statement, {
        "sha256": sha256, "content": b"" if parts else content, "size": len(content),
        "created_at": now, "parts": parts})
    # Only the row just added points at the pieces. A row already there (the same bytes,
    # stored inline before migration 0003, or in pieces it claimed itself) leaves the value
    # marked: drop_orphans() then drops pieces nobody points at, or keeps claimed ones.
    if parts and added.rowcount:
        await claim_pieces(session, sha256)


async def claim_pieces(session: AsyncSession, sha256: str) -> None:
    """A row now points at this value's pieces: they are nobody's no longer (store/blobs.py)."""
    await session.execute(_CLAIM_PIECES, {"sha256": sha256})


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
        await session.execute(_INSERT_EVENTS, rows)


async def add_attachments(session: AsyncSession, rows: list[dict[str, Any]]) -> None:
    if rows:
        await session.execute(_INSERT_ATTACHMENTS, rows)
    for row in rows:
        if row.get("parts"):
            await claim_pieces(session, row["sha256"])


async def set_ticket_status(session: AsyncSession, ticket_id: int, status: str, now: datetime
                            ) -> None:
    values: dict[str, Any] = {"status": status, "updated_at": now}
    values["closed_at"] = now if status == "closed" else None
    await session.execute(update(Ticket).where(Ticket.id == ticket_id).values(**values))


async def touch_ticket(session: AsyncSession, ticket_id: int, now: datetime) -> None:
    await session.execute(_TOUCH_TICKET, {"ticket_id": ticket_id, "now": now})


async def department_id(session: AsyncSession, slug: str) -> int:
    found = await session.scalar(select(Department.id).where(Department.slug == slug))
    if found is None:
        raise LookupError(f"department {slug!r} is not in the database (run deskgate db upgrade)")
    return found


async def account_for_domain(session: AsyncSession, domain: str) -> tuple[int, str] | None:
    row = (await session.execute(_ACCOUNT_FOR_DOMAIN, {"domain": domain})).first()
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

