"""Database outage drill: PostgreSQL stops under load, then comes back.

While it is down every mail must get 451 (never 5xx, never 250 without a commit); once it is
back the same daemon process takes mail again. The server is a private throwaway cluster
(tests/pgcluster.py): the machine's shared PostgreSQL serves other test runs.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib
import pytest
from sqlalchemy import func, select

from store.engine import Store
from store.models import Message
from tests.conftest import need_peer
from tests.daemon import Daemon, free_port, write_config
from tests.drills.test_crash_drill import NO_RATE_LIMITS
from tests.mailbuild import make_mail, send
from tests.pgcluster import PgCluster

pytestmark = pytest.mark.drill
OUTAGE_S = float(os.environ.get("DESKGATE_DRILL_OUTAGE_S", "2"))
CLIENTS = 4


@pytest.fixture
def cluster() -> Iterator[PgCluster]:
    try:
        made = PgCluster()
        made.init()
    except (RuntimeError, OSError, KeyError, subprocess.SubprocessError) as exc:
        need_peer("a private PostgreSQL cluster (initdb/pg_ctl)", f"{type(exc).__name__}: "
                  f"{getattr(exc, 'stderr', '') or exc}")
    try:
        yield made
    finally:
        made.destroy()


@dataclass(frozen=True)
class Attempt:
    index: int
    began: float  # time.monotonic() around the SMTP transaction
    ended: float
    code: int
    text: str


def _mail(i: int) -> bytes:
    return make_mail(subject=f"Outage {i}", sender=f"c{i % 7}@example.org",
                     message_id=f"<dbout{i}@example.org>", body=f"Mail {i}\r\n" * 30)


async def _stored(url: str) -> Counter[str]:
    store = Store(url)
    try:
        async with store.read() as session:
            rows = (await session.execute(select(Message.message_id, func.count())
                                          .group_by(Message.message_id))).all()
    finally:
        await store.dispose()
    return Counter({message_id: count for message_id, count in rows})


async def test_postgres_outage_answers_451_and_recovers(cluster: PgCluster,
                                                        tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path / "deskgate.toml", cluster.url, port, extra_departments=(
        # nobody listens on the relay port: the acks wait in the outbox
        NO_RATE_LIMITS + f'[relay]\nlisten = "127.0.0.1:{free_port()}"\n'
        "[outbox]\npoll_interval_s = 1\n"))
    subprocess.run([sys.executable, "-m", "gateway.cli", "--config", str(config), "db",
                    "upgrade"], check=True, capture_output=True)
    daemon = Daemon(config, tmp_path / "daemon.log")
    attempts: list[Attempt] = []
    next_index = iter(range(10**9))
    stop_load = asyncio.Event()

    async def client() -> None:
        while not stop_load.is_set():
            i = next(next_index)
            began = time.monotonic()
            try:
                reply = await send(port, _mail(i), mail_from=f"c{i % 7}@example.org")
            except (OSError, aiosmtplib.SMTPException) as exc:  # the daemon must stay up
                raise AssertionError(f"mail {i}: no SMTP answer: {exc!r}") from exc
            attempts.append(Attempt(i, began, time.monotonic(), reply.code, reply.message))
            await asyncio.sleep(0.02 if reply.code == 250 else 0.1)  # an MTA backs off

    async def wait_for(predicate: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return True
            await asyncio.sleep(0.05)
        return False

    try:
        await daemon.start()
        pid = daemon.process.pid if daemon.process else None
        load = [asyncio.create_task(client()) for _ in range(CLIENTS)]
        assert await wait_for(lambda: sum(a.code == 250 for a in attempts) >= 20, 60)
        await asyncio.to_thread(cluster.stop, "immediate")  # a crash, as clients see it
        down = time.monotonic()
        await asyncio.sleep(OUTAGE_S)  # the load goes on meanwhile
        restarting = time.monotonic()
        up = await asyncio.to_thread(cluster.start)
        recovered = await wait_for(lambda: any(a.code == 250 and a.began > up
                                               for a in attempts), 60)
        after = sum(a.began > up for a in attempts)
        await wait_for(lambda: sum(a.began > up for a in attempts) >= after + 20, 30)
        stop_load.set()
        await asyncio.gather(*load)
        assert daemon.process is not None and daemon.process.pid == pid
        assert daemon.process.poll() is None, "the daemon died with its database"
        assert "smtp.ingest_failed" not in daemon.log  # 451 by design, not by a caught bug
        # An MTA retries what got 451: a mail whose commit went through but whose answer
        # did not must come back as a duplicate, not a second message.
        retried: Counter[str] = Counter()
        for i in sorted({a.index for a in attempts} - {a.index for a in attempts
                                                         if a.code == 250}):
            reply = await send(port, _mail(i), mail_from=f"c{i % 7}@example.org")
            assert reply.code == 250, f"mail {i} after recovery: {reply}"
            retried["duplicate" if "already" in reply.message else "stored"] += 1
    finally:
        daemon.close()
    stored = await _stored(cluster.url)
    codes = Counter(a.code for a in attempts)
    ok = [a for a in attempts if a.code == 250]
    late = [a for a in attempts if a.code != 250 and a.began > up]
    in_outage = [a for a in attempts if a.began > down and a.ended < restarting]
    first_250 = min(a.ended for a in attempts if a.code == 250 and a.began > up)
    print(f"\n[drill] postgres outage: N={len(attempts)} codes={dict(codes)} "
          f"outage_s={up - down:.1f} during_outage={len(in_outage)} "
          f"451_during_outage={sum(a.code == 451 for a in in_outage)} "
          f"recovery_s={first_250 - up:.2f} 451_after_return={len(late)} "
          f"last_451_after_return_s={max((a.ended - up for a in late), default=0):.2f} "
          f"retried_after={dict(retried)} "
          f"lost={sum(stored[f'dbout{a.index}@example.org'] == 0 for a in ok)} "
          f"duplicated={sum(n > 1 for n in stored.values())}")
    assert set(codes) <= {250, 451}, codes  # never a 5xx, never a dropped session
    assert in_outage and all(a.code == 451 for a in in_outage)  # no 250 without a commit
    assert recovered, "no 250 within 60 s of PostgreSQL's return, without a daemon restart"
    for a in attempts:  # every 250 is a committed mail, exactly once
        if a.code == 250:
            assert stored[f"dbout{a.index}@example.org"] == 1, a
    assert all(stored[f"dbout{i}@example.org"] == 1 for i in {a.index for a in attempts})
    assert max(stored.values()) == 1
