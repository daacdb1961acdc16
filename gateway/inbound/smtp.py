"""Inbound SMTP: aiosmtpd's protocol on the daemon's own loop; wire <-> pipeline, no policy."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Iterable
from typing import Any

import structlog
from aiosmtpd.smtp import MISSING, SMTP, Session
from aiosmtpd.smtp import Envelope as SMTPEnvelope

from gateway.errors import StoreUnavailable
from gateway.inbound.data_reader import DataState, read_data
from gateway.inbound.limits import ConnectionGate, RateLimiter, client_ip
from gateway.inbound.smtp_address import getaddr, is_checked
from gateway.ingest.addresses import RouteKind
from gateway.ingest.model import Envelope
from gateway.ingest.pipeline import Outcome, Pipeline
from gateway.replies import (
    R250_DUPLICATE,
    R250_QUARANTINED,
    R421_SHUTTING_DOWN,
    R421_TIMEOUT,
    R421_TOO_MANY_CONNECTIONS,
    R451_TEMPORARY,
    R452_TOO_MANY_RECIPIENTS,
    R500_LINE_TOO_LONG,
    R550_NO_SUCH_ADDRESS,
    R552_TOO_BIG,
    R554_RELAY_DENIED,
    rate_limited,
    stored,
)
from gateway.settings_limits import InboundLimits
from gateway.web.metrics import Metrics

log = structlog.get_logger("deskgate.smtp")

# aiosmtpd answers size overruns itself with plain texts; we answer with enhanced codes.
# (DATA's own overruns are ours now: GatewaySMTP.smtp_DATA answers them directly.)
_LIBRARY_REPLIES = {
    "552 Error: message size exceeds fixed maximum message size": R552_TOO_BIG,
    # RFC 5321 4.5.3.1.6: 1000 octets a line. aiosmtpd drains the line, never buffers it.
    "500 Command line too long": R500_LINE_TOO_LONG,
}
# Library replies that mean an abuse limit was hit (issue 11): the metric's label.
_LIMIT_OF_REPLY = {R500_LINE_TOO_LONG: "line_length"}


_FAST_GETADDR = is_checked(SMTP._getaddr)


class GatewaySMTP(SMTP):
    """aiosmtpd's SMTP with our wording for the replies it makes on its own."""

    data_timeout_s: float = 600.0  # 354 to the final dot, whole (RFC 5321 4.5.3.2.6)
    _refused = False  # over a connection limit: answered 421, aiosmtpd never started
    _gate_key: str | None = None  # the per-IP count this connection holds (None: exempt)
    _held = b""  # the lines of a multiline reply so far, sent with its last line

    def __dir__(self) -> Iterable[str]:
        # aiosmtpd's __init__ finds its smtp_*/auth_* methods and the handler's handle_*
        # hooks by scanning dir() of both, with inspect.getmembers, on every connection:
        # most of a session's set-up cost (bench/README.md). The names are fixed per class.
        return _protocol_names(type(self))

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd's parses every MAIL and RCPT with email's header parser and defines a class
        # per call; plain <local@domain> needs neither (smtp_address.py).
        try:
            return getaddr(arg, self.local_part_limit) if _FAST_GETADDR else \
                super()._getaddr(arg)
        except IndexError:
            # That parser raises on a few malformed paths ("<", '<"', "<@"); uncaught, aiosmtpd
            # answered 451 (try again later) to what can never parse. Malformed, like the rest.
            return None, None

    async def push(self, status: Any) -> None:
        if isinstance(status, str):
            status = _LIBRARY_REPLIES.get(status, status)
            limit = _LIMIT_OF_REPLY.get(status) or (
                "commands" if status.endswith(" sent too many times") else None)
            if limit and isinstance(self.event_handler, InboundHandler) and self.session:
                self.event_handler.note_limit(limit, self.session, reply=status)
            if status[3:4] == "-":
                # A multiline reply's lines (EHLO's) leave in one write with its last line,
                # not in a send() each: the same bytes, 4 of a session's ~12 sends fewer.
                self._held += self._encoded(status) + b"\r\n"
                return
        if self._held:
            held, self._held = self._held, b""
            await super().push(held + (self._encoded(status) if isinstance(status, str)
                                       else status))
        else:
            await super().push(status)
        if isinstance(status, str) and status.startswith("421") and self.transport is not None:
            self.transport.close()  # RFC 5321 3.8: after 421 the server closes the channel

    def _encoded(self, status: str) -> bytes:
        return status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii")  # as aiosmtpd's push

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        handler = self.event_handler
        if isinstance(handler, InboundHandler) and self.transport is None:
            # Before the banner (issue 11): over a limit, 421 and close, no session at all.
            peer = transport.get_extra_info("peername")
            reason, self._gate_key = handler.connections.admit(client_ip(peer),
                                                               handler.limits())
            if reason:
                self._refused = True
                assert isinstance(transport, asyncio.WriteTransport)
                transport.write(R421_TOO_MANY_CONNECTIONS.encode() + b"\r\n")
                transport.close()
                handler.note_limit(reason, peer)
                return
        super().connection_made(transport)
        if isinstance(self.event_handler, InboundHandler):  # the drain needs to see sessions
            self.event_handler.sessions.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return  # nothing of aiosmtpd's was set up
        if isinstance(self.event_handler, InboundHandler):
            self.event_handler.sessions.discard(self)
            if self.transport is not None:  # once, also after STARTTLS
                self.event_handler.connections.release(self._gate_key)
        super().connection_lost(error)

    def _timeout_cb(self) -> None:
        # aiosmtpd closes silently; RFC 5321 4.2 lets us say why first (421, then close).
        if self.transport is not None and not self.transport.is_closing():
            assert isinstance(self.transport, asyncio.WriteTransport)
            self.transport.write(R421_TIMEOUT.encode() + b"\r\n")
        if isinstance(self.event_handler, InboundHandler) and self.session is not None:
            self.event_handler.note_limit("timeout", self.session)
        super()._timeout_cb()

    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA with the mail read in chunks (gateway/inbound/data_reader.py)."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        # aiosmtpd's timer runs from the DATA command to the end of the mail without a reset
        # per read: a client trickling its mail is bounded by this, not by an idle timeout.
        self._reset_timeout(self.data_timeout_s)
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            try:
                state, raw = await read_data(self._reader, self.data_size_limit,
                                             self.line_length_limit)
            except asyncio.CancelledError:  # the connection went away during DATA
                self._writer.close()
                raise
            except asyncio.IncompleteReadError:
                self._writer.close()
                return
        finally:
            if self.transport is not None:
                self._reset_timeout()
        if state is not DataState.NOMINAL:
            await self.push(R500_LINE_TOO_LONG if state is DataState.TOO_LONG else R552_TOO_BIG)
            self._set_post_data_state()
            return
        self.envelope.content = self.envelope.original_content = raw
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

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


