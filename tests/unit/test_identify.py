"""Threading order (DESIGN 4) and sender identity, without a database."""

from datetime import UTC, datetime

from gateway.ingest.identify import (
    ThreadEvidence,
    TicketRef,
    normalize_address,
    sender_authenticated,
    thread,
)
from gateway.ingest.model import ParsedMail

T1 = TicketRef(1, 101, "support", "open", None)
T2 = TicketRef(2, 102, "support", "open", None)
T3 = TicketRef(3, 103, "billing", "closed", datetime(2026, 1, 1, tzinfo=UTC))


def mail(in_reply_to: tuple[str, ...] = (), references: tuple[str, ...] = (),
         headers: tuple[tuple[str, str], ...] = ()) -> ParsedMail:
    return ParsedMail(message_id="x@y", in_reply_to=in_reply_to, references=references,
                      from_addr="a@b.example", from_name="", reply_to=(), to=(), cc=(),
                      subject="s", date=None, date_raw="", headers=headers, text="", html=None,
                      attachments=(), defects=(), body_sha256="0" * 64)


def evidence(by_id: dict[str, TicketRef] | None = None, token: TicketRef | None = None,
             tag: TicketRef | None = None, participant: bool = False) -> ThreadEvidence:
    return ThreadEvidence(by_id or {}, token, tag, participant)


def test_in_reply_to_wins_over_token_and_tag() -> None:
    decision = thread(mail(in_reply_to=("a@x",)), evidence({"a@x": T1}, T2, T3, True), None)
    assert (decision.ticket, decision.step) == (T1, "message-id")


def test_newest_reference_wins() -> None:
    decision = thread(mail(references=("old@x", "new@x")),
                      evidence({"old@x": T1, "new@x": T2}), None)
    assert decision.ticket == T2


def test_token_is_used_when_no_reference_is_known() -> None:
    decision = thread(mail(in_reply_to=("unknown@x",)), evidence(token=T2), False)
    assert (decision.ticket, decision.step) == (T2, "reply-token")


def test_tag_from_a_participant_threads() -> None:
    assert thread(mail(), evidence(tag=T1, participant=True), None).ticket == T1


def test_tag_from_a_stranger_starts_a_new_ticket() -> None:
    decision = thread(mail(), evidence(tag=T1, participant=False), None)
    assert decision.ticket is None and "not a participant" in decision.detail


def test_tag_is_ignored_when_authentication_failed() -> None:
    decision = thread(mail(), evidence(tag=T1, participant=True), False)
    assert decision.ticket is None and "authentication" in decision.detail


def test_nothing_known_is_a_new_ticket() -> None:
    assert thread(mail(), evidence(), None).step == "new"


def test_normalize_address_lowercases_and_rejects_junk() -> None:
    assert normalize_address(" <Jess@Example.ORG> ") == "jess@example.org"
    assert normalize_address("not an address") is None
    assert normalize_address("") is None


def test_trusted_authentication_results_decide() -> None:
    failing = mail(headers=(("authentication-results",
                             "mx.example.com; spf=pass; dkim=fail; dmarc=fail"),))
    assert sender_authenticated(failing, ("mx.example.com",)) is False
    assert sender_authenticated(failing, ("other.example",)) is None
    passing = mail(headers=(("authentication-results", "mx.example.com; dmarc=pass"),))
    assert sender_authenticated(passing, ("mx.example.com",)) is True


def test_failed_authentication_threads_only_by_our_own_message_ids() -> None:
    both = mail(in_reply_to=("theirs@example.org", "ours@deskgate.test"))
    found = ThreadEvidence({"theirs@example.org": T1, "ours@deskgate.test": T2}, None, None,
                           False, frozenset({"ours@deskgate.test"}))
    assert thread(both, found, False).detail == "ours@deskgate.test"
    only_theirs = ThreadEvidence({"theirs@example.org": T1}, None, None, False)
    assert thread(both, only_theirs, False).ticket is None
    assert thread(both, only_theirs, None).detail == "theirs@example.org"
