"""No value we put into an outgoing mail can add a header or a MIME part (issue 11).

Every event's templates are rendered with a hostile value in each text variable (customer
name, subject, agent and department names, ticket fields), composed with hostile names,
addresses and Message-IDs, and the bytes are parsed back: the header set is exactly ours,
each once, one text/plain and one text/html part, no decoded header holds a line break.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email.header import decode_header, make_header
from email.parser import BytesParser
from email.policy import compat32

import pytest
from jinja2 import UndefinedError

from gateway.ingest.parse import parse
from gateway.outbound.compose import Outgoing, compose, one_line
from gateway.outbound.render import EVENTS, SAMPLES, SHIPPED, Renderer

EVIL = "evil@example.net"
PAYLOADS = [
    f"x\r\nBcc: {EVIL}",
    f"x\nBcc: {EVIL}",
    f"x\rBcc: {EVIL}",
    "x\r\n\r\n--b\r\nContent-Type: text/html\r\n\r\n<script>alert(1)</script>\r\n--b--",
    f"x\r\n Bcc: {EVIL}",  # a fold: may stay, but only inside the one header
    f"x\x00\x0b\x0c\x1b\x7fBcc: {EVIL}",
    f"x\x85Bcc: {EVIL}",
    f"x\u2028Bcc: {EVIL}\u2029",
    f"=?utf-8?Q?x=0D=0ABcc:_{EVIL}?=",  # decodes to a line break in a naive reader
    "=?utf-8?B?eA0KQmNjOiBldmlsQGV4YW1wbGUubmV0?=",  # the same, base64
    f"Jörg\r\nBcc: {EVIL}",  # non-ASCII: goes through RFC 2047 encoding
    "Jörg\r\n\r\nbody",
    "Ünïcödé " * 40 + f"\r\nBcc: {EVIL}",  # long enough to be folded
]
NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
RENDERER = Renderer()
# Addresses and Message-IDs are taken literally (RFC 2047 5: no encoded-words in them).
LITERAL = {"message-id", "in-reply-to", "references", "to"}
SELECTORS = {"notice", "event", "target", "status", "priority"}  # choose a text, not shown
BASE_HEADERS = {"from", "to", "subject", "date", "message-id", "mime-version", "content-type",
                "auto-submitted", "x-auto-response-suppress", "content-language"}


def _text_fields(event: str) -> list[str]:
    return [key for key, value in SAMPLES[event].items() if isinstance(value, str)]


def _outgoing(hostile: str) -> Outgoing:
    return Outgoing(from_addr="support@example.com", from_name=hostile, to="jess@example.org",
                    hostname="example.com", date=NOW, tag="[#1234]",
                    reply_to="support+t1234-abc@example.com", in_reply_to=hostile + "@x",
                    references=(f"a@b{hostile}", "c@d"))


def assert_only_our_headers(mime: bytes, expected: set[str]) -> None:
    msg = BytesParser(policy=compat32).parsebytes(mime)
    names = [name.lower() for name in msg.keys()]
    assert sorted(names) == sorted(expected), names  # each exactly once, none added
    assert not msg.defects, msg.defects
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    for part in parts:
        assert not part.is_multipart() and not part.defects
        assert {n.lower() for n in part.keys()} == {
            "content-type", "mime-version", "content-transfer-encoding"}
    for name, value in msg.items():
        unfolded = re.sub(r"\r\n(?=[ \t])", "", value)  # RFC 5322 2.2.3; the only CRLFs
        # RFC 2047 words are text only where text may be; a Message-ID is taken literally.
        raw = name.lower() in LITERAL
        decoded = unfolded if raw else str(make_header(decode_header(unfolded)))
        assert "\r" not in decoded and "\n" not in decoded, (name, decoded)
    # Our own parser agrees: no attachment appeared, the header names are the same.
    mail = parse(mime)
    assert mail.attachments == () and mail.fatal is None
    assert sorted(n for n, _ in mail.headers) == sorted(expected)
    assert all("\n" not in v and "\r" not in v for n, v in mail.headers if n not in LITERAL)


@pytest.mark.parametrize("event", EVENTS)
@pytest.mark.parametrize("language", SHIPPED)
def test_hostile_template_variables_cannot_add_headers_or_parts(event: str, language: str
                                                                ) -> None:
    checked = 0
    for field in _text_fields(event):
        for hostile in PAYLOADS:
            context = {**SAMPLES[event], field: SAMPLES[event][field] + hostile}
            try:
                rendered = RENDERER.render(event, language, context)
            except UndefinedError:  # a key the template looks up, never shown as text
                assert field in SELECTORS, field
                continue
            assert "\n" not in rendered.subject and "\r" not in rendered.subject
            out = Outgoing(from_addr="support@example.com", from_name="Support",
                           to="jess@example.org", hostname="example.com", date=NOW,
                           tag="[#1234]", extra_headers=(("X-Deskgate-Verify", hostile),))
            composed = compose(rendered, out)
            assert_only_our_headers(composed.mime, BASE_HEADERS | {"x-deskgate-verify"})
            checked += 1
    assert checked >= (len(_text_fields(event)) - 1) * len(PAYLOADS) > 0


@pytest.mark.parametrize("hostile", PAYLOADS)
def test_hostile_names_addresses_and_ids_cannot_add_headers(hostile: str) -> None:
    """What compose puts into headers itself: department/agent name, recipient, the
    customer's Message-ID and References, the subject (already one line after render)."""
    for event in EVENTS:
        rendered = RENDERER.sample(event, "en")
        composed = compose(rendered, _outgoing(hostile))
        assert_only_our_headers(composed.mime, BASE_HEADERS | {
            "in-reply-to", "references", "reply-to"})
        assert "\n" not in composed.subject and "\r" not in composed.subject
    # The recipient header too (the envelope is guarded by aiosmtplib on the wire).
    bad_to = Outgoing(from_addr="support@example.com", from_name="Support",
                      to=f"jess@example.org{hostile}", hostname="example.com", date=NOW)
    assert_only_our_headers(compose(RENDERER.sample("ack", "en"), bad_to).mime, BASE_HEADERS)


def test_names_keep_their_text_without_the_line_breaks() -> None:
    """Sanitizing replaces, it does not drop: the reader still sees who wrote."""
    composed = compose(RENDERER.sample("ack", "en"), _outgoing(f"Jörg\r\nBcc: {EVIL}"))
    mail = parse(composed.mime)
    assert " ".join(mail.from_name.split()) == f"Jörg Bcc: {EVIL}"
    assert mail.from_addr == "support@example.com"
    assert mail.in_reply_to == (f"JörgBcc:{EVIL}@x",)
    literal = compose(RENDERER.sample("ack", "en"), _outgoing("=?utf-8?Q?x=0D=0A?="))
    assert parse(literal.mime).from_name == "=?utf-8?Q?x=0D=0A?="  # shown, not decoded


def test_one_line_covers_every_line_break_python_knows() -> None:
    breaks = [ch for ch in map(chr, range(0x3000)) if len(f"a{ch}b".splitlines()) > 1]
    assert breaks and all("\n" not in one_line(f"a{ch}b").splitlines()[0] for ch in breaks)
    assert all(len(one_line(f"a{ch}b").splitlines()) == 1 for ch in breaks)


def test_extra_header_names_are_checked() -> None:
    out = Outgoing(from_addr="support@example.com", from_name="Support", to="j@example.org",
                   hostname="example.com", date=NOW, extra_headers=(("X-A\r\nBcc", "v"),))
    with pytest.raises(ValueError, match="not a header name"):
        compose(RENDERER.sample("ack", "en"), out)
