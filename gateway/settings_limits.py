"""[inbound] abuse limits and [inbound.rate_limits] -> frozen InboundLimits (issue 11)."""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.settings import _Reader

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

KEYS = {"max_connections", "max_connections_per_ip", "session_timeout_s", "data_timeout_s",
        "max_recipients", "max_commands", "max_mails_per_connection", "limits_exempt_ips",
        "rate_limits"}
RATE_KEYS = {"window_s", "per_sender", "per_domain", "per_ip", "sync_interval_s"}
LOOPBACK = ("127.0.0.0/8", "::1/128")


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Mails per sliding window, summed over every instance on the database; 0 is off."""

    window_s: int = 600
    per_sender: int = 30
    per_domain: int = 300
    per_ip: int = 600
    sync_interval_s: int = 1  # how often counts go to the shared table and sums come back


@dataclass(frozen=True, slots=True)
class InboundLimits:
    """What one client may hold or send on the inbound port; 0 is off where it says so."""

    max_connections: int = 500  # open at once in this process (0: off)
    max_connections_per_ip: int = 20  # open at once from one client address (0: off)
    session_timeout_s: int = 300  # idle time between commands (RFC 5321 4.5.3.2.7)
    data_timeout_s: int = 600  # 354 to final dot, whole (RFC 5321 4.5.3.2.6)
    max_recipients: int = 100  # per transaction (RFC 5321 4.5.3.1.8 asks for at least 100)
    max_commands: int = 100  # each command other than MAIL/RCPT/DATA/RSET, per connection
    max_mails_per_connection: int = 1000  # MAIL, DATA and RSET each, per connection
    # Clients exempt from the per-IP limits: the MTA that forwards everyone's mail.
    exempt_ips: tuple[IpNetwork, ...] = tuple(ipaddress.ip_network(n) for n in LOOPBACK)
    rates: RateLimits = RateLimits()

    def exempt(self, ip: str | None) -> bool:
        return ip is None or _in_networks(ip, self.exempt_ips)

    def command_call_limit(self) -> dict[str, int]:
        """aiosmtpd's per-connection command budgets ("*": every other command)."""
        mails = self.max_mails_per_connection
        return {"*": self.max_commands, "MAIL": mails, "DATA": mails, "RSET": mails,
                "RCPT": mails * max(1, self.max_recipients)}


@functools.lru_cache(maxsize=4096)
def _in_networks(ip: str, networks: tuple[IpNetwork, ...]) -> bool:
    address = ipaddress.ip_address(ip)
    return any(address in network for network in networks)


def _count(r: _Reader, table: dict[str, Any], key: str, prefix: str, default: int,
           least: int = 0) -> int:
    value = r.get(table, key, prefix, int, default)
    if value < least:
        r.fail(f"{prefix}.{key}", f"must be at least {least}, not {value}")
        return default
    return int(value)


def _networks(r: _Reader, values: list[Any]) -> tuple[IpNetwork, ...]:
    networks = []
    for i, value in enumerate(values):
        try:
            networks.append(ipaddress.ip_network(str(value), strict=False))
        except ValueError:
            r.fail(f"inbound.limits_exempt_ips[{i}]", f"{value!r} is not an IP address or network")
    return tuple(networks)


def parse_inbound_limits(r: _Reader, inbound: dict[str, Any]) -> InboundLimits:
    rates = r.get(inbound, "rate_limits", "inbound", dict, {})
    r.unknown(rates, RATE_KEYS, "inbound.rate_limits")
    p = "inbound.rate_limits"
    rate_limits = RateLimits(
        window_s=_count(r, rates, "window_s", p, 600, least=1),
        per_sender=_count(r, rates, "per_sender", p, 30),
        per_domain=_count(r, rates, "per_domain", p, 300),
        per_ip=_count(r, rates, "per_ip", p, 600),
        sync_interval_s=_count(r, rates, "sync_interval_s", p, 1, least=1),
    )
    p = "inbound"
    exempt = r.get(inbound, "limits_exempt_ips", p, list, list(LOOPBACK))
    return InboundLimits(
        max_connections=_count(r, inbound, "max_connections", p, 500),
        max_connections_per_ip=_count(r, inbound, "max_connections_per_ip", p, 20),
        session_timeout_s=_count(r, inbound, "session_timeout_s", p, 300, least=1),
        data_timeout_s=_count(r, inbound, "data_timeout_s", p, 600, least=1),
        max_recipients=_count(r, inbound, "max_recipients", p, 100, least=1),
        max_commands=_count(r, inbound, "max_commands", p, 100, least=1),
        max_mails_per_connection=_count(r, inbound, "max_mails_per_connection", p, 1000,
                                        least=1),
        exempt_ips=_networks(r, exempt),
        rates=rate_limits,
    )
