"""Apply Alembic migrations: `deskgate db upgrade`, and the daemon's start-up check."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

from store.engine import Store

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _upgrade(connection: Connection, cfg: Config) -> None:
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def upgrade(store: Store) -> None:
    cfg = alembic_config(store.url)
    async with store.engine.begin() as connection:
        await connection.run_sync(_upgrade, cfg)


async def pending(store: Store) -> bool:
    """True when the database is behind the code: the daemon refuses to start then."""
    head = ScriptDirectory.from_config(alembic_config(store.url)).get_current_head()
    async with store.engine.connect() as connection:
        current = await connection.run_sync(_current)
    return current != head
