"""`deskgate doctor` against a live setup: store, addresses, relay, DKIM key and its DNS."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.doctor import run_checks
from gateway.outbound import dkim
from gateway.outbound.catcher import CatchHandler, start_catcher
from tests.conftest import settings_text


@pytest.fixture
def db_url(sqlite_url: str) -> str:
    return sqlite_url


async def _setup(make_gateway: Any, tmp_path: Path, relay_up: bool = True) -> tuple[Any, str]:
    key = dkim.generate("ed25519-sha256")
    dkim.write_key(tmp_path / "dk.key", key)
    server = await start_catcher(CatchHandler(), "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    if not relay_up:
        server.close()
        await server.wait_closed()
    gw = await make_gateway(extra=(
        f'[relay]\nlisten = "127.0.0.1:{port}"\n[outbox]\nworker = false\n'
        f'[dev]\nbootstrap = true\ndir = "{tmp_path}"\n'
        f'[[dkim.keys]]\ndomain = "example.test"\nselector = "s1"\n'
        f'algorithm = "ed25519-sha256"\nkey_file = "{tmp_path / "dk.key"}"\n'))
    gw.doctor_relay = server
    return gw, key.dns_value


def _states(checks: list[Any]) -> dict[str, str]:
    return {c.name: c.state for c in checks}


async def test_a_healthy_setup_is_all_ok(make_gateway: Any, tmp_path: Path) -> None:
    gw, record = await _setup(make_gateway, tmp_path)

    async def dns(name: str) -> list[str]:
        return [record] if name == "s1._domainkey.example.test" else []

    checks = await run_checks(gw.settings, gw.store, dns)
    gw.doctor_relay.close()
    assert set(_states(checks).values()) == {"ok"}, [str(c) for c in checks]
    assert "address support@example.test" in _states(checks)


async def test_wrong_dns_record_and_dead_relay_fail_and_offline_dns_is_skipped(
        make_gateway: Any, tmp_path: Path) -> None:
    gw, _ = await _setup(make_gateway, tmp_path, relay_up=False)

    async def wrong(name: str) -> list[str]:
        return ["v=DKIM1; k=ed25519; p=AAAA"]

    async def offline(name: str) -> None:
        return None

    states = _states(await run_checks(gw.settings, gw.store, wrong))
    assert states["relay"] == "FAIL"
    assert states["dkim s1._domainkey.example.test"] == "FAIL"
    offline_states = _states(await run_checks(gw.settings, gw.store, offline))
    assert offline_states["dkim s1._domainkey.example.test"] == "skip"


def test_doctor_command_exits_1_and_names_unverified_addresses(sqlite_url: str,
                                                                tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on: the relay is "down"
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    config = tmp_path / "deskgate.toml"
    config.write_text(settings_text(sqlite_url, extra=f'[relay]\nlisten = "127.0.0.1:{closed}"'))
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "--config", str(config),
                             "doctor"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "ok    database: sqlite, schema up to date" in result.stdout
    assert f"FAIL  relay: 127.0.0.1:{closed}" in result.stdout
    assert "Traceback" not in result.stderr
