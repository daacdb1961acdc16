"""Pure: the one place that reads a relay's answer -> sent, retry later, or failed (STYLE 5)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum


class Disposition(StrEnum):
    SENT = "sent"
    RETRY = "retry"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Answer:
    """What happened on the wire: an SMTP reply, or no reply at all (code None)."""

    code: int | None
    text: str

    @classmethod
    def no_reply(cls, what: str) -> Answer:  # timeout, refused, reset, disconnect
        return cls(None, what)

    def __str__(self) -> str:
        return f"{self.code} {self.text}" if self.code is not None else self.text


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    base_s: int = 60
    max_s: int = 3600
    lifetime_s: int = 5 * 24 * 3600


@dataclass(frozen=True, slots=True)
class Verdict:
    disposition: Disposition
    reason: str
    next_attempt_at: datetime | None = None


def backoff(attempts: int, policy: RetryPolicy) -> timedelta:
    """Exponential: base, 2·base, 4·base … capped at max (attempts counts this one)."""
    return timedelta(seconds=min(policy.max_s, policy.base_s * 2 ** max(0, attempts - 1)))


def is_temporary(answer: Answer) -> bool:
    # RFC 5321 4.2.1: 4yz is transient. 552 is treated as 452 (RFC 5321 4.5.3.1.10: some
    # relays still answer 552 for "mailbox full"). No answer at all: try again.
    return answer.code is None or 400 <= answer.code < 500 or answer.code == 552


def judge(answer: Answer, attempts: int, created_at: datetime, now: datetime,
          policy: RetryPolicy) -> Verdict:
    if answer.code is not None and 200 <= answer.code < 300:
        return Verdict(Disposition.SENT, str(answer))
    if not is_temporary(answer):
        return Verdict(Disposition.FAILED, f"permanent: {answer}")
    due = now + backoff(attempts, policy)
    if due > created_at + timedelta(seconds=policy.lifetime_s):
        return Verdict(Disposition.FAILED,
                       f"gave up after {attempts} attempts in {policy.lifetime_s} s: {answer}")
    return Verdict(Disposition.RETRY, f"temporary: {answer}", due)
