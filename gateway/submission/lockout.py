"""Failed-login throttling: the decision over timestamps, no I/O (the clock is passed in).

Failures are counted per login address and per client IP within a sliding window. Each
failure delays the 535 answer a little more; reaching the limit locks the key for a while,
and a locked key is refused before any password is checked. The state lives in this
process only: a restart forgets it, and several workers each count their own share.
"""

from __future__ import annotations

import ipaddress
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

MAX_DELAY_FACTOR = 8  # the delay doubles per failure up to 8x the first one
PRUNE_ABOVE = 10_000  # keys kept before expired ones are swept (a spray of made-up logins)


@dataclass(frozen=True, slots=True)
class Policy:
    max_failures: int = 5  # per address within window_s
    max_failures_per_ip: int = 20
    window_s: float = 900.0
    lockout_s: float = 900.0
    first_delay_s: float = 1.0


@dataclass(frozen=True, slots=True)
class Failure:
    """What a failed login earns: wait this long before answering; locked now or not."""

    delay_s: float
    locked: tuple[str, ...]  # the keys this failure locked ("address", "ip")


def ip_key(host: str) -> str:
    """An IPv6 client is counted by its /64: one machine gets a whole /64 to pick from."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class Lockout:
    def __init__(self, policy: Policy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._locked_until: dict[str, float] = {}

    def locked_for(self, address: str, ip: str) -> float:
        """Seconds until both the address and the client IP may try again (0: not locked)."""
        now = self.clock()
        until = max(self._locked_until.get(_addr(address), 0.0),
                    self._locked_until.get(_ip(ip), 0.0))
        return max(0.0, until - now)

    def failed(self, address: str, ip: str) -> Failure:
        now = self.clock()
        if len(self._failures) > PRUNE_ABOVE:
            self.prune()
        locked = []
        counts = []
        for kind, key, limit in (("address", _addr(address), self.policy.max_failures),
                                 ("ip", _ip(ip), self.policy.max_failures_per_ip)):
            times = self._failures.setdefault(key, deque())
            times.append(now)
            while times and times[0] <= now - self.policy.window_s:
                times.popleft()
            counts.append(len(times))
            if len(times) >= limit and self._locked_until.get(key, 0.0) <= now:
                self._locked_until[key] = now + self.policy.lockout_s
                times.clear()  # after the lock the key starts afresh
                locked.append(kind)
        factor = min(2 ** (max(counts) - 1), MAX_DELAY_FACTOR)
        return Failure(self.policy.first_delay_s * factor, tuple(locked))

    def succeeded(self, address: str) -> None:
        """A right password forgets the address's earlier typos (the IP's count stays)."""
        self._failures.pop(_addr(address), None)

    def prune(self) -> None:
        now = self.clock()
        for key, times in list(self._failures.items()):
            if not times or times[-1] <= now - self.policy.window_s:
                del self._failures[key]
        for key, until in list(self._locked_until.items()):
            if until <= now:
                del self._locked_until[key]

    def __len__(self) -> int:
        return len(self._failures) + len(self._locked_until)


def _addr(address: str) -> str:
    return "addr:" + address.strip().lower()


def _ip(ip: str) -> str:
    return "ip:" + ip_key(ip)
