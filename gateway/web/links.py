"""The links deskgate mails out, built in one place so mail and web agree on their shape."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from gateway.web.tokens import sign

RATING_VALUES = ("good", "okay", "bad")


def rating_links(base_url: str, ticket_number: int, closed_at: datetime, window_days: int,
                 keys: Sequence[bytes]) -> dict[str, str]:
    """One one-click link per value; they stop working `window_days` after the close."""
    token = sign("rate", str(ticket_number), closed_at + timedelta(days=window_days), keys)
    return {value: f"{base_url.rstrip('/')}/rate/{token}/{value}" for value in RATING_VALUES}
