"""What an inbound mail does to a ticket's status, as a pure decision."""

from datetime import UTC, datetime, timedelta

import pytest

from gateway.ingest.identify import ThreadDecision, TicketRef
from gateway.ingest.model import MailKind
from gateway.tickets.lifecycle import Action, Status, decide, transition

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
WINDOW = timedelta(days=14)


def threaded(status: str, closed_days_ago: int | None = None) -> ThreadDecision:
    closed_at = NOW - timedelta(days=closed_days_ago) if closed_days_ago is not None else None
    return ThreadDecision(TicketRef(1, 7, "support", status, closed_at), "message-id", "x")


NEW = ThreadDecision(None, "new", "")


def test_new_customer_mail_creates_an_open_ticket() -> None:
    decision = decide(NEW, MailKind.CUSTOMER, NOW, WINDOW)
    assert (decision.action, decision.new_status) == (Action.CREATE, Status.OPEN)


@pytest.mark.parametrize("kind", [MailKind.BOUNCE, MailKind.REPORT, MailKind.OWN_MAIL])
def test_machine_mail_without_a_ticket_is_quarantined(kind: MailKind) -> None:
    assert decide(NEW, kind, NOW, WINDOW).action is Action.QUARANTINE


def test_auto_reply_without_a_ticket_still_opens_one() -> None:
    assert decide(NEW, MailKind.AUTO_REPLY, NOW, WINDOW).action is Action.CREATE


@pytest.mark.parametrize("status", ["on_hold", "waiting_on_customer", "closed"])
def test_customer_reply_reopens(status: str) -> None:
    decision = decide(threaded(status, 1 if status == "closed" else None), MailKind.CUSTOMER,
                      NOW, WINDOW)
    assert (decision.action, decision.new_status) == (Action.APPEND, Status.OPEN)
    assert decision.events == (("reopened", {"from": status, "by": "customer reply"}),)


def test_reply_to_open_ticket_changes_nothing() -> None:
    decision = decide(threaded("escalated"), MailKind.CUSTOMER, NOW, WINDOW)
    assert (decision.action, decision.new_status, decision.events) == (Action.APPEND, None, ())


def test_auto_reply_does_not_reopen_a_closed_ticket() -> None:
    decision = decide(threaded("closed", 1), MailKind.AUTO_REPLY, NOW, WINDOW)
    assert (decision.action, decision.new_status) == (Action.APPEND, None)


def test_reply_after_the_follow_up_window_opens_a_linked_ticket() -> None:
    decision = decide(threaded("closed", 15), MailKind.CUSTOMER, NOW, WINDOW)
    assert decision.action is Action.FOLLOW_UP
    assert decision.ticket is not None and decision.ticket.number == 7


def test_transition_refuses_a_no_op() -> None:
    with pytest.raises(ValueError, match="already closed"):
        transition("closed", Status.CLOSED)
    assert transition("open", Status.CLOSED) is Status.CLOSED
