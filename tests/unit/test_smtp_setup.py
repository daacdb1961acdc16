"""GatewaySMTP's cached method names give aiosmtpd the same tables its own scan would."""

from __future__ import annotations

import asyncio

from aiosmtpd.smtp import SMTP

from gateway.inbound.smtp import GatewaySMTP, InboundHandler
from gateway.ingest.pipeline import Pipeline
from store.engine import Store
from tests.conftest import make_settings


class _DefaultDirHandler(InboundHandler):
    def __dir__(self) -> list[str]:
        return object.__dir__(self)


async def test_cached_names_build_the_same_command_hook_and_auth_tables() -> None:
    store = Store("sqlite+aiosqlite:///:memory:")
    pipeline = Pipeline(make_settings(), store)
    loop = asyncio.get_running_loop()
    ours = GatewaySMTP(InboundHandler(pipeline), hostname="h", loop=loop)
    library = SMTP(_DefaultDirHandler(pipeline), hostname="h", loop=loop)
    try:
        assert ours._smtp_methods.keys() == library._smtp_methods.keys()
        assert ours._auth_methods.keys() == library._auth_methods.keys()
        assert ours._handle_hooks.keys() == library._handle_hooks.keys()
        assert {"DATA", "EHLO", "MAIL", "RCPT", "QUIT"} <= ours._smtp_methods.keys()
        assert {"MAIL", "RCPT", "DATA", "exception"} <= ours._handle_hooks.keys()
    finally:
        await store.dispose()
