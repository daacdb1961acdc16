"""The IMAP token command is a child process of the poller: it must not outlive it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gateway.inbound.imap_client import run_token_command


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # killed and not yet reaped counts as gone


async def test_a_poller_stopping_mid_command_kills_the_command(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    task = asyncio.create_task(run_token_command(f"sh -c 'echo $$ > {pid_file}; exec sleep 30'"))
    try:
        for _ in range(500):
            if pid_file.exists() and pid_file.read_text().strip():
                break
            await asyncio.sleep(0.01)
        assert pid_file.exists(), "the token command never started"
        pid = int(pid_file.read_text())
        assert _alive(pid)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    for _ in range(200):
        if not _alive(pid):
            break
        await asyncio.sleep(0.01)
    assert not _alive(pid)
