"""The outbound commands as an operator runs them: real processes, exit codes, readable output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dkim
import pytest

from tests.conftest import ROOT, settings_text
from tests.integration.test_cli import deskgate
from tests.mailbuild import make_mail


@pytest.fixture
def config(sqlite_url: str, tmp_path: Path) -> Path:
    path = tmp_path / "deskgate.toml"
    path.write_text(settings_text(sqlite_url))
    return path


def test_address_add_queues_a_code_and_list_shows_it_pending(config: Path) -> None:
    added = deskgate(config, "address", "add", "billing@example.test", "--department",
                     "billing")
    assert added.returncode == 0, added.stderr
    assert "pending" in added.stdout
    listing = json.loads(deskgate(config, "address", "list", "--json").stdout)
    assert {"email": "billing@example.test", "department": "billing", "state": "pending",
            "verified_at": None} in listing
    rows = json.loads(deskgate(config, "outbox", "list", "--json").stdout)
    assert [(r["kind"], r["state"], r["to"]) for r in rows] == [
        ("verification", "queued", "billing@example.test")]


def test_unknown_department_is_one_readable_line(config: Path) -> None:
    result = deskgate(config, "address", "add", "x@example.test", "--department", "nope")
    assert result.returncode == 1
    assert "there is no department 'nope'" in result.stderr
    assert "Traceback" not in result.stderr


def test_retry_of_a_row_that_is_not_failed_is_refused(config: Path) -> None:
    deskgate(config, "address", "add", "billing@example.test", "--department", "billing")
    result = deskgate(config, "outbox", "retry", "1")
    assert result.returncode == 1 and "is not failed" in result.stderr
    assert deskgate(config, "outbox", "replay", "99").returncode == 1


def test_dkim_keygen_writes_a_key_whose_record_verifies(config: Path, tmp_path: Path) -> None:
    key_file = tmp_path / "k" / "example.test.s1.key"
    result = deskgate(config, "dkim", "keygen", "--domain", "example.test", "--selector", "s1",
                      "--algorithm", "ed25519-sha256", "--out", str(key_file))
    assert result.returncode == 0, result.stderr
    record = result.stdout.strip().splitlines()[-1]
    assert record.startswith("s1._domainkey.example.test. IN TXT \"v=DKIM1; k=ed25519; p=")
    assert key_file.stat().st_mode & 0o077 == 0
    mail = make_mail().replace(b"From: Jess <jess@example.org>", b"From: s@example.test")
    signed = dkim.sign(mail, b"s1", b"example.test", key_file.read_bytes(),
                       signature_algorithm=b"ed25519-sha256") + mail
    value = record.split("TXT ", 1)[1].strip('"').encode()
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: value)
    again = deskgate(config, "dkim", "keygen", "--domain", "example.test", "--selector", "s1",
                     "--out", str(key_file))
    assert again.returncode == 1 and "--force" in again.stderr


@pytest.mark.parametrize("lang", ["en", "de", "nl", "zh"])
def test_render_prints_a_sample(config: Path, lang: str) -> None:
    result = deskgate(config, "render", "ack", "--lang", lang)
    assert result.returncode == 0 and result.stdout.startswith("Subject: ")
    assert "1234" in result.stdout


def test_check_config_refuses_dev_flags_outside_the_dev_config(tmp_path: Path) -> None:
    dev = (ROOT / "config" / "deskgate.dev.toml").read_text()
    copied = tmp_path / "production.toml"
    copied.write_text(dev)
    result = deskgate(copied, "check-config", str(copied))
    assert result.returncode == 2 and "dev: bootstrap/catch" in result.stderr
    ok = subprocess.run([sys.executable, "-m", "gateway.cli", "check-config",
                         str(ROOT / "config" / "deskgate.dev.toml")], capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
