"""IMAP against a real Dovecot, issue 7 continued: health and alerts, from = now | all,
`deskgate imap test`, XOAUTH2, messages too big to import, SIGHUP reload."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from sqlalchemy import func, select

from gateway.outbound.catcher import CatchHandler, start_catcher
from store.models import Agent, AgentDepartment, Event, Outbox, Quarantine, Ticket
from tests.conftest import make_settings, settings_text
from tests.dovecot import OAUTH_TOKEN, OAUTH_USER, Dovecot, running
from tests.integration.test_imap_dovecot import (
    _last_uid,
    _polled,
    checkpoint,
    count,
    imap_table,
    mails,
    until,
)
from tests.mailbuild import make_mail

OPS = "ops@example.test"


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    yield from running()


@pytest.fixture
async def relay() -> AsyncIterator[tuple[CatchHandler, int]]:
    """A capture relay on 127.0.0.1: what deskgate's outbox worker sends lands here."""
    handler = CatchHandler()
    server = await start_catcher(handler, "127.0.0.1", 0)
    yield handler, int(server.sockets[0].getsockname()[1])
    server.close()


def outbound(port: int, tmp_path: Path, operators: str = f'["{OPS}"]') -> str:
    return (f'[relay]\nlisten = "127.0.0.1:{port}"\ntimeout_s = 5\n'
            f'[dev]\nbootstrap = true\ndir = "{tmp_path}"\n[alerts]\noperators = {operators}\n')


async def healthz(gw: Any) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{gw.web_port}/healthz") as response:
        return response.status, await response.json()


async def metrics(gw: Any) -> str:
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{gw.web_port}/metrics") as response:
        return await response.text()


def metric(text: str, name: str, **labels: str) -> float | None:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} "):
            return float(line.rsplit(" ", 1)[1])
    return None


async def rows(gw: Any, model: Any, *where: Any) -> list[Any]:
    async with gw.store.transaction() as session:
        return list(await session.scalars(select(model).where(*where)))


async def test_failing_mailbox_is_degraded_in_healthz_and_metrics_while_another_imports(
        dovecot: Dovecot, make_gateway: Any, tmp_path: Path) -> None:
    dovecot.append(mails(2), user="alice")
    tables = (imap_table(dovecot, tmp_path, "alice")
              + imap_table(dovecot, tmp_path, "bob", password="wrong", department="billing"))
    with structlog.testing.capture_logs() as logs:
        gw = await make_gateway(extra=tables)
        await until(lambda: _failing(gw, "bob"), timeout_s=30)
    await until(lambda: _last_uid(gw, "alice", 2))
    status, body = await healthz(gw)
    assert status == 200 and body["status"] == "degraded" and all(body["checks"].values())
    assert list(body["degraded"]["imap"]) == ["bob"]  # alice works: not named
    bob = body["degraded"]["imap"]["bob"]
    assert "login as bob refused" in bob["error"] and bob["failures"] >= 3
    assert bob["last_success"] is None and not bob["alerting"]
    failing = [e for e in logs if e["event"] == "imap.failing"]
    assert failing and failing[0]["log_level"] == "error" and failing[0]["mailbox"] == "bob"
    text = await metrics(gw)
    assert (metric(text, "deskgate_imap_failures", mailbox="bob") or 0) >= 3
    assert metric(text, "deskgate_imap_failures", mailbox="alice") == 0
    assert metric(text, "deskgate_imap_mails_total", mailbox="alice", outcome="stored") == 2
    assert await count(gw, Ticket) == 2


async def test_outage_alerts_operators_once_then_recovers(
        dovecot: Dovecot, make_gateway: Any, tmp_path: Path,
        relay: tuple[CatchHandler, int]) -> None:
    caught, port = relay
    dovecot.append(mails(1, "Bob"), user="bob")
    table = imap_table(dovecot, tmp_path, "bob", password="wrong", alert_after_s=3)
    with structlog.testing.capture_logs() as logs:
        gw = await make_gateway(extra=table + outbound(port, tmp_path))
        await until(lambda: _sent_to(caught, OPS), timeout_s=30)
        await asyncio.sleep(4)  # more failed polls within the same outage
    alert = [c for c in caught.caught if OPS in c.rcpt_tos]
    assert len(alert) == 1  # once per outage, not per poll
    message = alert[0].message
    assert message["Subject"] == "deskgate cannot read the mailbox bob"
    assert message["Auto-Submitted"] == "auto-generated"
    assert "login as bob refused" in message.get_body(("plain",)).get_content()
    assert len(await rows(gw, Outbox, Outbox.kind == "alert")) == 1
    errors = [e for e in logs if e["event"] == "imap.alert"]
    assert len(errors) == 1 and errors[0]["log_level"] == "error"
    status, body = await healthz(gw)
    assert status == 200 and body["degraded"]["imap"]["bob"]["alerting"] is True
    assert metric(await metrics(gw), "deskgate_imap_alerting", mailbox="bob") == 1
    # The password is fixed: the next login works, the mail comes in, the alert ends.
    (tmp_path / "bob.password").write_text("bob-secret\n")
    await until(lambda: _tickets(gw, 1), timeout_s=30)
    status, body = await healthz(gw)
    assert body["status"] == "ok" and "degraded" not in body
    row = await checkpoint(gw, "bob")
    assert row is not None and row.alerted_at is None and row.last_error is None
    assert metric(await metrics(gw), "deskgate_imap_alerting", mailbox="bob") == 0


