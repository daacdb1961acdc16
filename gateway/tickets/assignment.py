"""Who owns a new ticket: round-robin or least-open among the department's agents (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

STRATEGIES = ("none", "round_robin", "least_open")
_NEVER = datetime.min


@dataclass(frozen=True, slots=True)
class Candidate:
    agent_id: int
    open_tickets: int
    last_assigned_at: datetime | None  # newest ticket they were given; None: never


def pick_owner(strategy: str, candidates: list[Candidate]) -> int | None:
    """Round-robin gives the ticket to whoever waited longest since their last one;
    least-open to whoever has the fewest open tickets (then the longest wait)."""
    if strategy == "none" or not candidates:
        return None

    def waited(c: Candidate) -> tuple[datetime, int]:
        last = c.last_assigned_at.replace(tzinfo=None) if c.last_assigned_at else _NEVER
        return last, c.agent_id

    if strategy == "least_open":
        return min(candidates, key=lambda c: (c.open_tickets, *waited(c))).agent_id
    return min(candidates, key=waited).agent_id
