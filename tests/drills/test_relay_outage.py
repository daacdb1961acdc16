"""Relay outage drill: the smarthost refuses (451), then vanishes (port closed), while mail
keeps arriving; afterwards every acknowledgement reaches it exactly once, by Message-ID."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import select

from gateway.outbound.catcher import R250_CAUGHT, CatchHandler, Caught
from store.engine import Store
from store.models import Outbox, Ticket
from tests.daemon import Daemon, free_port, write_config
from tests.drills.test_crash_drill import NO_RATE_LIMITS
from tests.mailbuild import make_mail, send

pytestmark = pytest.mark.drill
STRETCH_S = float(os.environ.get("DESKGATE_DRILL_OUTAGE_S", "2"))
REFUSAL = "451 4.3.0 Relay drill: try again later"


class OutageRelay(CatchHandler):
    """The capture relay, refusing every DATA while `refusing` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.refusing = False
        self.refused = 0
        self.sessions: set[SMTP] = set()
        self.server: asyncio.Server | None = None

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.refusing:
            self.attempts += 1
            self.refused += 1
            return REFUSAL
        self.attempts += 1  # caught like CatchHandler does, without its log line per mail
        self.caught.append(Caught(envelope.mail_from or "", tuple(envelope.rcpt_tos),
                                  envelope.original_content or b"", None))
        return R250_CAUGHT

    async def listen(self, port: int) -> None:
        def factory() -> SMTP:
            protocol = SMTP(self, hostname="relay.localhost", ident="drill relay")
            self.sessions.add(protocol)
            return protocol

        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(factory, "127.0.0.1", port, reuse_address=True)

    async def vanish(self) -> None:
        """Port closed and every open connection cut: the relay machine is gone."""
        assert self.server is not None
        self.server.close()
        for protocol in self.sessions:
            if protocol.transport is not None:
                protocol.transport.abort()
        self.sessions.clear()
        await self.server.wait_closed()
        self.server = None


async def _outbox(db_url: str) -> tuple[list[tuple[str, str, int]], int]:
    store = Store(db_url)
    try:
        async with store.read() as session:
            rows = [(r.message_id, r.state, r.attempts) for r in await session.scalars(
                select(Outbox).where(Outbox.kind == "ack"))]
            tickets = len(list(await session.scalars(select(Ticket.id))))
    finally:
        await store.dispose()
    return rows, tickets


async def test_relay_outage_delivers_every_ack_once(db_url: str, tmp_path: Path) -> None:
    relay, relay_port, port = OutageRelay(), free_port(), free_port()
    await relay.listen(relay_port)
    config = write_config(tmp_path / "deskgate.toml", db_url, port, extra_departments=(
        NO_RATE_LIMITS + f'[relay]\nlisten = "127.0.0.1:{relay_port}"\n'
        "timeout_s = 5\nconcurrency = 2\n"
        "[outbox]\nlease_s = 60\npoll_interval_s = 1\nbackoff_base_s = 1\nbackoff_max_s = 2\n"
        "[acknowledgements]\nper_contact_per_hour = 1000000\n"
        f'[dev]\nbootstrap = true\ndir = "{tmp_path}"\n'))
    subprocess.run([sys.executable, "-m", "gateway.cli", "--config", str(config), "db",
                    "upgrade"], check=True, capture_output=True)
    daemon = Daemon(config, tmp_path / "daemon.log")
    loop = asyncio.get_running_loop()
    sent: Counter[str] = Counter()  # phase -> mails that got 250

    async def traffic(phase: str) -> None:
        """Mail keeps arriving for STRETCH_S; inbound must not notice the relay at all."""
        end = loop.time() + STRETCH_S
        while loop.time() < end:
            i = sum(sent.values())
            reply = await send(port, make_mail(subject=f"Outage {i}",
                                               sender=f"c{i % 11}@example.org",
                                               message_id=f"<outage{i}@example.org>"),
                               mail_from=f"c{i % 11}@example.org")
            assert reply.code == 250, f"mail {i} during {phase}: {reply}"
            sent[phase] += 1
            await asyncio.sleep(0.05)

    try:
        await daemon.start()
        await traffic("before")
        relay.refusing = True
        await traffic("refusing")
        relay.refusing = False
        await relay.vanish()
        await traffic("gone")
        caught_before_return = len(relay.caught)
        await relay.listen(relay_port)
        back = loop.time()
        total = sum(sent.values())
        while len(relay.caught) < total and loop.time() - back < 60:
            await asyncio.sleep(0.1)
        drained_s = loop.time() - back
        await asyncio.sleep(2.5)  # a second copy would come within a poll and a backoff
        rows, tickets = await _outbox(db_url)
    finally:
        daemon.close()
        if relay.server is not None:
            relay.server.close()
    caught = Counter(mail.message["Message-ID"].strip("<>") for mail in relay.caught)
    states = Counter(state for _, state, _ in rows)
    print(f"\n[drill] relay outage {db_url.split(':')[0]}: N={total} {dict(sent)} "
          f"outage_s={2 * STRETCH_S:.0f} refused={relay.refused} "
          f"caught_when_relay_returned={caught_before_return} "
          f"delivered={len(caught)} duplicated={sum(n - 1 for n in caught.values())} "
          f"lost={total - len(caught)} drain_after_return_s={drained_s:.1f} "
          f"max_attempts={max(a for _, _, a in rows)}")
    assert tickets == total and len(rows) == total  # one ack per new ticket
    assert relay.refused > 0 and sent["refusing"] and sent["gone"]  # the outage was real
    assert states == Counter({"sent": total}), states
    assert set(caught) == {message_id for message_id, _, _ in rows}  # every ack delivered
    assert max(caught.values()) == 1, [m for m, n in caught.items() if n > 1]  # none twice
