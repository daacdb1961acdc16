"""The command line as people and MTAs use it: real processes, exit codes, one-line errors."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tests.conftest import settings_text
from tests.mailbuild import make_mail


@pytest.fixture
def config(sqlite_url: str, tmp_path: Path) -> Path:
    path = tmp_path / "deskgate.toml"
    path.write_text(settings_text(sqlite_url))
    return path


def deskgate(config: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "--config", str(config), *args],
                            input=stdin, capture_output=True, timeout=60)
    return subprocess.CompletedProcess(result.args, result.returncode,
                                       result.stdout.decode(), result.stderr.decode())


def test_check_config_names_each_bad_key_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[inbound]\nlisten = "nowhere"\nsize = 3\n')
    result = deskgate(bad, "check-config", str(bad))
    assert result.returncode == 2
    assert f"{bad}:2: inbound.listen: must look like HOST:PORT" in result.stderr
    assert f"{bad}:3: inbound.size: is not a known key" in result.stderr
    assert "Traceback" not in result.stderr


def test_deliver_stores_and_answers_like_an_mta_expects(config: Path) -> None:
    stored = deskgate(config, "deliver", "--recipient", "billing@example.test",
                      "--sender", "jess@example.org", stdin=make_mail(subject="Piped"))
    assert (stored.returncode, stored.stderr) == (0, "")
    unknown = deskgate(config, "deliver", "--recipient", "nobody@example.test",
                       stdin=make_mail())
    assert unknown.returncode == 67
    assert "nobody@example.test: no such address here" in unknown.stderr
    listing = json.loads(deskgate(config, "ticket", "list", "--json").stdout)
    assert [(t["number"], t["subject"], t["department"]) for t in listing] == [
        (1, "Piped", "billing")]


def test_deliver_with_the_store_down_asks_the_mta_to_retry(tmp_path: Path) -> None:
    down = tmp_path / "down.toml"
    down.write_text(settings_text("postgresql+asyncpg://postgres@127.0.0.1:1/none"))
    result = deskgate(down, "deliver", "--recipient", "support@example.test", stdin=make_mail())
    assert result.returncode == 75
    assert "temporary failure" in result.stderr
    assert "Traceback" not in result.stderr


def test_ticket_show_contact_show_and_close(config: Path) -> None:
    deskgate(config, "deliver", "--recipient", "support@example.test",
             stdin=make_mail(subject="Printer on fire", body="It is burning."))
    shown = deskgate(config, "ticket", "show", "1")
    assert "Ticket 1: Printer on fire" in shown.stdout and "It is burning." in shown.stdout
    detail = json.loads(deskgate(config, "ticket", "show", "1", "--json").stdout)
    assert detail["thread"][0]["from"] == "jess@example.org"
    contact = json.loads(deskgate(config, "contact", "show", "JESS@example.org", "--json").stdout)
    assert [t["number"] for t in contact["tickets"]] == [1]
    assert deskgate(config, "ticket", "close", "1").returncode == 0
    again = deskgate(config, "ticket", "close", "1")
    assert (again.returncode, again.stderr.strip()) == (
        1, "deskgate: ticket 1: the ticket is already closed")
    assert json.loads(deskgate(config, "ticket", "list", "--status", "closed", "--json").stdout)
    missing = deskgate(config, "ticket", "show", "42")
    assert (missing.returncode, missing.stderr.strip()) == (1, "deskgate: there is no ticket 42")


def test_quarantine_list_show_and_reprocess(config: Path, tmp_path: Path) -> None:
    garbage = b"\x00\x01 not a mail\r\n"
    assert deskgate(config, "deliver", "--recipient", "support@example.test",
                    stdin=garbage).returncode == 0
    entries = json.loads(deskgate(config, "quarantine", "list", "--json").stdout)
    assert len(entries) == 1 and entries[0]["reason"]
    raw = subprocess.run([sys.executable, "-m", "gateway.cli", "--config", str(config),
                          "quarantine", "show", str(entries[0]["id"]), "--raw"],
                         capture_output=True, check=True).stdout
    assert raw == garbage
    held = deskgate(config, "quarantine", "reprocess", str(entries[0]["id"]))
    assert held.returncode == 1 and "stays held" in held.stdout


def test_reprocess_releases_a_bounce_once_its_ticket_exists(config: Path) -> None:
    bounce = (b"From: MAILER-DAEMON@mx.example.org\r\nTo: support@example.test\r\n"
              b"Subject: Undelivered Mail Returned to Sender\r\nMessage-ID: <dsn1@mx>\r\n"
              b"In-Reply-To: <orig@example.org>\r\n\r\nThe mail could not be delivered.\r\n")
    deskgate(config, "deliver", "--recipient", "support@example.test", stdin=bounce)
    entry = json.loads(deskgate(config, "quarantine", "list", "--json").stdout)[0]
    assert "bounce" in entry["reason"]
    deskgate(config, "deliver", "--recipient", "support@example.test",
             stdin=make_mail(message_id="<orig@example.org>"))
    released = deskgate(config, "quarantine", "reprocess", str(entry["id"]))
    assert (released.returncode, released.stdout.strip()) == (
        0, f"quarantine entry {entry['id']} released to ticket 1")
    assert json.loads(deskgate(config, "quarantine", "list", "--json").stdout) == []
    kinds = [m["kind"] for m in json.loads(deskgate(config, "ticket", "show", "1", "--json")
                                           .stdout)["thread"]]
    assert kinds == ["customer", "bounce"]


def test_pipe_sender_comes_from_the_flag_then_the_return_path() -> None:
    from gateway.cli import _pipe_sender

    assert _pipe_sender("", b"From: a@b\r\n\r\n") == ""  # the MTA said <>: a null sender
    assert _pipe_sender(None, b"Return-Path: <x@y.example>\r\nFrom: a@b\r\n") == "x@y.example"
    assert _pipe_sender(None, b"Return-Path: <>\r\nFrom: a@b\r\n") == ""
    assert _pipe_sender(None, b"From: a@b\r\n\r\n") is None  # nobody said: unknown, not <>


def test_rules_test_account_and_field_filter(config: Path, tmp_path: Path) -> None:
    config.write_text(config.read_text() + '''
[[ticket_fields]]
name = "tier"
type = "choice"
choices = ["gold", "silver"]
[[rules]]
name = "bigcorp"
when.account = "BigCorp"
then.priority = "high"
then.set = { tier = "gold" }
''')
    assert deskgate(config, "db", "upgrade").returncode == 0
    assert deskgate(config, "account", "add", "BigCorp", "--domain", "bigcorp.example"
                    ).returncode == 0
    mail = tmp_path / "m.eml"
    mail.write_bytes(make_mail(subject="Renewal", sender="ceo@bigcorp.example"))
    dry = json.loads(deskgate(config, "rules", "test", str(mail), "--json").stdout)
    assert dry["rules_fired"] == ["bigcorp"]
    assert (dry["new_ticket"]["priority"], dry["new_ticket"]["fields"]) == ("high",
                                                                           {"tier": "gold"})
    assert json.loads(deskgate(config, "ticket", "list", "--json").stdout) == []  # dry
    deskgate(config, "deliver", "--recipient", "support@example.test", stdin=mail.read_bytes())
    gold = json.loads(deskgate(config, "ticket", "list", "--field", "tier=gold", "--json").stdout)
    assert [(t["number"], t["priority"]) for t in gold] == [(1, "high")]
    assert json.loads(deskgate(config, "ticket", "list", "--field", "tier=silver", "--json")
                      .stdout) == []
    account = json.loads(deskgate(config, "account", "show", "BigCorp", "--json").stdout)
    assert (account["contacts"], [t["number"] for t in account["tickets"]]) == (
        ["ceo@bigcorp.example"], [1])
    bad = deskgate(config, "ticket", "list", "--field", "tier")
    assert bad.returncode == 1 and "write it as NAME=VALUE" in bad.stderr


def test_reports(config: Path) -> None:
    deskgate(config, "deliver", "--recipient", "support@example.test", stdin=make_mail())
    tickets = json.loads(deskgate(config, "report", "tickets", "--json").stdout)
    assert [(r["department"], r["new"], r["closed"]) for r in tickets] == [("support", 1, 0)]
    assert json.loads(deskgate(config, "report", "csat", "--json").stdout) == []
    assert json.loads(deskgate(config, "report", "sla", "--json").stdout)[0]["tickets"] == 1
    assert deskgate(config, "ticket", "status", "1", "on_hold").returncode == 0
    assert deskgate(config, "ticket", "priority", "1", "high").returncode == 0
    listed = json.loads(deskgate(config, "ticket", "list", "--json").stdout)[0]
    assert (listed["status"], listed["priority"]) == ("on_hold", "high")
    bad = deskgate(config, "report", "csat", "--since", "yesterday")
    assert (bad.returncode, bad.stderr.strip()) == (
        1, "deskgate: --since 'yesterday': write a date like 2026-11-01")


def test_a_big_quarantined_mail_is_shown_and_reprocessed_whole_from_its_pieces(
        config: Path, sqlite_url: str) -> None:
    """Over 256 KiB the raw bytes are stored in 1 MiB pieces (store/blobs.py): `show --raw`
    and `reprocess` put them back together."""
    log = b"".join(b"line %06d of the returned mail's log\r\n" % i for i in range(40_000))
    bounce = (b"From: MAILER-DAEMON@mx.example.org\r\nTo: support@example.test\r\n"
              b"Subject: Undelivered Mail Returned to Sender\r\nMessage-ID: <dsn2@mx>\r\n"
              b"In-Reply-To: <big-orig@example.org>\r\n\r\nThe mail could not be delivered.\r\n"
              + log)
    assert len(bounce) > 1.5 * 2**20
    deskgate(config, "deliver", "--recipient", "support@example.test", stdin=bounce)
    entry = json.loads(deskgate(config, "quarantine", "list", "--json").stdout)[0]
    with closing(sqlite3.connect(make_url(sqlite_url).database)) as db:
        assert db.execute("SELECT parts, length(content) FROM raws").fetchall() == [(2, 0)]
    raw = subprocess.run([sys.executable, "-m", "gateway.cli", "--config", str(config),
                          "quarantine", "show", str(entry["id"]), "--raw"],
                         capture_output=True, check=True).stdout
    assert raw == bounce
    shown = json.loads(deskgate(config, "quarantine", "show", str(entry["id"])).stdout)
    assert shown["size"] == len(bounce)
    deskgate(config, "deliver", "--recipient", "support@example.test",
             stdin=make_mail(message_id="<big-orig@example.org>"))
    released = deskgate(config, "quarantine", "reprocess", str(entry["id"]))
    assert released.returncode == 0, released.stdout + released.stderr
