"""Inbound SMTP: aiosmtpd's protocol on the daemon's own loop; wire <-> pipeline, no policy."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Iterable
from typing import Any

import structlog
from aiosmtpd.smtp import SMTP, Session
from aiosmtpd.smtp import Envelope as SMTPEnvelope

from gateway.errors import StoreUnavailable
from gateway.ingest.addresses import RouteKind
from gateway.ingest.model import Envelope
from gateway.ingest.pipeline import Outcome, Pipeline
from gateway.replies import (
    R250_DUPLICATE,
    R250_QUARANTINED,
    R421_SHUTTING_DOWN,
    R451_TEMPORARY,
    R550_NO_SUCH_ADDRESS,
    R552_TOO_BIG,
    R554_RELAY_DENIED,
    stored,
)
from gateway.web.metrics import Metrics

log = structlog.get_logger("deskgate.smtp")

# aiosmtpd answers size overruns itself with plain texts; we answer with enhanced codes.
_LIBRARY_REPLIES = {
    "552 Error: message size exceeds fixed maximum message size": R552_TOO_BIG,
    "552 Error: Too much mail data": R552_TOO_BIG,
}


class GatewaySMTP(SMTP):
    """aiosmtpd's SMTP with our wording for the replies it makes on its own."""

    def __dir__(self) -> Iterable[str]:
        # aiosmtpd's __init__ finds its smtp_*/auth_* methods and the handler's handle_*
        # hooks by scanning dir() of both, with inspect.getmembers, on every connection:
        # most of a session's set-up cost (bench/README.md). The names are fixed per class.
        return _protocol_names(type(self))

    async def push(self, status: Any) -> None:
        if isinstance(status, str):
            status = _LIBRARY_REPLIES.get(status, status)
        await super().push(status)
        if isinstance(status, str) and status.startswith("421") and self.transport is not None:
            self.transport.close()  # RFC 5321 3.8: after 421 the server closes the channel

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if isinstance(self.event_handler, InboundHandler):  # the drain needs to see sessions
            self.event_handler.sessions.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        if isinstance(self.event_handler, InboundHandler):
            self.event_handler.sessions.discard(self)
        super().connection_lost(error)

    @property
    def in_transaction(self) -> bool:
        """Between an accepted MAIL and the answer to its DATA (aiosmtpd resets the envelope)."""
        return self.envelope is not None and self.envelope.mail_from is not None


class ShutdownRefuser(asyncio.Protocol):
    """Answers a connection made while draining with 421 and hangs up (RFC 5321 3.8)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(R421_SHUTTING_DOWN.encode() + b"\r\n")
        transport.close()


class InboundHandler:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.accepting = True
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.sessions: set[GatewaySMTP] = set()
        self.metrics: Metrics | None = None  # set by the composition root when it has one

    @property
    def busy(self) -> bool:
        """Some session is mid-transaction: its mail must be answered before we stop."""
        return bool(self.inflight) or any(s.in_transaction for s in self.sessions)

    def hang_up_idle(self) -> None:
        """After the drain: tell sessions still connected that we are going (421) and close."""
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.write(R421_SHUTTING_DOWN.encode() + b"\r\n")
                session.transport.close()

    def __dir__(self) -> Iterable[str]:
        return _protocol_names(type(self))  # see GatewaySMTP.__dir__

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: SMTPEnvelope,
                          address: str, mail_options: list[str]) -> str:
        if not self.accepting:
            return R421_SHUTTING_DOWN
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: SMTPEnvelope,
                          address: str, rcpt_options: list[str]) -> str:
        route = self.pipeline.route(address)
        if not route.accepted:
            reason = "relay" if route.kind is RouteKind.RELAY else "unknown"
            log.info("smtp.rcpt_refused", peer=_peer(session), rcpt=address, reason=reason)
            if self.metrics:
                self.metrics.observe_refusal(reason)
            return R554_RELAY_DENIED if reason == "relay" else R550_NO_SUCH_ADDRESS
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SMTPEnvelope) -> str:
        raw = envelope.original_content or b""
        meta = Envelope(mail_from=envelope.mail_from or "", rcpt_tos=tuple(envelope.rcpt_tos),
                        peer=_peer(session), channel="smtp")
        self.inflight += 1
        self.idle.clear()
        started, outcome = time.perf_counter(), "temporary_failure"
        try:
            verdict = await self.pipeline.ingest(raw, meta)
            outcome = verdict.outcome.value
        except StoreUnavailable:
            return R451_TEMPORARY
        except Exception:  # a bug of ours must never become a bounce (STYLE habit 2)
            log.exception("smtp.ingest_failed", peer=meta.peer)
            return R451_TEMPORARY
        finally:
            self.inflight -= 1
            if not self.inflight:
                self.idle.set()
            if self.metrics:
                self.metrics.observe_mail(outcome, time.perf_counter() - started)
        if verdict.outcome is Outcome.DUPLICATE:
            return R250_DUPLICATE
        if verdict.outcome is Outcome.QUARANTINED:
            return R250_QUARANTINED
        if verdict.outcome is Outcome.REJECTED:
            return R550_NO_SUCH_ADDRESS
        return stored(verdict.ticket_number)

    async def handle_exception(self, error: Exception) -> str:
        log.error("smtp.session_error", error=type(error).__name__)
        return R451_TEMPORARY


@functools.cache
def _protocol_names(cls: type) -> tuple[str, ...]:
    """What aiosmtpd looks for in dir(): its commands, AUTH mechanisms and handler hooks."""
    return tuple(name for name in dir(cls) if name.startswith(("smtp_", "auth_", "handle_")))


def _peer(session: Session) -> str:
    peer = session.peer
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


async def start_inbound(handler: InboundHandler, host: str, port: int, hostname: str,
                        max_message_bytes: int, reuse_port: bool = False) -> asyncio.Server:
    loop = asyncio.get_running_loop()

    def factory() -> asyncio.Protocol:
        if not handler.accepting:  # draining for shutdown: new clients get 421 4.3.2
            return ShutdownRefuser()
        # hostname= given: aiosmtpd would otherwise call socket.getfqdn() per connection.
        # The size limit is read per connection: SIGHUP may have changed it (issue 9).
        limit = handler.pipeline.settings.inbound.max_message_bytes or max_message_bytes
        return GatewaySMTP(handler, hostname=hostname, ident="deskgate ESMTP",
                           data_size_limit=limit, enable_SMTPUTF8=True,
                           decode_data=False, loop=loop)

    # reuse_port: several worker processes bind the same port; the kernel spreads connections.
    return await loop.create_server(factory, host=host, port=port, reuse_address=True,
                                    reuse_port=reuse_port or None)
