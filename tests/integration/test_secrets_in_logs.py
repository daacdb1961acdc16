"""No secret reaches the logs (issue 11): a real `deskgate serve` at debug level with a
reply-token secret, a relay password (AUTH at a real relay), a DKIM key, an agent who sets a
password on the invitation page and logs in on the submission port, and rating and
verification links; plus the CLI commands an operator runs meanwhile. All log output is
captured and searched for every secret, password and token MAC of the session.
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
import subprocess
import sys
import warnings
from pathlib import Path
from urllib.error import HTTPError
from urllib.parse import urlencode
from urllib.request import urlopen

import aiosmtplib
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from gateway.outbound.catcher import CatchHandler
from tests.conftest import SECRET, settings_text
from tests.daemon import Daemon, free_port
from tests.mailbuild import make_mail, send

TOKEN_SECRET = "Reply-Token-Secret-7f3a9c2e5b"
RELAY_USER, RELAY_PASSWORD = "deskgate", "Relay-Passw0rd-q8Zr4"
AGENT, AGENT_PASSWORD = "shawn@example.test", "Agent-Passw0rd-x5Lm2"
WRONG_PASSWORD = "Wrong-Passw0rd-k2Vb9"


class Relay:
    """The company relay: AUTH required, every mail caught."""

    def __init__(self) -> None:
        self.handler = CatchHandler()
        self.logins: list[tuple[bytes, bool]] = []

    def authenticate(self, server: SMTP, session: object, envelope: object, mechanism: str,
                     data: object) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
            RELAY_USER.encode(), RELAY_PASSWORD.encode())
        self.logins.append((data.login if isinstance(data, LoginPassword) else b"", ok))
        return AuthResult(success=ok)

    def _protocol(self) -> SMTP:
        with warnings.catch_warnings():  # "AUTH without TLS": a relay on the loopback here
            warnings.simplefilter("ignore")
            return SMTP(self.handler, hostname="relay.localhost", auth_required=True,
                        auth_require_tls=False, authenticator=self.authenticate)

    async def start(self) -> tuple[asyncio.Server, int]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(self._protocol, host="127.0.0.1", port=0)
        return server, int(server.sockets[0].getsockname()[1])

    async def wait_for(self, count: int, timeout_s: float = 30.0) -> list[bytes]:
        for _ in range(int(timeout_s * 10)):
            if len(self.handler.caught) >= count:
                break
            await asyncio.sleep(0.1)
        assert len(self.handler.caught) >= count, [c.rcpt_tos for c in self.handler.caught]
        return [c.content for c in self.handler.caught]

    async def wait_for_link(self, after: int, path: str, timeout_s: float = 30.0) -> str:
        """The first /path/ link in a mail caught after the first `after` mails: other mail
        (an invitation, a notification) may still be on its way and arrive first."""
        for _ in range(int(timeout_s * 10)):
            try:
                return _link([c.content for c in self.handler.caught][after:], path)
            except AssertionError:
                await asyncio.sleep(0.1)
        return _link([c.content for c in self.handler.caught][after:], path)


def _config(tmp: Path, db_url: str, relay_port: int) -> tuple[Path, dict[str, int]]:
    ports = {"inbound": free_port(), "web": free_port(), "submission": free_port()}
    (tmp / "relay.password").write_text(RELAY_PASSWORD + "\n")
    (tmp / "relay.password").chmod(0o600)
    extra = f"""
