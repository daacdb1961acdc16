"""Stopping the relay worker while it sends must not wait out its poll interval."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest


@pytest.fixture
def db_url(sqlite_url: str) -> str:
    return sqlite_url


async def test_stop_during_a_send_round_returns_at_once(make_gateway: Any) -> None:
    gw = await make_gateway(extra="[outbox]\npoll_interval_s = 600\n")
    worker = gw.outbound.worker
    assert worker is not None
    inside, release = asyncio.Event(), asyncio.Event()
    send_round = worker.run_until_idle

    async def held_round() -> int:  # keep the loop inside a send round until stop() came
        inside.set()
        await release.wait()
        return await send_round()

    worker.run_until_idle = held_round  # type: ignore[method-assign]
    worker.wake()
    await asyncio.wait_for(inside.wait(), 5)
    stopping = asyncio.create_task(worker.stop(timeout_s=60))
    await asyncio.sleep(0)
    release.set()
    await asyncio.wait_for(stopping, 5)


async def test_a_wake_during_a_send_round_starts_the_next_round_at_once(
        make_gateway: Any) -> None:
    """A mail queued while the worker sends wakes it; that wake must not be lost when the
    round ends, or the mail waits out the poll interval (600 s here)."""
    gw = await make_gateway(extra="[outbox]\npoll_interval_s = 600\n")
    worker = gw.outbound.worker
    assert worker is not None
    rounds: list[int] = []
    second = asyncio.Event()
    send_round = worker.run_until_idle

    async def counted_round() -> int:
        rounds.append(len(rounds))
        if len(rounds) == 1:
            worker.wake()  # as the ingest path does when it queues an acknowledgement
        else:
            second.set()
        return await send_round()

    worker.run_until_idle = counted_round  # type: ignore[method-assign]
    worker.wake()
    await asyncio.wait_for(second.wait(), 5)
    assert len(rounds) >= 2
