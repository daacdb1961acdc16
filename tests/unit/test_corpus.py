"""The shared third-party corpus: every file parses and classifies; stated facts hold."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from email.utils import getaddresses
from pathlib import Path
from typing import Any

import pytest

from gateway.ingest.bounce import analyse_bounce
from gateway.ingest.model import Classification, Envelope, MailKind, ParsedMail
from gateway.ingest.parse import parse
from gateway.ingest.rules import classify

CORPUS = Path(os.environ.get("DESKGATE_CORPUS")
              or Path(__file__).resolve().parents[2].parent / "shared" / "corpus")
IN_CI = os.environ.get("CI") == "true"

# Known misses, each with the reason; xfail is strict, so a fix shows up as XPASS.
KNOWN_MISSES: dict[tuple[str, str], str] = {
    # Verizon's gateway answers "Re:Test message" from post_master@ with a custom text body:
    # no DSN, no daemon sender, no MTA wording we could match without false positives.
    ("bounces/sisimai__bsd_lhost-apachejames-01.eml", "is_bounce"):
        "free-text bounce with a reply subject",
    # fml's "you are not a member" notice: a list-server rejection, classified as bulk.
    ("bounces/sisimai__bsd_lhost-fml-02.eml", "is_bounce"): "list-server rejection",
}

# Floors measured on the visible corpus (hits/total, rounded down); raise them, never lower.
FLOORS = {"is_bounce": 0.98, "is_autoreply": 1.0, "is_feedback_report": 1.0, "subject": 1.0,
          "from": 1.0, "message_id": 1.0, "attachments": 1.0, "attachment_filenames": 1.0,
          "dsn_status": 0.85}

_ESCAPE = re.compile(r"\\(.)")
_KEY = re.compile(r"\s*([^=;]+?)=")
_PSEUDO_STATUS = re.compile(r"\b[45]\.0\.9\d\d\b")


def _unescape(field: str) -> str:
    table = {"t": "\t", "r": "\r", "n": "\n", "\\": "\\"}
    return _ESCAPE.sub(lambda m: table.get(m.group(1), m.group(0)), field)


def _facts(expected: str) -> dict[str, Any]:
    """'key=<json>; key=<json>' -> dict; values that are not JSON are kept as text."""
    decoder, facts, pos = json.JSONDecoder(), {}, 0
    while (match := _KEY.match(expected, pos)) is not None:
        try:
            value, pos = decoder.raw_decode(expected, match.end())
        except ValueError:
            end = expected.find(";", match.end())
            end = len(expected) if end < 0 else end
            value, pos = expected[match.end():end].strip(), end
        facts[match.group(1).strip()] = value
        pos = re.compile(r"\s*;?").match(expected, pos).end()  # type: ignore[union-attr]
    return facts


def _manifest() -> list[tuple[str, dict[str, Any]]]:
    path = CORPUS / "manifest.tsv"
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    header = lines[0].split("\t")
    rows = [dict(zip(header, map(_unescape, line.split("\t")), strict=False))
            for line in lines[1:] if line.strip()]
    return [(row["path"], _facts(row.get("expected", ""))) for row in rows]


def _envelope(mail: ParsedMail) -> Envelope:
    """The corpus has no SMTP envelope: Return-Path is what the final MTA recorded of it."""
    return_path = mail.header("return-path")
    if return_path is not None:
        return Envelope(return_path.strip().strip("<>").strip(), ())
    return Envelope(mail.from_addr or "unknown@corpus.invalid", ())


_CACHE: dict[str, tuple[ParsedMail, Classification]] = {}


def _run(path: str) -> tuple[ParsedMail, Classification]:
    if path not in _CACHE:
        raw = (CORPUS / path).read_bytes()
        mail = parse(raw)
        _CACHE[path] = (mail, classify(mail, _envelope(mail), frozenset()))
    return _CACHE[path]


def _address(value: Any) -> tuple[str, str]:
    if isinstance(value, list):  # SpamScope renders [[name, address]]
        return (value[0][0], value[0][1])
    return getaddresses([value])[0]


def _filenames(mail: ParsedMail) -> list[str | None]:
    return [part.filename for part in mail.attachments]


def _names_match(got: list[str | None], expected: list[str]) -> bool:
    # php-mime-mail-parser names unnamed parts "noname1", "noname2"...; we keep None.
    if len(got) != len(expected):
        return False
    pairs = zip(got, expected, strict=True)
    return all(g == e or (g is None and re.fullmatch(r"noname\d*", e)) for g, e in pairs)


def _first_status(mail: ParsedMail) -> str | None:
    report = analyse_bounce(mail)
    return report.status if report else None


Check = Callable[[ParsedMail, Classification, Any], bool]
CHECKS: dict[str, Check] = {
    "is_bounce": lambda m, c, e: (c.kind is MailKind.BOUNCE) == e,
    "is_autoreply": lambda m, c, e: (c.kind is MailKind.AUTO_REPLY) == e,
    "is_feedback_report": lambda m, c, e: any(h.rule == "feedback-report" for h in c.hits) == e,
    "subject": lambda m, c, e: m.subject == e,
    "from": lambda m, c, e: (m.from_name, m.from_addr) == _address(e),
    "message_id": lambda m, c, e: m.message_id == e.strip().strip("<>"),
    "attachments": lambda m, c, e: len(m.attachments) == e,
    "attachment_filenames": lambda m, c, e: _names_match(_filenames(m), e),
    # sisimai's pseudo-codes (x.0.9NN) do not occur in the mail; only real codes are compared.
    "dsn_status": lambda m, c, e: _first_status(m) == (e[0] if isinstance(e, list) else e),
}
PER_FACT = [f for f in CHECKS if f != "dsn_status"]
MANIFEST = _manifest()
FILES = sorted(str(p.relative_to(CORPUS)) for p in CORPUS.glob("*/*.eml")) if CORPUS.is_dir() \
    else []


def _cases(fact: str) -> list[Any]:
    cases = []
    for path, facts in MANIFEST:
        if fact in facts:
            reason = KNOWN_MISSES.get((path, fact))
            marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
            cases.append(pytest.param(fact, path, facts[fact], id=f"{fact}:{path}", marks=marks))
    return cases


def test_corpus_is_present() -> None:
    if not FILES:
        message = f"corpus not found at {CORPUS} (set DESKGATE_CORPUS)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@pytest.mark.parametrize("path", FILES)
def test_file_parses_and_classifies(path: str) -> None:
    mail, _ = _run(path)
    assert not any(d.startswith("parser-error") for d in mail.defects)


@pytest.mark.parametrize(("fact", "path", "expected"), [c for f in PER_FACT for c in _cases(f)])
def test_stated_fact_holds(fact: str, path: str, expected: Any) -> None:
    assert CHECKS[fact](*_run(path), expected)


def test_hit_rates_stay_above_their_floors() -> None:
    if not MANIFEST:
        pytest.skip("corpus manifest missing")
    below = {}
    for fact, check in CHECKS.items():
        results = [check(*_run(path), facts[fact]) for path, facts in MANIFEST if fact in facts
                   and not _PSEUDO_STATUS.search(str(facts[fact]))]
        if not results:
            continue
        rate = sum(results) / len(results)
        print(f"{fact:22s} {sum(results):4d}/{len(results):<4d} {rate:6.1%}")
        if rate < FLOORS[fact]:
            below[fact] = rate
    assert below == {}
