"""Sender authentication: policy, DMARC, DKIM/SPF through the libraries' DNS hooks, forwarders,
ARC, the stored header, and the live resolver's budget against a real UDP DNS server."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import dkim
import dns.message
import dns.rcode
import dns.rrset
import pytest

from gateway.errors import ConfigError
from gateway.ingest import authcheck
from gateway.ingest.authcheck import (
    AuthChecker,
    AuthSettings,
    DnsHealth,
    DnsTempError,
    LiveResolver,
    TableResolver,
    TrustedForwarder,
    aligned,
    check_signatures,
    key_names,
    org_domain,
    parse_dmarc,
    peer_ip,
    received_from,
)
from gateway.ingest.identify import auth_verdict
from gateway.ingest.model import Envelope
from gateway.ingest.offload import BIG_MAIL_BYTES
from gateway.ingest.parse import parse
from gateway.outbound.dkim import DkimKey, Signer, generate
from gateway.settings import parse_settings
from tests.conftest import note_offloads, settings_text
from tests.mailbuild import make_mail

KEY = generate("rsa-sha256", 1024)
OTHER_KEY = generate("rsa-sha256", 1024)
SPF = "v=spf1 ip4:192.0.2.0/24 -all"


def table(**extra: list[str]) -> TableResolver:
    records = {"sel._domainkey.example.org": [KEY.dns_value],
               "sel._domainkey.evil.example": [OTHER_KEY.dns_value],
               "sel._domainkey.mail.example.org": [KEY.dns_value],
               "_dmarc.example.org": ["v=DMARC1; p=reject; rua=mailto:d@example.org"],
               "example.org": [SPF], "evil.example": ["v=spf1 ip4:198.51.100.0/24 -all"]}
    records.update({k.replace("__", "."): v for k, v in extra.items()})
    return TableResolver(records)


def signed(raw: bytes, domain: str = "example.org", key: bytes = KEY.private) -> bytes:
    return Signer([DkimKey(domain, "sel", "rsa-sha256", key)]).sign(raw, domain)


def envelope(peer: str = "127.0.0.1:40000", mail_from: str = "jess@example.org",
             helo: str = "") -> Envelope:
    return Envelope(mail_from, ("support@example.test",), peer, helo=helo)


def check(raw: bytes, resolver: TableResolver | None = None, peer: str = "127.0.0.1:40000",
          mail_from: str = "jess@example.org", helo: str = "", **settings: object):
    checker = AuthChecker(AuthSettings(**settings), "deskgate.test",  # type: ignore[arg-type]
                          resolver or table())
    return checker.check_sync(raw, parse(raw), envelope(peer, mail_from, helo))


async def check_async(raw: bytes, resolver: TableResolver | None = None,
                      peer: str = "127.0.0.1:40000", **settings: object):
    """The checker as the pipeline calls it (a big mail's signatures in the parser process)."""
    checker = AuthChecker(AuthSettings(**settings), "deskgate.test",  # type: ignore[arg-type]
                          resolver or table())
    return await checker.check(raw, parse(raw), envelope(peer))


FORWARDER = (TrustedForwarder(ipaddress.ip_network("10.0.0.0/8"), "mx.acme.com"),)


# --- the policy (pure) ---

@pytest.mark.parametrize(("dmarc", "spf", "aligned_pass", "spf_checked", "expected"), [
    ("pass", "fail", False, True, True),
    ("fail", "pass", True, True, False),  # DMARC wins (strict alignment failed, say)
    ("fail", "none", False, False, None),  # judged without SPF: unknown, not forged
    ("none", "fail", False, True, False),  # no DMARC: a hard SPF fail is a forgery
    ("none", "softfail", False, True, None),
    ("none", "fail", True, True, True),  # ... unless DKIM aligned and passed
    (None, "pass", True, True, True),
    ("temperror", "fail", False, True, None),  # DNS trouble never counts against a sender
    ("none", "none", False, True, None),  # most small senders: today's behaviour
])
def test_policy(dmarc: str | None, spf: str, aligned_pass: bool, spf_checked: bool,
                expected: bool | None) -> None:
    assert auth_verdict(dmarc, spf, aligned_pass, spf_checked) is expected


def test_dmarc_record_parsing() -> None:
    record = parse_dmarc(b"v=DMARC1; p=quarantine; adkim=s; rua=mailto:x@example.org")
    assert record is not None
    assert (record.policy, record.strict_dkim, record.strict_spf) == ("quarantine", True, False)
    assert parse_dmarc(b"v=spf1 -all") is None
    assert parse_dmarc(b"v=DMARC1; p=bogus") is None
    bad_p_with_rua = parse_dmarc(b"v=DMARC1; p=bogus; rua=mailto:x@example.org")
    assert bad_p_with_rua is not None and bad_p_with_rua.policy == "none"


def test_organizational_domain_and_alignment() -> None:
    assert org_domain("mail.example.co.uk") == "example.co.uk"
    assert org_domain("a.b.example.org") == "example.org"
    assert aligned("mail.example.org", "example.org", strict=False)
    assert not aligned("mail.example.org", "example.org", strict=True)
    assert not aligned("example.co.uk", "other.co.uk", strict=False)
    assert not aligned(None, "example.org", strict=False)


def test_peer_ip_from_the_adapters_peer_string() -> None:
    assert str(peer_ip("192.0.2.1:2525")) == "192.0.2.1"
    assert str(peer_ip("::1:2525")) == "::1"
    assert peer_ip("imap:support") is None
    assert peer_ip("") is None


# --- our own verdict ---

def test_valid_dkim_and_dmarc_pass() -> None:
    outcome = check(signed(make_mail()))
    assert outcome.authenticated is True
    assert outcome.header is not None and outcome.header.startswith("deskgate.test; ")
    assert "dkim=pass header.d=example.org header.s=sel" in outcome.header
    assert "dmarc=pass header.from=example.org policy.dmarc=reject" in outcome.header


def test_forged_from_fails_dmarc() -> None:
    outcome = check(make_mail())  # no signature, sent from an IP outside example.org's SPF
    assert outcome.authenticated is False
    assert outcome.header is not None
    assert "spf=fail smtp.mailfrom=jess@example.org" in outcome.header
    assert "dmarc=fail" in outcome.header


def test_spf_pass_from_a_listed_ip_passes_dmarc() -> None:
    outcome = check(make_mail(), peer="192.0.2.7:40000")
    assert outcome.authenticated is True
    assert "spf=pass" in (outcome.header or "")


def test_changed_body_fails_dkim() -> None:
    outcome = check(signed(make_mail()).replace(b"Hello", b"Hallo"))
    assert "dkim=fail" in (outcome.header or "")
    assert outcome.authenticated is False


def test_junk_dkimpy_cannot_read_is_permerror_not_a_crash() -> None:
    outcome = check(b" leading continuation line\r\n" + signed(make_mail()))
    assert outcome.source == "own" and "dkim=permerror" in (outcome.header or "")
    assert outcome.authenticated is False  # SPF still failed hard


def test_the_null_sender_is_checked_by_its_helo_name() -> None:
    resolver = table(mx__bounce__example=["v=spf1 ip4:127.0.0.0/8 -all"])
    outcome = check(make_mail(), resolver, mail_from="", helo="mx.bounce.example")
    assert "spf=pass smtp.helo=mx.bounce.example" in (outcome.header or "")
    outcome = check(make_mail(), resolver, peer="198.51.100.1:25", mail_from="",
                    helo="mx.bounce.example")
    assert "spf=fail smtp.helo=mx.bounce.example" in (outcome.header or "")


def test_signature_of_another_domain_does_not_align() -> None:
    raw = signed(make_mail(), domain="evil.example", key=OTHER_KEY.private)
    outcome = check(raw)
    assert "dkim=pass header.d=evil.example" in (outcome.header or "")
    assert outcome.authenticated is False


def test_strict_dkim_alignment_refuses_a_subdomain_signature() -> None:
    raw = signed(make_mail(), domain="mail.example.org")
    assert check(raw).authenticated is True  # relaxed: same organizational domain
    strict = table(_dmarc__example__org=["v=DMARC1; p=reject; adkim=s"])
    assert check(raw, strict).authenticated is False


def test_subdomain_sender_falls_back_to_the_organizational_record() -> None:
    resolver = table()
    outcome = check(make_mail(sender="news@news.example.org"), resolver,
                    mail_from="news@news.example.org")
    assert ("_dmarc.news.example.org", "TXT") in resolver.queries
    assert ("_dmarc.example.org", "TXT") in resolver.queries
    assert outcome.authenticated is False


def test_without_dmarc_a_hard_spf_fail_is_a_forgery_and_nothing_is_unknown() -> None:
    no_dmarc = TableResolver({"example.org": [SPF]})
    assert check(make_mail(), no_dmarc).authenticated is False
    assert check(make_mail(), TableResolver({})).authenticated is None
    assert "dmarc=none" in (check(make_mail(), TableResolver({})).header or "")


def test_dns_timeouts_are_temperror_not_fail() -> None:
    resolver = TableResolver({"example.org": [SPF]}, timeouts={"_dmarc.example.org"})
    outcome = check(make_mail(), resolver)
    assert outcome.authenticated is None
    assert "dmarc=temperror" in (outcome.header or "")
    key_lost = TableResolver({"_dmarc.example.org": ["v=DMARC1; p=reject"]},
                             timeouts={"sel._domainkey.example.org"})
    assert "dkim=temperror" in (check(signed(make_mail()), key_lost).header or "")


def test_spent_budget_stops_all_lookups() -> None:
    resolver = table()
    outcome = check(signed(make_mail()), resolver, dns_timeout_s=1e-9)
    assert outcome.authenticated is None
    assert "dkim=temperror" in (outcome.header or "")
    assert "dmarc=temperror" in (outcome.header or "")


def test_a_forged_results_header_from_an_untrusted_peer_is_ignored() -> None:
    raw = make_mail(headers={"Authentication-Results": "mx.acme.com; dmarc=pass"})
    outcome = check(raw, forwarders=FORWARDER)  # from 127.0.0.1: not the forwarder
    assert (outcome.authenticated, outcome.source) == (False, "own")


# --- trusted forwarders and ARC ---

def forwarded(*results: str) -> bytes:
    return b"".join(f"Authentication-Results: {r}\r\n".encode() for r in results) + make_mail()


def test_the_forwarders_topmost_header_decides() -> None:
    raw = forwarded("mx.acme.com; spf=pass smtp.mailfrom=jess@example.org; "
                    "dmarc=pass header.from=example.org", "mx.acme.com; dmarc=fail")
    outcome = check(raw, peer="10.1.2.3:25", forwarders=FORWARDER)
    assert (outcome.authenticated, outcome.source) == (True, "forwarder:mx.acme.com")
    assert "dmarc=pass (from mx.acme.com) header.from=example.org" in (outcome.header or "")
    below = forwarded("mx.acme.com; dmarc=fail header.from=example.org",
                      "mx.acme.com; dmarc=pass")  # the lower one came with the mail: forged
    assert check(below, peer="10.1.2.3:25", forwarders=FORWARDER).authenticated is False


def test_forwarders_header_without_dmarc_needs_alignment() -> None:
    unaligned = forwarded("mx.acme.com; spf=fail smtp.mailfrom=x@evil.example; "
                          "dkim=pass header.d=evil.example")
    assert check(unaligned, peer="10.0.0.1:25", forwarders=FORWARDER).authenticated is False
    good = forwarded("mx.acme.com; spf=fail smtp.mailfrom=x@evil.example; "
                     "dkim=pass header.d=example.org")
    assert check(good, peer="10.0.0.1:25", forwarders=FORWARDER).authenticated is True


def test_forwarded_mail_without_its_header_is_judged_without_spf() -> None:
    outcome = check(make_mail(), peer="10.0.0.1:25", forwarders=FORWARDER)
    assert outcome.source == "own"
    assert outcome.authenticated is None  # DMARC fails only for want of SPF: unknown
    assert check(signed(make_mail()), peer="10.0.0.1:25",
                 forwarders=FORWARDER).authenticated is True


def test_behind_a_forwarder_spf_checks_the_client_it_recorded() -> None:
    internal = "Received: from relay.acme.com (relay.acme.com [10.9.9.9]) by mx.acme.com\r\n"

    def via(client: str) -> bytes:
        return (f"Received: from mail.example.org (mail.example.org [{client}])\r\n"
                f"\tby relay.acme.com (Postfix) with ESMTPS id 4; Mon, 23 Nov 2026\r\n"
                ).encode()
    good = internal.encode() + via("192.0.2.9") + make_mail()
    outcome = check(good, peer="10.0.0.1:25", forwarders=FORWARDER)
    assert outcome.authenticated is True and "spf=pass" in (outcome.header or "")
    forged = internal.encode() + via("203.0.113.5") + make_mail()
    assert check(forged, peer="10.0.0.1:25", forwarders=FORWARDER).authenticated is False
    # Directly from an untrusted peer, a Received header is the sender's word: not used.
    assert check(good, peer="203.0.113.5:25", forwarders=FORWARDER).authenticated is False


@pytest.mark.parametrize(("value", "ip", "helo"), [
    ("from mail.example.org (mail.example.org [192.0.2.9])\r\n\tby mx (Postfix); date",
     "192.0.2.9", "mail.example.org"),
    ("from [192.0.2.1] (helo=foo.example) by mx with esmtp", "192.0.2.1", "foo.example"),
    ("from rdns.example ([2001:db8::1] helo=bar.example) by x", "2001:db8::1", "bar.example"),
    ("from x (unknown [IPv6:2001:db8::1:5]) by y", "2001:db8::1:5", "x"),
    ("by localhost with LMTP; Mon, 23 Nov 2026", None, ""),
])
def test_received_from_clause(value: str, ip: str | None, helo: str) -> None:
    found, name = received_from(value)
    assert (str(found) if found else None, name) == (ip, helo)


def arc_sealed(results: str, key: bytes = KEY.private, body: str = "Hello, I need help.") -> bytes:
    raw = make_mail(body=body)
    header = f"Authentication-Results: mx.acme.com; {results}\r\n".encode()
    return b"".join(dkim.arc_sign(header + raw, b"arc", b"acme.com", key, b"mx.acme.com")) + raw


def test_forwarders_arc_results_count_when_the_chain_holds() -> None:
    resolver = table(arc___domainkey__acme__com=[KEY.dns_value])
    raw = arc_sealed("spf=pass smtp.mailfrom=jess@example.org; dmarc=pass header.from=example.org")
    outcome = check(raw, resolver, peer="10.0.0.1:25", forwarders=FORWARDER)
    assert (outcome.authenticated, outcome.source) == (True, "arc:mx.acme.com")
    assert "arc=pass" in (outcome.header or "")
    broken = raw.replace(b"Hello", b"Hallo")  # the sealed body changed: chain fails
    outcome = check(broken, resolver, peer="10.0.0.1:25", forwarders=FORWARDER)
    assert outcome.source == "own" and "arc=fail" in (outcome.header or "")


# --- big mails: signatures checked in the parser process, on keys looked up first ---

# Spaces doubled and trailing: relaxed canonicalization has work to do on every line.
BIG_BODY = "A line  of a  big mail, with a trailing space \r\n" * (BIG_MAIL_BYTES // 40)


def tampered_body(raw: bytes) -> bytes:
    changed = raw.replace(b"\r\n\r\n", b"\r\n\r\nP.S. ", 1)
    assert changed != raw
    return changed


@pytest.fixture
def offloaded(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    return note_offloads(monkeypatch, authcheck)


@pytest.mark.parametrize(("tampered", "timeouts", "expected"), [
    (False, (), "dkim=pass header.d=example.org"),
    (True, (), "dkim=fail header.d=example.org"),
    (False, ("sel._domainkey.example.org",), "dkim=temperror header.d=example.org"),
])
async def test_a_big_mails_signature_is_checked_in_the_parser_process_alike(
        offloaded: list[Any], tampered: bool, timeouts: tuple[str, ...], expected: str) -> None:
    raw = signed(make_mail(body=BIG_BODY))
    assert len(raw) > BIG_MAIL_BYTES
    if tampered:
        raw = tampered_body(raw)
    resolver = table()
    resolver.timeouts = set(timeouts)
    outcome = await check_async(raw, resolver)
    assert [getattr(call, "func", None) for call in offloaded] == [check_signatures]
    assert expected in (outcome.header or "")
    alike = check(raw, resolver)  # the small-mail way: all of it in this thread
    assert (outcome.header, outcome.authenticated, outcome.detail["dns_failures"]) == (
        alike.header, alike.authenticated, alike.detail["dns_failures"])
    assert bool(timeouts) == bool(outcome.detail["dns_failures"])


async def test_a_key_the_header_parse_missed_is_looked_up_and_checked_again(
        offloaded: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    raw = signed(signed(make_mail(body=BIG_BODY)), domain="evil.example", key=OTHER_KEY.private)
    monkeypatch.setattr(authcheck, "key_names", lambda raw: key_names(raw)[:1])
    outcome = await check_async(raw)
    assert len(offloaded) == 2  # the second time with the key it asked for
    assert "dkim=pass header.d=evil.example" in (outcome.header or "")
    assert "dkim=pass header.d=example.org" in (outcome.header or "")
    assert outcome.detail["dns_failures"] == []
    assert outcome.header == check(raw).header


async def test_a_big_mails_arc_chain_is_checked_in_the_parser_process(offloaded: list[Any]
                                                                       ) -> None:
    resolver = table(arc___domainkey__acme__com=[KEY.dns_value])
    raw = arc_sealed("spf=pass smtp.mailfrom=jess@example.org; dmarc=pass header.from=example.org",
                     body=BIG_BODY)
    outcome = await check_async(raw, resolver, peer="10.0.0.1:25", forwarders=FORWARDER)
    assert len(offloaded) == 1
    assert (outcome.authenticated, outcome.source) == (True, "arc:mx.acme.com")
    outcome = await check_async(tampered_body(raw), resolver, peer="10.0.0.1:25",
                                forwarders=FORWARDER)
    assert outcome.source == "own" and "arc=fail" in (outcome.header or "")


async def test_small_mails_and_unsigned_big_ones_stay_in_the_thread(offloaded: list[Any]
                                                                     ) -> None:
    assert "dkim=pass" in ((await check_async(signed(make_mail()))).header or "")
    assert "dkim=none" in ((await check_async(make_mail(body=BIG_BODY))).header or "")
    assert offloaded == []


def test_key_names_as_dkimpy_forms_them() -> None:
    raw = (b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org;\r\n\ts=sel; bh=x; b=y\r\n"
           b"dkim-signature : v=1; d=example.org; s=sel; b=z\r\n"  # the same key once
           b"DKIM-Signature: v=1; d=example.org; d=twice; s=sel\r\n"  # junk: dkimpy's call
           b"ARC-Seal: i=1; a=rsa-sha256; d=acme.com; s=arc; cv=none; b=w\r\n"
           b"Subject: hi\r\n\r\nDKIM-Signature: v=1; d=body.example; s=no\r\n")
    assert key_names(raw) == [b"sel._domainkey.example.org.", b"arc._domainkey.acme.com."]


def test_a_name_not_looked_up_is_temperror_and_asked_for() -> None:
    raw = signed(make_mail())
    result = check_signatures(authcheck.Keys({}, {}), False, raw)
    assert [d.result for d in result.dkims] == ["temperror"]
    assert result.missing == [b"sel._domainkey.example.org."]


# --- modes and settings ---

def test_record_mode_keeps_the_header_but_not_the_verdict() -> None:
    outcome = check(make_mail(), mode="record")
    assert outcome.authenticated is None and "dmarc=fail" in (outcome.header or "")


async def test_off_mode_checks_nothing() -> None:
    resolver = table()
    raw = make_mail(headers={"Authentication-Results": "elsewhere; dmarc=pass"})
    checker = AuthChecker(AuthSettings(mode="off"), "deskgate.test", resolver)
    outcome = await checker.check(raw, parse(raw), envelope())
    assert (outcome.authenticated, outcome.header) == (None, "elsewhere; dmarc=pass")
    assert resolver.queries == []


def test_settings_read_forwarders_and_options() -> None:
    settings = parse_settings(settings_text("sqlite+aiosqlite:///x.db", extra="""
trusted_forwarders = [{ip = "10.0.0.0/8", authserv_id = "MX.acme.com"}, {ip = "2001:db8::1", authserv_id = "mx6.acme.com"}]
[inbound.authentication]
mode = "record"
dns_timeout_s = 1.5
dns_cache_s = 0"""), "t.toml")  # noqa: E501
    auth = settings.inbound.authentication
    assert (auth.mode, auth.dns_timeout_s, auth.dns_cache_s) == ("record", 1.5, 0)
    assert [(str(f.network), f.authserv_id) for f in auth.forwarders] == [
        ("10.0.0.0/8", "mx.acme.com"), ("2001:db8::1/128", "mx6.acme.com")]
    assert parse_settings(settings_text("sqlite+aiosqlite:///x.db"),
                          "t.toml").inbound.authentication == AuthSettings()


def test_bad_authentication_settings_are_named() -> None:
    text = settings_text("sqlite+aiosqlite:///x.db", extra="""
trusted_authserv_ids = ["mx.acme.com"]
trusted_forwarders = [{ip = "10.0.0.300", authserv_id = "mx"}, {ip = "10.0.0.1"}]
[inbound.authentication]
mode = "strict"
dns_timeout_s = 0""")
    with pytest.raises(ConfigError) as caught:
        parse_settings(text, "t.toml")
    joined = "\n".join(caught.value.problems)
    assert "inbound.trusted_authserv_ids: was replaced by inbound.trusted_forwarders" in joined
    assert "inbound.trusted_forwarders[0].ip: must be an IP address or CIDR network" in joined
    assert "inbound.trusted_forwarders[1].authserv_id: must name the forwarder's" in joined
    assert "inbound.authentication.mode: must be one of off, record, enforce" in joined
    assert "inbound.authentication.dns_timeout_s: must be in (0, 30], not 0" in joined


# --- the live resolver against a real DNS server on a local UDP socket ---

class TinyDns:
    """Answers TXT queries from a dict over UDP; `silent` makes it drop every query."""

    def __init__(self, records: dict[str, str], ttl: int = 300) -> None:
        self.records, self.ttl, self.silent, self.asked = records, ttl, False, 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.running:
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            self.asked += 1
            if self.silent:
                continue
            query = dns.message.from_wire(data)
            response = dns.message.make_response(query)
            name = query.question[0].name.to_text(True)
            if name in self.records:
                response.answer.append(dns.rrset.from_text(
                    query.question[0].name, self.ttl, "IN", "TXT", f'"{self.records[name]}"'))
            else:
                response.set_rcode(dns.rcode.NXDOMAIN)
            self.sock.sendto(response.to_wire(), peer)

    def close(self) -> None:
        self.running = False
        self.thread.join()
        self.sock.close()


@pytest.fixture
def tiny_dns() -> Iterator[TinyDns]:
    server = TinyDns({"_dmarc.example.org": "v=DMARC1; p=reject"})
    yield server
    server.close()


def live(server: TinyDns, cache_s: int = 300) -> LiveResolver:
    resolver = LiveResolver(cache_s, DnsHealth())  # not the process's: other tests use it
    assert resolver._resolver is not None
    resolver._resolver.nameservers = ["127.0.0.1"]
    resolver._resolver.port = server.port
    return resolver


def test_live_resolver_answers_and_caches(tiny_dns: TinyDns) -> None:
    resolver = live(tiny_dns)
    assert resolver.query("_dmarc.example.org", "TXT", 1.0) == [b"v=DMARC1; p=reject"]
    assert resolver.query("_dmarc.example.org", "TXT", 1.0) == [b"v=DMARC1; p=reject"]
    assert resolver.query("nothing.example.org", "TXT", 1.0) == []
    assert tiny_dns.asked == 2  # the second question came from the cache


def test_live_resolver_serves_stale_and_backs_off_when_dns_is_gone(tiny_dns: TinyDns) -> None:
    tiny_dns.ttl = 0  # expires at once: the next question goes to the server
    resolver = live(tiny_dns)
    assert resolver.query("_dmarc.example.org", "TXT", 1.0) == [b"v=DMARC1; p=reject"]
    tiny_dns.silent = True
    assert resolver.query("_dmarc.example.org", "TXT", 0.2) == [b"v=DMARC1; p=reject"]
    for name in ("a.example", "b.example"):
        with pytest.raises(DnsTempError, match="timeout"):
            resolver.query(name, "TXT", 0.2)
    asked, started = tiny_dns.asked, time.monotonic()
    with pytest.raises(DnsTempError, match="backing off"):
        resolver.query("c.example", "TXT", 0.2)
    assert time.monotonic() - started < 0.05 and tiny_dns.asked == asked


async def test_a_check_whose_names_are_all_cached_runs_on_the_loop(
        tiny_dns: TinyDns, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first mail of a sender asks DNS in a thread; the next, every name fresh in the
    cache, is checked on the loop without one; once the cache has expired, in a thread again.
    Same verdict each time."""
    threads: list[str] = []
    real = asyncio.to_thread

    async def counted(function: Any, *args: Any) -> Any:
        threads.append(function.__name__)
        return await real(function, *args)

    monkeypatch.setattr(authcheck.asyncio, "to_thread", counted)
    raw = (b"From: jess@example.org\r\nTo: support@example.test\r\nSubject: hi\r\n"
           b"Message-ID: <c1@example.org>\r\n\r\nhello\r\n")
    checker = AuthChecker(AuthSettings(), "deskgate.test", live(tiny_dns))
    first = await checker.check(raw, parse(raw), envelope("192.0.2.1:40000"))
    asked = tiny_dns.asked
    assert threads == ["check_sync"] and asked >= 2  # SPF and DMARC at least
    again = await checker.check(raw, parse(raw), envelope("192.0.2.1:40000"))
    assert threads == ["check_sync"] and tiny_dns.asked == asked  # no thread, no question
    assert (again.authenticated, again.header) == (first.authenticated, first.header)
    assert "dmarc=fail" in again.header and again.authenticated is False

    resolver = checker.resolver
    assert isinstance(resolver, LiveResolver)
    for key, (_, values) in list(resolver._cache.items()):
        resolver._cache[key] = (0.0, values)  # expired
    expired = await checker.check(raw, parse(raw), envelope("192.0.2.1:40000"))
    assert threads == ["check_sync", "check_sync"] and tiny_dns.asked > asked
    assert (expired.authenticated, expired.header) == (first.authenticated, first.header)


async def test_a_name_that_times_out_is_asked_in_a_thread_not_cached_as_an_answer() -> None:
    # The table's "never answers" name misses the cache: the check goes to a thread, where
    # it times out as before (temperror), rather than answering from the loop.
    resolver = table()
    resolver.timeouts = {"_dmarc.example.org"}
    raw = (b"From: jess@example.org\r\nTo: support@example.test\r\nSubject: hi\r\n\r\nx\r\n")
    outcome = await check_async(raw, resolver, dns_timeout_s=0.2)
    assert "dmarc=temperror" in outcome.header
