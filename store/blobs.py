"""Big values in pieces: a big mail's raw bytes and its big attachments go to the store as
PART_BYTES pieces, each in a short transaction of its own, before the mail's own transaction.

SQLite has one write lock. Written in one transaction, a 10 MB value held it for 30–90 ms
(bench/run.py's big-mail phase), and every small mail's batch waited behind it; in pieces, a
batch waits for one piece at most, because WriterQueue's lanes take turns. The row pointing
at the pieces (raws.parts, attachments.parts) commits with the mail; until then a BlobValue
row marks the pieces as nobody's yet. A redelivery finds and reuses them (they are keyed by
the whole value's sha256), and drop_orphans() removes those nobody came back for.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, exists, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.errors import DeskgateError
from store.engine import Store
from store.models import Attachment, BlobPart, BlobValue, Raw
from store.repo import insert_ignore

PART_BYTES = 1 << 20
# A value unclaimed this long belongs to a delivery its sender gave up (MTAs retry for 5 days
# at most by default, but each retry marks the value fresh again: keep_in_parts).
ORPHAN_AGE = timedelta(days=1)


class MissingParts(DeskgateError):
    """A stored value's pieces are not all there (the database was altered by hand)."""


def count_parts(size: int) -> int:
    return max(1, -(-size // PART_BYTES))


async def keep_in_parts(store: Store, sha256: str, content: bytes, now: datetime) -> int:
    """Commit `content` as pieces, one transaction each; returns how many. The value is
    marked fresh first (BlobValue), so drop_orphans() cannot take pieces an earlier delivery
    of the same bytes left, which are then not sent again."""
    count = count_parts(len(content))
    async with store.transaction() as session:
        marked = await session.execute(update(BlobValue).where(BlobValue.sha256 == sha256)
                                       .values(created_at=now))
        if not marked.rowcount:  # type: ignore[attr-defined]
            await session.execute(insert_ignore(session, BlobValue.__table__),
                                  {"sha256": sha256, "created_at": now})
        # The primary key's index holds seq: no piece's content is read.
        have = set(await session.scalars(select(BlobPart.seq).where(BlobPart.sha256 == sha256)))
    statement = None
    for seq in range(count):
        if seq in have:
            continue
        async with store.transaction() as session:
            statement = statement if statement is not None else \
                insert_ignore(session, BlobPart.__table__)
            await session.execute(statement, {
                "sha256": sha256, "seq": seq,
                "content": content[seq * PART_BYTES:(seq + 1) * PART_BYTES]})
        store.checkpoint_soon()
    return count


async def joined(session: AsyncSession, sha256: str, parts: int, size: int) -> bytes:
    pieces = (await session.execute(select(BlobPart.seq, BlobPart.content).where(
        BlobPart.sha256 == sha256).order_by(BlobPart.seq))).all()
    value = b"".join(bytes(content) for _, content in pieces)
    if [seq for seq, _ in pieces] != list(range(parts)) or len(value) != size:
        raise MissingParts(f"value {sha256}: {len(pieces)} pieces of {len(value)} bytes "
                           f"stored where {parts} of {size} bytes were (blob_parts)")
    return value


async def read_raw(session: AsyncSession, sha256: str) -> bytes | None:
    """A received mail's bytes, wherever they are kept; None when there is no such mail."""
    row = (await session.execute(select(Raw.content, Raw.parts, Raw.size).where(
        Raw.sha256 == sha256))).first()
    if row is None:
        return None
    return await joined(session, sha256, row.parts, row.size) if row.parts \
        else bytes(row.content)


async def read_attachment(session: AsyncSession, attachment: Attachment) -> bytes | None:
    """An attachment's bytes; None when it was not kept (not_kept_reason says why)."""
    if attachment.parts:
        return await joined(session, attachment.sha256, attachment.parts, attachment.size)
    return None if attachment.content is None else bytes(attachment.content)


def _claimed(sha256: Any) -> Any:
    return or_(exists().where(Raw.sha256 == sha256, Raw.parts > 0),
               exists().where(Attachment.sha256 == sha256, Attachment.parts > 0))


async def drop_orphans(store: Store, now: datetime, limit: int = 20) -> int:
    """Delete the pieces of values unclaimed for ORPHAN_AGE; returns how many values lost
    theirs. One value a transaction, each locked first: a redelivery marking it fresh
    meanwhile (keep_in_parts) waits for it, or makes it keep its pieces."""
    before = now - ORPHAN_AGE
    async with store.read() as session:
        candidates = list(await session.scalars(
            select(BlobValue.sha256).where(BlobValue.created_at < before).limit(limit)))
    dropped = 0
    for sha256 in candidates:
        async with store.transaction() as session:
            old = await session.scalar(select(BlobValue.sha256).where(
                BlobValue.sha256 == sha256, BlobValue.created_at < before).with_for_update())
            if old is None:
                continue
            await session.execute(delete(BlobValue).where(BlobValue.sha256 == sha256))
            if await session.scalar(select(_claimed(sha256))):
                continue  # another mail with the same bytes points at them
            await session.execute(delete(BlobPart).where(BlobPart.sha256 == sha256))
            dropped += 1
        store.checkpoint_soon()
    return dropped
