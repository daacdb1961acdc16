"""The shared rate-limit counts (issue 11): add a process's buckets, read back window sums."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from store.models import RateCount

CHUNK = 500  # rows per statement: far below either driver's bind-parameter ceiling
T = TypeVar("T")


def _chunks(items: Sequence[T]) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), CHUNK):
        yield items[start:start + CHUNK]


async def add_and_sum(session: AsyncSession, counts: dict[str, dict[int, int]],
                      keys: Sequence[str], oldest: int) -> dict[str, int]:
    """Add `counts` (key -> bucket -> mails) and return each key's sum from `oldest` on.

    Rows are upserted in key order so that instances adding the same keys at once lock
    them in the same order (no deadlock on PostgreSQL).
    """
    rows = sorted((key, bucket, hits) for key, buckets in counts.items()
                  for bucket, hits in buckets.items() if hits)
    dialect = session.bind.dialect.name if session.bind else "sqlite"
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    for chunk in _chunks(rows):
        stmt = insert(RateCount).values([{"key": k, "bucket": b, "hits": n} for k, b, n in chunk])
        await session.execute(stmt.on_conflict_do_update(
            index_elements=[RateCount.key, RateCount.bucket],
            set_={"hits": RateCount.hits + stmt.excluded.hits}))
    sums: dict[str, int] = {}
    for chunk in _chunks(sorted(keys)):
        result = await session.execute(
            select(RateCount.key, func.sum(RateCount.hits))
            .where(RateCount.key.in_(chunk), RateCount.bucket >= oldest)
            .group_by(RateCount.key))
        sums.update((key, int(total)) for key, total in result.all())
    return sums


async def prune(session: AsyncSession, oldest: int) -> int:
    """Delete buckets that left every window; returns how many rows went."""
    result = await session.execute(delete(RateCount).where(RateCount.bucket < oldest))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
