"""The running daemon's life: signals, sd_notify (READY, STATUS, WATCHDOG), reload, drain."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, time
from typing import TYPE_CHECKING

import structlog
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from gateway.errors import ConfigError, DeskgateError
from gateway.sdnotify import Notifier
from gateway.settings import Settings
from store.models import Message

if TYPE_CHECKING:  # service.py builds the Daemon; only the type is needed here
    from gateway.service import Gateway

log = structlog.get_logger("deskgate.daemon")

STATUS_INTERVAL_S = 60.0
STATUS_QUERY_TIMEOUT_S = 5.0


class Daemon:
    """Drives one started Gateway until SIGTERM/SIGINT; SIGHUP reloads its configuration.

    The first SIGTERM drains (DESIGN 6); a second one while draining stops at once
    (uvicorn's force_exit). A reload that fails keeps the configuration in use.
    """

    def __init__(self, gateway: Gateway, load: Callable[[], Settings],
                 notifier: Notifier | None = None) -> None:
        self.gateway = gateway
        self.load = load
        self.notifier = notifier or Notifier()
        self.stopping = asyncio.Event()
        self.force = asyncio.Event()
        self.reload_requested = asyncio.Event()
        self.status_hooks: list[Callable[[], Awaitable[str]]] = [self._mails_today]

    def install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_stop_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self.reload_requested.set)

    def _on_stop_signal(self, signum: int) -> None:
        if self.stopping.is_set():
            log.warning("service.force_stop", signal=signal.Signals(signum).name)
            self.force.set()
            return
        log.info("service.stopping", signal=signal.Signals(signum).name,
                 drain_timeout_s=self.gateway.settings.drain_timeout_s)
        self.stopping.set()

    async def run(self) -> None:
        """After gateway.start(): READY, then serve until told to stop, then drain and stop."""
        self.notifier.send("READY=1", f"STATUS={await self.status()}")
        tasks = [asyncio.create_task(self._reloader()), asyncio.create_task(self._status_loop())]
        if self.notifier.watchdog_interval_s:
            tasks.append(asyncio.create_task(self._watchdog(self.notifier.watchdog_interval_s)))
        try:
            await self.stopping.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self.notifier.send("STOPPING=1", "STATUS=draining: finishing mails in progress")
        await self.gateway.stop(force=self.force)

    async def status(self) -> str:
        parts = [await hook() for hook in self.status_hooks]
        return "; ".join(p for p in parts if p)

    async def _mails_today(self) -> str:
        midnight = datetime.combine(datetime.now(UTC).date(), time(), UTC)
        query = select(func.count(Message.id)).where(Message.direction == "in",
                                                     Message.received_at >= midnight)
        try:
            async with self.gateway.store.read() as session:
                # asyncio.timeout, not wait_for: on Python 3.11 a stop landing as the count
                # came back was dropped, and run() waited on this task for ever.
                async with asyncio.timeout(STATUS_QUERY_TIMEOUT_S):
                    count = await session.scalar(query)
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            return f"store unavailable ({type(exc).__name__})"
        return f"{count} mails today"

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL_S)
            self.notifier.send(f"STATUS={await self.status()}")

    async def _watchdog(self, interval_s: float) -> None:
        """WATCHDOG=1 from the main loop: a stuck loop stops the pings and systemd restarts us."""
        while True:
            self.notifier.send("WATCHDOG=1")
            await asyncio.sleep(interval_s)

    async def _reloader(self) -> None:
        while True:
            await self.reload_requested.wait()
            self.reload_requested.clear()
            self.notifier.send("RELOADING=1", "STATUS=reloading the configuration")
            note = await self._reload_once()
            self.notifier.send("READY=1", f"STATUS={note}{await self.status()}")

    async def _reload_once(self) -> str:
        try:
            settings = self.load()
            await self.gateway.reload(settings)
        except ConfigError as exc:
            log.error("service.reload_failed", problems=exc.problems, kept="previous config")
            return "reload failed, previous configuration kept; "
        except (DeskgateError, SQLAlchemyError, OSError) as exc:
            log.error("service.reload_failed", error=f"{type(exc).__name__}: {exc}"[:300],
                      kept="previous config")
            return "reload failed, previous configuration kept; "
        log.info("service.reloaded", source=settings.source,
                 departments=[d.slug for d in settings.departments])
        return ""
