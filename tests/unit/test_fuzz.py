"""Property tests: whatever bytes arrive, parse -> rules -> identify never raise, and what
they return keeps its promises (bounded CI run; `make fuzz` runs atheris for longer).
Structured MIME strategies: test_fuzz_mime.py; hostile sizes: test_parser_abuse.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.targets import pipeline, swallowed

EXAMPLES = int(os.environ.get("DESKGATE_FUZZ_EXAMPLES", "300"))
# In CI the examples are fixed (derandomize): a landing must not hang on a coin toss;
# local runs and DESKGATE_FUZZ_EXAMPLES keep exploring.
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=os.environ.get("CI") == "true",
                suppress_health_check=[HealthCheck.too_slow])
REGRESSIONS = Path(__file__).resolve().parents[1] / "data" / "fuzz"

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
    """parse -> classify -> identify -> readable view (tests/fuzz/targets.py): no promise broken."""
    pipeline(raw, view=False)


@FUZZ
@given(mails())
def test_structured_mail_never_breaks_the_decisions(raw: bytes) -> None:
    check_pipeline_decisions(raw)


@FUZZ
@given(st.binary(max_size=2000))
def test_random_bytes_never_break_the_decisions(raw: bytes) -> None:
    check_pipeline_decisions(raw)


REGRESSION_FILES = sorted(REGRESSIONS.glob("*.eml"))


def test_regression_folder_is_not_empty() -> None:
    assert REGRESSION_FILES, f"no *.eml in {REGRESSIONS}"


@pytest.mark.parametrize("path", REGRESSION_FILES, ids=lambda p: p.name)
def test_saved_fuzz_findings_stay_fixed(path: Path) -> None:
    """Every input a fuzzer once broke us with (make fuzz, tests/data/fuzz/README.md)."""
    mail = pipeline(path.read_bytes())
    assert isinstance(mail.text, str)
    # Findings named swallowed-*: parse() used to catch an exception of its own on them.
    if path.name.startswith("swallowed-"):
        assert swallowed(mail) == [], swallowed(mail)
