"""A stop that lands as the status query answers must still stop the status task: on
Python 3.11, asyncio.wait_for returned the answer and dropped the cancellation, and
Daemon.run waited for that task for ever, so the daemon never began to drain."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.daemon import Daemon


class _AnsweringStore:
    """Stands in for the store at one point only: when its count comes back."""

    def __init__(self) -> None:
        self.answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Any]:
        yield SimpleNamespace(scalar=self._scalar)

    async def _scalar(self, _query: Any) -> int:
        return await self.answer


@pytest.mark.parametrize("turns", [0, 1, 2])  # each failed with wait_for
async def test_a_stop_as_the_status_count_answers_is_not_dropped(turns: int) -> None:
    store = _AnsweringStore()
    daemon = Daemon(SimpleNamespace(store=store), load=lambda: None)  # type: ignore[arg-type]
    task = asyncio.create_task(daemon._mails_today())
    await asyncio.sleep(0)  # waiting for the count now
    store.answer.set_result(7)
    for _ in range(turns):
        await asyncio.sleep(0)
    if not task.cancel():
        assert task.result() == "7 mails today"  # it had finished: nothing to drop
        return
    done, _ = await asyncio.wait([task], timeout=5)
    assert done and task.cancelled()
