"""Close -> rating mail at the relay -> its links over real HTTP -> the rating is stored."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import select

from gateway.outbound.catcher import CatchHandler, start_catcher
from gateway.scheduler import Scheduler
from gateway.tickets import actions
from gateway.tickets.lifecycle import Status
from store.models import Rating
from tests.mailbuild import make_mail, send


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def rated(make_gateway: Any, tmp_path: Path
                ) -> AsyncIterator[tuple[Any, CatchHandler, Clock]]:
    async for setup in _with_relay(make_gateway, tmp_path, bootstrap=True):
        yield setup


@pytest.fixture
async def unverified(make_gateway: Any, tmp_path: Path
                     ) -> AsyncIterator[tuple[Any, CatchHandler, Clock]]:
    async for setup in _with_relay(make_gateway, tmp_path, bootstrap=False):
        yield setup


async def _with_relay(make_gateway: Any, tmp_path: Path, bootstrap: bool
                      ) -> AsyncIterator[tuple[Any, CatchHandler, Clock]]:
    """A gateway whose relay is a capture relay on port 0, worker run by hand."""
    relay = CatchHandler()
    server = await start_catcher(relay, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    clock = Clock()
    gateway = await make_gateway(clock=clock, extra=(
        f'[relay]\nlisten = "127.0.0.1:{port}"\ntimeout_s = 5\n[outbox]\nworker = false\n'
        f'[dev]\nbootstrap = {str(bootstrap).lower()}\ndir = "{tmp_path}"\n'))
    yield gateway, relay, clock
    server.close()


def _rating_mails(relay: CatchHandler) -> list[Any]:
    return [c.message for c in relay.caught if "rate/" in c.message.get_body(("plain",))
            .get_content()]


async def _close(gw: Any, number: int, now: datetime) -> None:
    async with gw.store.transaction() as session:
        await actions.change_status(session, gw.settings, number, Status.CLOSED, now, "test",
                                    on_close=gw.rating.on_closed)


async def test_closing_sends_a_rating_mail_whose_links_record_the_rating(
        rated: Any) -> None:
    gw, relay, clock = rated
    await send(gw.inbound_port, make_mail(subject="Broken printer"))
    await _close(gw, 1, clock.now)
    await gw.outbound.worker.run_until_idle()
    [mail] = _rating_mails(relay)
    assert mail["To"] == "jess@example.org" and mail["Auto-Submitted"] == "auto-generated"
    links = dict(re.findall(r"(Good|Okay|Bad):\s+(\S+)", mail.get_body(("plain",))
                            .get_content()))
    local = {k: re.sub(r"^https?://[^/]+", f"http://127.0.0.1:{gw.web_port}", v)
             for k, v in links.items()}
    async with aiohttp.ClientSession() as http:
        async with http.get(local["Okay"]) as response:
            assert response.status == 200
    async with gw.store.transaction() as session:
        assert [r.value for r in await session.scalars(select(Rating))] == ["okay"]


async def test_auto_close_sends_exactly_one_rating_mail(rated: Any) -> None:
    gw, relay, clock = rated
    await send(gw.inbound_port, make_mail())
    async with gw.store.transaction() as session:
        await actions.change_status(session, gw.settings, 1, Status.WAITING_ON_CUSTOMER,
                                    clock.now, "test")
    support, billing = gw.settings.departments
    weekly = replace(support, sla=replace(support.sla, auto_close_waiting_days=7))
    scheduler = Scheduler(replace(gw.settings, departments=(weekly, billing)), gw.store, clock)
    scheduler.hooks.append(gw.rating.on_time_rule)
    clock.now += timedelta(days=8)
    assert (await scheduler.tick()).auto_closed == [1]
    assert (await scheduler.tick()).auto_closed == []
    await gw.outbound.worker.run_until_idle()
    assert len(_rating_mails(relay)) == 1


async def test_no_rating_mail_for_a_ticket_an_auto_responder_opened(rated: Any) -> None:
    gw, relay, clock = rated
    await send(gw.inbound_port, make_mail(subject="Out of office",
                                          headers={"Auto-Submitted": "auto-replied"}))
    await _close(gw, 1, clock.now)
    await gw.outbound.worker.run_until_idle()
    assert _rating_mails(relay) == []


async def test_verification_link_verifies_and_releases_held_mail(unverified: Any) -> None:
    from gateway.outbound import verify

    gw, relay, clock = unverified
    await send(gw.inbound_port, make_mail())  # its acknowledgement waits: From unverified
    await gw.outbound.worker.run_until_idle()
    assert relay.caught == []
    async with gw.store.transaction() as session:
        await verify.start(session, gw.settings, gw.outbound.renderer, "support@example.test",
                           None, clock.now)
    await gw.outbound.worker.run_until_idle()
    [check] = relay.caught
    link = re.search(r"https?://\S+/verify/\S+", check.message.get_body(("plain",))
                     .get_content()).group(0)
    local = re.sub(r"^https?://[^/]+", f"http://127.0.0.1:{gw.web_port}", link)
    async with aiohttp.ClientSession() as http:
        async with http.get(local.replace("/verify/", "/verify/x")) as response:
            assert response.status == 404  # a guessed code verifies nothing
        async with http.get(local) as response:
            assert response.status == 200 and "support@example.test" in await response.text()
    await gw.outbound.worker.run_until_idle()
    assert len(relay.caught) == 2  # the held acknowledgement went out after the click
    assert "[#1]" in relay.caught[1].message["Subject"]
    assert relay.caught[1].message["From"].endswith("<support@example.test>")
