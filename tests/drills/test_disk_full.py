"""Disk-full drill on the SQLite path: the database lives on a small tmpfs that we fill.

While the disk is full a mail gets 451 (never 5xx, never 250 without a commit); once space
returns the same daemon takes mail again, and `PRAGMA integrity_check` finds no damage.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import need_peer
from tests.daemon import Daemon, free_port, write_config
from tests.drills.test_crash_drill import NO_RATE_LIMITS, attachment_mail
from tests.mailbuild import send

pytestmark = pytest.mark.drill
FULL_MAILS = int(os.environ.get("DESKGATE_DRILL_FULL_MAILS", "40"))
# Room for the retries after space returns (about 50 KB per mail, stored): else the disk
# is honestly full again and they get 451 once more.
DISK_MB = 8 + FULL_MAILS // 10


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A DISK_MB tmpfs (root only: mount needs CAP_SYS_ADMIN)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs",
                           str(mount)], capture_output=True, text=True)
    if done.returncode:
        need_peer("a size-limited tmpfs", f"mount failed: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path: Path) -> int:
    """Write until ENOSPC; returns the bytes written (the disk is then full)."""
    written, chunk = 0, os.urandom(64 * 1024)
    with path.open("wb", buffering=0) as out:
        while True:
            try:
                written += out.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                if len(chunk) == 1:
                    return written
                chunk = chunk[: len(chunk) // 8 or 1]  # top up the last blocks too


def _mail(i: int) -> bytes:
    return attachment_mail(f"<full{i}@example.org>", f"c{i % 7}@example.org", f"Full {i}",
                           None, files=2)


async def test_disk_full_answers_451_and_recovers(sqlite_url: str, small_disk: Path,
                                                  tmp_path: Path) -> None:
    database = small_disk / "deskgate.sqlite3"
    shutil.copy(sqlite_url.removeprefix("sqlite+aiosqlite:///"), database)
    port = free_port()
    config = write_config(tmp_path / "deskgate.toml", f"sqlite+aiosqlite:///{database}", port,
                          extra_departments=NO_RATE_LIMITS + "[outbox]\nworker = false\n")
    daemon = Daemon(config, tmp_path / "daemon.log")
    replies: dict[int, list[int]] = {}  # mail -> the codes it got, in order
    counter = iter(range(10**9))

    async def deliver(i: int | None = None) -> int:
        i = next(counter) if i is None else i
        reply = await send(port, _mail(i), mail_from=f"c{i % 7}@example.org")
        replies.setdefault(i, []).append(reply.code)
        return reply.code

    filler = small_disk / "filler"
    try:
        await daemon.start()
        for _ in range(10):
            assert await deliver() == 250
        filled = await asyncio.to_thread(fill, filler)
        # Space SQLite already holds (free pages, the WAL's tail) may take a few more mails;
        # then the disk is full for it too.
        full_codes = Counter([await deliver() for _ in range(FULL_MAILS)])
        freed = time.monotonic()
        filler.unlink()
        recovered = None
        while time.monotonic() - freed < 30:
            if await deliver() == 250:
                recovered = time.monotonic() - freed
                break
            await asyncio.sleep(0.1)
        # The sending MTAs retry what got 451.
        retried = Counter([await deliver(i) for i, codes in sorted(replies.items())
                           if 250 not in codes])
        assert daemon.process is not None and daemon.process.poll() is None
        assert "smtp.ingest_failed" not in daemon.log  # 451 by design, not by a caught bug
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0
    finally:
        daemon.close()
    connection = sqlite3.connect(database)
    try:
        integrity = connection.execute("PRAGMA integrity_check").fetchall()
        stored = Counter(dict(connection.execute(
            "SELECT message_id, count(*) FROM messages GROUP BY message_id").fetchall()))
    finally:
        connection.close()
    codes = Counter(code for codes in replies.values() for code in codes)
    lost = [i for i, got in replies.items() if 250 in got and not stored[f"full{i}@example.org"]]
    print(f"\n[drill] disk full sqlite: disk_mb={DISK_MB} filler_bytes={filled} "
          f"N={len(replies)} while_full={dict(full_codes)} "
          f"recovery_s={recovered and round(recovered, 2)} "
          f"retried={dict(retried)} all={dict(codes)} integrity={integrity[0][0]} "
          f"lost={len(lost)} "
          f"duplicated={sum(n > 1 for n in stored.values())}")
    assert set(codes) <= {250, 451}, codes  # never a 5xx
    assert full_codes[451] > 0, "the disk never got full for SQLite"
    assert recovered is not None, "no 250 within 30 s of space coming back, without restart"
    assert retried == Counter({250: sum(retried.values())}), retried
    assert integrity == [("ok",)], integrity
    for i in replies:  # every mail got its 250 in the end, and is stored exactly once
        assert stored[f"full{i}@example.org"] == 1, i
