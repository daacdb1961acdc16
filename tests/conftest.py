"""Fixtures shared by unit and integration tests: settings, stores, a running gateway."""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from gateway.settings import Settings, parse_settings
from store.engine import Store
from store.migrate import upgrade
from store.models import Base

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI") == "true"
PG_ADMIN_URL = os.environ.get("DESKGATE_TEST_PG",
                              "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres")
SECRET = "test-secret-0123456789abcdef"


@pytest.fixture(autouse=True)
def _no_big_sqlite_commit_lately(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether a SQLite commit stays on the loop depends on this process's latest big commit
    (store/sqlite_inline.py): an earlier test's must not decide it for the next."""
    from store import sqlite_inline

    monkeypatch.setattr(sqlite_inline, "_big_at", float("-inf"))


def need_peer(what: str, why: str) -> None:
    """A missing peer fails the run in CI and skips it on a laptop (brief, non-negotiable 2)."""
    message = f"{what} is not available: {why}"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def settings_text(database_url: str, extra: str = "", tickets: str = "") -> str:
    return f"""
hostname = "deskgate.test"
log_level = "warning"
[database]
url = "{database_url}"
[inbound]
listen = "127.0.0.1:0"
max_message_bytes = 1048576
max_attachment_bytes = 65536
{extra}
[tickets]
secret = "{SECRET}"
follow_up_window_days = 14
{tickets}
[web]
listen = "127.0.0.1:0"
[[departments]]
name = "Support"
slug = "support"
addresses = ["support@example.test"]
[[departments]]
name = "Billing"
slug = "billing"
language = "de"
addresses = ["billing@example.test"]
"""


def make_settings(database_url: str = "sqlite+aiosqlite:///:memory:", **kw: str) -> Settings:
    return parse_settings(settings_text(database_url, **kw), "test.toml")


async def _migrate(url: str) -> None:
    store = Store(url)
    try:
        await upgrade(store)
    finally:
        await store.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.sqlite3"
    asyncio.run(_migrate(f"sqlite+aiosqlite:///{path}"))
    return path


@pytest.fixture
def sqlite_url(sqlite_template: Path, tmp_path: Path) -> str:
    target = tmp_path / "deskgate.sqlite3"
    shutil.copy(sqlite_template, target)
    return f"sqlite+aiosqlite:///{target}"


async def _admin(sql: str) -> None:
    import asyncpg

    url = make_url(PG_ADMIN_URL)
    conn = await asyncpg.connect(host=url.host, port=url.port or 5432, user=url.username,
                                 password=url.password, database=url.database, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    name = f"deskgate_test_{uuid.uuid4().hex[:10]}"
    try:
        asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    except (OSError, Exception) as exc:  # noqa: BLE001 — any connect failure means "no peer"
        need_peer("PostgreSQL", f"{PG_ADMIN_URL}: {type(exc).__name__}: {exc}")
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    asyncio.run(_migrate(url))
    yield url
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# Every table of the model: a new table can never be forgotten by the per-test reset.
TABLES = tuple(table.name for table in Base.metadata.sorted_tables)


@pytest.fixture
def pg_url(pg_database: str) -> str:
    async def reset() -> None:
        import asyncpg

        url = make_url(pg_database)
        conn = await asyncpg.connect(host=url.host, port=url.port or 5432, user=url.username,
                                     database=url.database)
        try:
            await conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE; "
                               "ALTER SEQUENCE ticket_number_seq RESTART WITH 1")
        finally:
            await conn.close()

    asyncio.run(reset())
    return pg_database


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Run the test once on each store."""
    name = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return str(request.getfixturevalue(name))


@pytest.fixture
async def make_gateway(db_url: str) -> AsyncIterator[Callable[..., Any]]:
    from gateway.service import Gateway

    started: list[Gateway] = []

    async def factory(url: str | None = None, clock: Any = None, **kw: str) -> Gateway:
        gateway = Gateway(make_settings(url or db_url, **kw), clock=clock)
        await gateway.start(port=0)
        started.append(gateway)
        return gateway

    yield factory
    for gateway in started:
        await gateway.stop(drain_timeout_s=5)


@pytest.fixture
def corpus_dir() -> Path:
    path = Path(os.environ.get("DESKGATE_CORPUS", ROOT.parent / "shared" / "corpus"))
    if not (path / "manifest.tsv").is_file():
        need_peer("the shared corpus", f"{path}/manifest.tsv is missing")
    return path


def note_offloads(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[Any]:
    """What `module` hands to the parser process; the real one still runs each call."""
    calls: list[Any] = []
    real = module.in_process

    async def noting(function: Any, raw: bytes) -> Any:
        calls.append(function)
        return await real(function, raw)

    monkeypatch.setattr(module, "in_process", noting)
    return calls