async def test_from_now_imports_only_mail_arriving_after_the_first_contact(
        dovecot: Dovecot, make_gateway: Any, tmp_path: Path) -> None:
    dovecot.append(mails(3, "Old"))
    gw = await make_gateway(extra=imap_table(dovecot, tmp_path, **{"from": "now"}))
    await until(lambda: _polled(gw, "alice"))
    row = await checkpoint(gw, "alice")
    assert row is not None and row.last_uid == 3 and row.history_below is None
    await asyncio.to_thread(dovecot.append, mails(1, "New"))
    await until(lambda: _last_uid(gw, "alice", 4))
    tickets = await rows(gw, Ticket)
    assert [t.subject for t in tickets] == ["New 0"]
    flags = dovecot.flags()
    assert [uid for uid, f in sorted(flags.items()) if r"\Seen" in f] == [4]  # old ones untouched


async def test_from_all_imports_history_without_acknowledgements(
        dovecot: Dovecot, make_gateway: Any, tmp_path: Path) -> None:
    asked = make_mail(subject="Where is my order?", sender="Ann <ann@example.org>",
                      message_id="<ann-1@example.org>")
    answered = make_mail(subject="Re: Where is my order?", sender="support@example.test",
                         to="ann@example.org", message_id="<answer-1@example.test>",
                         in_reply_to="<ann-1@example.org>")
    pending = make_mail(subject="Invoice wrong", sender="Ben <ben@example.org>",
                        message_id="<ben-1@example.org>")
    dovecot.append([asked, answered, pending])
    first = await make_gateway()  # an agent of Support, before the mailbox is read
    async with first.store.transaction() as session:
        agent = Agent(email="al@example.test", name="Al", profile="agent", active=True,
                      created_at=datetime.now(UTC))
        session.add(agent)
        await session.flush()
        session.add(AgentDepartment(agent_id=agent.id,
                                    department_id=first.pipeline.department_ids["support"]))
    await first.stop(drain_timeout_s=5)
    gw = await make_gateway(extra=imap_table(dovecot, tmp_path, **{"from": "all"}))
    await until(lambda: _last_uid(gw, "alice", 3))
    status = {t.subject: t.status for t in await rows(gw, Ticket)}
    assert status == {"Where is my order?": "closed", "Invoice wrong": "open"}
    assert await rows(gw, Outbox, Outbox.kind == "ack") == []
    suppressed = await rows(gw, Event, Event.type == "ack_suppressed")
    assert [e.data["reason"] for e in suppressed] == ["imported history"] * 2
    row = await checkpoint(gw, "alice")
    assert row is not None and row.history_below == 4
    # Mail that arrives after the first contact is live: acknowledged as usual.
    await asyncio.to_thread(dovecot.append, mails(1, "Live"))
    await until(lambda: _last_uid(gw, "alice", 4))
    acks = await rows(gw, Outbox, Outbox.kind == "ack")
    assert [a.recipient for a in acks] == ["c0@example.org"]
    # Notifications likewise: Al hears of the live ticket, not of the history.
    notified = await rows(gw, Outbox, Outbox.kind == "notification")
    live = (await rows(gw, Ticket, Ticket.subject == "Live 0"))[0]
    assert [(n.ticket_id, n.recipient) for n in notified] == [(live.id, "al@example.test")]


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", "--config", str(config),
                           "imap", *args], capture_output=True, text=True, timeout=60)


