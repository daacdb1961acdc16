"""Big values in pieces: a big mail's raw bytes and its big attachments go to the store as
PART_BYTES pieces, each in a short transaction of its own, before the mail's own transaction.

SQLite has one write lock. Written in one transaction, a 10 MB value held it for 30–90 ms
(bench/run.py's big-mail phase), and every small mail's batch waited behind it; in pieces, a
batch waits for one piece at most, because WriterQueue's lanes take turns. The row pointing
at the pieces (raws.parts, attachments.parts) commits with the mail, so until then the
pieces belong to nothing: a redelivery finds and reuses them (they are keyed by the whole
value's sha256), and drop_orphans() removes those nobody came back for.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, exists, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.errors import DeskgateError
from store.engine import Store
from store.models import Attachment, BlobPart, Raw
from store.repo import insert_ignore

PART_BYTES = 1 << 20
# A piece unclaimed this long belongs to a delivery its sender gave up (MTAs retry for 5 days
# at most by default, but each retry refreshes the pieces it reuses: keep_in_parts).
ORPHAN_AGE = timedelta(days=1)


class MissingParts(DeskgateError):
    """A stored value's pieces are not all there (the database was altered by hand)."""


def count_parts(size: int) -> int:
    return max(1, -(-size // PART_BYTES))


async def keep_in_parts(store: Store, sha256: str, content: bytes, now: datetime) -> int:
    """Commit `content` as pieces, one transaction each; returns how many. Pieces already
    stored (an earlier delivery of the same bytes) are not sent again, only marked fresh, so
    drop_orphans() cannot take them before the mail that now needs them commits."""
    count = count_parts(len(content))
    async with store.transaction() as session:
        refreshed = await session.execute(
            update(BlobPart).where(BlobPart.sha256 == sha256).values(created_at=now)
            .returning(BlobPart.seq))
        have = set(refreshed.scalars())
    statement = None
    for seq in range(count):
        if seq in have:
            continue
        async with store.transaction() as session:
            statement = statement if statement is not None else \
                insert_ignore(session, BlobPart.__table__)
            await session.execute(statement, {
                "sha256": sha256, "seq": seq, "created_at": now,
                "content": content[seq * PART_BYTES:(seq + 1) * PART_BYTES]})
        store.checkpoint_soon()
    return count


async def joined(session: AsyncSession, sha256: str, parts: int) -> bytes:
    pieces = (await session.execute(select(BlobPart.seq, BlobPart.content).where(
        BlobPart.sha256 == sha256).order_by(BlobPart.seq))).all()
    if [seq for seq, _ in pieces] != list(range(parts)):
        raise MissingParts(f"value {sha256}: only {len(pieces)} of its {parts} pieces are "
                           "stored (blob_parts)")
    return b"".join(bytes(content) for _, content in pieces)


async def read_raw(session: AsyncSession, sha256: str) -> bytes | None:
    """A received mail's bytes, wherever they are kept; None when there is no such mail."""
    row = (await session.execute(select(Raw.content, Raw.parts).where(
        Raw.sha256 == sha256))).first()
    if row is None:
        return None
    return await joined(session, sha256, row.parts) if row.parts else bytes(row.content)


async def read_attachment(session: AsyncSession, attachment: Attachment) -> bytes | None:
    """An attachment's bytes; None when it was not kept (not_kept_reason says why)."""
    if attachment.parts:
        return await joined(session, attachment.sha256, attachment.parts)
    return None if attachment.content is None else bytes(attachment.content)


def _unclaimed(before: datetime) -> Any:
    return and_(BlobPart.created_at < before,
                ~exists().where(Raw.sha256 == BlobPart.sha256, Raw.parts > 0),
                ~exists().where(Attachment.sha256 == BlobPart.sha256, Attachment.parts > 0))


async def drop_orphans(store: Store, now: datetime, limit: int = 100) -> int:
    """Delete pieces older than ORPHAN_AGE that no raw mail or attachment points at; returns
    how many values lost their pieces. The candidates are found outside the write lock."""
    before = now - ORPHAN_AGE
    async with store.read() as session:
        candidates = list(await session.scalars(
            select(BlobPart.sha256).where(_unclaimed(before)).distinct().limit(limit)))
    if not candidates:
        return 0
    async with store.transaction() as session:  # checked again: a mail may have claimed one
        await session.execute(delete(BlobPart).where(BlobPart.sha256.in_(candidates),
                                                     _unclaimed(before)))
    return len(candidates)
