"""Composition root: builds the parts from settings, starts them in order, stops them in order."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import structlog

from gateway.agentmail.path import AgentPath
from gateway.daemon import Daemon
from gateway.errors import DeskgateError
from gateway.inbound.imap import ImapPollers
from gateway.inbound.imap_alert import AlertMail
from gateway.inbound.imap_history import HistoryHook
from gateway.inbound.limits import RateLimiter
from gateway.inbound.smtp import InboundHandler, start_inbound
from gateway.ingest.authcheck import org_domain
from gateway.ingest.pipeline import Pipeline
from gateway.ingest.prep import Preparer
from gateway.ingest.readable import warm_up
from gateway.memory import freeze_startup_objects, return_big_buffers
from gateway.outbound.escalation import EscalationMail
from gateway.outbound.rating import RatingMail
from gateway.outbound.service import Outbound
from gateway.scheduler import Scheduler
from gateway.settings import Settings, load_settings
from gateway.submission.server import Submission, SubmissionHandler
from gateway.web.app import WebApp
from gateway.web.metrics import Metrics
from gateway.web.tokens import link_keys
from store.engine import Store
from store.migrate import pending

log = structlog.get_logger("deskgate.service")
DRAIN_POLL_S = 0.05


class Gateway:
    """One deskgate instance: store, pipeline, inbound listener."""

    def __init__(self, settings: Settings, clock: Callable[[], datetime] | None = None,
                 shares_port: bool = False) -> None:
        self.settings = settings
        self.store = Store(settings.database_url)
        self.pipeline = Pipeline(settings, self.store, clock or (lambda: datetime.now(UTC)))
        # Unset: a helper for one serving process only. Workers sharing the port use both
        # cores already; a helper each made them 10 % slower (bench/ab.py, AB_WORKERS=2).
        helper = settings.inbound.parse_helper
        if helper is None:
            helper = not shares_port
        self.preparer = Preparer(self.pipeline.cid_url) if helper else None
        self.pipeline.preparer = self.preparer
        self.handler = InboundHandler(self.pipeline)
        self.server: asyncio.Server | None = None
        # Acknowledgements, bounces, verification and the relay worker (issue 4).
        self.outbound = Outbound(settings, self.store, self.pipeline.clock)
        self.outbound.attach(self.pipeline)
        self.imap = ImapPollers(settings.imap, lambda: self.pipeline, self.store,
                                self.pipeline.clock)
        # Escalation, pre-breach warnings, auto-close (issue 8).
        self.scheduler = Scheduler(settings, self.store, self.pipeline.clock,
                                   settings.tickets.scheduler_tick_s)
        self._scheduler_task: asyncio.Task[None] | None = None
        self.rating = RatingMail(settings, self.outbound.renderer, self.pipeline.clock,
                                 self.outbound._wake_soon)  # noqa: SLF001
        self.scheduler.hooks.append(self.rating.on_time_rule)
        # Agents' replies, notes and commands from the submission port (issue 6).
        self.agent_path = AgentPath(settings, self.store, self.pipeline, self.outbound,
                                    self.rating)
        self.escalation = EscalationMail(settings, self.outbound.renderer, self.pipeline.clock,
                                         self.outbound._wake_soon)  # noqa: SLF001
        self.scheduler.hooks.append(self.escalation.on_time_rule)
        # Rating links, /healthz, /metrics (issue 5).
        self.metrics = Metrics()
        self.handler.metrics = self.metrics
        # SMTP rate limits, counted here and shared through the store (issue 11).
        self.rates = RateLimiter(self.store, lambda: self.pipeline.clock().timestamp(),
                                 lambda: self.settings.inbound.limits)
        self.handler.rates = self.rates
        self._rates_task: asyncio.Task[None] | None = None
        self._checkpoint_task: asyncio.Task[None] | None = None
        self.web = WebApp(self.store, link_keys(settings.tickets.reply_token_secret),
                          self.metrics, self.health, self.pipeline.clock)
        self.web_port: int | None = None
        # IMAP (issue 7): failing mailboxes in /healthz and /metrics, alert mails, history.
        self.imap.attach(self.metrics, AlertMail(settings, self.outbound.renderer,
                                                 self.pipeline.clock, self.outbound._wake_soon))  # noqa: SLF001
        self.web.degraded = self.imap.degraded
        self.pipeline.after_store.append(HistoryHook(settings))
        self.web.released = self.outbound._wake  # noqa: SLF001 — held mail may go now
        # What the invitation page tells agents to put into their mail client (issue 6).
        self.web.submission = f"{settings.hostname}:{settings.submission.port}"
        self.submission = Submission(settings, self.store, self.agent_path, self.metrics)

    def health(self) -> dict[str, bool]:
        """Every supervised part alive (the web endpoint adds the database check)."""
        return {"inbound": self.server is not None and self.server.is_serving(),
                "scheduler": self._scheduler_task is not None and
                not self._scheduler_task.done()} | (
            {"submission": self.submission.serving} if self.submission.enabled else {})

    @property
    def inbound_port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    @property
    def submission_port(self) -> int | None:
        """The STARTTLS port as bound (None when [submission] is not configured)."""
        return self.submission.port

    async def start(self, port: int | None = None, reuse_port: bool = False) -> None:
        if await pending(self.store):
            raise DeskgateError("the database schema is not up to date: run `deskgate db upgrade`")
        await self.pipeline.start()
        if self.preparer is not None:
            self.preparer.launch()  # in the background: until it is ready, mails parse here
        await self.outbound.start()
        inbound = self.settings.inbound
        self.server = await start_inbound(
            self.handler, inbound.listen.host, inbound.listen.port if port is None else port,
            self.settings.hostname, inbound.max_message_bytes, reuse_port)
        log.info("service.ready", inbound=f"{inbound.listen.host}:{self.inbound_port}",
                 database=self.store.engine.dialect.name,
                 departments=[d.slug for d in self.settings.departments])
        if self.submission.enabled:  # agents' mail clients (issue 6)
            try:
                await self.submission.start(reuse_port)
            except OSError as exc:
                raise DeskgateError(f"cannot listen on submission {self.settings.submission} "
                                    f"or its tls_listen: {exc.strerror}") from None
        self.imap.start()  # one supervised poller task per [[imap]] mailbox (issue 7)
        self._scheduler_task = asyncio.create_task(self.scheduler.run(), name="scheduler")
        self._rates_task = asyncio.create_task(self.rates.run(), name="rate-limits")
        if self.store.is_sqlite:  # WAL checkpoints off the writers' path (store/engine.py)
            self._checkpoint_task = asyncio.create_task(self.store.checkpoints(),
                                                        name="checkpoints")
        web = self.settings.web
        self.web_port = await self.web.start(web.host, web.port, reuse_port)
        log.info("service.web", listen=f"{web.host}:{self.web_port}")

    async def stop(self, drain_timeout_s: float | None = None,
                   force: asyncio.Event | None = None) -> None:
        """Refuse new mail (421), let mails in progress finish (bounded), then close the store.

        The listener stays open while draining so a new client hears 421 4.3.2 and retries
        later instead of a connection refused (STYLE habit 7); `force` cuts the drain short.
        """
        self.handler.accepting = False
        self.submission.stop_accepting()
        await self.imap.stop()  # an import cut short rolls back and is fetched again
        await self.web.stop()
        if self._scheduler_task is not None:  # its changes are claimed per transaction
            self._scheduler_task.cancel()
            await asyncio.gather(self._scheduler_task, return_exceptions=True)
        timeout_s = self.settings.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        cut = force or asyncio.Event()
        inbound_done, submission_done = await asyncio.gather(
            _drain(self.handler, timeout_s, cut), _drain(self.submission.handler, timeout_s, cut))
        if not inbound_done:
            log.warning("service.drain_incomplete", inflight=self.handler.inflight,
                        sessions=len(self.handler.sessions), forced=bool(force and force.is_set()))
        if not submission_done:
            log.warning("service.submission_drain_incomplete",
                        inflight=self.submission.handler.inflight, forced=cut.is_set())
        if self.server is not None:
            self.server.close()
        self.handler.hang_up_idle()
        self.submission.close()
        if self._rates_task is not None:  # this run's last counts go to the shared table
            self._rates_task.cancel()
            await asyncio.gather(self._rates_task, return_exceptions=True)
            try:
                await self.rates.sync()
            except Exception as exc:  # noqa: BLE001 — a lost second of counts, nothing more
                log.warning("service.rate_sync_failed", error=type(exc).__name__)
        await self.outbound.stop()
        if self.preparer is not None:
            await self.preparer.stop()
        if self._checkpoint_task is not None:
            self._checkpoint_task.cancel()
            await asyncio.gather(self._checkpoint_task, return_exceptions=True)
        await self.store.dispose()
        log.info("service.stopped")

    async def abandon(self) -> None:
        """A start that failed part way: what it started (the helper, the store) ends."""
        if self.preparer is not None:
            await self.preparer.stop()
        await self.store.dispose()

    async def reload(self, settings: Settings) -> None:
        """SIGHUP: swap in a pipeline built from new settings; open sessions carry on.

        Sessions read `handler.pipeline` per command, so the swap is one assignment; a mail
        already in ingest finishes with the pipeline it started with.
        """
        settings = _keep_restart_only(self.settings, settings)
        pipeline = Pipeline(settings, self.store, self.pipeline.clock)
        pipeline.preparer = self.preparer
        # Every part that hooks into the pipeline attaches again, built from the new settings
        # (copying the old hooks would keep the old departments: KeyError on a new one).
        self.outbound.settings = settings
        self.outbound.attach(pipeline)
        pipeline.after_store.append(HistoryHook(settings))  # from = "all" imports (issue 7)
        await pipeline.start()  # new departments get their rows before any mail routes to them
        self.settings, self.pipeline, self.handler.pipeline = settings, pipeline, pipeline
        self.agent_path.reload(settings, pipeline)
        self.scheduler.settings = settings
        await self.imap.reload(settings.imap, settings)  # restart changed pollers (issue 7)


async def _drain(handler: InboundHandler | SubmissionHandler, timeout_s: float,
                 force: asyncio.Event) -> bool:
    """Wait until no session is mid-transaction; False on deadline or force."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while handler.busy:
        if force.is_set() or loop.time() >= deadline:
            return False
        await asyncio.sleep(DRAIN_POLL_S)
    return True


