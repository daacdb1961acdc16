"""Composition root: builds the parts from settings, starts them in order, stops them in order."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from datetime import UTC, datetime

import structlog

from gateway.errors import DeskgateError
from gateway.inbound.smtp import InboundHandler, start_inbound
from gateway.ingest.pipeline import Pipeline
from gateway.settings import Settings
from store.engine import Store
from store.migrate import pending

log = structlog.get_logger("deskgate.service")


class Gateway:
    """One deskgate instance: store, pipeline, inbound listener."""

    def __init__(self, settings: Settings, clock: Callable[[], datetime] | None = None) -> None:
        self.settings = settings
        self.store = Store(settings.database_url)
        self.pipeline = Pipeline(settings, self.store, clock or (lambda: datetime.now(UTC)))
        self.handler = InboundHandler(self.pipeline)
        self.server: asyncio.Server | None = None

    @property
    def inbound_port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self, port: int | None = None) -> None:
        if await pending(self.store):
            raise DeskgateError("the database schema is not up to date: run `deskgate db upgrade`")
        await self.pipeline.start()
        inbound = self.settings.inbound
        self.server = await start_inbound(
            self.handler, inbound.listen.host, inbound.listen.port if port is None else port,
            self.settings.hostname, inbound.max_message_bytes)
        log.info("service.ready", inbound=f"{inbound.listen.host}:{self.inbound_port}",
                 database=self.store.engine.dialect.name,
                 departments=[d.slug for d in self.settings.departments])

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Stop listening, let in-flight mails finish (bounded), then close the store."""
        self.handler.accepting = False
        if self.server is not None:
            self.server.close()
        try:
            await asyncio.wait_for(self.handler.idle.wait(), drain_timeout_s)
        except TimeoutError:
            log.warning("service.drain_timeout", inflight=self.handler.inflight)
        if self.server is not None:
            self.server.close()
        await self.store.dispose()
        log.info("service.stopped")


async def serve(settings: Settings) -> None:
    gateway = Gateway(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await gateway.start()
    except OSError as exc:
        await gateway.store.dispose()
        raise DeskgateError(f"cannot listen on {settings.inbound.listen}: {exc.strerror}") from None
    except BaseException:
        await gateway.store.dispose()
        raise
    await stop.wait()
    log.info("service.stopping")
    await gateway.stop()
