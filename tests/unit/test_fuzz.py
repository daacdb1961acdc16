"""Property tests: whatever bytes arrive, parse -> rules -> identify never raise, and what
they return keeps its promises (bounded CI run; `make fuzz` runs longer)."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.ingest.identify import ThreadEvidence, normalize_address, thread
from gateway.ingest.model import Envelope
from gateway.ingest.parse import parse
from gateway.ingest.pipeline import fingerprint
from gateway.ingest.rules import classify

EXAMPLES = int(os.environ.get("DESKGATE_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
REGRESSIONS = Path(__file__).resolve().parents[1] / "data" / "fuzz"
ENVELOPE = Envelope(mail_from="a@example.org", rcpt_tos=("support@example.test",))
OWN = frozenset({"support@example.test"})

header_names = st.sampled_from([
    "From", "To", "Cc", "Subject", "Message-ID", "In-Reply-To", "References", "Date",
    "Reply-To", "Content-Type", "Content-Transfer-Encoding", "Content-Disposition",
    "Auto-Submitted", "Precedence", "List-Id", "X-Autoreply", "Authentication-Results",
    "MIME-Version", "Return-Path", "X-Weird"])
charsets = st.sampled_from(["utf-8", "iso-8859-1", "koi8-r", "gb2312", "iso-2022-jp",
                            "windows-1252", "x-unknown", "utf-7", "", "utf8\"broken"])
encoded_word = st.builds(lambda cs, enc, text: f"=?{cs}?{enc}?{text}?=", charsets,
                         st.sampled_from(["B", "Q", "b", "X"]),
                         st.text(alphabet="AZaz09+/=_-?", max_size=30))
header_value = st.one_of(st.text(max_size=120), encoded_word,
                         st.lists(encoded_word, max_size=4).map(" ".join),
                         st.binary(max_size=80).map(lambda b: b.decode("latin-1")))


@st.composite
def mime_tree(draw: st.DrawFn, depth: int = 0) -> str:
    boundary = draw(st.sampled_from(["b1", "b2", "", "=_x", "b1"]))
    subtype = draw(st.sampled_from(["mixed", "alternative", "report", "related", "digest"]))
    if depth >= 3 or draw(st.booleans()):
        ctype = draw(st.sampled_from(["text/plain", "text/html", "image/png",
                                      "application/ms-tnef", "message/rfc822",
                                      "message/delivery-status", "text/rfc822-headers"]))
        charset = draw(charsets)
        encoding = draw(st.sampled_from(["7bit", "8bit", "base64", "quoted-printable", "x"]))
        body = draw(st.text(max_size=200))
        name = draw(st.one_of(st.none(), header_value))
        disposition = f"Content-Disposition: attachment; filename=\"{name}\"\n" if name else ""
        return (f"Content-Type: {ctype}; charset=\"{charset}\"\n{disposition}"
                f"Content-Transfer-Encoding: {encoding}\n\n{body}\n")
    parts = draw(st.lists(mime_tree(depth + 1), max_size=3))
    inner = "".join(f"--{boundary}\n{p}" for p in parts)
    closing = draw(st.sampled_from([f"--{boundary}--\n", ""]))
    return f"Content-Type: multipart/{subtype}; boundary=\"{boundary}\"\n\n{inner}{closing}"


@st.composite
def mails(draw: st.DrawFn) -> bytes:
    headers = draw(st.lists(st.tuples(header_names, header_value), max_size=12))
    text = "".join(f"{name}: {value}\n" for name, value in headers) + draw(mime_tree())
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    data = text.replace("\n", newline).encode("utf-8", "surrogateescape")
    junk = draw(st.binary(max_size=16))
    return data + junk if draw(st.booleans()) else data


def check_pipeline_decisions(raw: bytes) -> None:
    mail = parse(raw)
    assert isinstance(mail.subject, str) and isinstance(mail.text, str)
    assert len(mail.body_sha256) == 64
    classification = classify(mail, ENVELOPE, OWN)
    assert all(hit.rule and hit.reason for hit in classification.hits)
    assert len(fingerprint(mail)) == 64
    normalize_address(mail.from_addr)
    decision = thread(mail, ThreadEvidence({}, None, None, False), None)
    assert decision.ticket is None


@FUZZ
@given(mails())
def test_structured_mail_never_breaks_the_decisions(raw: bytes) -> None:
    check_pipeline_decisions(raw)


@FUZZ
@given(st.binary(max_size=2000))
def test_random_bytes_never_break_the_decisions(raw: bytes) -> None:
    check_pipeline_decisions(raw)


def _hostile_inputs() -> dict[str, bytes]:
    """Generated rather than stored: megabytes of fixtures for a few lines of code."""
    return {
        "1 MB header line": b"From: a@example.org\r\nSubject: " + b"x" * 1_000_000 +
        b"\r\n\r\nbody\r\n",
        "100,000 headers": b"From: a@example.org\r\n" + b"X-H: v\r\n" * 100_000 +
        b"\r\nbody\r\n",
        "1,000 nested multiparts": b"From: a@example.org\r\n" + b"".join(
            f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n'.encode()
            for i in range(1000)) + b"Content-Type: text/plain\r\n\r\nhi\r\n",
        "encoded-word storm": b"From: " + b"=?utf-8?B?w6Q=?=" * 20000 +
        b" <a@example.org>\r\nSubject: " + b"=?x-unknown?Q?=FF?= " * 20000 +
        b"\r\n\r\nbody\r\n",
    }


def test_hostile_inputs_are_parsed_not_fatal() -> None:
    for name, raw in _hostile_inputs().items():
        mail = parse(raw)
        assert mail.fatal is None, name
        assert mail.from_addr == "a@example.org", name
        check_pipeline_decisions(raw)
    # Every input a fuzzer once broke us with is kept in tests/data/fuzz/ and replayed here.
    for path in sorted(REGRESSIONS.glob("*.eml")):
        check_pipeline_decisions(path.read_bytes())
