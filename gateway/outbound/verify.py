"""Reply-from verification: mail a one-time code to an address; its return proves ownership."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.errors import DeskgateError
from gateway.ingest.pipeline import Incoming, Outcome, Verdict
from gateway.outbound import queue
from gateway.outbound.compose import Outgoing, compose
from gateway.outbound.render import Renderer
from gateway.settings import Settings
from store import repo
from store.models import Address, Department

log = structlog.get_logger("deskgate.verify")

HEADER = "X-Deskgate-Verification"
_CODE = re.compile(r"\b([0-9a-f]{32})\b")


# Bytes that are hex digits -> "1", all others -> "0": a body holds a code only if it has
# 32 hex digits in a row, which this finds far quicker than the regex does (issue 10).
_HEX_RUNS = bytes(0x31 if chr(i) in "0123456789abcdef" else 0x30 for i in range(256))
_HEX_RUN = b"1" * 32


def _may_hold_code(lowered: str) -> bool:
    """False only when _CODE cannot match; a non-ASCII character becomes one "?" byte."""
    return _HEX_RUN in lowered.encode("ascii", "replace").translate(_HEX_RUNS)


def candidate_codes(header: str | None, text: str) -> list[str]:
    """The header first; the body too, in case a forwarder dropped our header."""
    found = [header.strip().lower()] if header else []
    lowered = text[:20000].lower()
    if _may_hold_code(lowered):
        found += _CODE.findall(lowered)
    return list(dict.fromkeys(found))[:10]


async def start(session: AsyncSession, settings: Settings, renderer: Renderer, email: str,
                department: str | None, now: datetime) -> int:
    """Adds (or resets) an address as pending and queues its code; returns the outbox id."""
    email = email.lower()
    row = await session.scalar(select(Address).where(Address.email == email))
    if row is None:
        if department is None:
            raise DeskgateError(f"{email} is not known: give --department")
        dept_id = await repo.department_id(session, department)
        row = await repo.add(session, Address(email=email, department_id=dept_id,
                                              verification_state="pending"))
    elif row.verification_state == "verified":
        raise DeskgateError(f"{email} is already verified")
    dept = await session.get(Department, row.department_id)
    assert dept is not None
    code = secrets.token_hex(16)
    row.verification_state, row.verification_code, row.verified_at = "pending", code, None
    language = dept.language if dept.language in ("en", "de", "nl", "zh") else "en"
    rendered = renderer.render("verification", language, {
        "address": email, "department": dept.name, "code": code,
        "verify_url": f"{settings.web_links.base_url}/verify/{code}"}, department=dept.slug)
    composed = compose(rendered, Outgoing(
        from_addr=email, from_name=dept.name, to=email, hostname=settings.hostname, date=now,
        auto_submitted="auto-generated", language=language, extra_headers=((HEADER, code),)))
    outbox = await queue.enqueue(session, kind="verification", from_addr=email, to=email,
                                 message_id=composed.message_id, mime=composed.mime, now=now,
                                 exempt_from_hold=True)
    log.info("verify.sent", address=email, outbox=outbox.id)
    return int(outbox.id)


async def mark_verified(session: AsyncSession, email: str, now: datetime) -> int:
    """Verified now; held mail From it is released. Returns how many rows were released."""
    await session.execute(update(Address).where(Address.email == email.lower()).values(
        verification_state="verified", verification_code=None, verified_at=now))
    return await queue.release_held(session, email, now)


class VerificationIntercept:
    """Pipeline intercept: a returning code verifies its address and is not a ticket."""

    def __init__(self, released: Callable[[], None] = lambda: None) -> None:
        self.released = released

    async def __call__(self, session: AsyncSession, incoming: Incoming) -> Verdict | None:
        codes = candidate_codes(incoming.mail.header(HEADER.lower()), incoming.mail.text)
        if not codes:
            return None
        address = await session.scalar(select(Address).where(
            Address.verification_code.in_(codes), Address.verification_state == "pending"))
        if address is None:
            return None
        released = await mark_verified(session, address.email, incoming.now)
        log.info("verify.verified", address=address.email, released=released)
        if released:
            self.released()
        return Verdict(Outcome.STORED, reason=f"{address.email} verified; {released} released")


async def listing(session: AsyncSession) -> list[dict[str, Any]]:
    rows = await session.execute(select(Address, Department.slug).join(
        Department, Department.id == Address.department_id).order_by(Address.email))
    return [{"email": a.email, "department": slug, "state": a.verification_state,
             "verified_at": a.verified_at} for a, slug in rows]


async def bootstrap(session: AsyncSession, addresses: list[str], now: datetime) -> None:
    """Dev config only: the example addresses count as verified (refused by check-config)."""
    for email in addresses:
        state = await session.scalar(select(Address.verification_state)
                                     .where(Address.email == email))
        if state != "verified":
            await mark_verified(session, email, now)
