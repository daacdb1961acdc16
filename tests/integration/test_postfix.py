"""A real Postfix in front of deskgate: forwarded mail becomes a ticket; 4xx or down -> queued.

Postfix is configured exactly as README "Postfix in front of deskgate" says (relay_domains,
transport_maps to smtp:[127.0.0.1]:PORT), as a private instance under a temp folder.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import func, select

from gateway.service import Gateway
from store.engine import Store
from store.models import Message
from tests import postfix as pf
from tests.conftest import make_settings, need_peer
from tests.daemon import free_port
from tests.faults import store_fails
from tests.mailbuild import make_mail, send

pytestmark = pytest.mark.postfix


@pytest.fixture
def postfix() -> Iterator[Callable[[int], pf.PrivatePostfix]]:
    """Factory: a started private Postfix forwarding to the given deskgate port."""
    if (why := pf.missing()) is not None:
        need_peer("Postfix", why)
    started: list[pf.PrivatePostfix] = []

    def factory(deskgate_port: int) -> pf.PrivatePostfix:
        instance = pf.PrivatePostfix(free_port(), deskgate_port)
        started.append(instance)
        instance.start()
        return instance

    yield factory
    for instance in started:
        instance.stop()


async def _until(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def _inbound(store: Store, subject: str) -> int:
    async with store.transaction() as session:
        return int(await session.scalar(select(func.count(Message.id)).where(
            Message.direction == "in", Message.subject == subject)) or 0)


def _deferred_because(postfix: pf.PrivatePostfix, reason: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        entries = await asyncio.to_thread(postfix.queue)
        return any(e["queue_name"] == "deferred" and reason in r.get("delay_reason", "")
                   for e in entries for r in e["recipients"])
    return check


def _queue_empty(postfix: pf.PrivatePostfix) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return not await asyncio.to_thread(postfix.queue)
    return check


async def test_mail_sent_to_postfix_reaches_a_ticket(make_gateway: Any, postfix: Any) -> None:
    gw = await make_gateway()
    mta = postfix(gw.inbound_port)
    reply = await send(mta.smtpd_port, make_mail(subject="Via Postfix"))
    assert reply.code == 250 and "queued as" in reply.message
    await _until(lambda: _count_is(gw.store, "Via Postfix", 1), "the ticket")
    await _until(_queue_empty(mta), "Postfix's queue to empty")
    assert "status=sent (250 2.0.0 OK: ticket 1)" in mta.log


async def _count_is(store: Store, subject: str, n: int) -> bool:
    return await _inbound(store, subject) == n


async def test_postfix_keeps_mail_while_deskgate_answers_451_and_delivers_it_once_after(
        make_gateway: Any, postfix: Any) -> None:
    gw = await make_gateway()
    mta = postfix(gw.inbound_port)
    async with store_fails(gw.store):
        assert (await send(mta.smtpd_port, make_mail(subject="Retried"))).code == 250
        await _until(_deferred_because(mta, "451 4.3.0"), "Postfix to defer on 451")
    assert await _inbound(gw.store, "Retried") == 0
    await asyncio.to_thread(mta.flush)
    await _until(lambda: _count_is(gw.store, "Retried", 1), "delivery after the flush")
    await _until(_queue_empty(mta), "Postfix's queue to empty")
    await asyncio.to_thread(mta.flush)  # nothing left to send: still exactly one
    assert await _inbound(gw.store, "Retried") == 1


async def test_postfix_queues_while_deskgate_is_down_and_delivers_after_it_is_back(
        sqlite_url: str, postfix: Any) -> None:
    port = free_port()
    mta = postfix(port)
    for i in range(3):
        assert (await send(mta.smtpd_port, make_mail(subject=f"While down {i}"))).code == 250
    await _until(_deferred_because(mta, "Connection refused"), "Postfix to defer")
    gateway = Gateway(make_settings(sqlite_url))
    await gateway.start(port=port)
    try:
        await asyncio.to_thread(mta.flush)
        await _until(_queue_empty(mta), "Postfix's queue to empty")
        for i in range(3):
            assert await _inbound(gateway.store, f"While down {i}") == 1
    finally:
        await gateway.stop(drain_timeout_s=5)
