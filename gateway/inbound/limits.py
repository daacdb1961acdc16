"""Abuse limits of the inbound port (issue 11): open connections and mail rates per client.

Connections are counted in this process (each worker holds its own sockets). Mail rates
are counted locally on the hot path and shared through the store every `sync_interval_s`
(store/rate_counts.py), so several instances on one database enforce one limit; between
two hand-overs an instance may let through what it receives in that second beyond it.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
from collections import Counter
from collections.abc import Callable
from typing import Any

import structlog

from gateway.inbound.rate_windows import Rule, Windows, bucket_width, oldest_bucket, rules_for
from gateway.settings_limits import InboundLimits
from store import rate_counts
from store.engine import Store

log = structlog.get_logger("deskgate.smtp")


def client_ip(peername: Any) -> str | None:
    """The client's address as text; an IPv4-mapped IPv6 address is the IPv4 one."""
    if not isinstance(peername, tuple) or not peername:
        return None
    return _normal_ip(str(peername[0]))


@functools.lru_cache(maxsize=4096)
def _normal_ip(host: str) -> str | None:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return str(address)


class ConnectionGate:
    """Open inbound connections of this process, per client address and in total."""

    def __init__(self) -> None:
        self.total = 0
        self.per_ip: Counter[str] = Counter()

    def admit(self, ip: str | None, limits: InboundLimits) -> tuple[str | None, str | None]:
        """(refusal reason, None) or (None, the per-IP key to release later; None if exempt)."""
        if limits.max_connections and self.total >= limits.max_connections:
            return "connections_total", None
        key = None if limits.exempt(ip) else ip
        if key is not None and limits.max_connections_per_ip and \
                self.per_ip[key] >= limits.max_connections_per_ip:
            return "connections_per_ip", None
        self.total += 1
        if key is not None:
            self.per_ip[key] += 1
        return None, key

    def release(self, key: str | None) -> None:
        self.total -= 1
        if key is not None:
            self.per_ip[key] -= 1
            if self.per_ip[key] <= 0:
                del self.per_ip[key]


class RateLimiter:
    """Per sender, sender domain and client IP: mails per sliding window, across instances."""

    def __init__(self, store: Store | None, clock: Callable[[], float],
                 limits: Callable[[], InboundLimits]) -> None:
        self.store = store
        self.clock = clock  # epoch seconds; every instance's buckets line up on wall time
        self.limits = limits  # read per mail: SIGHUP may change them
        self.windows = Windows()
        self._sync_lock = asyncio.Lock()
        self._pruned_bucket: int | None = None

    def check(self, mail_from: str, ip: str | None) -> Rule | None:
        """The rule a new mail is over (refuse it), or None: the mail is counted."""
        limits = self.limits()
        rates = limits.rates
        rules = rules_for(mail_from, None if limits.exempt(ip) else ip,
                          rates.per_sender, rates.per_domain, rates.per_ip)
        if not rules:
            return None
        return self.windows.admit(rules, self.clock(), rates.window_s)

    async def sync(self) -> None:
        """Hand this process's counts to the shared table and read the window sums back."""
        if self.store is None:
            return
        async with self._sync_lock:
            now, window_s = self.clock(), self.limits().rates.window_s
            counts = self.windows.hand_over(now, window_s)
            keys = self.windows.keys()
            if not keys:
                return
            oldest = oldest_bucket(now, window_s)
            try:
                async with self.store.transaction() as session:
                    sums = await rate_counts.add_and_sum(session, counts, keys, oldest)
                    if self._pruned_bucket != oldest:  # once per bucket: old rows go
                        await rate_counts.prune(session, oldest - bucket_width(window_s))
            except Exception:
                self.windows.restore()
                raise
            self._pruned_bucket = oldest
            self.windows.absorb(sums)

    async def run(self) -> None:
        """The sync loop; a store outage leaves the counts local until it is back."""
        failing = False
        while True:
            await asyncio.sleep(self.limits().rates.sync_interval_s)
            try:
                await self.sync()
            except Exception as exc:  # noqa: BLE001 — limits go on locally, mail keeps flowing
                if not failing:
                    log.warning("smtp.rate_sync_failed", error=type(exc).__name__)
                failing = True
            else:
                failing = False
