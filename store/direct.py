"""The statements every mail runs, sent straight to the driver (issue 10).

SQLAlchemy's async execution path costs ~100-200 µs of event-loop CPU per statement here
(greenlet spawn, ORM session, execution context, result set-up) against ~5 µs for SQLite's
own work; a new ticket takes ~13 statements. A statement registered with `direct()` is
compiled by SQLAlchemy once per dialect and set of parameter names (so the SQL, the bind
and result type processing and the Python-side column defaults are SQLAlchemy's own), then
executed on the session's DBAPI driver connection (the inline SQLite shim, aiosqlite or
asyncpg) with no layer in between.

Only inside a SAVEPOINT: a group-commit unit's (`DirectSession.unit()`), or one begun with
`session.begin_nested()`. The transaction is then open on the driver, and rolling back to
the savepoint also undoes what went past SQLAlchemy. Anywhere else, and for statements
never registered, `DirectSession.execute` is SQLAlchemy's. Driver errors come out as
SQLAlchemy's exception classes (IntegrityError, OperationalError ...), so callers catch what
they always caught.

`unit()` emits its SAVEPOINT and RELEASE on the driver too: through SQLAlchemy's session
(greenlet, session transaction, execution context) they cost ~0.2 ms of loop CPU per mail,
a fifth of the ingest transaction on SQLite. SQLAlchemy does not see that savepoint, so the
first time a unit works on the session's objects (get, flush, a query with something
pending ...) a nested transaction of SQLAlchemy's own opens inside it: a failed flush then
rolls back that one, as it always did, instead of leaving the whole batch's session
unusable. (Leaving the RELEASE to the batch's COMMIT was measured too: slower on SQLite,
whose nested savepoints cost more than a RELEASE does.) On PostgreSQL each is a round trip,
so a unit's RELEASE waits and goes with the next unit's SAVEPOINT, one simple query.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import DateTime
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Dialect
from sqlalchemy.engine.result import IteratorResult, SimpleResultMetaData
from sqlalchemy.ext.asyncio import AsyncSession

Processor = Callable[[Any], Any] | None

_DIRECT: dict[int, Any] = {}  # id -> statement (kept alive, so ids stay unique)
# DESKGATE_DIRECT=0 sends every statement through SQLAlchemy again, should an operator need
# to rule this path out.
ENABLED = os.environ.get("DESKGATE_DIRECT") != "0"
executed = 0  # statements that took the direct path (tests, bench/statements.py)
UNIT_SAVEPOINT = "deskgate_unit"
# Session.info keys: the batch's driver connection; a unit is open (its savepoint is on the
# driver); the nested transaction SQLAlchemy opened inside it, once the unit used the ORM.
_DRIVER, _IN_UNIT, _NESTED = "direct_batch_driver", "direct_in_unit", "direct_unit_nested"
_RELEASE_DUE = "direct_release_due"  # PostgreSQL: the last unit's RELEASE is not sent yet


def direct(statement: Any) -> Any:
    """Register a module-level Core statement for the direct path; returns it unchanged."""
    _DIRECT[id(statement)] = statement
    return statement


@dataclass(frozen=True, slots=True)
class _Plan:
    """One statement compiled for one dialect and one set of parameter names."""

    sql: str
    names: tuple[str, ...]  # positional order of the parameters
    binds: tuple[Processor, ...]  # SQLAlchemy's bind processing, per position
    static: dict[str, Any]  # literal values compiled into the statement's binds
    defaults: tuple[tuple[str, Any], ...]  # Python-side column defaults (name, ColumnDefault)
    keys: tuple[str, ...]  # result column names; () when no rows come back
    results: tuple[Processor, ...]
    # Made once per plan, as SQLAlchemy keeps a compiled statement's result metadata: made
    # per result it was ~1.7 % of the loop (profile, 20 sessions).
    metadata: SimpleResultMetaData


_PLANS: dict[tuple[int, str, frozenset[str]], _Plan | None] = {}


def _plan(statement: Any, dialect: Dialect, names: frozenset[str]) -> _Plan | None:
    key = (id(statement), dialect.name, names)
    try:
        return _PLANS[key]
    except KeyError:
        pass
    compiled = statement.compile(dialect=dialect, column_keys=sorted(names))
    plan: _Plan | None = None
    positions = getattr(compiled, "positiontup", None)
    expanding = any(b.expanding for b in compiled.binds.values())
    if dialect.positional and positions is not None and not expanding:
        unescape = {v: k for k, v in (compiled.escaped_bind_names or {}).items()}
        order = tuple(unescape.get(n, n) for n in positions)
        binds = tuple(_remembering(compiled.binds[n].type, dialect) for n in order)
        static = {name: bind.effective_value for name, bind in compiled.binds.items()
                  if not bind.required and name not in names}
        defaults = tuple((column.key, column.default) for column in compiled.insert_prefetch
                         if column.key not in names)
        columns = list(statement.exported_columns)  # the SELECT list or RETURNING
        keys = tuple(c.key for c in columns)
        plan = _Plan(
            sql=compiled.string, names=order, binds=binds, static=static, defaults=defaults,
            keys=keys, metadata=SimpleResultMetaData(keys),
            results=tuple(c.type.dialect_impl(dialect).result_processor(dialect, None)
                          for c in columns))
        if getattr(compiled, "update_prefetch", None) or any(
                d is not None and not (d.is_scalar or d.is_callable) for _, d in defaults):
            plan = None  # onupdate or SQL-expression defaults: SQLAlchemy knows how to run them
    _PLANS[key] = plan
    return plan


def _remembering(type_: Any, dialect: Dialect) -> Processor:
    """A bind's processing; for timestamps, one processing per type and dialect, shared by
    every statement's binds of it, that remembers the last value it processed.

    A mail binds the one `now` of its transaction in most of its rows (the ticket's
    created_at and updated_at, the message's received_at, every event's at ...), and each
    time it went through the UTCDateTime decorator and the dialect's formatting: ~2.5 % of
    the loop (issue 10). Remembered by identity, in one tuple (read and replaced whole), so
    a value is never paired with another value's text."""
    process = type_.dialect_impl(dialect).bind_processor(dialect)
    if process is None or not isinstance(getattr(type_, "impl_instance", type_), DateTime):
        return process
    key = (type(type_), repr(type_), dialect.name)
    shared = _SHARED_TIMESTAMPS.get(key)
    if shared is None:
        shared = _SHARED_TIMESTAMPS[key] = _remembered(process)
    return shared