class SessionsHandler:
    """What the drain needs of an SMTP handler: its sessions and the mails in flight."""

    sessions: set[Any]
    inflight: int

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


class InboundHandler(SessionsHandler):
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.accepting = True
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.sessions: set[GatewaySMTP] = set()
        self.metrics: Metrics | None = None  # set by the composition root when it has one
        self.connections = ConnectionGate()  # open connections per client (issue 11)
        self.rates: RateLimiter | None = None  # mail rates; the composition root sets it

    def limits(self) -> InboundLimits:
        """Read per connection and per mail: SIGHUP may have changed them."""
        return self.pipeline.settings.inbound.limits

    def note_limit(self, limit: str, peer: Any, **fields: Any) -> None:
        """An abuse limit answered (issue 11): one log line and the metric."""
        peer = _peer(peer) if isinstance(peer, Session) else _peer_of(peer)
        log.warning("smtp.limited", limit=limit, peer=peer, **fields)
        if self.metrics:
            self.metrics.observe_limit(limit)

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: SMTPEnvelope,
                          address: str, mail_options: list[str]) -> str:
        if not self.accepting:
            return R421_SHUTTING_DOWN
        over = self.rates.check(address, client_ip(session.peer)) if self.rates else None
        if over is not None:  # 451 4.7.1: the MTA retries later (issue 11)
            self.note_limit(f"rate_{over.kind}", session, sender=address, per_window=over.limit)
            return rate_limited(over.kind)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: SMTPEnvelope,
                          address: str, rcpt_options: list[str]) -> str:
        if len(envelope.rcpt_tos) >= self.limits().max_recipients:  # RFC 5321 4.5.3.1.10
            self.note_limit("recipients", session, rcpt=address)
            return R452_TOO_MANY_RECIPIENTS
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
                        peer=_peer(session), channel="smtp", helo=session.host_name or "")
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
    return _peer_of(session.peer)


def _peer_of(peer: Any) -> str:
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
        limits = handler.limits()  # timeouts and command budgets (issue 11)
        protocol = GatewaySMTP(handler, hostname=hostname, ident="deskgate ESMTP",
                               data_size_limit=limit, enable_SMTPUTF8=True,
                               decode_data=False, loop=loop, timeout=limits.session_timeout_s,
                               command_call_limit=limits.command_call_limit())
        protocol.data_timeout_s = limits.data_timeout_s
        return protocol

    # reuse_port: several worker processes bind the same port; the kernel spreads connections.
    return await loop.create_server(factory, host=host, port=port, reuse_address=True,
                                    reuse_port=reuse_port or None)