[relay]
listen = "127.0.0.1:{relay_port}"
security = "none"
username = "{RELAY_USER}"
password_file = "{tmp / 'relay.password'}"
timeout_s = 5
[outbox]
poll_interval_s = 1
[submission]
listen = "127.0.0.1:{ports['submission']}"
tls_dir = "{tmp / 'tls'}"
failure_delay_ms = 10
[[dkim.keys]]
domain = "example.test"
selector = "s1"
algorithm = "rsa-sha256"
key_file = "{tmp / 'dkim.key'}"
"""
    text = settings_text(db_url, extra=extra).replace('log_level = "warning"',
                                                      'log_level = "debug"')
    text = text.replace("127.0.0.1:0", f"127.0.0.1:{ports['inbound']}", 1)
    text = text.replace('[web]\nlisten = "127.0.0.1:0"',
                        f'[web]\nlisten = "127.0.0.1:{ports["web"]}"\n'
                        f'base_url = "http://127.0.0.1:{ports["web"]}"')
    text = text.replace(SECRET, TOKEN_SECRET)
    path = tmp / "deskgate.toml"
    path.write_text(text)
    return path, ports


class Cli:
    """`deskgate ...` as an operator runs it; stderr (the log stream) is kept."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.stderr: list[str] = []
        self.stdout: list[str] = []

    async def __call__(self, *args: str, check: bool = True) -> str:
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "gateway.cli", "--config", str(self.config),
                             *args], capture_output=True, text=True, timeout=60)
        self.stderr.append(done.stderr)
        self.stdout.append(done.stdout)
        if check:
            assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout


def _http(url: str, data: dict[str, str] | None = None) -> tuple[int, str]:
    body = urlencode(data).encode() if data is not None else None
    try:
        with urlopen(url, body, timeout=10) as response:
            return response.status, response.read().decode()
    except HTTPError as exc:
        return exc.code, exc.read().decode()


def _link(mails: list[bytes], path: str) -> str:
    for content in mails:
        text = re.sub(rb"=\r?\n", b"", content).decode("utf-8", "replace")
        found = re.search(rf"https?://[^\s\"<>]*/{path}/[^\s\"<>]+", text)
        if found:
            return found.group(0).replace("=3D", "=")
    raise AssertionError(f"no /{path}/ link in {len(mails)} mails")


def _mac(token: str) -> str:
    """The part of a link token that is an HMAC (subject.expires.mac)."""
    return token.rsplit(".", 1)[-1]


async def _submission_login(port: int, password: str) -> int:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the self-signed certificate made in tls_dir
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=True,
                           tls_context=context, timeout=10)
    await smtp.connect()
    try:
        await smtp.login(AGENT, password)
        return 235
    except aiosmtplib.SMTPAuthenticationError as exc:
        return exc.code
    finally:
        smtp.close()


