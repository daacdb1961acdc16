"""`deskgate serve --workers 2`: two processes share the port, and stop together on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import func, select

from store.engine import Store
from store.models import Ticket
from tests.conftest import settings_text
from tests.drills.test_kill9 import _free_port, _start
from tests.mailbuild import make_mail, send

pytestmark = pytest.mark.drill


def _workers(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _helpers(pid: int) -> list[int]:
    """Parse helpers (gateway/ingest/prep.py) among the children of process pid."""
    found = []
    for child in _workers(pid):
        try:
            if b"gateway.ingest.prep" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
        except FileNotFoundError:  # gone meanwhile
            continue
    return found


async def _until(ready: Callable[[], bool], tries: int = 100, every_s: float = 0.05) -> None:
    for _ in range(tries):
        if ready():
            return
        await asyncio.sleep(every_s)


def _config(db_url: str, tmp_path: Path) -> tuple[Path, int]:
    port = _free_port()
    config = tmp_path / "deskgate.toml"
    config.write_text(settings_text(db_url).replace("127.0.0.1:0", f"127.0.0.1:{port}", 1))
    subprocess.run([sys.executable, "-m", "gateway.cli", "--config", str(config), "db",
                    "upgrade"], check=True, capture_output=True)
    return config, port


async def test_one_serving_process_has_a_parse_helper_workers_sharing_the_port_have_none(
        db_url: str, tmp_path: Path) -> None:
    """Unset, parse_helper is on for one serving process and off for `--workers 2`: there a
    helper each took the cores the workers use (10 % slower, bench/ab.py AB_WORKERS=2)."""
    config, port = _config(db_url, tmp_path)
    alone = await _start(config, port)
    try:
        await _until(lambda: bool(_helpers(alone.pid)), tries=200)
        assert len(_helpers(alone.pid)) == 1
    finally:
        alone.send_signal(signal.SIGTERM)
        assert alone.wait(timeout=60) == 0
    supervisor = await _start(config, port, "--workers", "2")
    try:
        await _until(lambda: len(_workers(supervisor.pid)) == 2)
        workers = _workers(supervisor.pid)
        assert len(workers) == 2
        replies = await asyncio.gather(*(send(port, make_mail(subject=f"Worker {i}"))
                                         for i in range(6)))
        assert [r.code for r in replies] == [250] * 6
        for _ in range(40):  # the helper starts with its serving process: 2 s is ample
            assert [_helpers(w) for w in workers] == [[], []]
            await asyncio.sleep(0.05)
    finally:
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=60) == 0


async def test_two_workers_share_the_port_and_stop_cleanly(db_url: str, tmp_path: Path) -> None:
    config, port = _config(db_url, tmp_path)
    supervisor = await _start(config, port, "--workers", "2")
    try:
        await _until(lambda: len(_workers(supervisor.pid)) == 2)  # both up before the mails
        assert len(_workers(supervisor.pid)) == 2
        replies = await asyncio.gather(*(send(port, make_mail(subject=f"Worker {i}"))
                                         for i in range(12)))
        assert [r.code for r in replies] == [250] * 12
    finally:
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=60) == 0
    store = Store(db_url)
    try:
        async with store.transaction() as session:
            assert await session.scalar(select(func.count(Ticket.id))) == 12
    finally:
        await store.dispose()


async def test_sigterm_while_the_workers_are_still_starting_is_a_clean_stop(
        db_url: str, tmp_path: Path) -> None:
    """`systemctl stop` right after start: a worker ended by the supervisor's SIGTERM before
    it had set up its handlers had accepted nothing, so the supervisor still exits 0 (a CI
    run once saw 15 here, from a worker that was slower to start than its sibling)."""
    config = tmp_path / "deskgate.toml"
    config.write_text(settings_text(db_url).replace("127.0.0.1:0", f"127.0.0.1:{_free_port()}",
                                                    1))
    subprocess.run([sys.executable, "-m", "gateway.cli", "--config", str(config), "db",
                    "upgrade"], check=True, capture_output=True)
    supervisor = subprocess.Popen([sys.executable, "-m", "gateway.cli", "--config", str(config),
                                   "serve", "--workers", "2"], stderr=subprocess.DEVNULL)
    try:
        for _ in range(400):  # the workers are forked: they are still importing deskgate
            if Path(f"/proc/{supervisor.pid}").exists() and len(_workers(supervisor.pid)) == 2:
                break
            await asyncio.sleep(0.005)
        assert len(_workers(supervisor.pid)) == 2
    finally:
        supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=60) == 0