def _keep_restart_only(old: Settings, new: Settings) -> Settings:
    """Listener and database cannot change under a running process: keep them, say so."""
    for key, before, after in (("database.url", old.database_url, new.database_url),
                               ("inbound.listen", old.inbound.listen, new.inbound.listen),
                               ("inbound.parse_helper", old.inbound.parse_helper,
                                new.inbound.parse_helper),
                               ("submission", old.submission, new.submission)):
        if before != after:
            log.warning("service.reload_needs_restart", key=key)
    return replace(new, database_url=old.database_url, submission=old.submission,
                   inbound=replace(new.inbound, listen=old.inbound.listen,
                                   parse_helper=old.inbound.parse_helper))


async def serve(settings: Settings, reuse_port: bool = False) -> None:
    return_big_buffers()
    warm_up()  # the language model, ~0.3 s: else the first mail stalls every session for it
    if settings.inbound.authentication.mode != "off":
        org_domain("example.com")  # the public suffix list, ~50 ms: checks run on the loop
    gateway = Gateway(settings, shares_port=reuse_port)
    daemon = Daemon(gateway, lambda: load_settings(Path(settings.source)))
    daemon.install_signals()  # before start: a SIGTERM during start-up drains, not kills
    try:
        await gateway.start(reuse_port=reuse_port)
    except OSError as exc:
        await gateway.abandon()
        raise DeskgateError(f"cannot listen on {settings.inbound.listen}: {exc.strerror}") from None
    except BaseException:
        await gateway.abandon()
        raise
    freeze_startup_objects()
    await daemon.run()


