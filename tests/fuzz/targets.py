"""The pure part of the ingest pipeline as one function of the raw bytes, shared by the
hypothesis tests (tests/unit/test_fuzz*.py) and the atheris harness (tests/fuzz/fuzz_parse.py).

It raises only when a promise is broken: parse() raised or swallowed an internal error
("parser error: ..."), or a later pure step raised on what parse() returned.
"""

from __future__ import annotations

import re

from gateway.ingest.addresses import find_tag, parse_reply_token, tag_pattern
from gateway.ingest.identify import (
    ThreadEvidence,
    TicketRef,
    normalize_address,
    sender_authenticated,
    thread,
)
from gateway.ingest.model import Envelope, ParsedMail
from gateway.ingest.parse import parse
from gateway.ingest.pipeline import fingerprint
from gateway.ingest.readable import readable
from gateway.ingest.rules import classify

ENVELOPE = Envelope(mail_from="a@example.org", rcpt_tos=("support@example.test",))
OWN = frozenset({"support@example.test"})
TAG = tag_pattern("[#{number}]")
SECRET = b"fuzz-reply-token-secret"
TRUSTED = ("mx.example.test",)
_TICKET = TicketRef(id=1, number=7, department="support", status="open", closed_at=None)


class BrokenPromise(AssertionError):
    """An input the pipeline's pure parts must accept but did not."""


def pipeline(raw: bytes, *, view: bool = True) -> ParsedMail:
    """parse -> classify -> identify (threading, authentication verdict) -> readable view."""
    mail = parse(raw)
    if mail.fatal and mail.fatal.startswith("parser error"):
        raise BrokenPromise(f"parse() swallowed an internal error: {mail.defects}")
    if not (isinstance(mail.subject, str) and isinstance(mail.text, str)):
        raise BrokenPromise("subject/text are not str")
    if len(mail.body_sha256) != 64 or len(fingerprint(mail)) != 64:
        raise BrokenPromise("hash of unexpected length")
    classification = classify(mail, ENVELOPE, OWN)
    if not all(hit.rule and hit.reason for hit in classification.hits):
        raise BrokenPromise("rule hit without a name or a reason")
    sender = normalize_address(mail.from_addr)
    if sender is not None and sender != sender.lower():
        raise BrokenPromise("normalized sender is not lower-case")
    for address in (*mail.reply_to, *mail.to, *mail.cc):
        normalize_address(address)
        local = address.rpartition("@")[0]
        parse_reply_token(local.partition("+")[2], SECRET)
    verdict = sender_authenticated(mail, TRUSTED)
    number = find_tag(mail.subject, TAG)
    by_ids = dict.fromkeys((*mail.in_reply_to, *mail.references), _TICKET)
    decision = thread(mail, ThreadEvidence(by_ids, None, _TICKET if number else None, True),
                      verdict)
    if (decision.ticket is None) != (not by_ids and (number is None or verdict is False)):
        raise BrokenPromise(f"threading decision {decision} does not follow the evidence")
    if view:
        readable(mail)
    return mail


def swallowed(mail: ParsedMail) -> list[str]:
    """Defects that record an exception parse() caught inside (worth a look, not a crash)."""
    return [d for d in mail.defects if re.match(r"(part-unreadable|payload-undecodable|"
                                                r"embedded-message-incomplete|mime-unparsed):", d)]
