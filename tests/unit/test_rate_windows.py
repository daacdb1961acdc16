"""The sliding-window counts of the inbound rate limits, over a fake clock (issue 11)."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.errors import ConfigError
from gateway.inbound.limits import ConnectionGate, client_ip
from gateway.inbound.rate_windows import (
    Windows,
    bucket_of,
    bucket_width,
    oldest_bucket,
    rules_for,
)
from gateway.settings_limits import InboundLimits
from tests.conftest import make_settings

WINDOW = 600  # ten buckets of 60 s
T0 = 60.0 * 29_916_667  # a bucket boundary (2026-11-18), in epoch seconds


def _sender(limit: int = 3) -> tuple:
    return rules_for("Jess@Example.org", None, limit, 0, 0)


def test_window_is_ten_buckets_ending_with_the_current_one() -> None:
    assert bucket_width(WINDOW) == 60
    assert bucket_of(T0 + 59.9, WINDOW) == T0
    assert bucket_of(T0 + 60, WINDOW) == T0 + 60
    assert oldest_bucket(T0 + 30, WINDOW) == T0 - 540
    assert bucket_width(5) == 1 and oldest_bucket(T0, 5) == T0 - 4


def test_rules_name_sender_domain_and_ip_and_skip_what_is_off() -> None:
    rules = rules_for("Jess@Example.ORG", "192.0.2.7", 30, 300, 600)
    assert [(r.kind, r.key, r.limit) for r in rules] == [
        ("sender", "sender:jess@example.org", 30), ("domain", "domain:example.org", 300),
        ("ip", "ip:192.0.2.7", 600)]
    assert [r.kind for r in rules_for("jess@example.org", "192.0.2.7", 0, 300, 0)] == ["domain"]
    # A null sender (a bounce) counts against the client only.
    assert [r.kind for r in rules_for("", "192.0.2.7", 30, 300, 600)] == ["ip"]
    assert rules_for("", None, 30, 300, 600) == ()


def test_limit_refuses_the_mail_after_the_threshold() -> None:
    windows = Windows()
    answers = [windows.admit(_sender(3), T0 + i, WINDOW) for i in range(5)]
    assert [a is None for a in answers] == [True, True, True, False, False]
    assert answers[3] is not None and answers[3].kind == "sender"
    assert windows.count("sender:jess@example.org", T0 + 5, WINDOW) == 3  # refusals not counted


def test_window_slides_by_whole_buckets() -> None:
    windows = Windows()
    for i in range(3):
        assert windows.admit(_sender(3), T0 + i, WINDOW) is None
    assert windows.admit(_sender(3), T0 + 599, WINDOW) is not None  # same ten buckets
    assert windows.admit(_sender(3), T0 + 600, WINDOW) is None  # the first bucket left
    assert windows.count("sender:jess@example.org", T0 + 600, WINDOW) == 1


def test_any_rule_at_its_limit_refuses_and_counts_nothing() -> None:
    windows = Windows()
    for i in range(2):
        assert windows.admit(rules_for(f"c{i}@example.org", None, 5, 2, 0), T0, WINDOW) is None
    over = windows.admit(rules_for("new@example.org", None, 5, 2, 0), T0, WINDOW)
    assert over is not None and over.kind == "domain"
    assert windows.count("sender:new@example.org", T0, WINDOW) == 0


def test_shared_sums_add_to_local_counts_and_nothing_counts_twice() -> None:
    windows = Windows()
    windows.admit(_sender(10), T0, WINDOW)
    handed = windows.hand_over(T0 + 1, WINDOW)
    assert handed == {"sender:jess@example.org": {T0: 1}}
    windows.admit(_sender(10), T0 + 1, WINDOW)  # arrives while the hand-over is in flight
    assert windows.count("sender:jess@example.org", T0 + 1, WINDOW) == 2
    windows.absorb({"sender:jess@example.org": 1 + 6})  # ours plus another instance's six
    assert windows.count("sender:jess@example.org", T0 + 1, WINDOW) == 8
    assert windows.keys() == ["sender:jess@example.org"]


def test_failed_hand_over_keeps_the_counts_for_the_next() -> None:
    windows = Windows()
    windows.admit(_sender(10), T0, WINDOW)
    windows.hand_over(T0, WINDOW)
    windows.restore()
    assert windows.count("sender:jess@example.org", T0, WINDOW) == 1
    assert windows.hand_over(T0 + 2, WINDOW) == {"sender:jess@example.org": {T0: 1}}


def test_prune_forgets_buckets_outside_the_window() -> None:
    windows = Windows()
    windows.admit(_sender(10), T0, WINDOW)
    windows.admit(rules_for("late@example.org", None, 10, 0, 0), T0 + 600, WINDOW)
    assert windows.hand_over(T0 + 600, WINDOW) == {"sender:late@example.org": {T0 + 600: 1}}


def test_connection_gate_counts_per_client_and_in_total() -> None:
    limits = InboundLimits(max_connections=3, max_connections_per_ip=2, exempt_ips=())
    gate = ConnectionGate()
    assert gate.admit("192.0.2.1", limits) == (None, "192.0.2.1")
    assert gate.admit("192.0.2.1", limits) == (None, "192.0.2.1")
    assert gate.admit("192.0.2.1", limits) == ("connections_per_ip", None)
    assert gate.admit("192.0.2.2", limits) == (None, "192.0.2.2")
    assert gate.admit("192.0.2.3", limits) == ("connections_total", None)
    gate.release("192.0.2.1")
    assert gate.admit("192.0.2.1", limits) == (None, "192.0.2.1")
    for key in ("192.0.2.1", "192.0.2.1", "192.0.2.2"):
        gate.release(key)
    assert (gate.total, dict(gate.per_ip)) == (0, {})


def test_exempt_clients_count_only_in_the_total() -> None:
    limits = InboundLimits(max_connections=0, max_connections_per_ip=1,
                           exempt_ips=(ipaddress.ip_network("10.0.0.0/8"),))
    gate = ConnectionGate()
    assert [gate.admit("10.1.2.3", limits) for _ in range(3)] == [(None, None)] * 3
    assert gate.total == 3 and not gate.per_ip


def test_client_ip_unmaps_ipv4_in_ipv6() -> None:
    assert client_ip(("::ffff:192.0.2.9", 25, 0, 0)) == "192.0.2.9"
    assert client_ip(("2001:db8::1", 25, 0, 0)) == "2001:db8::1"
    assert client_ip(("127.0.0.1", 40000)) == "127.0.0.1"
    assert client_ip(None) is None


def test_limit_keys_are_read_and_bad_ones_named_with_their_line() -> None:
    limits = make_settings(extra="max_connections_per_ip = 5\nlimits_exempt_ips = ['10.0.0.0/8']"
                                  "\n[inbound.rate_limits]\nper_sender = 7\n").inbound.limits
    assert (limits.max_connections_per_ip, limits.rates.per_sender) == (5, 7)
    assert limits.exempt("10.9.8.7") and not limits.exempt("127.0.0.1")
    assert limits.command_call_limit()["RCPT"] == 1000 * 100
    with pytest.raises(ConfigError) as error:
        make_settings(extra="max_recipients = 0\nlimits_exempt_ips = ['nope']\n"
                            "[inbound.rate_limits]\nwindow = 5\n")
    problems = str(error.value)
    assert "test.toml:10: inbound.max_recipients: must be at least 1" in problems
    assert "inbound.limits_exempt_ips[0]: 'nope' is not an IP address" in problems
    assert "inbound.rate_limits.window: is not a known key" in problems
