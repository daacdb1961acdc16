"""Outbound decisions without sockets or a database: classify, compose, ack policy, templates."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy

import dkim
import pytest
from jinja2 import UndefinedError

from gateway.errors import ConfigError
from gateway.ingest.addresses import (
    Directory,
    RouteKind,
    bounce_address,
    reply_address,
    route_recipient,
)
from gateway.outbound.ack import AckFacts, decide_ack, is_ours
from gateway.outbound.classify import Answer, Disposition, RetryPolicy, backoff, judge
from gateway.outbound.compose import Outgoing, compose
from gateway.outbound.config import AckSettings
from gateway.outbound.dkim import DkimKey, Signer, generate
from gateway.outbound.render import EVENTS, SAMPLES, SHIPPED, Renderer, pick_language
from gateway.outbound.verify import candidate_codes
from tests.conftest import make_settings

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
POLICY = RetryPolicy(base_s=60, max_s=3600, lifetime_s=5 * 24 * 3600)
SECRET = b"0123456789abcdef0123"
OWN = frozenset({"support@example.test", "billing@example.test"})


# --- classify -----------------------------------------------------------------------------

@pytest.mark.parametrize("code", [250, 251])
def test_2xx_is_sent(code: int) -> None:
    assert judge(Answer(code, "ok"), 1, T0, T0, POLICY).disposition is Disposition.SENT


@pytest.mark.parametrize("answer", [Answer(421, "closing"), Answer(451, "later"),
                                    Answer(452, "full"), Answer(552, "mailbox full"),
                                    Answer.no_reply("TimeoutError"),
                                    Answer.no_reply("ConnectionRefusedError")])
def test_4xx_552_and_no_answer_are_retried(answer: Answer) -> None:
    verdict = judge(answer, 1, T0, T0, POLICY)
    assert verdict.disposition is Disposition.RETRY
    assert verdict.next_attempt_at == T0 + timedelta(seconds=60)


@pytest.mark.parametrize("code", [500, 550, 551, 553, 554])
def test_other_5xx_fail_for_good(code: int) -> None:
    verdict = judge(Answer(code, "no"), 1, T0, T0, POLICY)
    assert verdict.disposition is Disposition.FAILED
    assert verdict.reason.startswith("permanent")


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff(n, POLICY).total_seconds() for n in (1, 2, 3, 7, 20)] == [
        60, 120, 240, 3600, 3600]


def test_a_temporary_failure_past_the_lifetime_gives_up() -> None:
    late = T0 + timedelta(days=5)
    verdict = judge(Answer(451, "later"), 40, T0, late, POLICY)
    assert verdict.disposition is Disposition.FAILED
    assert "gave up" in verdict.reason


# --- compose ------------------------------------------------------------------------------

def _rendered(lang: str = "en") -> object:
    return Renderer().render("ack", lang, {"customer_name": "Jess", "department": "Support",
                                           "ticket_number": 7, "subject": "Refund",
                                           "tag": "[#7]"})


def test_compose_threads_suppresses_robots_and_carries_the_token() -> None:
    token = reply_address("support@example.test", 7, SECRET)
    out = Outgoing(from_addr="support@example.test", from_name="Support",
                   to="jess@example.org", hostname="deskgate.test", date=T0, tag="[#7]",
                   reply_to=token, in_reply_to="m1@example.org", references=("m0@example.org",))
    composed = compose(_rendered(), out)  # type: ignore[arg-type]
    msg = message_from_bytes(composed.mime, policy=policy.default)
    assert msg["Message-ID"] == f"<{composed.message_id}>"
    assert composed.message_id.endswith("@deskgate.test")
    assert msg["In-Reply-To"] == "<m1@example.org>"
    assert msg["References"] == "<m0@example.org> <m1@example.org>"
    assert msg["Reply-To"].addresses[0].addr_spec == token
    assert msg["Subject"].startswith("[#7] ")
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["X-Auto-Response-Suppress"] == "All"
    assert str(msg["From"]) == "Support <support@example.test>"
    assert msg.get_body(("plain",)).get_content().startswith("Hello Jess")


def test_compose_keeps_a_tag_the_template_already_wrote() -> None:
    out = Outgoing(from_addr="s@example.test", from_name="S", to="j@example.org",
                   hostname="h", date=T0, tag="[#7]")
    rendered = Renderer().render("notification", "en", {
        **SAMPLES["notification"], "ticket_number": 7, "subject": "[#7] x"})
    assert compose(rendered, out).subject.count("[#7]") == 1


# --- templates ----------------------------------------------------------------------------

@pytest.mark.parametrize("lang", SHIPPED)
@pytest.mark.parametrize("event", EVENTS)
def test_every_event_renders_in_every_shipped_language(event: str, lang: str) -> None:
    rendered = Renderer().sample(event, lang)
    assert rendered.subject and "\n" not in rendered.subject
    assert rendered.text.strip() and rendered.html.strip()


def test_html_is_escaped_and_text_is_not() -> None:
    rendered = Renderer().render("ack", "en", {"customer_name": "<b>Eve</b>",
                                               "department": "S", "ticket_number": 1,
                                               "subject": "x", "tag": "[#1]"})
    assert "&lt;b&gt;Eve&lt;/b&gt;" in rendered.html
    assert "<b>Eve</b>" in rendered.text


def test_a_missing_variable_is_an_error_not_an_empty_string() -> None:
    with pytest.raises(UndefinedError):
        Renderer().render("ack", "en", {"department": "S"})


def test_a_department_folder_overrides_one_template(tmp_path: object) -> None:
    from pathlib import Path

    folder = Path(str(tmp_path))
    (folder / "en").mkdir()
    (folder / "en" / "ack.subject.j2").write_text("Got it, {{ customer_name }}")
    renderer = Renderer({"support": str(folder)})
    context = {"customer_name": "Jess", "department": "S", "ticket_number": 1,
               "subject": "x", "tag": "[#1]"}
    assert renderer.render("ack", "en", context, department="support").subject == "Got it, Jess"
    assert renderer.render("ack", "en", context, department="billing").subject.startswith("We")


@pytest.mark.parametrize(("tags", "expected"), [
    (["de-CH"], "de"), (["fr", "nl-BE"], "nl"), (["zh-Hans-CN"], "zh"), (["fr"], "de"),
    ([], "de")])
def test_language_from_content_language_else_the_departments(tags: list[str],
                                                             expected: str) -> None:
    assert pick_language(tags, "de") == expected


# --- acknowledgement policy ---------------------------------------------------------------

def _facts(**kw: object) -> AckFacts:
    base: dict[str, object] = {"created": True, "reopened": False, "automated": False,
                               "recipient": "jess@example.org", "recent": 0}
    return AckFacts(**(base | kw))  # type: ignore[arg-type]


def test_a_new_customer_ticket_is_acknowledged() -> None:
    assert decide_ack(_facts(), AckSettings(), OWN) is None


@pytest.mark.parametrize(("facts", "reason"), [
    ({"created": False}, "not a new ticket"),
    ({"automated": True}, "automated"),
    ({"recipient": "support@example.test"}, "our own"),
    ({"recipient": "support+t1-abcdefghij@example.test"}, "our own"),
    ({"recipient": None}, "no address"),
    ({"recent": 3}, "3 acknowledgements"),
    ({"recipient": "postmaster@example.org"}, "robot"),
    ({"recipient": "MAILER-DAEMON@example.org"}, "robot"),
    ({"recipient": "noreply@shop.example"}, "robot"),
])
def test_no_acknowledgement_when(facts: dict[str, object], reason: str) -> None:
    assert reason in (decide_ack(_facts(**facts), AckSettings(), OWN) or "")


def test_reopen_is_acknowledged_only_when_configured() -> None:
    facts = _facts(created=False, reopened=True)
    assert decide_ack(facts, AckSettings(), OWN) == "not a new ticket"
    assert decide_ack(facts, AckSettings(on_reopen=True), OWN) is None


def test_bounce_addresses_on_our_domains_are_ours() -> None:
    assert is_ours(bounce_address("example.test", 5, SECRET), OWN)
    assert not is_ours("bounces@elsewhere.org", OWN)


# --- VERP routing -------------------------------------------------------------------------

def _directory() -> Directory:
    return Directory.from_departments({"support": ("support@example.test",)}, SECRET)


def test_a_verp_address_routes_to_its_outbox_row() -> None:
    route = route_recipient(bounce_address("example.test", 42, SECRET), _directory())
    assert (route.kind, route.outbox_id, route.accepted) == (RouteKind.BOUNCE, 42, True)


def test_a_forged_verp_token_is_unknown() -> None:
    route = route_recipient("bounces+o42-aaaaaaaaaa@example.test", _directory())
    assert route.kind is RouteKind.UNKNOWN


# --- DKIM ---------------------------------------------------------------------------------

MAIL = (b"From: Support <support@example.test>\r\nTo: jess@example.org\r\n"
        b"Subject: Hello\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
        b"Message-ID: <a@deskgate.test>\r\n\r\nYour ticket is 7.\r\n")


@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
def test_dkim_signature_verifies_and_a_changed_body_fails(algorithm: str) -> None:
    key = generate(algorithm, bits=1024) if algorithm == "rsa-sha256" else generate(algorithm)
    signed = Signer([DkimKey("example.test", "s1", algorithm, key.private)]).sign(
        MAIL, "example.test")
    table = {b"s1._domainkey.example.test.": key.dns_value.encode()}

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return table.get(name)

    assert dkim.verify(signed, dnsfunc=dnsfunc)
    assert not dkim.verify(signed.replace(b"ticket is 7", b"ticket is 8"), dnsfunc=dnsfunc)


def test_mail_from_a_domain_without_a_key_goes_unsigned() -> None:
    assert Signer([]).sign(MAIL, "example.test") == MAIL


# --- verification codes and settings ------------------------------------------------------

def test_codes_come_from_the_header_and_the_body() -> None:
    code = "0123456789abcdef0123456789abcdef"
    assert candidate_codes(code, "") == [code]
    assert candidate_codes(None, f"Confirmation code: {code}\n") == [code]
    assert candidate_codes(None, "no code here") == []


def test_outbound_settings_are_read_and_unknown_keys_named() -> None:
    settings = make_settings(extra='[outbox]\nlifetime_s = 600\n[acknowledgements]\n'
                                   'per_contact_per_hour = 5\n[relay]\nsecurity = "starttls"\n')
    assert settings.outbound.outbox.lifetime_s == 600
    assert settings.outbound.acknowledgements.per_contact_per_hour == 5
    assert settings.outbound.relay.security == "starttls"
    with pytest.raises(ConfigError) as caught:
        make_settings(extra='[outbox]\nlifetime = 3\n[relay]\nsecurity = "ssl"\n')
    text = str(caught.value)
    assert "outbox.lifetime: is not a known key" in text
    assert "relay.security: must be one of" in text


def test_compose_round_trips_non_ascii_and_uses_crlf() -> None:
    rendered = Renderer().render("ack", "zh", {
        "customer_name": "张伟", "department": "Support", "ticket_number": 5, "tag": "[#5]",
        "subject": "退款 request with a subject long enough to be folded over several lines"})
    out = Outgoing(from_addr="support@example.test", from_name="Süpport", to="z@example.org",
                   hostname="h", date=T0, tag="[#5]")
    composed = compose(rendered, out)
    msg = message_from_bytes(composed.mime, policy=policy.default)
    assert msg["Subject"] == composed.subject and composed.subject.startswith("[#5] 我们")
    assert str(msg["From"]) == "Süpport <support@example.test>"
    assert "张伟您好" in msg.get_body(("plain",)).get_content()
    assert b"\n" not in composed.mime.replace(b"\r\n", b"")  # RFC 5322 2.3: CRLF only
