"""The agents' submission port over real sockets and real TLS (trustme certificates).

The agent path behind the port is a recorder here: these tests cover the wire (TLS, AUTH,
lock-out, sender check, RCPT/DATA hand-over, drain); gateway/agentmail has its own tests.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import structlog
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.agents import AgentIdentity, Profile, hash_password
from gateway.ingest.model import Envelope
from gateway.service import Gateway
from gateway.submission.tls import CERT_NAME, KEY_NAME
from store import repo
from store.models import Agent, AgentDepartment
from tests.conftest import make_settings

PASSWORD = "correct horse battery"
RAW = (b"From: Shawn <shawn@example.test>\r\nTo: jess@example.org\r\n"
       b"Subject: Re: Refund\r\nMessage-ID: <a1@example.test>\r\n\r\nDone, refunded.\r\n")


class RecordingPath:
    """Stands in for AgentPath: records what the port hands over, answers as told."""

    def __init__(self) -> None:
        self.checked: list[tuple[str, str]] = []
        self.delivered: list[tuple[AgentIdentity, bytes, Envelope]] = []
        self.refuse: dict[str, str] = {}
        self.fail = False
        self.hold: asyncio.Event | None = None  # set: deliver waits for it (drain test)
        self.entered = asyncio.Event()

    async def check_recipient(self, agent: AgentIdentity, address: str) -> str | None:
        self.checked.append((agent.email, address))
        if self.fail:
            raise RuntimeError("bug in the agent path")
        return self.refuse.get(address)

    async def deliver(self, agent: AgentIdentity, raw: bytes, envelope: Envelope) -> str:
        self.entered.set()
        if self.hold is not None:
            await self.hold.wait()
        if self.fail:
            raise RuntimeError("bug in the agent path")
        self.delivered.append((agent, raw, envelope))
        return "250 2.0.0 OK: reply recorded on ticket 7"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
def cert_files(ca: trustme.CA, tmp_path: Path) -> tuple[Path, Path]:
    issued = ca.issue_cert("deskgate.test", "127.0.0.1")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    return cert, key


def submission_table(cert_files: tuple[Path, Path] | None, tls_dir: Path | None = None,
                     **keys: int) -> str:
    lines = ['[submission]', 'listen = "127.0.0.1:0"', 'tls_listen = "127.0.0.1:0"']
    if cert_files:
        lines += [f'cert_file = "{cert_files[0]}"', f'key_file = "{cert_files[1]}"']
    if tls_dir:
        lines.append(f'tls_dir = "{tls_dir}"')
    lines += [f"{key} = {value}" for key, value in
              ({"failure_delay_ms": 10, "max_message_bytes": 100_000} | keys).items()]
    return "\n".join(lines)


async def add_agent(gw: Gateway, email: str, password: str | None = PASSWORD,
                    active: bool = True, departments: tuple[str, ...] = ("support",)) -> None:
    async with gw.store.transaction() as session:
        ids = await repo.sync_departments(session, gw.settings.departments)
        agent = await repo.add(session, Agent(
            email=email, name=email.split("@")[0].title(), profile=Profile.AGENT.value,
            credential_hash=hash_password(password) if password else None, active=active,
            created_at=datetime.now(UTC)))
        for slug in departments:
            session.add(AgentDepartment(agent_id=agent.id, department_id=ids[slug]))


@pytest.fixture
async def sub(make_gateway: Any, cert_files: tuple[Path, Path]
               ) -> AsyncIterator[tuple[Gateway, RecordingPath]]:
    """A gateway with the submission port on; its agent path replaced by a recorder."""
    gw = await make_gateway(extra=submission_table(cert_files, max_failures=3,
                                                   max_failures_per_ip=5, lockout_s=1))
    recorder = RecordingPath()
    gw.submission.handler.path = recorder
    await add_agent(gw, "shawn@example.test", departments=("support", "billing"))
    yield gw, recorder


def logins(gw: Gateway, result: str) -> float | None:
    return gw.metrics.registry.get_sample_value("deskgate_submission_logins_total",
                                                {"result": result})


def client(gw: Gateway, tls: ssl.SSLContext, implicit: bool = False) -> aiosmtplib.SMTP:
    port = gw.submission.tls_port if implicit else gw.submission.port
    return aiosmtplib.SMTP(hostname="127.0.0.1", port=port, use_tls=implicit, start_tls=False,
                           tls_context=tls, timeout=10)


async def command(smtp: aiosmtplib.SMTP, *words: str) -> tuple[int, str]:
    reply = await smtp.execute_command(*(w.encode() for w in words))
    return reply.code, reply.message


def plain(login: str, password: str) -> str:
    return base64.b64encode(f"\0{login}\0{password}".encode()).decode()


async def auth_plain(gw: Gateway, tls: ssl.SSLContext, login: str, password: str
                     ) -> tuple[int, str]:
    async with client(gw, tls) as smtp:
        await smtp.starttls()
        await smtp.ehlo()
        return await command(smtp, "AUTH", "PLAIN", plain(login, password))


async def test_tls_then_login_are_required(sub: Any, client_tls: ssl.SSLContext) -> None:
    gw, recorder = sub
    async with client(gw, client_tls) as smtp:
        await smtp.ehlo()
        assert smtp.supports_extension("starttls") and not smtp.supports_extension("auth")
        assert await command(smtp, "AUTH", "PLAIN", plain("shawn@example.test", PASSWORD)) == (
            530, "5.7.0 Must issue a STARTTLS command first")
        code, _ = await command(smtp, "MAIL", "FROM:<shawn@example.test>")
        assert code == 530
        await smtp.starttls()
        await smtp.ehlo()
        assert sorted(smtp.supported_auth_methods) == ["login", "plain"]
        assert not smtp.supports_extension("starttls")
        assert await command(smtp, "MAIL", "FROM:<shawn@example.test>") == (
            530, "5.7.0 Authentication required")
        assert (await command(smtp, "RCPT", "TO:<jess@example.org>"))[0] == 530
    assert recorder.checked == [] and recorder.delivered == []


async def test_auth_plain_then_mail_goes_to_the_agent_path(
        sub: Any, client_tls: ssl.SSLContext) -> None:
    gw, recorder = sub
    recorder.refuse["boss@example.org"] = "550 5.7.1 Not allowed: ticket 9 is in sales"
    with structlog.testing.capture_logs() as logs:
        async with client(gw, client_tls) as smtp:
            await smtp.starttls()
            await smtp.ehlo()
            reply = await smtp.auth_plain("Shawn@Example.test", PASSWORD)
            assert (reply.code, reply.message) == (235, "2.7.0 Authentication successful")
            assert await command(smtp, "MAIL", "FROM:<Shawn@example.test>") == (250, "2.1.0 OK")
            assert await command(smtp, "RCPT", "TO:<jess@example.org>") == (250, "2.1.5 OK")
            assert await command(smtp, "RCPT", "TO:<boss@example.org>") == (
                550, "5.7.1 Not allowed: ticket 9 is in sales")
            reply = await smtp.data(RAW)
            assert (reply.code, reply.message) == (250, "2.0.0 OK: reply recorded on ticket 7")
            local_port = smtp.get_transport_info("sockname")[1]
    [(agent, raw, envelope)] = recorder.delivered
    assert (agent.email, agent.name, agent.profile) == ("shawn@example.test", "Shawn",
                                                         Profile.AGENT)
    assert agent.departments == frozenset({"support", "billing"})
    assert raw == RAW
    assert envelope == Envelope(mail_from="Shawn@example.test", rcpt_tos=("jess@example.org",),
                                peer=f"127.0.0.1:{local_port}", channel="submission")
    assert recorder.checked == [("shawn@example.test", "jess@example.org"),
                                ("shawn@example.test", "boss@example.org")]
    events = {e["event"]: e for e in logs}
    assert events["submission.auth_ok"]["agent"] == "shawn@example.test"
    assert events["submission.rcpt_refused"]["rcpt"] == "boss@example.org"
    assert PASSWORD not in repr(logs) and plain("Shawn@Example.test", PASSWORD) not in repr(logs)


async def test_auth_login_both_forms(sub: Any, client_tls: ssl.SSLContext) -> None:
    gw, _ = sub
    async with client(gw, client_tls) as smtp:  # initial response with the user name
        await smtp.starttls()
        await smtp.ehlo()
        assert (await smtp.auth_login("shawn@example.test", PASSWORD)).code == 235
        assert (await command(smtp, "MAIL", "FROM:<shawn@example.test>"))[0] == 250
    async with client(gw, client_tls) as smtp:  # the three-step exchange Outlook uses
        await smtp.starttls()
        await smtp.ehlo()
        b64 = lambda text: base64.b64encode(text.encode()).decode()  # noqa: E731
        assert await command(smtp, "AUTH", "LOGIN") == (334, "VXNlciBOYW1lAA==")
        assert (await command(smtp, b64("shawn@example.test")))[0] == 334
        assert await command(smtp, b64(PASSWORD)) == (235, "2.7.0 Authentication successful")


async def test_wrong_password_disabled_and_passwordless_agents_are_refused(
        sub: Any, client_tls: ssl.SSLContext) -> None:
    gw, recorder = sub
    await add_agent(gw, "gone@example.test", active=False)
    await add_agent(gw, "new@example.test", password=None)
    with structlog.testing.capture_logs() as logs:
        for login, password in (("shawn@example.test", "wrong password here"),
                                ("gone@example.test", PASSWORD),
                                ("new@example.test", PASSWORD),
                                ("nobody@example.test", PASSWORD)):
            assert await auth_plain(gw, client_tls, login, password) == (
                535, "5.7.8 Authentication credentials invalid"), login
        async with client(gw, client_tls) as smtp:  # LOGIN fails the same way
            await smtp.starttls()
            await smtp.ehlo()
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
                await smtp.auth_login("gone@example.test", PASSWORD)
            assert refused.value.code == 535
            assert (await command(smtp, "MAIL", "FROM:<gone@example.test>"))[0] == 530
    reasons = [(e["login"], e["reason"]) for e in logs if e["event"] == "submission.auth_failed"]
    assert reasons == [("shawn@example.test", "wrong_password"), ("gone@example.test", "disabled"),
                       ("new@example.test", "no_password"), ("nobody@example.test", "unknown"),
                       ("gone@example.test", "disabled")]
    assert PASSWORD not in repr(logs)
    assert logins(gw, "failed") == 5
    assert recorder.delivered == []


async def test_repeated_failures_lock_the_address_then_the_client_ip(
        sub: Any, client_tls: ssl.SSLContext) -> None:
    gw, _ = sub  # max_failures=3, max_failures_per_ip=5, lockout_s=1, first delay 10 ms
    await add_agent(gw, "maria@example.test")
    with structlog.testing.capture_logs() as logs:
        answers = [await auth_plain(gw, client_tls, "shawn@example.test", "guess number 1")
                   for _ in range(3)]
        assert [code for code, _ in answers] == [535, 535, 535]
        assert "locked for" in answers[-1][1]
        # Locked: even the right password is refused, and no password is checked.
        code, text = await auth_plain(gw, client_tls, "shawn@example.test", PASSWORD)
        assert code == 454 and text.startswith("4.7.0 Too many failed logins")
        # Another address from the same IP still may log in, until the IP reaches its limit.
        assert (await auth_plain(gw, client_tls, "maria@example.test", PASSWORD))[0] == 235
        for attempt in ("nobody1@example.test", "nobody2@example.test"):
            assert (await auth_plain(gw, client_tls, attempt, "guess"))[0] == 535
        code, text = await auth_plain(gw, client_tls, "maria@example.test", PASSWORD)
        assert code == 454 and "try again in 1 minute" in text
        await asyncio.sleep(1.1)  # lockout_s = 1
        assert (await auth_plain(gw, client_tls, "shawn@example.test", PASSWORD))[0] == 235
    failed = [e for e in logs if e["event"] == "submission.auth_failed"]
    assert [e["delay_s"] for e in failed] == [0.01, 0.02, 0.04, 0.08, 0.08]
    locks = [e["keys"] for e in logs if e["event"] == "submission.locked_out"]
    assert locks == [["address"], ["ip"]]
    assert [e["login"] for e in logs if e["event"] == "submission.auth_locked"] == [
        "shawn@example.test", "maria@example.test"]
    assert logins(gw, "locked") == 2


async def test_agents_cannot_send_as_someone_else(sub: Any, client_tls: ssl.SSLContext) -> None:
    gw, _ = sub
    await add_agent(gw, "maria@example.test")
    async with client(gw, client_tls) as smtp:
        await smtp.starttls()
        await smtp.ehlo()
        await smtp.auth_plain("shawn@example.test", PASSWORD)
        for sender in ("maria@example.test", "support@example.test", ""):
            assert await command(smtp, "MAIL", f"FROM:<{sender}>") == (
                553, "5.7.1 Agents may only send as themselves: use "
                     "MAIL FROM:<shawn@example.test>"), sender
        assert (await command(smtp, "MAIL", "FROM:<shawn@example.test>"))[0] == 250


async def test_agent_path_failures_answer_451(sub: Any, client_tls: ssl.SSLContext) -> None:
    gw, recorder = sub
    async with client(gw, client_tls) as smtp:
        await smtp.starttls()
        await smtp.ehlo()
        await smtp.auth_plain("shawn@example.test", PASSWORD)
        await smtp.mail("shawn@example.test")
        assert await command(smtp, "RCPT", "TO:<jess@example.org>") == (250, "2.1.5 OK")
        recorder.fail = True
        assert (await command(smtp, "RCPT", "TO:<joe@example.org>"))[0] == 451
        with pytest.raises(aiosmtplib.SMTPDataError) as failed:
            await smtp.data(RAW)
        assert (failed.value.code, failed.value.message) == (
            451, "4.3.0 Temporary failure, please try again later")
        assert await command(smtp, "MAIL", "FROM:<shawn@example.test>", "SIZE=200000") == (
            552, "5.3.4 Message exceeds the size limit")


async def test_implicit_tls_listener(sub: Any, client_tls: ssl.SSLContext) -> None:
    gw, recorder = sub
    async with client(gw, client_tls, implicit=True) as smtp:
        await smtp.ehlo()
        assert smtp.supports_extension("auth") and not smtp.supports_extension("starttls")
        assert smtp.get_transport_info("ssl_object") is not None
        assert (await smtp.auth_login("shawn@example.test", PASSWORD)).code == 235
        await smtp.sendmail("shawn@example.test", ["jess@example.org"], RAW)
    assert [raw for _, raw, _ in recorder.delivered] == [RAW]
    assert gw.health()["submission"] is True


@pytest.fixture
def sqlite_only(sqlite_url: str) -> Iterator[str]:
    yield sqlite_url  # certificate files and drains do not depend on the store


async def test_self_signed_certificate_is_made_once_and_reused(
        sqlite_only: str, tmp_path: Path) -> None:
    tls_dir = tmp_path / "var"
    settings = make_settings(sqlite_only, extra=submission_table(None, tls_dir))
    presented = []
    for _ in range(2):
        gw = Gateway(settings)
        await gw.start(port=0)
        try:
            cert_file, key_file = tls_dir / CERT_NAME, tls_dir / KEY_NAME
            assert oct(key_file.stat().st_mode & 0o777) == "0o600"
            trust = ssl.create_default_context(cafile=str(cert_file))
            trust.check_hostname = False  # the name is checked below: we dial 127.0.0.1
            async with client(gw, trust) as smtp:
                await smtp.starttls()
                await smtp.ehlo()
                der = smtp.get_transport_info("ssl_object").getpeercert(binary_form=True)
            presented.append(der)
        finally:
            await gw.stop(drain_timeout_s=1)
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["deskgate.test"]
    assert presented[0] == presented[1] == cert.public_bytes(Encoding.DER)
    assert sorted(p.name for p in tls_dir.iterdir()) == sorted([CERT_NAME, KEY_NAME])


async def test_stop_drains_a_mail_in_progress_and_refuses_new_clients(
        sqlite_only: str, cert_files: tuple[Path, Path], client_tls: ssl.SSLContext) -> None:
    gw = Gateway(make_settings(sqlite_only, extra=submission_table(cert_files)))
    await gw.start(port=0)
    recorder = RecordingPath()
    recorder.hold = asyncio.Event()
    gw.submission.handler.path = recorder
    await add_agent(gw, "shawn@example.test")
    smtp = client(gw, client_tls)
    await smtp.connect()
    await smtp.starttls()
    await smtp.ehlo()
    await smtp.auth_plain("shawn@example.test", PASSWORD)
    sending = asyncio.create_task(smtp.sendmail("shawn@example.test", ["jess@example.org"], RAW))
    await asyncio.wait_for(recorder.entered.wait(), 5)
    stopping = asyncio.create_task(gw.stop(drain_timeout_s=10))
    await asyncio.sleep(0.2)
    assert not stopping.done()  # waiting for the mail in deliver
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.submission.port)
    assert (await reader.readline()).startswith(b"421 4.3.2")
    writer.close()
    recorder.hold.set()
    errors, _ = await asyncio.wait_for(sending, 5)
    assert errors == {} and len(recorder.delivered) == 1
    await asyncio.wait_for(stopping, 10)
    assert gw.submission.server is not None and not gw.submission.server.is_serving()
    smtp.close()
