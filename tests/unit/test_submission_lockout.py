"""Failed-login throttling over a fake clock: delays grow, limits lock, locks expire."""

from __future__ import annotations

import pytest

from gateway.errors import ConfigError
from gateway.replies import locked_out
from gateway.settings import parse_settings
from gateway.submission.auth import verdict
from gateway.submission.lockout import MAX_DELAY_FACTOR, PRUNE_ABOVE, Lockout, Policy, ip_key
from gateway.submission.tls import self_signed_dir
from tests.conftest import settings_text


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lockout(**policy: float) -> tuple[Lockout, Clock]:
    clock = Clock()
    defaults = {"max_failures": 5, "max_failures_per_ip": 20, "window_s": 900.0,
                "lockout_s": 900.0, "first_delay_s": 1.0}
    return Lockout(Policy(**(defaults | policy)), clock), clock  # type: ignore[arg-type]


def test_each_failure_waits_longer_until_the_address_is_locked() -> None:
    guard, clock = lockout()
    failures = [guard.failed("shawn@example.test", "192.0.2.1") for _ in range(5)]
    assert [f.delay_s for f in failures] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert [f.locked for f in failures] == [(), (), (), (), ("address",)]
    assert guard.locked_for("SHAWN@example.test", "198.51.100.7") == 900.0  # any IP
    clock.now += 899
    assert guard.locked_for("shawn@example.test", "198.51.100.7") == pytest.approx(1.0)
    clock.now += 1
    assert guard.locked_for("shawn@example.test", "198.51.100.7") == 0.0
    # After the lock the count starts afresh: one typo is one typo again.
    assert guard.failed("shawn@example.test", "192.0.2.1").locked == ()
    assert guard.locked_for("shawn@example.test", "192.0.2.1") == 0.0


def test_failures_older_than_the_window_are_forgotten() -> None:
    guard, clock = lockout(window_s=60.0)
    for _ in range(4):
        guard.failed("a@example.test", "192.0.2.1")
    clock.now += 61
    assert guard.failed("a@example.test", "192.0.2.1") == guard.failed(
        "b@example.test", "192.0.2.9")  # one failure each in the window: the first delay
    assert guard.locked_for("a@example.test", "192.0.2.1") == 0.0


def test_the_client_ip_is_locked_across_addresses() -> None:
    guard, _ = lockout(max_failures_per_ip=3)
    results = [guard.failed(f"user{i}@example.test", "192.0.2.1") for i in range(3)]
    assert results[-1].locked == ("ip",)
    assert guard.locked_for("somebody-else@example.test", "192.0.2.1") == 900.0
    assert guard.locked_for("user0@example.test", "192.0.2.2") == 0.0  # the address is not


def test_success_forgets_the_address_but_not_the_ip() -> None:
    guard, _ = lockout(max_failures=3, max_failures_per_ip=4)
    guard.failed("a@example.test", "192.0.2.1")
    guard.failed("a@example.test", "192.0.2.1")
    guard.succeeded("a@example.test")
    assert guard.failed("a@example.test", "192.0.2.1").locked == ()
    assert guard.failed("b@example.test", "192.0.2.1").locked == ("ip",)  # 4th from this IP


def test_the_delay_is_capped() -> None:
    guard, _ = lockout(max_failures=100, max_failures_per_ip=100, first_delay_s=0.5)
    delays = [guard.failed("a@example.test", "192.0.2.1").delay_s for _ in range(10)]
    assert max(delays) == 0.5 * MAX_DELAY_FACTOR and delays == sorted(delays)


def test_prune_keeps_memory_bounded_under_a_spray_of_logins() -> None:
    guard, clock = lockout(window_s=10.0, lockout_s=10.0)
    for i in range(PRUNE_ABOVE + 5):
        guard.failed(f"made-up-{i}@example.test", "192.0.2.1")
        clock.now += 0.001
    clock.now += 11
    guard.failed("last@example.test", "192.0.2.2")
    assert len(guard) <= 3  # the last address, its IP; the sprayed ones are gone


def test_ipv6_clients_are_counted_by_their_64() -> None:
    assert ip_key("2001:db8:1:2:aaaa::1") == ip_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert ip_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert ip_key("192.0.2.1") == "192.0.2.1"


def test_login_verdicts_and_lock_text() -> None:
    assert verdict(False, False, False, False) == "unknown"
    assert verdict(True, False, True, True) == "disabled"
    assert verdict(True, True, False, False) == "no_password"
    assert verdict(True, True, True, False) == "wrong_password"
    assert verdict(True, True, True, True) == "ok"
    assert locked_out(900).startswith("454 4.7.0 ") and "15 minutes" in locked_out(900)
    assert "1 minute" in locked_out(5) and "minutes" not in locked_out(5)


def test_submission_settings() -> None:
    base = settings_text("sqlite+aiosqlite:///x.db")
    assert not parse_settings(base, "t.toml").submission.enabled  # no table: no listener
    sub = parse_settings(base + '[submission]\nlisten = "127.0.0.1:0"\n', "t.toml")
    assert sub.submission.enabled and sub.submission.tls_listen is None
    assert str(sub.submission) == "127.0.0.1:0"
    text = base + ('[submission]\ntls_listen = "0.0.0.0:465"\nmax_failures = 3\n'
                   'cert_file = "/nonexistent.pem"\n')
    with pytest.raises(ConfigError) as caught:
        parse_settings(text, "t.toml")
    problems = "\n".join(caught.value.problems)
    assert "submission.cert_file: cert_file and key_file go together" in problems
    assert "submission.cert_file: /nonexistent.pem is not a readable file" in problems
    ok = parse_settings(base + '[submission]\ntls_listen = "[::]:465"\nmax_failures = 3\n',
                        "t.toml").submission
    assert (ok.listen.port, ok.tls_listen and ok.tls_listen.port, ok.max_failures) == (587, 465, 3)
    bad = base + '[submission]\ntls_listen = "nope"\nlockout_s = 0\n'
    with pytest.raises(ConfigError) as caught:
        parse_settings(bad, "t.toml")
    problems = "\n".join(caught.value.problems)
    assert "submission.tls_listen: must look like HOST:PORT" in problems
    assert "submission.lockout_s: must be at least 1" in problems


def test_the_self_signed_certificate_goes_to_the_state_directory() -> None:
    base = settings_text("sqlite+aiosqlite:///x.db") + '[submission]\nlisten = "127.0.0.1:0"\n'
    assert str(self_signed_dir(parse_settings(base, "t.toml"))) == "."  # systemd: StateDirectory
    dev = base + '[dev]\nbootstrap = true\ndir = "/tmp/dev-state"\n'
    assert str(self_signed_dir(parse_settings(dev, "t.toml"))) == "/tmp/dev-state"
    explicit = dev.replace("[dev]", 'tls_dir = "/x/tls"\n[dev]')  # still in [submission]
    assert str(self_signed_dir(parse_settings(explicit, "t.toml"))) == "/x/tls"
