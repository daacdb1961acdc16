"""Issue 7's pure decisions: settings, big-message plan, SELECT parsing, health and alerts,
XOAUTH2 token answers, history status."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.inbound import imap_plan as plan
from gateway.inbound.imap_alert import already_alerted
from gateway.inbound.imap_client import ImapProblem
from gateway.inbound.imap_history import history_status
from gateway.inbound.imap_oauth import TokenRevoked, token_answer, token_form
from gateway.settings import parse_settings
from gateway.settings_imap import _KEYS, OAuthRefresh
from gateway.tickets.lifecycle import Status
from tests.conftest import ROOT, make_settings

BASE = ('[[imap]]\nname = "box"\nhost = "imap.example.com"\nuser = "u"\n'
        'department = "support"\n')


def imap(extra: str = 'password_env = "P"\n', top: str = "") -> str:
    return top + BASE + extra


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        make_settings(extra=text)
    return caught.value.problems


def test_defaults_start_from_now_alert_after_15_minutes_and_inbound_size_limit() -> None:
    box = make_settings(extra=imap()).imap[0]
    assert (box.start_from, box.alert_after_s, box.max_message_bytes) == ("now", 900, 1048576)


def test_global_alert_after_and_operators_come_from_alerts() -> None:
    settings = make_settings(extra=imap() + '[alerts]\noperators = ["Ops@Example.org"]\n'
                                           "imap_alert_after_s = 120\n")
    assert settings.alerts.operators == ("ops@example.org",)
    assert settings.imap[0].alert_after_s == 120
    mine = make_settings(extra=imap('password_env = "P"\nalert_after_s = 300\n')).imap[0]
    assert mine.alert_after_s == 300


@pytest.mark.parametrize(("extra", "key", "words"), [
    ('password_env = "P"\nfrom = "yesterday"\n', "imap[0].from", "now or all"),
    ('password_env = "P"\npoll_interval_s = 60\nalert_after_s = 60\n', "imap[0].alert_after_s",
     "longer than poll_interval_s"),
    ('auth = "xoauth2"\n', "imap[0].token_command", "token_url + client_id"),
    ('auth = "xoauth2"\ntoken_command = "x"\ntoken_url = "https://t"\nclient_id = "c"\n'
     'refresh_token_file = "/r"\n', "imap[0].token_command", "either token_command"),
    ('auth = "xoauth2"\ntoken_url = "https://t"\n', "imap[0].token_url", "go together"),
    ('auth = "xoauth2"\ntoken_url = "ftp://t"\nclient_id = "c"\nrefresh_token_file = "/r"\n',
     "imap[0].token_url", "http(s) URL"),
    ('password_env = "P"\nmax_message_bytes = 10\n', "imap[0].max_message_bytes", "1024"),
])
def test_bad_imap_settings_name_the_key(extra: str, key: str, words: str) -> None:
    found = problems(imap(extra))
    assert any(f": {key}: " in p and words in p for p in found), found


def test_bad_operator_address_names_the_key() -> None:
    found = problems(imap() + '[alerts]\noperators = ["not an address"]\n')
    assert any("alerts.operators[0]" in p for p in found), found


def test_refresh_token_flow_settings() -> None:
    box = make_settings(extra=imap('auth = "xoauth2"\ntoken_url = "https://login.example/t"\n'
                                   'client_id = "app"\nrefresh_token_file = "/etc/r"\n'
                                   'scope = "https://outlook.office.com/IMAP.AccessAsUser.All"\n'
                                   )).imap[0]
    assert box.oauth == OAuthRefresh("https://login.example/t", "app", "/etc/r", None,
                                     "https://outlook.office.com/IMAP.AccessAsUser.All")


def test_fetch_plan_keeps_uid_order_skips_the_too_big_and_bounds_bytes() -> None:
    sized = [(5, 30), (1, 10), (2, 10), (3, 100), (4, 5), (6, 30)]
    assert list(plan.fetch_plan(sized, limit=50, max_bytes=40)) == [
        ("fetch", [(1, 10), (2, 10)]), ("skip", [(3, 100)]),
        ("fetch", [(4, 5), (5, 30)]), ("fetch", [(6, 30)])]
    # One mail above the byte budget (but under the limit) is fetched alone.
    assert list(plan.fetch_plan([(1, 90), (2, 1)], limit=100, max_bytes=40)) == [
        ("fetch", [(1, 90)]), ("fetch", [(2, 1)])]
    assert list(plan.fetch_plan([], 10, 10)) == []


def test_select_answer_gives_uidvalidity_uidnext_and_count() -> None:
    lines = [b"FLAGS (\\Answered \\Seen)", b"12 EXISTS", b"0 RECENT",
             b"OK [UIDVALIDITY 1763900000] UIDs valid", b"OK [UIDNEXT 57] Predicted next UID",
             b"[READ-WRITE] Select completed (0.001 + 0.000 secs)."]
    assert plan.parse_select(lines) == plan.FolderInfo(1763900000, 57, 12)
    assert plan.parse_select([b"OK [UIDVALIDITY 3] x"]) == plan.FolderInfo(3, None, None)


def test_sizes_parse_in_either_item_order() -> None:
    lines = [b"1 FETCH (UID 7 RFC822.SIZE 1200)", b"2 FETCH (RFC822.SIZE 99 UID 9)",
             b"Fetch completed."]
    assert plan.parse_sizes(lines) == [(7, 1200), (9, 99)]


def test_failing_after_three_failures_or_while_alerting() -> None:
    assert not plan.is_failing(2, alerting=False)
    assert plan.is_failing(3, alerting=False)
    assert plan.is_failing(0, alerting=True)


def test_alert_is_due_once_after_alert_after_without_success() -> None:
    assert not plan.alert_due(now_s=100.0, last_success_s=0.0, alert_after_s=900,
                              alerting=False)
    assert plan.alert_due(now_s=900.0, last_success_s=0.0, alert_after_s=900, alerting=False)
    assert not plan.alert_due(now_s=5000.0, last_success_s=0.0, alert_after_s=900,
                              alerting=True)


def test_one_alert_per_outage_across_restarts() -> None:
    t = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
    assert not already_alerted(None, t)
    assert already_alerted(t, None)  # never fetched, already mailed
    assert already_alerted(t + timedelta(minutes=20), t)  # this outage was mailed
    assert not already_alerted(t, t + timedelta(minutes=5))  # a success since: new outage


def test_token_request_form() -> None:
    oauth = OAuthRefresh("https://t", "app", "/r", None, "scope-a")
    assert token_form(oauth, "rt", "cs") == {"grant_type": "refresh_token",
                                             "refresh_token": "rt", "client_id": "app",
                                             "client_secret": "cs", "scope": "scope-a"}


def test_token_answers() -> None:
    granted = token_answer(200, b'{"access_token": "at", "expires_in": 3599, '
                                b'"refresh_token": "rt2"}', "https://t")
    assert (granted.access_token, granted.expires_in_s, granted.refresh_token) == \
        ("at", 3599.0, "rt2")
    with pytest.raises(TokenRevoked, match="invalid_grant .*expired.*authorize deskgate"):
        token_answer(400, b'{"error": "invalid_grant", "error_description": "expired"}',
                     "https://t")
    with pytest.raises(ImapProblem, match="temporarily_unavailable") as transient:
        token_answer(503, b'{"error": "temporarily_unavailable"}', "https://t")
    assert not isinstance(transient.value, TokenRevoked)  # retried, not alerted at once
    with pytest.raises(ImapProblem, match="without JSON"):
        token_answer(502, b"<html>Bad Gateway</html>", "https://t")


def test_history_ticket_closes_unless_the_customer_wrote_last() -> None:
    assert history_status(customer_wrote=True, current="open") is None
    assert history_status(customer_wrote=False, current="open") is Status.CLOSED
    assert history_status(customer_wrote=False, current="closed") is None


def test_example_config_documents_every_imap_and_alerts_key(tmp_path: Path) -> None:
    """Uncomment the example's [[imap]] and [alerts] blocks: they parse as documented."""
    secret = tmp_path / "secret"
    secret.write_text("a-secret-of-enough-length\n")
    text = (ROOT / "config" / "deskgate.example.toml").read_text()
    head, sep, tail = text.partition("# [[imap]]\n")
    tail = re.sub(r"(?m)^# (?=\[|[a-z_]+ = )", "", sep + tail)
    settings = parse_settings((head + tail).replace("/etc/deskgate/secret", str(secret)),
                              "example")
    box = settings.imap[0]
    assert (box.name, box.start_from, box.after_import.action) == ("support-mailbox", "now",
                                                                    "seen")
    assert settings.alerts.operators == ("ops@example.com",)
    documented = set(re.findall(r"(?m)^(?:# )*([a-z_]+) = ", tail))
    assert _KEYS <= documented, _KEYS - documented