def _remembered(process: Callable[[Any], Any]) -> Callable[[Any], Any]:
    last: tuple[Any, Any] = (_NOTHING, None)

    def remembered(value: Any) -> Any:
        nonlocal last
        seen = last
        if seen[0] is value:
            return seen[1]
        result = process(value)
        last = (value, result)
        return result

    return remembered


_SHARED_TIMESTAMPS: dict[tuple[type, str, str], Callable[[Any], Any]] = {}
_NOTHING = object()


def _arguments(plan: _Plan, params: dict[str, Any]) -> tuple[Any, ...]:
    if plan.defaults:
        params = dict(params)
        for name, default in plan.defaults:
            params[name] = default.arg if default.is_scalar else default.arg(None)
    values = []
    for name, process in zip(plan.names, plan.binds, strict=True):
        value = params[name] if name in params else plan.static[name]
        values.append(value if process is None else process(value))
    return tuple(values)


class DirectResult(IteratorResult):  # type: ignore[type-arg]
    """SQLAlchemy's own Result API over the driver's rows, plus rowcount."""

    rowcount: int = -1


def _result(plan: _Plan, rows: Sequence[Any], rowcount: int) -> DirectResult:
    if plan.results and any(p is not None for p in plan.results):
        rows = [tuple(v if p is None else p(v) for v, p in zip(row, plan.results, strict=True))
                for row in rows]
    result = DirectResult(plan.metadata, iter(rows))
    result.rowcount = rowcount
    return result


