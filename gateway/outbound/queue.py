"""The outbox table as a queue: enqueue in the cause's transaction, claim with a lease, settle."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.errors import DeskgateError
from gateway.ingest.addresses import bounce_address
from store import repo
from store.direct import direct
from store.models import Address, Outbox

DUE_STATES = ("queued", "retry")
HELD_REASON = "From {address} is not verified yet (deskgate address verify {address})"


@dataclass(frozen=True, slots=True)
class Claimed:
    """A row the worker holds a lease on: everything it needs to send, nothing more."""

    id: int
    ticket_id: int | None
    kind: str
    envelope_from: str
    envelope_to: tuple[str, ...]
    from_addr: str
    message_id: str
    mime: bytes
    attempts: int
    internal_errors: int
    created_at: datetime
    lease_until: datetime | None = None  # this claim's lease: hand_back only touches that


async def is_verified(session: AsyncSession, address: str) -> bool:
    state = await session.scalar(select(Address.verification_state)
                                 .where(Address.email == address.lower()))
    return state == "verified"


@dataclass(frozen=True, slots=True)
class Queued:
    """What `insert` tells of the row it added (no ORM object to carry around)."""

    id: int
    state: str


def _values(kind: str, from_addr: str, to: str, message_id: str, mime: bytes, now: datetime,
            held: bool, ticket_id: int | None, cause_message_id: int | None) -> dict[str, Any]:
    return dict(kind=kind, ticket_id=ticket_id, cause_message_id=cause_message_id,
                envelope_from="", envelope_to=[to], from_addr=from_addr.lower(),
                recipient=to.lower(), message_id=message_id, mime=mime,
                state="held" if held else "queued", attempts=0, internal_errors=0,
                next_attempt_at=now, created_at=now,
                last_error=HELD_REASON.format(address=from_addr) if held else None)


async def enqueue(session: AsyncSession, *, kind: str, from_addr: str, to: str, message_id: str,
                  mime: bytes, now: datetime, ticket_id: int | None = None,
                  cause_message_id: int | None = None, exempt_from_hold: bool = False) -> Outbox:
    """Adds a row; From an unverified address it waits as `held` (DESIGN 4, verification).
    Its VERP sender names the row's id, so claim() sets it, in the UPDATE it makes anyway."""
    held = not exempt_from_hold and not await is_verified(session, from_addr)
    row = Outbox(**_values(kind, from_addr, to, message_id, mime, now, held, ticket_id,
                           cause_message_id))
    session.add(row)
    await session.flush()
    return row


async def insert(session: AsyncSession, *, kind: str, from_addr: str, to: str, message_id: str,
                 mime: bytes, now: datetime, verified: bool, ticket_id: int | None = None,
                 cause_message_id: int | None = None) -> Queued:
    """enqueue for a caller that knows whether From is verified and needs no ORM row: one
    plain statement, for the ingest transaction's hooks (issue 10)."""
    values = _values(kind, from_addr, to, message_id, mime, now, not verified, ticket_id,
                     cause_message_id)
    return Queued(await repo.insert_row(session, Outbox, values), values["state"])


_OUTBOX = Outbox.__table__


def _recent_query(kind: Any, recipient: Any, since: Any) -> Any:
    return select(func.count(_OUTBOX.c.id)).where(
        _OUTBOX.c.kind == kind, _OUTBOX.c.recipient == recipient, _OUTBOX.c.created_at >= since)


_RECENT_AND_VERIFIED = direct(select(
    _recent_query(bindparam("kind"), bindparam("recipient"),
                  bindparam("since", type_=_OUTBOX.c.created_at.type)).scalar_subquery(),
    select(Address.__table__.c.verification_state)
    .where(Address.__table__.c.email == bindparam("from_addr")).scalar_subquery()))


async def recent_and_verified(session: AsyncSession, kind: str, recipient: str,
                              since: datetime, from_addr: str) -> tuple[int, bool]:
    """Mails of this kind to recipient since then, and whether from_addr is verified: one
    round trip."""
    row = (await session.execute(_RECENT_AND_VERIFIED, {
        "kind": kind, "recipient": recipient.lower(), "since": since,
        "from_addr": from_addr.lower()})).one()
    return int(row[0] or 0), row[1] == "verified"


