"""Agent profiles and password hashing."""

import pytest

from gateway.agents import (
    Profile,
    hash_password,
    may_act,
    may_reply_to_customers,
    replies_need_approval,
    verify_password,
)


def test_password_round_trip_and_wrong_password() -> None:
    stored = hash_password("correct horse battery")
    assert stored.startswith("scrypt$") and "correct" not in stored
    assert verify_password("correct horse battery", stored)
    assert not verify_password("correct horse batterY", stored)
    assert hash_password("correct horse battery") != stored  # salted


@pytest.mark.parametrize("stored", [None, "", "md5$abc", "scrypt$x$y$z$!!$??"])
def test_garbage_hashes_never_verify(stored: str | None) -> None:
    assert not verify_password("anything at all", stored)


def test_short_password_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 12"):
        hash_password("short")


def test_profiles() -> None:
    assert not may_reply_to_customers(Profile.LIGHT_AGENT)
    assert may_reply_to_customers(Profile.NEWBIE_AGENT)
    assert replies_need_approval(Profile.NEWBIE_AGENT)
    assert not replies_need_approval(Profile.AGENT)
    assert may_act(Profile.AGENT, frozenset({"support"}), "support")
    assert not may_act(Profile.AGENT, frozenset({"support"}), "billing")
    assert may_act(Profile.SUPPORT_MANAGER, frozenset(), "billing")