async def supervise(config: str, workers: int) -> int:
    """Run `workers` deskgate processes sharing the inbound port (SO_REUSEPORT).

    Each worker is a whole `deskgate serve --reuse-port`: its own loop, pipeline and store
    connections. SIGTERM/SIGINT are passed on; when one worker exits, the others are stopped.
    """
    command = [sys.executable, "-m", "gateway.cli", "--config", config, "serve", "--reuse-port"]
    children: list[asyncio.subprocess.Process] = []
    stopping: list[bool] = []
    signalled: set[int] = set()  # workers we sent SIGTERM while they still ran

    def stop(child: asyncio.subprocess.Process) -> None:
        if child.returncode is None:
            child.send_signal(signal.SIGTERM)
            signalled.add(child.pid)

    def stop_all() -> None:
        if stopping:  # once: a second SIGTERM would cut a worker's drain short
            return
        stopping.append(True)
        for child in children:
            stop(child)

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):  # before the workers: a stop that comes
        loop.add_signal_handler(signum, stop_all)  # while they start reaches each of them
    for _ in range(workers):
        children.append(await asyncio.create_subprocess_exec(*command))
        if stopping:
            stop(children[-1])
    log.info("service.workers", workers=workers, pids=[c.pid for c in children])
    waits = [asyncio.ensure_future(c.wait()) for c in children]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    stop_all()
    codes = await asyncio.gather(*waits)
    # A worker that our SIGTERM ended before it had set up its handlers was still starting:
    # it had not listened yet, so nothing was in flight, and that is a clean stop.
    return max((0 if code == -signal.SIGTERM and child.pid in signalled else abs(code)
                for child, code in zip(children, codes, strict=True)), default=0)
