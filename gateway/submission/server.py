"""The agents' submission port: TLS, AUTH against the agents table, then the agent path.

Wire <-> AgentPath only; what an agent's mail does is decided in gateway/agentmail.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from typing import Any, Protocol

import structlog
from aiosmtpd.smtp import SMTP, Session
from aiosmtpd.smtp import Envelope as SMTPEnvelope
from sqlalchemy.exc import SQLAlchemyError

from gateway.agents import AgentIdentity
from gateway.errors import StoreUnavailable
from gateway.inbound.smtp import GatewaySMTP, SessionsHandler, ShutdownRefuser, _peer
from gateway.ingest.identify import normalize_address
from gateway.ingest.model import Envelope
from gateway.replies import (
    R235_AUTH_OK,
    R421_SHUTTING_DOWN,
    R451_TEMPORARY,
    R454_AUTH_UNAVAILABLE,
    R530_AUTH_REQUIRED,
    R530_STARTTLS_FIRST,
    R535_AUTH_FAILED,
    auth_failed_and_locked,
    locked_out,
    not_your_address,
)
from gateway.settings import Settings
from gateway.submission.auth import check_login
from gateway.submission.lockout import Lockout, Policy
from gateway.submission.tls import server_context
from gateway.web.metrics import Metrics
from store.engine import Store

log = structlog.get_logger("deskgate.submission")

_LIBRARY_REPLIES = {"530 Must issue a STARTTLS command first": R530_STARTTLS_FIRST}


class AgentMail(Protocol):
    """What the port needs from gateway.agentmail.path.AgentPath (tests pass a recorder)."""

    async def check_recipient(self, agent: AgentIdentity, address: str) -> str | None: ...

    async def deliver(self, agent: AgentIdentity, raw: bytes, envelope: Envelope) -> str: ...


class SubmissionSMTP(GatewaySMTP):
    """GatewaySMTP that knows when its socket was TLS from the first byte (port 465)."""

    def __init__(self, handler: SubmissionHandler, implicit_tls: bool, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.implicit_tls = implicit_tls

    async def push(self, status: Any) -> None:
        if isinstance(status, str):
            status = _LIBRARY_REPLIES.get(status, status)
        await super().push(status)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first and self.implicit_tls and self.session is not None:
            # aiosmtpd only counts STARTTLS as encryption (AUTH offered, 538 avoided): the
            # SSL transport's protocol object stands in for the one STARTTLS would have made.
            tls = getattr(transport, "_ssl_protocol", None) or transport
            self._tls_protocol = tls  # type: ignore[assignment]
            self.session.ssl = {"ssl_object": transport.get_extra_info("ssl_object"),
                                "cipher": transport.get_extra_info("cipher")}
        if isinstance(self.event_handler, SubmissionHandler):
            self.event_handler.sessions.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        if isinstance(self.event_handler, SubmissionHandler):
            self.event_handler.sessions.discard(self)
        super().connection_lost(error)


class SubmissionHandler(SessionsHandler):
    """aiosmtpd hooks for AUTH, MAIL, RCPT and DATA; counts mails in flight for the drain."""

    def __init__(self, path: AgentMail, store: Store, lockout: Lockout,
                 metrics: Metrics | None = None) -> None:
        self.path = path
        self.store = store
        self.lockout = lockout
        self.metrics = metrics
        self.accepting = True
        self.inflight = 0
        self.sessions: set[SubmissionSMTP] = set()

    async def handle_AUTH(self, server: SMTP, session: Session, envelope: SMTPEnvelope,
                          args: list[str]) -> str | None:
        """PLAIN and LOGIN (aiosmtpd has refused other mechanisms and AUTH before TLS)."""
        credentials = await _read_credentials(server, args)
        if credentials is None:  # aborted or undecodable: aiosmtpd has answered 501
            return None
        login, password = credentials
        return await self.login(session, args[0].upper(), login, password)

    async def login(self, session: Session, mechanism: str, login: str, password: bytes
                    ) -> str:
        peer, ip = _peer(session), _ip(session)
        waited = self.lockout.locked_for(login, ip)
        if waited > 0:
            log.warning("submission.auth_locked", login=login, peer=peer,
                        retry_after_s=round(waited))
            self._count("locked")
            return locked_out(waited)
        try:
            result = await check_login(self.store, login, password)
        except (SQLAlchemyError, OSError, StoreUnavailable) as exc:
            log.error("submission.auth_unavailable", login=login, peer=peer,
                      error=type(exc).__name__)
            return R454_AUTH_UNAVAILABLE
        if result.agent is not None:
            self.lockout.succeeded(login)
            session.authenticated = True
            session.auth_data = result.agent
            log.info("submission.auth_ok", agent=result.agent.email, peer=peer,
                     mechanism=mechanism)
            self._count("ok")
            return R235_AUTH_OK
        failure = self.lockout.failed(login, ip)
        log.warning("submission.auth_failed", login=login, peer=peer, mechanism=mechanism,
                    reason=result.reason, delay_s=failure.delay_s)
        self._count("failed")
        reply = R535_AUTH_FAILED
        if failure.locked:
            log.warning("submission.locked_out", login=login, peer=peer, ip=ip,
                        keys=list(failure.locked), lockout_s=self.lockout.policy.lockout_s)
            reply = auth_failed_and_locked(self.lockout.policy.lockout_s)
        await asyncio.sleep(failure.delay_s)  # each failure answers a little later
        return reply

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: SMTPEnvelope,
                          address: str, mail_options: list[str]) -> str:
        if not self.accepting:
            return R421_SHUTTING_DOWN
        agent = session.auth_data
        if not isinstance(agent, AgentIdentity):
            return R530_AUTH_REQUIRED
        if normalize_address(address) != agent.email:
            log.warning("submission.sender_refused", agent=agent.email, mail_from=address,
                        peer=_peer(session))
            return not_your_address(agent.email)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: SMTPEnvelope,
                          address: str, rcpt_options: list[str]) -> str:
        agent = session.auth_data
        assert isinstance(agent, AgentIdentity)  # MAIL was accepted
        try:
            refusal = await self.path.check_recipient(agent, address)
        except Exception:  # a bug of ours must never become a permanent refusal
            log.exception("submission.rcpt_failed", agent=agent.email, rcpt=address)
            return R451_TEMPORARY
        if refusal is not None:
            log.info("submission.rcpt_refused", agent=agent.email, rcpt=address, reply=refusal)
            return refusal
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SMTPEnvelope) -> str:
        agent = session.auth_data
        assert isinstance(agent, AgentIdentity)
        meta = Envelope(mail_from=envelope.mail_from or "", rcpt_tos=tuple(envelope.rcpt_tos),
                        peer=_peer(session), channel="submission")
        self.inflight += 1
        started = time.perf_counter()
        try:
            reply = await self.path.deliver(agent, envelope.original_content or b"", meta)
        except Exception:
            log.exception("submission.deliver_failed", agent=agent.email, peer=meta.peer)
            return R451_TEMPORARY
        finally:
            self.inflight -= 1
        log.info("submission.delivered", agent=agent.email, rcpt=list(meta.rcpt_tos),
                 reply=reply[:3], ms=round((time.perf_counter() - started) * 1000))
        return reply

    async def handle_exception(self, error: Exception) -> str:
        log.error("submission.session_error", error=type(error).__name__)
        return R451_TEMPORARY

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.logins.labels(result).inc()


async def _read_credentials(server: SMTP, args: list[str]) -> tuple[str, bytes] | None:
    """(login, password) from an AUTH PLAIN/LOGIN exchange; None when aiosmtpd answered 501."""
    mechanism = args[0].upper()
    initial = args[1] if len(args) > 1 else None
    if mechanism == "PLAIN":
        blob = _b64(initial) if initial is not None else await server.challenge_auth("")
        if not isinstance(blob, bytes) or blob.count(b"\x00") != 2:
            if isinstance(blob, bytes):
                await server.push("501 5.5.2 Cannot split the PLAIN credentials")
            elif initial is not None:
                await server.push("501 5.5.2 Cannot decode base64")
            return None
        _authzid, login, password = blob.split(b"\x00")
    else:  # LOGIN
        user = _b64(initial) if initial is not None else await server.challenge_auth(
            server.AuthLoginUsernameChallenge)
        if not isinstance(user, bytes):
            if initial is not None:
                await server.push("501 5.5.2 Cannot decode base64")
            return None
        secret = await server.challenge_auth(server.AuthLoginPasswordChallenge)
        if not isinstance(secret, bytes):
            return None
        login, password = user, secret
    return login.decode("utf-8", "replace").strip().lower()[:320], password


def _b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text.encode(), validate=True)
    except (binascii.Error, ValueError):
        return None


def _ip(session: Session) -> str:
    peer = session.peer
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


class Submission:
    """The listeners: STARTTLS-required (587) and, when configured, implicit TLS (465)."""

    def __init__(self, settings: Settings, store: Store, path: AgentMail,
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        sub = settings.submission
        policy = Policy(max_failures=sub.max_failures, max_failures_per_ip=sub.max_failures_per_ip,
                        window_s=float(sub.failure_window_s), lockout_s=float(sub.lockout_s),
                        first_delay_s=sub.failure_delay_ms / 1000)
        self.handler = SubmissionHandler(path, store, Lockout(policy), metrics)
        self.server: asyncio.Server | None = None
        self.tls_server: asyncio.Server | None = None

    @property
    def enabled(self) -> bool:
        return self.settings.submission.enabled

    @property
    def port(self) -> int | None:
        return _port(self.server)

    @property
    def tls_port(self) -> int | None:
        return _port(self.tls_server)

    @property
    def serving(self) -> bool:
        return self.server is not None and self.server.is_serving() and (
            self.tls_server is None or self.tls_server.is_serving())

    async def start(self, reuse_port: bool = False) -> None:
        sub, hostname = self.settings.submission, self.settings.hostname
        context = await asyncio.to_thread(server_context, self.settings)  # RSA keygen once
        loop = asyncio.get_running_loop()
        handler = self.handler

        def factory(implicit_tls: bool) -> asyncio.Protocol:
            if not handler.accepting:
                return ShutdownRefuser()
            return SubmissionSMTP(
                handler, implicit_tls, hostname=hostname, ident="deskgate ESMTP submission",
                data_size_limit=sub.max_message_bytes, enable_SMTPUTF8=True, decode_data=False,
                tls_context=None if implicit_tls else context, require_starttls=not implicit_tls,
                auth_required=True, auth_require_tls=True, loop=loop)

        self.server = await loop.create_server(
            lambda: factory(False), host=sub.listen.host, port=sub.listen.port,
            reuse_address=True, reuse_port=reuse_port or None)
        if sub.tls_listen is not None:
            self.tls_server = await loop.create_server(
                lambda: factory(True), host=sub.tls_listen.host, port=sub.tls_listen.port,
                ssl=context, ssl_handshake_timeout=30, reuse_address=True,
                reuse_port=reuse_port or None)
        log.info("submission.ready", listen=f"{sub.listen.host}:{self.port}",
                 tls_listen=f"{sub.tls_listen.host}:{self.tls_port}" if sub.tls_listen else None)

    def stop_accepting(self) -> None:
        self.handler.accepting = False

    def close(self) -> None:
        """After the drain: stop listening, tell idle sessions we are going (421)."""
        for server in (self.server, self.tls_server):
            if server is not None:
                server.close()
        self.handler.hang_up_idle()


def _port(server: asyncio.Server | None) -> int | None:
    return int(server.sockets[0].getsockname()[1]) if server and server.sockets else None
