"""Open-relay attempts of every kind, over a real socket: none gets past RCPT."""

from __future__ import annotations

from typing import Any

import pytest

from tests.mailbuild import make_mail, send

ATTEMPTS = [
    ("victim@elsewhere.example", 554),  # plain foreign domain
    # Malformed addresses are refused by aiosmtpd's parser itself: 553 (RFC 5321 4.2.2).
    ("victim@elsewhere.example@example.test", 553),  # our domain tacked on at the end
    ("support@example.test@elsewhere.example", 553),  # user@ourdomain@evil
    ("victim%elsewhere.example@example.test", 550),  # percent hack
    ("@example.test:victim@elsewhere.example", 553),  # source route (RFC 5321 4.1.1.3)
    ('"victim@elsewhere.example"@example.test', 550),  # quoted local part
    ("victim!elsewhere.example@example.test", 550),  # bang path
    ("support@EXAMPLE.TEST.elsewhere.example", 554),  # our name inside a foreign domain
    ("support@example.test.", 553),  # trailing dot
]


@pytest.mark.parametrize(("rcpt", "code"), ATTEMPTS)
async def test_relay_attempt_is_refused_at_rcpt(make_gateway: Any, rcpt: str, code: int
                                                ) -> None:
    gw = await make_gateway()
    reply = await send(gw.inbound_port, make_mail(), rcpts=(rcpt,))
    assert (reply.stage, reply.code) == ("rcpt", code), reply.message