class DirectSession(AsyncSession):
    """AsyncSession whose execute() takes the direct path for registered statements."""

    @asynccontextmanager
    async def unit(self) -> AsyncIterator[None]:
        """One unit of work in a savepoint of its own, inside the session's transaction:
        its failure undoes its writes alone and the transaction goes on."""
        if not ENABLED:
            async with self.begin_nested():
                yield
            return
        driver = self.info.get(_DRIVER)
        if driver is None:  # the batch's first unit
            connection = await self.connection()
            driver = (await connection.get_raw_connection()).driver_connection
            if self._is_postgres():  # asyncpg's adapter begins with the first statement
                await connection.exec_driver_sql(f"SAVEPOINT {UNIT_SAVEPOINT}")
            else:  # SQLite: connection() ran BEGIN IMMEDIATE (store/engine.py's begin event)
                await self._control(driver, f"SAVEPOINT {UNIT_SAVEPOINT}")
            self.info[_DRIVER] = driver
        elif self.info.pop(_RELEASE_DUE, False):  # the unit before's RELEASE goes along
            await self._control(driver, f"RELEASE SAVEPOINT {UNIT_SAVEPOINT}; "
                                        f"SAVEPOINT {UNIT_SAVEPOINT}")
        else:
            await self._control(driver, f"SAVEPOINT {UNIT_SAVEPOINT}")
        self.info[_IN_UNIT] = True
        try:
            yield
            sync = self.sync_session
            if sync.new or sync.dirty or sync.deleted:  # added, never flushed: flush them
                await self.flush()  # now, inside the unit (flush() opens the nested one)
            nested = self.info.get(_NESTED)
            if nested is not None:
                await nested.commit()
                del self.info[_NESTED]  # committed: a failure after it needs no rollback
            if self._is_postgres():
                # A round trip each: RELEASE waits for the next unit's SAVEPOINT, and goes
                # in one simple query with it (COMMIT releases the last one). A RELEASE
                # cannot fail where its savepoint is alive, and the next unit's ROLLBACK TO
                # then goes back to that unit's savepoint, not further.
                self.info[_RELEASE_DUE] = True
            else:  # SQLite: no round trip, and one statement per call
                await self._control(driver, f"RELEASE SAVEPOINT {UNIT_SAVEPOINT}")
        except BaseException:
            nested = self.info.pop(_NESTED, None)
            try:
                if nested is not None:  # active, or deactivated by a failed flush
                    await nested.rollback()
                await self._control(driver, f"ROLLBACK TO SAVEPOINT {UNIT_SAVEPOINT}")
                await self._control(driver, f"RELEASE SAVEPOINT {UNIT_SAVEPOINT}")
            finally:
                # What the ORM holds may have come from the undone writes (a row id the
                # next insert reuses): forget it all; the units before it were flushed.
                self.sync_session.expunge_all()
            raise
        finally:
            self.info[_IN_UNIT] = False

    async def _orm(self, identity: bool = True) -> None:
        """Called before anything that runs through SQLAlchemy's session inside a unit.
        identity=False: a statement (execute, scalar ...) that cannot flush while nothing
        is pending, and whose failure leaves the session usable."""
        if not self.info.get(_IN_UNIT) or _NESTED in self.info:
            return
        sync = self.sync_session
        if identity or sync.new or sync.dirty or sync.deleted:
            # begin_nested() flushes first, which would put what the unit added outside the
            # nested transaction: those objects wait outside the session meanwhile. (Changed
            # objects are flushed there, inside the unit's savepoint: should that fail, the
            # batch fails and every mail of it is answered 451.)
            added = list(sync.new)
            for instance in added:
                sync.expunge(instance)
            try:
                self.info[_NESTED] = await self.begin_nested()
            finally:
                sync.add_all(added)

    def _is_postgres(self) -> bool:
        return bool(self.sync_session.get_bind().dialect.name == "postgresql")

    async def _control(self, driver: Any, sql: str) -> None:
        """SAVEPOINT, RELEASE or ROLLBACK TO, on the driver."""
        global executed
        executed += 1
        try:
            if self._is_postgres():
                await driver.execute(sql)
            else:
                await (await driver.execute(sql)).close()
        except Exception as error:
            if _driver_error(error):
                raise _wrapped(error, sql, ()) from error
            raise

    async def execute(self, statement: Any, params: Any = None, *args: Any,
                      **kwargs: Any) -> Any:
        if (args or kwargs or not ENABLED or id(statement) not in _DIRECT
                or not (self.info.get(_IN_UNIT) or self.in_nested_transaction())):
            return await self._sqlalchemys(statement, params, *args, **kwargs)
        many = isinstance(params, list)
        rows_in: list[dict[str, Any]] = params if many else [params or {}]
        if not rows_in:
            return await self._sqlalchemys(statement, params)
        names = frozenset(rows_in[0])
        if many and any(frozenset(r) != names for r in rows_in):
            return await self._sqlalchemys(statement, params)
        dialect = self.sync_session.get_bind().dialect  # the engine's: no I/O
        plan = _plan(statement, dialect, names)
        if plan is None or (many and plan.keys):
            return await self._sqlalchemys(statement, params)
        driver = await self._driver()
        arguments = [_arguments(plan, r) for r in rows_in]
        global executed
        executed += 1
        if dialect.name == "postgresql":
            return await _postgres(driver, plan, arguments, many)
        return await _sqlite(driver, plan, arguments, many)

    async def _sqlalchemys(self, statement: Any, params: Any, *args: Any, **kwargs: Any
                           ) -> Any:
        await self._orm(identity=False)
        return await super().execute(statement, params, *args, **kwargs)

    async def _driver(self) -> Any:
        """The DBAPI driver connection under this savepoint. SQLAlchemy's connection() is
        asked once per savepoint of its own: it emits a SAVEPOINT that is still pending."""
        if self.info.get(_IN_UNIT) and _NESTED not in self.info:
            return self.info[_DRIVER]
        nested = self.sync_session.get_nested_transaction()
        cached = self.info.get("direct_driver")
        if cached is not None and cached[0] is nested:
            return cached[1]
        connection = await self.connection()
        driver = (await connection.get_raw_connection()).driver_connection
        self.info["direct_driver"] = (nested, driver)
        return driver


