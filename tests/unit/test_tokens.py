"""Link tokens: a forged, altered, re-purposed or expired token is refused."""

from datetime import UTC, datetime, timedelta

import pytest

from gateway.web.tokens import TokenError, link_keys, sign, verify

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
KEYS = link_keys(b"secret-one-0123456789")


def test_round_trip() -> None:
    token = sign("rate", "42", NOW + timedelta(days=30), KEYS)
    assert verify("rate", token, KEYS, NOW) == "42"


@pytest.mark.parametrize("mutate", [
    lambda t: t.replace("42.", "43.", 1),  # another ticket
    lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),  # altered MAC
    lambda t: "42." + str(int(t.split(".")[1]) + 86400) + "." + t.split(".")[2],  # longer life
    lambda t: "garbage", lambda t: "", lambda t: "42..", lambda t: "../../etc.1.x"])
def test_altered_tokens_are_invalid(mutate: object) -> None:
    token = sign("rate", "42", NOW + timedelta(days=30), KEYS)
    with pytest.raises(TokenError) as caught:
        verify("rate", mutate(token), KEYS, NOW)  # type: ignore[operator]
    assert caught.value.reason == "invalid"


def test_token_for_another_purpose_is_invalid() -> None:
    token = sign("verify", "42", NOW + timedelta(days=1), KEYS)
    with pytest.raises(TokenError, match="invalid"):
        verify("rate", token, KEYS, NOW)


def test_expired_token_says_expired() -> None:
    token = sign("rate", "42", NOW - timedelta(seconds=1), KEYS)
    with pytest.raises(TokenError, match="expired"):
        verify("rate", token, KEYS, NOW)


def test_old_key_still_verifies_during_rotation() -> None:
    old = link_keys(b"secret-one-0123456789")
    token = sign("rate", "7", NOW + timedelta(days=1), old)
    rotated = link_keys(b"secret-two-0123456789", [b"secret-one-0123456789"])
    assert verify("rate", token, rotated, NOW) == "7"
    assert sign("rate", "7", NOW + timedelta(days=1), rotated) != token

