"""Configuration: readable errors naming the key and line, example files that load."""

from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.settings import load_settings, parse_settings
from tests.conftest import ROOT, settings_text


def test_example_and_dev_configs_are_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    dev = load_settings(ROOT / "config" / "deskgate.dev.toml")
    assert [d.slug for d in dev.departments] == ["support", "billing"]
    assert (dev.inbound.listen.port, dev.relay.port, dev.submission.port, dev.web.port) == (
        2525, 2526, 2587, 8080)
    secret = tmp_path / "secret"
    secret.write_text("a-secret-of-enough-length\n")
    text = (ROOT / "config" / "deskgate.example.toml").read_text()
    example = parse_settings(text.replace("/etc/deskgate/secret", str(secret)), "example")
    assert example.department_of("help@example.com").slug == "support"


def test_unknown_key_is_named_with_its_line() -> None:
    text = settings_text("sqlite+aiosqlite:///x.db", extra="max_mesage_bytes = 10")
    with pytest.raises(ConfigError) as caught:
        parse_settings(text, "deskgate.toml")
    line = text.splitlines().index("max_mesage_bytes = 10") + 1
    assert caught.value.problems == [
        f"deskgate.toml:{line}: inbound.max_mesage_bytes: is not a known key "
        "(see config/deskgate.example.toml)"]


def test_wrong_type_and_bad_address_are_both_reported() -> None:
    text = settings_text("sqlite+aiosqlite:///x.db", extra='trusted_authserv_ids = 5')
    text = text.replace('"billing@example.test"', '"not-an-address"')
    with pytest.raises(ConfigError) as caught:
        parse_settings(text, "t.toml")
    joined = "\n".join(caught.value.problems)
    assert "inbound.trusted_authserv_ids: must be a list, not 5" in joined
    assert "departments[1].addresses[0]: 'not-an-address' is not an e-mail address" in joined


def test_an_idn_address_is_kept_ascii_and_a_unicode_local_part_is_refused() -> None:
    text = settings_text("sqlite+aiosqlite:///x.db")
    idn = parse_settings(text.replace('"billing@example.test"', '"Billing@Exämple.test"'), "t")
    assert idn.departments[1].addresses == ("billing@xn--exmple-cua.test",)
    text = text.replace('"billing@example.test"', '"bïlling@example.test"')
    with pytest.raises(ConfigError) as caught:
        parse_settings(text, "t")
    [problem] = caught.value.problems
    assert problem.split(": ", 1)[1] == (
        "departments[1].addresses[0]: 'bïlling@example.test' is not an e-mail address "
        "deskgate can send from: Internationalized characters before the @-sign are not "
        "supported: 'ï'.")


def test_address_owned_twice_is_refused() -> None:
    text = settings_text("sqlite+aiosqlite:///x.db").replace('"billing@example.test"',
                                                             '"support@example.test"')
    with pytest.raises(ConfigError, match="belongs to Support and Billing"):
        parse_settings(text, "t.toml")


def test_invalid_toml_is_one_readable_problem() -> None:
    with pytest.raises(ConfigError, match="t.toml: not valid TOML"):
        parse_settings("[inbound\nlisten=1", "t.toml")


def test_sla_keys_are_validated_with_their_names() -> None:
    text = settings_text("sqlite+aiosqlite:///x.db").replace('slug = "support"', '''slug = "support"
business_hours = { mon = ["9-18"], funday = ["10:00-11:00"] }
holidays = ["25.12.2026"]
sla.urgent = { first_response_min = 10 }
sla.high = { first_response_min = -5 }''', 1)
    with pytest.raises(ConfigError) as caught:
        parse_settings(text, "t.toml")
    joined = "\n".join(caught.value.problems)
    for expected in ("departments[0].business_hours.funday: is not a weekday",
                     "departments[0].business_hours.mon[0]: '9-18'",
                     "departments[0].holidays[0]: '25.12.2026' is not a date",
                     "departments[0].sla.urgent: must be a table for one of high",
                     "departments[0].sla.high.first_response_min: must be a positive number"):
        assert expected in joined


def test_priority_rules_raise_but_never_lower() -> None:
    text = settings_text("sqlite+aiosqlite:///x.db").replace('slug = "support"', '''slug = "support"
default_priority = "medium"
priority_rules = [{ sender_domains = ["vip.example"], priority = "high" },
                  { subject_words = ["newsletter"], priority = "low" }]''', 1)
    sla = parse_settings(text, "t.toml").departments[0].sla
    assert sla.priority_for("ceo@vip.example", "hello") == "high"
    assert sla.priority_for("a@b.example", "Newsletter question") == "medium"
    assert sla.priority_for(None, "hello") == "medium"
