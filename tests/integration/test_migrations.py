"""The migrations build exactly what the models describe, on both stores, and go back down."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import delete, inspect, text

from store import repo
from store.engine import Store
from store.migrate import alembic_config, pending, upgrade
from store.models import Base, Quarantine, Raw


def _diff(connection: Any) -> list[Any]:
    return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))


async def test_migrated_schema_equals_the_models(db_url: str) -> None:
    store = Store(db_url)
    try:
        assert not await pending(store)
        async with store.engine.connect() as connection:
            assert await connection.run_sync(_diff) == []
    finally:
        await store.dispose()


async def test_downgrade_to_base_and_upgrade_again(sqlite_url: str) -> None:
    store = Store(sqlite_url)
    try:
        def down(connection: Any) -> None:
            cfg = alembic_config(sqlite_url)
            cfg.attributes["connection"] = connection
            command.downgrade(cfg, "base")

        async with store.engine.begin() as connection:
            await connection.run_sync(down)
        async with store.engine.connect() as connection:
            tables = await connection.run_sync(lambda c: inspect(c).get_table_names())
        assert set(tables) <= {"alembic_version"}
        assert await pending(store)
        await upgrade(store)
        assert not await pending(store)
    finally:
        await store.dispose()


async def _downgrade_to(store: Store, url: str, revision: str) -> None:
    def down(connection: Any) -> None:
        cfg = alembic_config(url)
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, revision)

    async with store.engine.begin() as connection:
        await connection.run_sync(down)


async def test_0003_goes_down_with_mails_in_it_unless_they_are_in_pieces(db_url: str) -> None:
    """Going back to 0002 keeps every mail (a foreign key points at raws: SQLite drops the
    columns in place); with a mail stored in pieces it refuses, as 0002 could not hold it."""
    store = Store(db_url)
    now = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
    try:
        async with store.transaction() as session:
            await repo.put_raw(session, "a" * 64, b"a small mail", now)
            session.add(Quarantine(raw_sha256="a" * 64, reason="test", received_at=now))
            await repo.put_raw(session, "b" * 64, b"x" * 10, now, parts=1)
        with pytest.raises(RuntimeError, match="1 raw mails or attachments are stored in pieces"):
            await _downgrade_to(store, db_url, "0002")
        async with store.transaction() as session:
            await session.execute(delete(Raw).where(Raw.sha256 == "b" * 64))
        await _downgrade_to(store, db_url, "0002")
        async with store.read() as session:
            kept = (await session.execute(text("SELECT content FROM raws"))).scalars().all()
        assert [bytes(k) for k in kept] == [b"a small mail"]
        await upgrade(store)
        assert not await pending(store)
    finally:
        await store.dispose()