async def recover(session: AsyncSession, now: datetime) -> int:
    """Rows whose worker died mid-send (lease expired) become due again."""
    result = await session.execute(update(Outbox).where(
        Outbox.state == "sending", Outbox.lease_until < now).values(
        state="retry", lease_until=None, next_attempt_at=now))
    return int(result.rowcount or 0)


async def claim(session: AsyncSession, now: datetime, lease_s: int, limit: int, secret: bytes
                ) -> list[Claimed]:
    """Due rows, leased to this worker. A row's VERP sender (bounces+o<id>-<mac>@domain) is
    set by its first claim: the row's id was not known to the INSERT that made it, and an
    UPDATE there cost every acknowledged mail a statement before its 250 (issue 10)."""
    due = or_(Outbox.state.in_(DUE_STATES),
              (Outbox.state == "sending") & (Outbox.lease_until < now))
    query = (select(Outbox).where(due, Outbox.next_attempt_at <= now)
             .order_by(Outbox.next_attempt_at, Outbox.id).limit(limit))
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        # Several instances: each row is claimed by one of them (DESIGN 6).
        query = query.with_for_update(skip_locked=True)
    rows = list(await session.scalars(query))
    for row in rows:
        row.state, row.lease_until = "sending", now + timedelta(seconds=lease_s)
        if not row.envelope_from:
            row.envelope_from = bounce_address(row.from_addr.rsplit("@", 1)[1], row.id, secret)
    await session.flush()
    return [Claimed(r.id, r.ticket_id, r.kind, r.envelope_from, tuple(r.envelope_to),
                    r.from_addr, r.message_id, r.mime, r.attempts, r.internal_errors,
                    r.created_at, r.lease_until) for r in rows]


async def settle(session: AsyncSession, row_id: int, **values: Any) -> None:
    await session.execute(update(Outbox).where(Outbox.id == row_id)
                          .values(lease_until=None, **values))


async def hand_back(session: AsyncSession, rows: list[Claimed], now: datetime) -> int:
    """Claimed rows not begun: due again now. Only while still under this claim's lease:
    had it expired and another worker claimed (and sent) a row meanwhile, that row is its."""
    handed = 0
    for row in rows:
        result = await session.execute(update(Outbox).where(
            Outbox.id == row.id, Outbox.state == "sending",
            Outbox.lease_until == row.lease_until).values(
            state="retry", lease_until=None, next_attempt_at=now))
        handed += int(result.rowcount or 0)
    return handed


async def release_held(session: AsyncSession, address: str, now: datetime) -> int:
    result = await session.execute(update(Outbox).where(
        Outbox.state == "held", Outbox.from_addr == address.lower()).values(
        state="queued", next_attempt_at=now, last_error=None))
    return int(result.rowcount or 0)


async def approve(session: AsyncSession, row_id: int, now: datetime) -> str:
    """A supervisor lets a newbie agent's reply go; its From must still be verified."""
    row = await session.get(Outbox, row_id)
    if row is None or row.state != "approval":
        raise DeskgateError(f"outbox row {row_id} is not waiting for approval")
    if await is_verified(session, row.from_addr):
        row.state, row.last_error, row.next_attempt_at = "queued", None, now
    else:
        row.state, row.last_error = "held", HELD_REASON.format(address=row.from_addr)
    await session.flush()
    return f"approved, {row.state}"


async def requeue(session: AsyncSession, row_id: int, states: tuple[str, ...], now: datetime
                  ) -> bool:
    """`outbox retry` (failed) and `outbox replay` (shunted): due now, errors forgotten."""
    result = await session.execute(update(Outbox).where(
        Outbox.id == row_id, Outbox.state.in_(states)).values(
        state="queued", next_attempt_at=now, internal_errors=0, lease_until=None))
    return bool(result.rowcount)


async def listing(session: AsyncSession, state: str | None, limit: int = 200
                  ) -> list[dict[str, Any]]:
    query = select(Outbox).order_by(Outbox.id.desc()).limit(limit)
    if state:
        query = query.where(Outbox.state == state)
    return [{"id": r.id, "state": r.state, "kind": r.kind, "ticket_id": r.ticket_id,
             "to": r.recipient, "from": r.from_addr, "attempts": r.attempts,
             "next_attempt_at": r.next_attempt_at, "created_at": r.created_at,
             "sent_at": r.sent_at, "message_id": r.message_id, "last_error": r.last_error,
             "bounce": r.bounce}
            for r in await session.scalars(query)]