async def test_imap_test_prints_what_the_server_offers_or_one_line_error(
        dovecot: Dovecot, sqlite_url: str, tmp_path: Path) -> None:
    dovecot.append(mails(2))
    config = tmp_path / "deskgate.toml"
    config.write_text(settings_text(sqlite_url, extra=imap_table(dovecot, tmp_path, "alice")
                                    + imap_table(dovecot, tmp_path, "bob", password="wrong",
                                                 department="billing")))
    ok = await asyncio.to_thread(_cli, config, "test", "alice")
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.splitlines()
    assert lines[0] == f"alice: logged in to 127.0.0.1:{dovecot.port} as alice " \
                       "(tls none, auth password)"
    assert "IDLE" in lines[1] and lines[2] == "  IDLE: yes"
    assert lines[3] == f"  folder INBOX: UIDVALIDITY {dovecot.uidvalidity('INBOX')}, " \
                       "2 messages, UIDNEXT 3"
    as_json = json.loads((await asyncio.to_thread(_cli, config, "test", "alice", "--json"))
                         .stdout)
    assert (as_json["messages"], as_json["uidnext"], as_json["idle"]) == (2, 3, True)
    assert not any(r"\Seen" in f for f in dovecot.flags().values())  # EXAMINE: read-only
    wrong = await asyncio.to_thread(_cli, config, "test", "bob")
    assert wrong.returncode == 1 and wrong.stdout == ""
    assert len(wrong.stderr.splitlines()) == 1
    assert wrong.stderr.startswith("deskgate: imap test bob: login as bob refused: NO")
    unknown = await asyncio.to_thread(_cli, config, "test", "carol")
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == ("deskgate: imap test: no [[imap]] mailbox is named "
                                      "'carol' (alice, bob)")


