"""drain_timeout_s: the SIGTERM drain bound, validated like every other key."""

from __future__ import annotations

import pytest

from gateway.errors import ConfigError
from gateway.settings import parse_settings
from tests.conftest import settings_text

URL = "sqlite+aiosqlite:///:memory:"


def test_drain_timeout_defaults_to_30_seconds() -> None:
    assert parse_settings(settings_text(URL)).drain_timeout_s == 30.0


def test_drain_timeout_is_read_from_the_top_level() -> None:
    assert parse_settings("drain_timeout_s = 5\n" + settings_text(URL)).drain_timeout_s == 5.0


@pytest.mark.parametrize("value", ["0", "601", '"soon"'])
def test_a_bad_drain_timeout_names_key_and_line(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings(f"drain_timeout_s = {value}\n" + settings_text(URL), "d.toml")
    assert any(p.startswith("d.toml:1: drain_timeout_s: must be") for p in caught.value.problems)
