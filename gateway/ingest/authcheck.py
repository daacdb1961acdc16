"""Sender authentication of inbound mail: DKIM, SPF, DMARC, trusted forwarders, ARC (DESIGN 4).

The verdict decides whether a mail may thread by sender or subject tag. DNS goes through one
resolver under a per-mail time budget and runs in a worker thread: a slow or dead resolver
costs a mail at most the budget and never blocks the event loop. A failure to look something
up gives temperror (verdict unknown), never a refused or delayed-forever mail.

The signatures of a big mail are checked in the parser process (gateway/ingest/offload.py),
on keys looked up here first: dkimpy canonicalizes the whole body with regular expressions
that hold the GIL, and a thread would stall the loop (measured, 10 MiB signed
relaxed/relaxed: 0.5 s of CPU, the loop stalled for up to 195 ms).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache, lru_cache, partial
from typing import Any, Protocol

import authres
import authres.arc
import authres.dmarc
import dkim
import dkim.util
import dns.exception
import dns.resolver
import spf
import structlog
from publicsuffixlist import PublicSuffixList

from gateway.ingest.identify import auth_verdict, normalize_address
from gateway.ingest.model import Envelope, ParsedMail
from gateway.ingest.offload import BIG_MAIL_BYTES, in_process

log = structlog.get_logger("deskgate.auth")

MODES = ("off", "record", "enforce")
MAX_SIGNATURES = 5  # DKIM signatures checked per mail; each may cost a DNS lookup
MAX_KEYS = 2 * MAX_SIGNATURES + 2  # keys looked up ahead for a big mail (DKIM and ARC)
_AR = authres.all_features()
_DKIM_LOG = logging.getLogger("deskgate.dkimpy")  # dkimpy logs every bad signature as error
_DKIM_LOG.addHandler(logging.NullHandler())
_DKIM_LOG.propagate = False


# --- configuration ([inbound] trusted_forwarders, [inbound.authentication]) -----------------

@dataclass(frozen=True, slots=True)
class TrustedForwarder:
    """The company's MTA: mail from `network` carries its verdict under `authserv_id`."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    authserv_id: str


@dataclass(frozen=True, slots=True)
class AuthSettings:
    mode: str = "enforce"  # off | record | enforce
    forwarders: tuple[TrustedForwarder, ...] = ()
    dns_timeout_s: float = 2.0  # all lookups of one mail together
    dns_cache_s: int = 300  # longest time a DNS answer is reused (0: no cache)


AUTH_KEYS = {"mode", "dns_timeout_s", "dns_cache_s"}
AUTH_INBOUND_KEYS = {"authentication", "trusted_forwarders"}  # keys of [inbound]


def parse_auth_settings(r: Any, inbound: dict[str, Any]) -> AuthSettings:
    """`r` is settings._Reader: every problem is named with its key and line."""
    table = r.get(inbound, "authentication", "inbound", dict, {})
    r.unknown(table, AUTH_KEYS, "inbound.authentication")
    mode = r.get(table, "mode", "inbound.authentication", str, "enforce")
    if mode not in MODES:
        r.fail("inbound.authentication.mode", f"must be one of {', '.join(MODES)}, not {mode!r}")
    timeout = r.get(table, "dns_timeout_s", "inbound.authentication", object, 2.0)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 30:
        r.fail("inbound.authentication.dns_timeout_s", f"must be in (0, 30], not {timeout!r}")
        timeout = 2.0
    cache_s = r.get(table, "dns_cache_s", "inbound.authentication", int, 300)
    if cache_s < 0:
        r.fail("inbound.authentication.dns_cache_s", "must be 0 or more")
    legacy = inbound.get("trusted_authserv_ids")
    if isinstance(legacy, list) and legacy:  # trusted from any peer, so forgeable: migrate
        r.fail("inbound.trusted_authserv_ids", "was replaced by inbound.trusted_forwarders = "
               '[{ip = "<forwarder IP or CIDR>", authserv_id = "<its authserv-id>"}]: a header '
               "is trusted only on mail that came from that forwarder's address")
    forwarders = []
    for i, entry in enumerate(r.get(inbound, "trusted_forwarders", "inbound", list, [])):
        dotted = f"inbound.trusted_forwarders[{i}]"
        if not isinstance(entry, dict):
            r.fail(dotted, 'must be a table like {ip = "10.0.0.0/8", authserv_id = "mx.acme.com"}')
            continue
        r.unknown(entry, {"ip", "authserv_id"}, dotted)
        ip = r.get(entry, "ip", dotted, str, "")
        authserv_id = r.get(entry, "authserv_id", dotted, str, "").strip().lower()
        try:
            network = ipaddress.ip_network(ip, strict=False)
        except ValueError:
            r.fail(f"{dotted}.ip", f"must be an IP address or CIDR network, not {ip!r}")
            continue
        if not authserv_id or any(c.isspace() or c == ";" for c in authserv_id):
            r.fail(f"{dotted}.authserv_id", "must name the forwarder's authserv-id "
                   "(the first word of its Authentication-Results header)")
            continue
        forwarders.append(TrustedForwarder(network, authserv_id))
    return AuthSettings(mode, tuple(forwarders), float(timeout), cache_s)


