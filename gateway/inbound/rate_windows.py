"""Sliding-window mail counts for the inbound rate limits: pure state over given times (issue 11).

A window of `window_s` seconds is made of fixed sub-buckets keyed by their start (epoch
seconds). Buckets from several processes add up in one shared table (store/rate_counts.py),
and the window slides by leaving whole buckets behind. Each process counts locally and hands
its counts over now and then; between hand-overs a count is the last shared sum plus what
this process added since, so the hot path never waits for the database.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

BUCKETS = 10  # sub-buckets per window: the window slides in steps of a tenth
KEY_CHARS = 400  # the shared table's key column


@dataclass(frozen=True, slots=True)
class Rule:
    """One counted key and its limit: kind is sender, domain or ip."""

    kind: str
    key: str
    limit: int


def bucket_width(window_s: int) -> int:
    return max(1, window_s // BUCKETS)


def bucket_of(now: float, window_s: int) -> int:
    """Start of the bucket holding `now`."""
    width = bucket_width(window_s)
    return int(now // width) * width


def oldest_bucket(now: float, window_s: int) -> int:
    """Start of the oldest bucket still inside the window ending at `now`."""
    width = bucket_width(window_s)
    return bucket_of(now, window_s) - (max(1, window_s // width) - 1) * width


def rules_for(mail_from: str, ip: str | None, per_sender: int, per_domain: int,
              per_ip: int) -> tuple[Rule, ...]:
    """The keys a MAIL FROM counts against; a limit of 0 is off, a null sender (<>) has no
    sender or domain key (bounces are counted by client IP only)."""
    address = mail_from.strip().lower()
    domain = address.rpartition("@")[2] if "@" in address else ""
    rules = []
    if address and per_sender > 0:
        rules.append(Rule("sender", f"sender:{address}"[:KEY_CHARS], per_sender))
    if domain and per_domain > 0:
        rules.append(Rule("domain", f"domain:{domain}"[:KEY_CHARS], per_domain))
    if ip and per_ip > 0:
        rules.append(Rule("ip", f"ip:{ip}", per_ip))
    return tuple(rules)


Counts = dict[str, dict[int, int]]  # key -> bucket start -> mails
_NONE: dict[int, int] = {}


def _add(into: Counts, key: str, bucket: int, hits: int) -> None:
    buckets = into.setdefault(key, {})
    buckets[bucket] = buckets.get(bucket, 0) + hits


class Windows:
    """This process's view of the counts: shared sums plus local counts not yet shared."""

    def __init__(self) -> None:
        self.pending: Counts = {}  # counted here, not handed over yet
        self.inflight: Counts = {}  # handed over, the sums that include them not read back yet
        self.shared: dict[str, int] = {}  # window sums across all processes, last read back

    def count(self, key: str, now: float, window_s: int) -> int:
        return self._count(key, oldest_bucket(now, window_s))

    def _count(self, key: str, oldest: int) -> int:
        total = self.shared.get(key, 0)
        for counts in (self.pending, self.inflight):
            for bucket, hits in counts.get(key, _NONE).items():
                if bucket >= oldest:
                    total += hits
        return total

    def admit(self, rules: Iterable[Rule], now: float, window_s: int) -> Rule | None:
        """The first rule at its limit, or None and the mail is counted against every key.

        A refused mail is not counted: the sender's retries must not keep it blocked.
        """
        rules = tuple(rules)
        oldest = oldest_bucket(now, window_s)
        for rule in rules:
            if self._count(rule.key, oldest) >= rule.limit:
                return rule
        bucket = bucket_of(now, window_s)
        for rule in rules:
            _add(self.pending, rule.key, bucket, 1)
        return None

    def hand_over(self, now: float, window_s: int) -> Counts:
        """Move the pending counts in flight; returns what to add to the shared table."""
        self.prune(now, window_s)
        for key, buckets in self.pending.items():
            for bucket, hits in buckets.items():
                _add(self.inflight, key, bucket, hits)
        self.pending = {}
        return {key: dict(buckets) for key, buckets in self.inflight.items()}

    def keys(self) -> list[str]:
        """Keys whose shared sums this process wants back: the ones it has seen in the window."""
        return sorted(set(self.shared) | set(self.inflight) | set(self.pending))

    def absorb(self, sums: dict[str, int]) -> None:
        """The shared sums read back after the in-flight counts were added to them."""
        self.shared = {key: hits for key, hits in sums.items() if hits > 0}
        self.inflight = {}

    def restore(self) -> None:
        """The hand-over failed: its counts stay local and go with the next one."""
        for key, buckets in self.inflight.items():
            for bucket, hits in buckets.items():
                _add(self.pending, key, bucket, hits)
        self.inflight = {}

    def prune(self, now: float, window_s: int) -> None:
        """Forget local buckets that left the window (they no longer count anywhere)."""
        oldest = oldest_bucket(now, window_s)
        for counts in (self.pending, self.inflight):
            for key in list(counts):
                kept = {b: n for b, n in counts[key].items() if b >= oldest}
                if kept:
                    counts[key] = kept
                else:
                    del counts[key]