class TokenEndpoint:
    """A provider's OAuth 2.0 token endpoint on 127.0.0.1 (RFC 6749 6)."""

    def __init__(self) -> None:
        self.valid = {"refresh-1"}
        self.requests: list[dict[str, str]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def token(self, request: web.Request) -> web.Response:
        form = dict(await request.post())
        self.requests.append({k: str(v) for k, v in form.items()})
        if form.get("grant_type") != "refresh_token" or form.get("client_id") != "deskgate":
            return web.json_response({"error": "invalid_request"}, status=400)
        if form.get("refresh_token") not in self.valid:
            return web.json_response({"error": "invalid_grant", "error_description":
                                      "AADSTS70008: the refresh token has expired"}, status=400)
        self.valid = {"refresh-2"}  # rotated: the old one is retired
        return web.json_response({"access_token": OAUTH_TOKEN, "token_type": "Bearer",
                                  "expires_in": 3600, "refresh_token": "refresh-2"})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/token", self.token)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # noqa: SLF001
        self.url = f"http://127.0.0.1:{port}/token"


@pytest.fixture
async def endpoint() -> AsyncIterator[TokenEndpoint]:
    server = TokenEndpoint()
    await server.start()
    yield server
    assert server.runner is not None
    await server.runner.cleanup()


def oauth_table(dovecot: Dovecot, refresh_file: Path, url: str, **extra: Any) -> str:
    lines = ["[[imap]]", 'name = "carol"', 'host = "127.0.0.1"', f"port = {dovecot.port}",
             'tls = "none"', "allow_plaintext = true", f'user = "{OAUTH_USER}"',
             'auth = "xoauth2"', f'token_url = "{url}"', 'client_id = "deskgate"',
             f'refresh_token_file = "{refresh_file}"', 'department = "support"',
             "poll_interval_s = 1", 'from = "all"']
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


async def test_xoauth2_refresh_flow_logs_in_and_keeps_the_rotated_refresh_token(
        dovecot: Dovecot, make_gateway: Any, tmp_path: Path,
        endpoint: TokenEndpoint) -> None:
    dovecot.append(mails(2, "Oauth"), user=OAUTH_USER)
    refresh = tmp_path / "carol.refresh"
    refresh.write_text("refresh-1\n")
    gw = await make_gateway(extra=oauth_table(dovecot, refresh, endpoint.url))
    await until(lambda: _tickets(gw, 2))
    assert endpoint.requests[0] == {"grant_type": "refresh_token", "refresh_token": "refresh-1",
                                    "client_id": "deskgate"}
    assert refresh.read_text().strip() == "refresh-2"
    assert refresh.stat().st_mode & 0o077 == 0  # still readable by deskgate only
    assert "XOAUTH2" in (Path(dovecot.root) / "dovecot.log").read_text()


async def test_refresh_token_that_can_no_longer_be_refreshed_alerts_at_once(
        dovecot: Dovecot, make_gateway: Any, tmp_path: Path, endpoint: TokenEndpoint,
        relay: tuple[CatchHandler, int]) -> None:
    caught, port = relay
    refresh = tmp_path / "carol.refresh"
    refresh.write_text("revoked-long-ago\n")
    table = oauth_table(dovecot, refresh, endpoint.url, alert_after_s=900)
    with structlog.testing.capture_logs() as logs:
        gw = await make_gateway(extra=table + outbound(port, tmp_path))
        await until(lambda: _sent_to(caught, OPS), timeout_s=20)  # not after 15 minutes
    body = [c for c in caught.caught if OPS in c.rcpt_tos][0].message.get_body(("plain",))
    assert "invalid_grant" in body.get_content()
    alert = [e for e in logs if e["event"] == "imap.alert"]
    assert alert and "refresh token" in alert[0]["error"]
    status, health = await healthz(gw)
    assert health["degraded"]["imap"]["carol"]["alerting"] is True


async def test_token_command_logs_in_with_xoauth2(dovecot: Dovecot, make_gateway: Any,
                                                 tmp_path: Path) -> None:
    dovecot.append(mails(1, "Command"), user=OAUTH_USER)
    table = "\n".join([
        "[[imap]]", 'name = "carol"', 'host = "127.0.0.1"', f"port = {dovecot.port}",
        'tls = "none"', "allow_plaintext = true", f'user = "{OAUTH_USER}"', 'auth = "xoauth2"',
        f'token_command = "echo {OAUTH_TOKEN}"', 'department = "support"', 'from = "all"',
        "poll_interval_s = 1"]) + "\n"
    gw = await make_gateway(extra=table)
    await until(lambda: _tickets(gw, 1))


async def test_message_over_max_message_bytes_is_skipped_recorded_and_left_in_place(
        dovecot: Dovecot, make_gateway: Any, tmp_path: Path) -> None:
    small = mails(2, "Small")
    big = make_mail(subject="Huge scan", sender="scan@example.org",
                    message_id="<huge@example.org>", body=("y" * 70 + "\r\n") * 120)
    dovecot.append([small[0], big, small[1]])
    table = imap_table(dovecot, tmp_path, after_import="delete", max_message_bytes=4096)
    with structlog.testing.capture_logs() as logs:
        gw = await make_gateway(extra=table)
        await until(lambda: _last_uid(gw, "alice", 3))
    assert sorted(t.subject for t in await rows(gw, Ticket)) == ["Small 0", "Small 1"]
    skipped = [e for e in logs if e["event"] == "imap.message_skipped"]
    assert [(e["uid"], e["limit"]) for e in skipped] == [(2, 4096)]
    held = await rows(gw, Quarantine)
    assert len(held) == 1 and "over max_message_bytes (4096)" in held[0].reason
    assert held[0].channel == "imap"
    await until(lambda: _uids(dovecot, {2}))  # the others were deleted after import
    # A restart re-applies the after-import action to the last imported mail only: the
    # skipped one is never deleted.
    await gw.stop(drain_timeout_s=5)
    gw2 = await make_gateway(extra=table)
    await until(lambda: _polled(gw2, "alice"))
    await asyncio.sleep(0.5)
    assert set(dovecot.flags()) == {2}
    assert len(await rows(gw2, Quarantine)) == 1


async def test_reload_restarts_changed_pollers_starts_new_and_stops_removed(
        dovecot: Dovecot, make_gateway: Any, tmp_path: Path, db_url: str) -> None:
    gw = await make_gateway(extra=imap_table(dovecot, tmp_path, "alice"))
    await until(lambda: _polled(gw, "alice"))
    alice = gw.imap.pollers[0]
    same = imap_table(dovecot, tmp_path, "alice")
    bob = imap_table(dovecot, tmp_path, "bob", department="billing")
    await gw.reload(make_settings(db_url, extra=same + bob))
    assert gw.imap.pollers[0] is alice  # unchanged: carries on
    await asyncio.to_thread(dovecot.append, mails(1, "Bob"), "bob")
    await until(lambda: _tickets(gw, 1))
    changed = imap_table(dovecot, tmp_path, "alice", poll_interval_s=2)
    await gw.reload(make_settings(db_url, extra=changed + bob))
    assert gw.imap.pollers[0] is not alice and alice.task is not None and alice.task.done()
    assert gw.imap.pollers[0].cfg.poll_interval_s == 2
    await gw.reload(make_settings(db_url, extra=bob))
    assert [p.cfg.name for p in gw.imap.pollers] == ["bob"]
    await asyncio.to_thread(dovecot.append, mails(1, "Alice"), "alice")
    await asyncio.to_thread(dovecot.append, mails(1, "Bob2"), "bob")
    await until(lambda: _tickets(gw, 2))
    await asyncio.sleep(1.5)  # alice's poller is gone: her mail stays in the mailbox
    assert sorted(t.subject for t in await rows(gw, Ticket)) == ["Bob 0", "Bob2 0"]


async def _failing(gw: Any, name: str) -> bool:
    return name in (await healthz(gw))[1].get("degraded", {}).get("imap", {})


async def _tickets(gw: Any, n: int) -> bool:
    async with gw.store.transaction() as session:
        return int(await session.scalar(select(func.count()).select_from(Ticket))) == n


async def _sent_to(handler: CatchHandler, address: str) -> bool:
    return any(address in c.rcpt_tos for c in handler.caught)


async def _uids(dovecot: Dovecot, uids: set[int]) -> bool:
    return set(await asyncio.to_thread(dovecot.flags)) == uids

