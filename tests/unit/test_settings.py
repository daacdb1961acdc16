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


def test_address_owned_twice_is_refused() -> None:
    text = settings_text("sqlite+aiosqlite:///x.db").replace('"billing@example.test"',
                                                             '"support@example.test"')
    with pytest.raises(ConfigError, match="belongs to Support and Billing"):
        parse_settings(text, "t.toml")


def test_invalid_toml_is_one_readable_problem() -> None:
    with pytest.raises(ConfigError, match="t.toml: not valid TOML"):
        parse_settings("[inbound\nlisten=1", "t.toml")
