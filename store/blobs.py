"""Big blobs into SQLite in pieces (issue 10: memory).

An INSERT with a bound 50 MB value makes SQLite copy it twice (the bound copy and the record
it builds), on top of the Python object: a 50 MB mail cost the serving process 100 MB more at
that moment. Here the row is inserted with zeroblob(N), then written through SQLite's
incremental blob I/O one MiB at a time, in the same transaction; a crash before the commit
leaves nothing, as before. PostgreSQL (asyncpg) streams the value in its own buffer.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

BIG_BLOB_BYTES = 1 << 20  # smaller values go in the INSERT as before
_CHUNK = 1 << 20


def in_pieces(session: AsyncSession, content: bytes | None) -> bool:
    """Whether this value should be written in pieces (SQLite and big)."""
    bind = session.bind
    return (content is not None and len(content) >= BIG_BLOB_BYTES and bind is not None
            and bind.dialect.name == "sqlite")


async def write_blob(session: AsyncSession, table: str, column: str, rowid: int,
                     content: bytes) -> None:
    """content into the zeroblob of (table, column, rowid), in aiosqlite's thread."""
    connection = await session.connection()
    driver: Any = (await connection.get_raw_connection()).driver_connection  # aiosqlite's

    def write() -> None:
        view = memoryview(content)
        with driver._conn.blobopen(table, column, rowid) as blob:  # noqa: SLF001
            for start in range(0, len(view), _CHUNK):
                blob.write(view[start:start + _CHUNK])

    # aiosqlite runs every call on the connection's own thread (sqlite3 requires it); its
    # _execute is how its public methods do that, and has no public twin for blobs.
    await driver._execute(write)  # noqa: SLF001


async def rowid_of(session: AsyncSession, table: str, key: str, value: Any) -> int:
    found = await session.scalar(text(f"SELECT rowid FROM {table} WHERE {key} = :value"),
                                 {"value": value})
    assert found is not None
    return int(found)