async def test_a_whole_session_leaves_no_secret_in_the_logs(sqlite_url: str,
                                                           tmp_path: Path) -> None:
    relay = Relay()
    server, relay_port = await relay.start()
    config, ports = _config(tmp_path, sqlite_url, relay_port)
    cli = Cli(config)
    dkim_public = await cli("dkim", "keygen", "--domain", "example.test", "--selector", "s1",
                            "--out", str(tmp_path / "dkim.key"))
    daemon = Daemon(config, tmp_path / "daemon.log")
    try:
        await daemon.start()
        # The department address proves itself: verification mail, link opened.
        await cli("address", "verify", "support@example.test")
        verify_url = _link(await relay.wait_for(1), "verify")
        assert (await asyncio.to_thread(_http, verify_url))[0] == 200
        # Customers write; acknowledgements go out DKIM-signed through the AUTH relay.
        for n in range(3):
            reply = await send(ports["inbound"], make_mail(
                subject=f"Order {n} broken", sender=f"Jess {n} <jess{n}@example.org>",
                message_id=f"<c{n}@example.org>"), mail_from=f"jess{n}@example.org")
            assert reply.code == 250, reply
        acks = (await relay.wait_for(4))[1:]
        assert all(a.startswith(b"DKIM-Signature:") for a in acks)
        tokens = [m.group(1) for a in acks
                  for m in [re.search(rb"support\+(t\d+-[A-Za-z0-9_-]+)@", a)] if m]
        assert len(tokens) == 3
        # A customer answers through the reply-token address.
        reply = await send(ports["inbound"], make_mail(
            subject="more details", sender="Jess 0 <jess0@example.org>",
            to=f"support+{tokens[0].decode()}@example.test", message_id="<c9@example.org>"),
            mail_from="jess0@example.org", rcpts=(f"support+{tokens[0].decode()}@example.test",))
        assert reply.code == 250, reply
        # An agent is invited (CLI), sets a password on the page, logs in on submission.
        printed = await cli("agent", "invite", AGENT, "--name", "Shawn",
                            "--department", "support", "--print-link")
        invite_url = printed.strip().splitlines()[-1]
        assert (await asyncio.to_thread(_http, invite_url))[0] == 200
        mismatch = {"password": AGENT_PASSWORD, "again": WRONG_PASSWORD}
        assert (await asyncio.to_thread(_http, invite_url, mismatch))[0] == 400
        good = {"password": AGENT_PASSWORD, "again": AGENT_PASSWORD}
        assert (await asyncio.to_thread(_http, invite_url, good))[0] == 200
        assert await _submission_login(ports["submission"], WRONG_PASSWORD) == 535
        assert await _submission_login(ports["submission"], AGENT_PASSWORD) == 235
        # The ticket is closed; the rating link is used, and a forged one refused.
        sent_before = len(relay.handler.caught)
        await cli("ticket", "close", "1")
        rating_url = await relay.wait_for_link(sent_before, "rate")
        assert (await asyncio.to_thread(_http, rating_url))[0] == 200
        forged = re.sub(r"\.([^./]+)/good$", lambda m: "." + m.group(1)[::-1] + "/good",
                        rating_url)
        assert (await asyncio.to_thread(_http, forged))[0] in (403, 410)
        for command in (["ticket", "list"], ["ticket", "show", "1"], ["outbox", "list"],
                        ["check-config"], ["agent", "list"], ["address", "list"]):
            await cli(*command)
        assert relay.logins and all(ok for _, ok in relay.logins)
    finally:
        daemon.close()
        server.close()

    logs = daemon.log + "".join(cli.stderr)
    # The capture holds the session (a broken capture would pass any grep).
    for event in ("ingest.stored", "web.verified", "web.password_set", "web.rated",
                  "web.rating_refused"):
        assert event in logs, event
    # PKCS#8 RSA: the first lines hold the public modulus (it is in the DNS record too);
    # from line 8 on, the private exponent and primes.
    key_lines = [line for line in (tmp_path / "dkim.key").read_text().splitlines()
                 if line and not line.startswith("-----")][8:]
    assert len(key_lines) > 10
    secrets = {
        "reply-token secret": TOKEN_SECRET, "relay password": RELAY_PASSWORD,
        "agent password": AGENT_PASSWORD, "wrong password": WRONG_PASSWORD,
        "AUTH PLAIN (agent)": base64.b64encode(f"\0{AGENT}\0{AGENT_PASSWORD}".encode()).decode(),
        "AUTH LOGIN password": base64.b64encode(AGENT_PASSWORD.encode()).decode(),
        "relay AUTH PLAIN": base64.b64encode(
            f"\0{RELAY_USER}\0{RELAY_PASSWORD}".encode()).decode(),
        "verification code": verify_url.rstrip("/").rsplit("/", 1)[-1],
        "invitation token MAC": _mac(invite_url.rstrip("/").rsplit("/", 1)[-1]),
        "rating token MAC": _mac(rating_url.rsplit("/", 2)[-2]),
        **{f"reply token {t.decode()}": t.decode().split("-", 1)[1] for t in tokens},
        **{f"DKIM private key line {i}": line[:40] for i, line in enumerate(key_lines)},
        "PEM private key": "PRIVATE KEY-----",
    }
    bounce_macs = {m.group(1) for c in relay.handler.caught
                   for m in [re.search(r"\+o\d+-([A-Za-z0-9_-]+)@", c.mail_from)] if m}
    secrets |= {f"bounce token {mac}": mac for mac in bounce_macs}
    leaked = {name: value for name, value in secrets.items() if value and value in logs}
    assert not leaked, leaked
    # Stdout is what the operator asked for: the invitation link, the public DKIM record.
    stdout = "".join(cli.stdout)
    assert "p=" in dkim_public
    for value in (TOKEN_SECRET, RELAY_PASSWORD, AGENT_PASSWORD, WRONG_PASSWORD, *key_lines):
        assert value not in stdout
