"""Intercept hook: a DSN to a VERP address is recorded on its outbox row and ticket, only."""

from __future__ import annotations

from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.ingest.addresses import RouteKind
from gateway.ingest.bounce import BounceReport, analyse_bounce
from gateway.ingest.pipeline import Incoming, Outcome, Verdict
from store import repo
from store.models import Outbox, Ticket

log = structlog.get_logger("deskgate.bounce")


def bounce_record(report: BounceReport | None, sha256: str, at: str) -> dict[str, Any]:
    if report is None:
        return {"status": None, "action": None, "diagnostic": "unreadable bounce",
                "recipients": [], "permanent": False, "raw_sha256": sha256, "at": at}
    return {"status": report.status, "action": report.action, "diagnostic": report.diagnostic,
            "recipients": list(report.final_recipients), "permanent": report.permanent,
            "raw_sha256": sha256, "at": at}


async def record_bounce(session: AsyncSession, incoming: Incoming) -> Verdict | None:
    route = next((r for r in incoming.routes if r.kind is RouteKind.BOUNCE), None)
    if route is None:
        return None
    row = await session.get(Outbox, route.outbox_id)
    if row is None:  # an old row removed by hand: accept and forget, never a ticket
        log.warning("bounce.unknown_row", outbox=route.outbox_id)
        return Verdict(Outcome.STORED, reason=f"bounce for unknown outbox row {route.outbox_id}")
    if row.bounce and row.bounce.get("raw_sha256") == incoming.sha256:
        return Verdict(Outcome.DUPLICATE, reason="bounce already recorded")
    record = bounce_record(analyse_bounce(incoming.mail, incoming.raw), incoming.sha256,
                           incoming.now.isoformat())
    await repo.put_raw(session, incoming.sha256, incoming.raw, incoming.now, incoming.raw_parts)
    row.bounce = record
    if record["permanent"]:
        row.state = "bounced"
    row.last_error = f"bounce: {record['status'] or '?'} {record['diagnostic'] or ''}".strip()
    number = None
    if row.ticket_id is not None:
        number = await session.scalar(select(Ticket.number).where(Ticket.id == row.ticket_id))
        await repo.add_events(session, row.ticket_id, incoming.now,
                              [("bounce", {"outbox": row.id, "kind": row.kind} | record)])
    log.info("bounce.recorded", outbox=row.id, ticket=number, status=record["status"],
             permanent=record["permanent"])
    return Verdict(Outcome.STORED, number, f"bounce recorded on outbox row {row.id}")
