"""The migrations build exactly what the models describe, on both stores, and go back down."""

from __future__ import annotations

from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from store.engine import Store
from store.migrate import alembic_config, pending, upgrade
from store.models import Base


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
