"""The outbound part of the composition root: hooks into the pipeline, the worker, dev helpers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import structlog

from gateway.ingest.pipeline import Pipeline
from gateway.outbound import dkim, verify
from gateway.outbound.ack import AckHook
from gateway.outbound.bounces import record_bounce
from gateway.outbound.catcher import CatchHandler, start_catcher
from gateway.outbound.notify import NotifyHook
from gateway.outbound.relay import Relay, RelayWorker
from gateway.outbound.render import Renderer
from gateway.settings import Settings
from store.engine import Store

log = structlog.get_logger("deskgate.outbound")
DEV_SELECTOR = "dev"


def dev_keys(settings: Settings) -> list[tuple[str, str, str, str]]:
    """Dev config: one rsa key per own domain under <dev.dir>/dkim, made on first start."""
    entries = []
    for domain in sorted(settings.own_domains):
        path = Path(settings.outbound.dev.dir) / "dkim" / f"{domain}.{DEV_SELECTOR}.key"
        if not path.exists():
            dkim.write_key(path, dkim.generate("rsa-sha256"))
            log.info("dkim.generated", domain=domain, file=str(path),
                     record=dkim.record_name(DEV_SELECTOR, domain))
        entries.append((domain, DEV_SELECTOR, "rsa-sha256", str(path)))
    return entries


def make_signer(settings: Settings) -> dkim.Signer:
    entries = [(k.domain, k.selector, k.algorithm, k.key_file) for k in settings.outbound.dkim]
    if settings.outbound.dev.bootstrap:
        configured = {k.domain for k in settings.outbound.dkim}
        entries += [e for e in dev_keys(settings) if e[0] not in configured]
    return dkim.Signer.from_files(entries)


class Outbound:
    """Acknowledgements, bounces and verification on the pipeline; the relay worker beside it."""

    def __init__(self, settings: Settings, store: Store, clock: Callable[[], datetime]) -> None:
        self.settings, self.store, self.clock = settings, store, clock
        self.renderer = Renderer(dict(settings.outbound.template_dirs))
        self.relay = Relay.from_settings(settings.relay, settings.outbound)
        self.worker: RelayWorker | None = None
        self.catcher: asyncio.Server | None = None

    def attach(self, pipeline: Pipeline) -> None:
        pipeline.intercepts.append(record_bounce)
        pipeline.intercepts.append(verify.VerificationIntercept(self._wake))
        pipeline.after_store.append(AckHook(self.settings, self.renderer, self._wake_soon))
        pipeline.after_store.append(NotifyHook(self.settings, self.renderer, self._wake_soon))

    def _wake(self) -> None:
        if self.worker is not None:
            self.worker.wake()

    def _wake_soon(self) -> None:
        # Called inside the ingest transaction: wake the worker once this task yields; on
        # SQLite its claim then waits for our commit, on PostgreSQL the poll catches up.
        asyncio.get_running_loop().call_soon(self._wake)

    async def start(self) -> None:
        dev = self.settings.outbound.dev
        if dev.enabled and not self.settings.source.endswith("deskgate.dev.toml"):
            log.warning("outbound.dev_flags_outside_dev_config", source=self.settings.source)
        if dev.bootstrap:
            async with self.store.transaction() as session:
                await verify.bootstrap(session, sorted(self.settings.own_addresses), self.clock())
        if dev.catch:
            relay = self.settings.relay
            self.catcher = await start_catcher(CatchHandler(Path(dev.dir) / "caught"),
                                               relay.host, relay.port)
            log.info("catch.ready", listen=str(relay), dir=str(Path(dev.dir) / "caught"))
        self.worker = RelayWorker(self.store, self.settings.outbound, self.relay,
                                  make_signer(self.settings), self.settings.hostname, self.clock,
                                  self.settings.tickets.reply_token_secret)
        if self.settings.outbound.outbox.worker:
            self.worker.start()

    async def stop(self, timeout_s: float = 10.0) -> None:
        if self.worker is not None:
            await self.worker.stop(timeout_s)
        if self.catcher is not None:
            self.catcher.close()
