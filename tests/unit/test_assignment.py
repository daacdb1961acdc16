"""Assignment strategies as a pure choice over the department's agents."""

from datetime import UTC, datetime, timedelta

from gateway.tickets.assignment import Candidate, pick_owner

T = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


def test_round_robin_picks_who_waited_longest_and_newcomers_first() -> None:
    agents = [Candidate(1, 5, T), Candidate(2, 0, T - timedelta(hours=1)), Candidate(3, 9, None)]
    assert pick_owner("round_robin", agents) == 3
    assert pick_owner("round_robin", agents[:2]) == 2


def test_least_open_picks_the_lightest_load() -> None:
    agents = [Candidate(1, 5, None), Candidate(2, 1, T), Candidate(3, 1, T - timedelta(1))]
    assert pick_owner("least_open", agents) == 3


def test_none_and_nobody_mean_unowned() -> None:
    assert pick_owner("none", [Candidate(1, 0, None)]) is None
    assert pick_owner("round_robin", []) is None