async def _sqlite(driver: Any, plan: _Plan, arguments: list[tuple[Any, ...]],
                  many: bool) -> DirectResult:
    """The inline shim's run_inline when it can; else the awaitable cursor interface that
    the shim and aiosqlite (DESKGATE_SQLITE_THREADS=1) share."""
    inline = None if many else getattr(driver, "run_inline", None)
    try:
        done = inline(plan.sql, arguments[0], bool(plan.keys)) if inline is not None else None
        if done is not None:
            rows, rowcount = done
        else:
            if many:
                cursor = await driver.executemany(plan.sql, arguments)
                rows = []
            else:
                cursor = await driver.execute(plan.sql, arguments[0])
                rows = await cursor.fetchall() if plan.keys else []
            rowcount = cursor.rowcount
            await cursor.close()
    except sqlite3.Error as error:
        raise _wrapped(error, plan.sql, arguments) from error
    return _result(plan, rows, rowcount)


async def _postgres(driver: Any, plan: _Plan, arguments: list[tuple[Any, ...]],
                    many: bool) -> DirectResult:
    import asyncpg

    try:
        if many:
            await driver.executemany(plan.sql, arguments)
            return _result(plan, [], len(arguments))
        if plan.keys:
            rows = [tuple(r) for r in await driver.fetch(plan.sql, *arguments[0])]
            return _result(plan, rows, len(rows))
        status = await driver.execute(plan.sql, *arguments[0])
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as error:
        raise _wrapped(error, plan.sql, arguments) from error
    count = status.rsplit(" ", 1)[-1]
    return _result(plan, [], int(count) if count.isdigit() else -1)


def _wrapped(error: BaseException, sql: str, arguments: Any) -> sa_exc.DBAPIError:
    """The driver's error as SQLAlchemy would have raised it (by class)."""
    kind: type[sa_exc.DBAPIError] = sa_exc.OperationalError
    if isinstance(error, sqlite3.IntegrityError) or _is_pg_integrity(error):
        kind = sa_exc.IntegrityError
    elif isinstance(error, sqlite3.ProgrammingError):
        kind = sa_exc.ProgrammingError
    elif isinstance(error, sqlite3.DatabaseError) and not isinstance(error,
                                                                     sqlite3.OperationalError):
        kind = sa_exc.DatabaseError
    return kind(sql, arguments, error)  # type: ignore[arg-type]


def _driver_error(error: BaseException) -> bool:
    if isinstance(error, sqlite3.Error | OSError):
        return True
    try:
        import asyncpg
    except ImportError:  # pragma: no cover — asyncpg is a dependency
        return False
    return isinstance(error, asyncpg.PostgresError | asyncpg.InterfaceError)


def _opening_nested(name: str, identity: bool) -> Callable[..., Any]:
    base = getattr(AsyncSession, name)

    async def method(self: DirectSession, *args: Any, **kwargs: Any) -> Any:
        await self._orm(identity)
        return await base(self, *args, **kwargs)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = base.__doc__
    return method


# Everything else of AsyncSession that goes through SQLAlchemy's session (scalars() and
# stream_scalars() call execute() and stream()): statements, and what works on the session's
# objects.
for _name in ("scalar", "stream"):
    setattr(DirectSession, _name, _opening_nested(_name, identity=False))
for _name in ("get", "get_one", "delete", "delete_all", "merge", "merge_all", "flush",
              "refresh", "run_sync"):
    setattr(DirectSession, _name, _opening_nested(_name, identity=True))


def _is_pg_integrity(error: BaseException) -> bool:
    try:
        import asyncpg
    except ImportError:  # pragma: no cover — asyncpg is a dependency
        return False
    return isinstance(error, asyncpg.IntegrityConstraintViolationError)
