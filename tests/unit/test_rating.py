"""Who gets a rating mail: the loop rules of DESIGN 4, as a pure decision."""

from gateway.outbound.rating import decide_rating


def test_rating_mail_loop_rules() -> None:
    own = frozenset({"support@example.test"})
    assert decide_rating("jess@example.org", "customer", False, own) is None
    assert "robot" in (decide_rating("mailer-daemon@example.org", "customer", False, own) or "")
    assert "own" in (decide_rating("support@example.test", "customer", False, own) or "")
    assert "automated" in (decide_rating("jess@example.org", "auto_reply", False, own) or "")
    assert "bounced" in (decide_rating("jess@example.org", "customer", True, own) or "")
    assert "no address" in (decide_rating(None, "customer", False, own) or "")
