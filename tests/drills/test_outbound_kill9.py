"""Crash drill: kill -9 the daemon while its worker is mid-send; after restart nothing is lost."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import select

from gateway.outbound.catcher import CatchHandler, start_catcher
from store.engine import Store
from store.models import Outbox
from tests.conftest import settings_text
from tests.drills.test_kill9 import _free_port, _start
from tests.mailbuild import make_mail, send

pytestmark = pytest.mark.drill
MAILS = 8
STALL_AT = 3  # the relay never answers this DATA: the worker is mid-send when it dies


class StallingRelay(CatchHandler):
    def __init__(self) -> None:
        super().__init__()
        self.stalled = asyncio.Event()
        self.release = asyncio.Event()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.attempts + 1 == STALL_AT:
            self.attempts += 1
            self.stalled.set()
            await self.release.wait()
            return "451 4.3.0 too late"
        return await super().handle_DATA(server, session, envelope)


async def _rows(db_url: str) -> list[tuple[int, str, str]]:
    store = Store(db_url)
    try:
        async with store.transaction() as session:
            return [(r.id, r.state, r.message_id) for r in await session.scalars(
                select(Outbox).order_by(Outbox.id))]
    finally:
        await store.dispose()


async def test_kill9_mid_send_loses_no_outbox_row(db_url: str, tmp_path: Path) -> None:
    relay = StallingRelay()
    server = await start_catcher(relay, "127.0.0.1", 0)
    relay_port = server.sockets[0].getsockname()[1]
    port = _free_port()
    config = tmp_path / "deskgate.toml"
    config.write_text(settings_text(db_url, extra=(
        f'[relay]\nlisten = "127.0.0.1:{relay_port}"\ntimeout_s = 30\nconcurrency = 1\n'
        f'[outbox]\nlease_s = 1\npoll_interval_s = 1\nbackoff_base_s = 1\n'
        f'[acknowledgements]\nper_contact_per_hour = 100\n'
        f'[dev]\nbootstrap = true\ndir = "{tmp_path}"\n'))
        .replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"', 1))
    subprocess.run([sys.executable, "-m", "gateway.cli", "--config", str(config), "db",
                    "upgrade"], check=True, capture_output=True)
    daemon = await _start(config, port)
    try:
        for i in range(MAILS):
            reply = await send(port, make_mail(subject=f"Crash {i}", sender=f"c{i}@example.org"),
                               mail_from=f"c{i}@example.org")
            assert reply.code == 250
        await asyncio.wait_for(relay.stalled.wait(), 30)
    finally:
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
    before = await _rows(db_url)
    assert len(before) == MAILS and "sending" in {state for _, state, _ in before}
    relay.release.set()

    restarted = await _start(config, port)
    try:
        for _ in range(200):
            if {state for _, state, _ in await _rows(db_url)} == {"sent"}:
                break
            await asyncio.sleep(0.1)
    finally:
        restarted.send_signal(signal.SIGTERM)
        assert restarted.wait(timeout=30) == 0
        server.close()
    after = await _rows(db_url)
    assert {state for _, state, _ in after} == {"sent"}, after
    caught: dict[str, int] = {}
    for mail in relay.caught:
        message_id = mail.message["Message-ID"].strip("<>")
        caught[message_id] = caught.get(message_id, 0) + 1
    assert set(caught) == {message_id for _, _, message_id in after}  # none lost
    assert max(caught.values()) == 1  # the stalled one got no 250, so nothing went twice