# --- DNS: one resolver abstraction, a per-mail budget, the libraries' hooks --------------------

class DnsTempError(Exception):
    """No answer in time (or no resolver): the result is temperror, not fail."""


class Resolver(Protocol):
    def query(self, name: str, qtype: str, timeout: float) -> list[Any]:
        """TXT -> bytes; A/AAAA -> str; MX -> (preference, host); PTR -> host. [] when the
        name or record does not exist; DnsTempError when nobody answered in `timeout`."""
        ...


def _rdata(qtype: str, rdata: Any) -> Any:
    if qtype in ("TXT", "SPF"):
        return b"".join(rdata.strings)
    if qtype == "MX":
        return (rdata.preference, rdata.exchange.to_text(True))
    if qtype == "PTR":
        return rdata.target.to_text(True)
    return rdata.address


@dataclass(slots=True)
class DnsHealth:
    """Whether the machine's resolver answers: one per process by default, as every checker
    (a reload, several pipelines) asks the same resolver."""

    timeouts: int = 0  # in a row
    down_until: float = 0.0


_HEALTH = DnsHealth()


class LiveResolver:
    """dnspython with a small TTL cache. When the resolver itself seems gone (several timeouts
    in a row) it backs off for a while, answering from stale cache or failing at once."""

    BACKOFF_AFTER = 3  # consecutive timeouts
    BACKOFF_S = 30.0
    NEGATIVE_TTL_S = 60
    STALE_S = 86400  # RFC 8767 serve-stale: an old answer beats none while DNS is down
    MAX_ENTRIES = 10000

    def __init__(self, cache_s: int = 300, health: DnsHealth | None = None) -> None:
        self.cache_s = cache_s
        self.health = health or _HEALTH
        self._cache: dict[tuple[str, str], tuple[float, list[Any]]] = {}
        self._lock = threading.Lock()
        try:
            self._resolver: dns.resolver.Resolver | None = dns.resolver.Resolver()
        except dns.exception.DNSException as exc:  # no /etc/resolv.conf: every check temperror
            log.warning("auth.no_resolver", error=type(exc).__name__)
            self._resolver = None

    def query(self, name: str, qtype: str, timeout: float) -> list[Any]:
        key = (name.lower().rstrip("."), qtype)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            values, ttl = self._ask(key, timeout, now)
        except DnsTempError:
            if cached is not None and cached[0] + self.STALE_S > now:
                return cached[1]
            raise
        if self.cache_s:
            with self._lock:
                if len(self._cache) >= self.MAX_ENTRIES:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[key] = (now + min(ttl, self.cache_s), values)
        return values

    def cached(self, name: str, qtype: str) -> list[Any] | None:
        """A fresh answer from the cache, or None: never asks the network."""
        entry = self._cache.get((name.lower().rstrip("."), qtype))
        return entry[1] if entry is not None and entry[0] > time.monotonic() else None

    def _ask(self, key: tuple[str, str], timeout: float, now: float) -> tuple[list[Any], int]:
        if self._resolver is None:
            raise DnsTempError("no DNS resolver configured")
        if now < self.health.down_until:
            raise DnsTempError("DNS resolver unreachable; backing off")
        if timeout <= 0:
            raise DnsTempError("DNS time budget spent")
        try:
            answer = self._resolver.resolve(key[0] + ".", key[1], lifetime=timeout,
                                            search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            self.health.timeouts = 0
            return [], self.NEGATIVE_TTL_S
        except dns.exception.Timeout as exc:
            self.health.timeouts += 1
            if self.health.timeouts >= self.BACKOFF_AFTER:
                self.health.timeouts = 0
                self.health.down_until = time.monotonic() + self.BACKOFF_S
                log.warning("auth.dns_unreachable", backoff_s=self.BACKOFF_S)
            raise DnsTempError(f"timeout: {key[0]} {key[1]}") from exc
        except dns.exception.DNSException as exc:  # SERVFAIL everywhere, bad name, ...
            raise DnsTempError(f"{type(exc).__name__}: {key[0]} {key[1]}") from exc
        self.health.timeouts = 0
        rrset = answer.rrset
        if rrset is None:
            return [], self.NEGATIVE_TTL_S
        return [_rdata(key[1], r) for r in rrset], rrset.ttl


class TableResolver:
    """A local DNS table (tests, benchmarks, offline checks): name -> TXT records; other types
    in `records` as (name, qtype) -> values; names in `timeouts` never answer."""

    def __init__(self, txt: Mapping[str, Sequence[str | bytes]] | None = None,
                 records: Mapping[tuple[str, str], Sequence[Any]] | None = None,
                 timeouts: Collection[str] = ()) -> None:
        self.table: dict[tuple[str, str], list[Any]] = {
            (n.lower().rstrip("."), "TXT"): [v.encode() if isinstance(v, str) else v for v in vs]
            for n, vs in (txt or {}).items()}
        self.table.update({(n.lower().rstrip("."), t): list(vs)
                           for (n, t), vs in (records or {}).items()})
        self.timeouts = {t.lower().rstrip(".") for t in timeouts}
        self.queries: list[tuple[str, str]] = []

    def query(self, name: str, qtype: str, timeout: float) -> list[Any]:
        name = name.lower().rstrip(".")
        self.queries.append((name, qtype))
        if name in self.timeouts or timeout <= 0:
            raise DnsTempError(f"timeout: {name} {qtype}")
        return list(self.table.get((name, qtype), []))

    def cached(self, name: str, qtype: str) -> list[Any] | None:
        """The table is at hand, as a cache is: only the names that never answer are not."""
        if name.lower().rstrip(".") in self.timeouts:
            return None
        return self.query(name, qtype, timeout=1.0)


class _CachedOnly:
    """The resolver's fresh answers and nothing more: a check on the event loop never waits
    for the network through it. A check that needed more notes it, and runs again in a
    thread (AuthChecker.check)."""

    def __init__(self, cached: Callable[[str, str], list[Any] | None]) -> None:
        self._cached = cached
        self.missed = False

    def query(self, name: str, qtype: str, timeout: float) -> list[Any]:
        values = self._cached(name, qtype)
        if values is None:
            self.missed = True
            raise DnsTempError(f"not cached: {name} {qtype}")
        return values


class _Lookup:
    """One mail's view of the resolver: a shared deadline, and a note of what failed."""

    PER_QUERY_S = 1.5

    def __init__(self, resolver: Resolver, budget_s: float) -> None:
        self.resolver = resolver
        self.deadline = time.monotonic() + budget_s
        self.failures: list[str] = []

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def query(self, name: str, qtype: str) -> list[Any]:
        try:
            return self.resolver.query(name, qtype, min(self.remaining(), self.PER_QUERY_S))
        except DnsTempError as exc:
            self.failures.append(str(exc))
            raise

    def txt(self, name: str) -> list[bytes]:
        return [v for v in self.query(name, "TXT") if isinstance(v, bytes)]

    def dkim_txt(self, name: bytes, timeout: float = 5) -> bytes | None:
        """dkimpy's `dnsfunc` hook."""
        try:
            answers = self.txt(name.decode("ascii", "replace"))
        except DnsTempError as exc:
            raise dkim.DnsTimeoutError(str(exc)) from None
        return answers[0] if answers else None


# pyspf has no per-call resolver: its hook is the module-level spf.DNSLookup. Ours sends each
# lookup to the _Lookup of the check running in this thread.
_current = threading.local()
_pyspf_lookup = spf.DNSLookup


def _spf_dns(name: str, qtype: str, strict: Any = True, timeout: Any = None) -> list[Any]:
    lookup: _Lookup | None = getattr(_current, "lookup", None)
    if lookup is None:
        return _pyspf_lookup(name, qtype, strict, timeout)  # someone else's use of pyspf
    try:
        values = lookup.query(name, qtype)
    except DnsTempError as exc:
        raise spf.TempError(f"DNS {exc}") from None
    if qtype in ("TXT", "SPF"):
        return [((name, qtype), (v,)) for v in values]
    return [((name, qtype), v) for v in values]


spf.DNSLookup = _spf_dns


# --- DMARC (RFC 7489) --------------------------------------------------------------------

@cache
def _psl() -> PublicSuffixList:
    return PublicSuffixList()  # the list ships inside the package: no download at run time


def org_domain(domain: str) -> str:
    """Organizational domain (RFC 7489 3.2): one label below the public suffix."""
    domain = domain.lower().rstrip(".")
    return _psl().privatesuffix(domain) or domain


def aligned(domain: str | None, from_domain: str, strict: bool) -> bool:
    if not domain:
        return False
    domain = domain.lower().rstrip(".")
    return domain == from_domain if strict else org_domain(domain) == org_domain(from_domain)


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    policy: str  # none | quarantine | reject
    strict_dkim: bool
    strict_spf: bool


_TAG = re.compile(r"\s*([a-z]+)\s*=\s*([^;]*)", re.IGNORECASE)


def parse_dmarc(text: bytes) -> DmarcRecord | None:
    """A `v=DMARC1` record, or None when it is not one (RFC 7489 6.6.3: then no policy)."""
    tags = {m.group(1).lower(): m.group(2).strip().lower()
            for m in _TAG.finditer(text.decode("ascii", "replace"))}
    if tags.get("v") != "dmarc1":
        return None
    policy = tags.get("p", "")
    if policy not in ("none", "quarantine", "reject"):
        policy = "none" if "rua" in tags else ""  # 6.6.3: a bad p= with rua counts as none
    if not policy:
        return None
    return DmarcRecord(policy, tags.get("adkim") == "s", tags.get("aspf") == "s")


def find_dmarc(lookup: _Lookup, from_domain: str) -> DmarcRecord | None:
    """The From domain's record, else the organizational domain's (sp= is not needed: only
    pass/fail matters to us, not the owner's requested disposition)."""
    for name in dict.fromkeys((from_domain, org_domain(from_domain))):
        records = [r for r in lookup.txt(f"_dmarc.{name}") if r[:8].lower() == b"v=dmarc1"]
        if len(records) == 1 and (record := parse_dmarc(records[0])) is not None:
            return record
        if records:
            return None
    return None


# --- the checks ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Dkim:
    result: str  # pass | fail | permerror | temperror
    domain: str
    selector: str


@dataclass(frozen=True, slots=True)
class AuthOutcome:
    """What the pipeline takes: the verdict threading uses and the header that is stored."""

    authenticated: bool | None
    header: str | None  # an Authentication-Results value, ours
    source: str  # off | own | forwarder:<authserv-id> | arc:<authserv-id>
    detail: dict[str, Any] = field(default_factory=dict)


IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_HOPS = 10
# Postfix/Sendmail "from helo (rdns [192.0.2.1])", Exim "from rdns ([192.0.2.1] helo=x)",
# "from [192.0.2.1] (helo=x)"; IPv6 as [IPv6:2001:db8::1] or [2001:db8::1].
_RECEIVED = re.compile(r"^\s*from\s+(\S+)(.*?)(?:\sby\s|;|$)", re.IGNORECASE | re.DOTALL)
_BRACKETED = re.compile(r"\[(?:ipv6:)?([0-9a-f:.]+)\]", re.IGNORECASE)
_EXIM_HELO = re.compile(r"helo=([^\s)]+)", re.IGNORECASE)


def received_from(value: str) -> tuple[IpAddress | None, str]:
    """Client IP and HELO name of one Received header's from-clause (RFC 5321 4.4)."""
    match = _RECEIVED.match(value)
    if match is None:
        return None, ""
    first, rest = match.group(1), match.group(2)
    address = _BRACKETED.search(first + rest)
    try:
        ip = ipaddress.ip_address(address.group(1)) if address else None
    except ValueError:
        ip = None
    helo = _EXIM_HELO.search(rest)
    name = helo.group(1) if helo else "" if first.startswith("[") else first
    return ip, name.strip("[]()")


def peer_ip(peer: str) -> IpAddress | None:
    """The adapters' "ip:port" peer (or a bare address)."""
    for host in (peer.rpartition(":")[0], peer):
        if (ip := _address(host.strip("[]"))) is not None:
            return ip
    return None


@lru_cache(maxsize=4096)
def _address(host: str) -> IpAddress | None:
    """Parsed once per client address, not twice per mail (~6 µs each, issue 10)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _header_block(raw: bytes) -> bytes:
    """The header section, without copying the body (a split would: 50 MB for a 50 MB mail)."""
    end = raw.find(b"\r\n\r\n")
    end = len(raw) if end < 0 else end
    bare = raw.find(b"\n\n", 0, end)
    return raw[:bare if bare >= 0 else end]


def check_dkim(raw: bytes, lookup: _Lookup | _KeyTable) -> list[Dkim]:
    signatures = len(re.findall(rb"(?im)^dkim-signature\s*:", _header_block(raw)))
    if not signatures:
        return []
    try:
        verifier = dkim.DKIM(raw, logger=_DKIM_LOG, minkey=1024)
    except Exception:  # noqa: BLE001 — dkimpy's header parser raises IndexError on junk
        return [Dkim("permerror", "", "")]
    results = []
    for index in range(min(signatures, MAX_SIGNATURES)):
        failed_before = len(lookup.failures)
        verifier.domain, verifier.selector = None, ""
        try:
            ok = verifier.verify(index, dnsfunc=lookup.dkim_txt)
            result = "pass" if ok else "temperror" if len(lookup.failures) > failed_before \
                else "fail"
        except dkim.ValidationError:  # body hash mismatch, expired, bad tags
            result = "fail"
        except Exception:  # noqa: BLE001 — unreadable signature, key or message
            result = "permerror"
        domain = (verifier.domain or b"").decode("ascii", "replace").lower()
        selector = verifier.selector
        results.append(Dkim(result, domain, selector.decode("ascii", "replace")
                            if isinstance(selector, bytes) else ""))
    return results


def check_arc(raw: bytes, lookup: _Lookup | _KeyTable) -> str:
    try:
        cv, _, _ = dkim.arc_verify(raw, logger=_DKIM_LOG, dnsfunc=lookup.dkim_txt)
    except Exception:  # noqa: BLE001 — dkimpy raises more than DKIMException on junk
        return "fail"
    return {dkim.CV_Pass: "pass", dkim.CV_Fail: "fail"}.get(cv, "none")


_SIGNATURE_FIELDS = re.compile(
    rb"(?im)^(?:dkim-signature|arc-message-signature|arc-seal)[ \t]*:(.*(?:\r?\n[ \t].*)*)")


def key_names(raw: bytes) -> list[bytes]:
    """The DNS names of the keys the header's signatures and seals name (s= and d=), formed
    as dkimpy forms them; a field dkimpy cannot read either is left to its own verdict."""
    names: list[bytes] = []
    for match in _SIGNATURE_FIELDS.finditer(_header_block(raw)):
        try:
            tags = dkim.util.parse_tag_value(match.group(1))
        except Exception:  # noqa: BLE001 — junk: dkimpy answers permerror for it
            continue
        selector, domain = tags.get(b"s"), tags.get(b"d")
        if selector and domain:
            name = selector + b"._domainkey." + domain + b"."
            if name not in names:
                names.append(name)
    return names[:MAX_KEYS]


@dataclass(frozen=True, slots=True)
class Keys:
    """Key records looked up in the serving process, for checking in the parser process."""

    records: dict[bytes, bytes | None]  # name -> the TXT record, None: no such record
    failed: dict[bytes, str]  # name -> why it could not be looked up (temperror)


class _KeyTable:
    """dkimpy's dnsfunc over Keys. A name nobody looked up is noted in `missing` and answers
    temperror; the serving process looks it up and asks again (AuthChecker._signatures)."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self.failures: list[str] = []
        self.missing: list[bytes] = []

    def dkim_txt(self, name: bytes, timeout: float = 5) -> bytes | None:
        if name in self.keys.records:
            return self.keys.records[name]
        failure = self.keys.failed.get(name)
        if failure is None:
            self.missing.append(name)
            failure = f"not looked up: {name.decode('ascii', 'replace')}"
        self.failures.append(failure)
        raise dkim.DnsTimeoutError(failure)


@dataclass(frozen=True, slots=True)
class Signatures:
    dkims: list[Dkim]
    arc: str | None  # None: no ARC chain to check
    missing: list[bytes] = field(default_factory=list)  # names to look up and check again


def check_signatures(keys: Keys, arc: bool, raw: bytes) -> Signatures:
    """DKIM (and ARC) over keys looked up beforehand: what runs in the parser process."""
    table = _KeyTable(keys)
    dkims = check_dkim(raw, table)
    return Signatures(dkims, check_arc(raw, table) if arc else None, table.missing)


def check_spf(ip: str, mail_from: str, helo: str, lookup: _Lookup) -> str:
    if not mail_from and not helo:
        return "none"
    remaining = lookup.remaining()
    if remaining <= 0:
        return "temperror"
    _current.lookup = lookup
    try:
        result, _ = spf.check2(i=ip, s=mail_from, h=helo, querytime=remaining)
    except Exception:  # noqa: BLE001 — pyspf on a sender it cannot read (RFC 7208 2.6.7)
        return "permerror"
    finally:
        _current.lookup = None
    return str(result)


def _results_of(value: str) -> list[Any]:
    """An A-R header value, parsed (RFC 8601); a value authres cannot read counts as empty."""
    try:
        return list(_AR.parse_value(value).results)
    except authres.AuthResError:
        return []


def _authserv_id(value: str) -> str:
    first = value.split(";", 1)[0].strip().split()
    return first[0].lower() if first else ""


def header_verdict(results: Sequence[Any], from_domain: str) -> bool | None:
    """The policy applied to someone else's A-R results (a trusted forwarder's)."""
    by_method: dict[str, list[Any]] = {}
    for result in results:
        by_method.setdefault(str(result.method).lower(), []).append(result)
    dmarc = by_method.get("dmarc", [None])[0]
    spf_result = by_method.get("spf", [None])[0]
    aligned_pass = any(
        str(r.result).lower() == "pass" and aligned(getattr(r, "header_d", None), from_domain,
                                                    False) for r in by_method.get("dkim", []))
    if spf_result is not None and str(spf_result.result).lower() == "pass":
        mailfrom = str(getattr(spf_result, "smtp_mailfrom", "") or "")
        aligned_pass |= aligned(mailfrom.rpartition("@")[2], from_domain, False)
    return auth_verdict(str(dmarc.result).lower() if dmarc is not None else None,
                        str(spf_result.result).lower() if spf_result is not None else None,
                        aligned_pass)


class AuthChecker:
    """Checks one mail at a time; safe to call from several threads at once."""

    def __init__(self, config: AuthSettings, authserv_id: str,
                 resolver: Resolver | None = None) -> None:
        self.config = config
        self.authserv_id = authserv_id
        self.resolver: Resolver = resolver or LiveResolver(config.dns_cache_s)

    async def check(self, raw: bytes, mail: ParsedMail, envelope: Envelope) -> AuthOutcome:
        if self.config.mode == "off":
            return AuthOutcome(None, mail.header("authentication-results"), "off")
        if len(raw) > BIG_MAIL_BYTES and (names := key_names(raw)):
            lookup = _Lookup(self.resolver, self.config.dns_timeout_s)
            signatures = await self._signatures(raw, mail, names, lookup)
            return await asyncio.to_thread(self.check_sync, raw, mail, envelope,
                                           (lookup, signatures))
        cached = getattr(self.resolver, "cached", None)
        if cached is not None and len(raw) <= BIG_MAIL_BYTES:
            # Under load every name a mail needs is nearly always in the cache: the check is
            # then ~0.3 ms of CPU, less than a thread's round trip, whose return waits for the
            # GIL while the loop is busy (60-130 ms traced beside big mails, bench/run.py).
            only = _CachedOnly(cached)
            outcome = self._timed(raw, mail, envelope, None, only)
            if not only.missed:
                return self._finish(outcome, mail, envelope)
        return await asyncio.to_thread(self.check_sync, raw, mail, envelope)

    async def _signatures(self, raw: bytes, mail: ParsedMail, names: list[bytes],
                          lookup: _Lookup) -> Signatures:
        """A big mail's DKIM and ARC in the parser process, on keys looked up here first."""
        records: dict[bytes, bytes | None] = {}
        failed: dict[bytes, str] = {}
        arc = mail.header("arc-seal") is not None
        for _ in range(2):  # a name the header parse missed is looked up, then checked again
            await asyncio.to_thread(self._look_up, names, lookup, records, failed)
            signatures = await in_process(
                partial(check_signatures, Keys(dict(records), dict(failed)), arc), raw)
            names = [n for n in signatures.missing if n not in records and n not in failed]
            if not names:
                break
        return signatures

    @staticmethod
    def _look_up(names: list[bytes], lookup: _Lookup, records: dict[bytes, bytes | None],
                 failed: dict[bytes, str]) -> None:
        for name in names:
            try:
                records[name] = lookup.dkim_txt(name)
            except dkim.DnsTimeoutError as exc:
                failed[name] = str(exc)

    def check_sync(self, raw: bytes, mail: ParsedMail, envelope: Envelope,
                   checked: tuple[_Lookup, Signatures] | None = None) -> AuthOutcome:
        """checked: the lookup that fetched a big mail's keys and the signatures checked on
        them elsewhere (its DNS budget goes on here)."""
        return self._finish(self._timed(raw, mail, envelope, checked, self.resolver), mail,
                            envelope)

    def _timed(self, raw: bytes, mail: ParsedMail, envelope: Envelope,
               checked: tuple[_Lookup, Signatures] | None, resolver: Resolver) -> AuthOutcome:
        started = time.perf_counter()
        try:
            outcome = self._check(raw, mail, envelope, checked, resolver)
        except Exception as exc:  # noqa: BLE001 — a bug here must not cost the customer's mail
            log.exception("auth.check_failed", error=type(exc).__name__, peer=envelope.peer)
            outcome = AuthOutcome(None, f"{self.authserv_id}; none (check failed)", "own")
        outcome.detail["ms"] = round((time.perf_counter() - started) * 1000, 2)
        return outcome

    def _finish(self, outcome: AuthOutcome, mail: ParsedMail, envelope: Envelope
                ) -> AuthOutcome:
        if outcome.authenticated is False:  # explains a subject tag ignored later
            log.info("auth.failed", peer=envelope.peer, message_id=mail.message_id,
                     source=outcome.source, from_domain=outcome.detail.get("from_domain"),
                     enforced=self.config.mode == "enforce")
        if self.config.mode == "record":
            outcome = AuthOutcome(None, outcome.header, outcome.source, outcome.detail)
        return outcome

    def forwarder(self, peer: str) -> TrustedForwarder | None:
        ip = peer_ip(peer)
        return next((f for f in self.config.forwarders
                     if ip is not None and ip.version == f.network.version
                     and ip in f.network), None)

    def _check(self, raw: bytes, mail: ParsedMail, envelope: Envelope,
               checked: tuple[_Lookup, Signatures] | None, resolver: Resolver) -> AuthOutcome:
        sender = normalize_address(mail.from_addr)
        from_domain = sender.rsplit("@", 1)[1] if sender else ""
        if checked is not None:
            lookup, signatures = checked
            dkims, arc = signatures.dkims, signatures.arc
        else:
            lookup = _Lookup(resolver, self.config.dns_timeout_s)
            dkims = check_dkim(raw, lookup)
            arc = check_arc(raw, lookup) if mail.header("arc-seal") is not None else None
        forwarder = self.forwarder(envelope.peer)
        if forwarder is not None:
            trusted = self._forwarder_results(mail, forwarder.authserv_id, arc)
            if trusted is not None:
                source, results = trusted
                return self._outcome(header_verdict(results, from_domain), source, dkims, arc,
                                     results, from_domain)
        # Our peer is the sender's MTA, or (behind a forwarder without its own verdict) the
        # client the forwarder recorded in its Received header.
        ip, helo = ((peer_ip(envelope.peer), envelope.helo) if forwarder is None
                    else self.origin(mail))
        # The null reverse-path comes as "<>" from SMTP and "" from other channels: SPF then
        # checks postmaster@ the HELO name (RFC 7208 2.4).
        mail_from = "" if envelope.mail_from == "<>" else envelope.mail_from or ""
        spf_result = check_spf(str(ip), mail_from, helo, lookup) if ip is not None else "none"
        spf_domain = (mail_from.rpartition("@")[2] or helo).lower()
        dmarc, policy = self._dmarc(lookup, from_domain, dkims, spf_result, spf_domain)
        aligned_pass = any(d.result == "pass" and aligned(d.domain, from_domain, False)
                           for d in dkims) or (spf_result == "pass"
                                               and aligned(spf_domain, from_domain, False))
        verdict = auth_verdict(dmarc, spf_result, aligned_pass, spf_checked=ip is not None)
        results: list[Any] = [
            authres.SPFAuthenticationResult(
                result=spf_result, smtp_mailfrom=mail_from or None,
                smtp_helo=(helo or None) if not mail_from else None)
            if ip is not None else authres.SPFAuthenticationResult(
                result="none", result_comment="no client IP to check"),
            authres.dmarc.DMARCAuthenticationResult(
                result=dmarc, header_from=from_domain or None, policy=policy)]
        return self._outcome(verdict, "own", dkims, arc, results, from_domain,
                             lookup.failures)

    def origin(self, mail: ParsedMail) -> tuple[IpAddress | None, str]:
        """The first client outside our forwarders, from the Received headers they added
        (topmost first; below the first untrusted hop anything may be forged)."""
        for value in mail.header_all("received")[:MAX_HOPS]:
            ip, helo = received_from(value)
            if ip is None:
                return None, ""
            if not any(ip.version == f.network.version and ip in f.network
                       for f in self.config.forwarders):
                return ip, helo
        return None, ""

    def _dmarc(self, lookup: _Lookup, from_domain: str, dkims: list[Dkim], spf_result: str,
               spf_domain: str) -> tuple[str, str | None]:
        if not from_domain:
            return "none", None
        try:
            record = find_dmarc(lookup, from_domain)
        except DnsTempError:
            return "temperror", None
        if record is None:
            return "none", None
        passed = any(d.result == "pass" and aligned(d.domain, from_domain, record.strict_dkim)
                     for d in dkims) or (spf_result == "pass" and aligned(
                         spf_domain, from_domain, record.strict_spf))
        return ("pass" if passed else "fail"), record.policy

    def _forwarder_results(self, mail: ParsedMail, authserv_id: str, arc: str | None
                           ) -> tuple[str, list[Any]] | None:
        """The topmost A-R the forwarder added (RFC 8601 5: the nearest one is ours to trust;
        any below it may be forged), else its ARC-Authentication-Results if the chain holds."""
        for value in mail.header_all("authentication-results"):
            if _authserv_id(value) == authserv_id:
                return f"forwarder:{authserv_id}", _results_of(value)
        if arc != "pass":
            return None
        for value in mail.header_all("arc-authentication-results"):
            instance, _, rest = value.partition(";")  # "i=2; mx.acme.com; dkim=pass ..."
            if instance.strip().lower().startswith("i=") and _authserv_id(rest) == authserv_id:
                return f"arc:{authserv_id}", _results_of(rest)
        return None

    def _outcome(self, verdict: bool | None, source: str, dkims: list[Dkim], arc: str | None,
                 results: list[Any], from_domain: str, failures: Sequence[str] = ()
                 ) -> AuthOutcome:
        ours: list[Any] = [authres.DKIMAuthenticationResult(
            result=d.result, header_d=d.domain or None, header_s=d.selector or None)
            for d in dkims] or [authres.DKIMAuthenticationResult(result="none")]
        if source != "own":  # the forwarder's SPF and DMARC, marked as theirs
            results = [r for r in results if str(r.method).lower() in ("spf", "dmarc", "arc")]
            for result in results:
                result.result_comment = f"from {source.split(':', 1)[1]}"
        if arc is not None:
            ours.append(authres.arc.ARCAuthenticationResult(result=arc))
        header = _AR.header(authserv_id=self.authserv_id, results=ours + results)
        detail = {"from_domain": from_domain, "dns_failures": list(failures)[:5]}
        return AuthOutcome(verdict, header.header_value(), source, detail)
