"""Signed, expiring link tokens: the only credential a rating or verification link carries.

token = <subject>.<expires, unix s>.<mac>; mac = HMAC-SHA256(key, purpose|subject|expires),
so a token for one purpose (rate ticket 12) is worthless for another (verify an address).
Several keys may verify (the newest signs): keys rotate without breaking links in flight.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Sequence
from datetime import datetime

_SUBJECT = re.compile(r"^[A-Za-z0-9_@+=-]{1,200}$")


class TokenError(Exception):
    """Why a link is refused: 'invalid' (forged, altered, garbled) or 'expired'."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _mac(key: bytes, purpose: str, subject: str, expires: int) -> str:
    digest = hmac.new(key, f"{purpose}|{subject}|{expires}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:18]).decode("ascii")


def sign(purpose: str, subject: str, expires_at: datetime, keys: Sequence[bytes]) -> str:
    if not _SUBJECT.match(subject):
        raise ValueError(f"subject {subject!r} cannot go into a link")
    expires = int(expires_at.timestamp())
    return f"{subject}.{expires}.{_mac(keys[0], purpose, subject, expires)}"


def verify(purpose: str, token: str, keys: Sequence[bytes], now: datetime) -> str:
    """The subject the token was signed for; TokenError when forged or expired."""
    subject, _, rest = token.partition(".")
    expires_text, _, mac = rest.partition(".")
    if not (subject and expires_text.isdigit() and mac and _SUBJECT.match(subject)):
        raise TokenError("invalid")
    expires = int(expires_text)
    if not any(hmac.compare_digest(mac, _mac(key, purpose, subject, expires)) for key in keys):
        raise TokenError("invalid")
    if now.timestamp() > expires:  # checked after the MAC: an expiry cannot be forged
        raise TokenError("expired")
    return subject


def link_keys(secret: bytes, previous: Sequence[bytes] = ()) -> tuple[bytes, ...]:
    """Keys for links, derived from the configured secret(s) so one secret serves all uses."""
    return tuple(hmac.new(s, b"deskgate-web-links", hashlib.sha256).digest()
                 for s in (secret, *previous))
