"""The small web endpoint: one-click rating links, the comment form, /healthz, /metrics.

No session state and no login: every link carries a signed, expiring token (tokens.py);
the comment form posts back to the same token, which is what makes it CSRF-safe.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
import structlog
from aiohttp import web
from sqlalchemy import select, text, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from gateway.agents import hash_password
from gateway.outbound.verify import mark_verified
from gateway.paths import templates_dir
from gateway.web.metrics import Metrics
from gateway.web.tokens import TokenError, verify
from store.engine import Store
from store.models import Address, Agent, Department, Rating, Ticket

log = structlog.get_logger("deskgate.web")
VALUES = ("good", "okay", "bad")
LANGUAGES = ("en", "de", "nl", "zh")
PAGES = templates_dir() / "pages"
MAX_COMMENT = 4000


class WebApp:
    def __init__(self, store: Store, keys: tuple[bytes, ...], metrics: Metrics,
                 health: Callable[[], dict[str, bool]],
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 pages: Path = PAGES) -> None:
        self.store, self.keys, self.metrics = store, keys, metrics
        self.health, self.clock = health, clock
        self.pages = jinja2.Environment(loader=jinja2.FileSystemLoader(pages), autoescape=True,
                                        undefined=jinja2.StrictUndefined)
        self.app = web.Application(client_max_size=64 * 1024)
        self.app.add_routes([
            web.get("/healthz", self.healthz), web.get("/metrics", self.prometheus),
            web.get("/rate/{token}/{value}", self.rate),
            web.post("/rate/{token}/{value}", self.comment),
            web.get("/verify/{code}", self.verify_address),
            web.get("/invite/{token}", self.invitation),
            web.post("/invite/{token}", self.set_password)])
        self.runner: web.AppRunner | None = None
        self.released: Callable[[], None] | None = None  # wakes the relay worker
        # Parts that work but not wholly (an IMAP mailbox that keeps failing, issue 7):
        # /healthz stays 200 and says "degraded", naming them.
        self.degraded: Callable[[], dict[str, Any]] = dict
        self.submission = "127.0.0.1:2587"  # shown to agents for their mail client

    async def start(self, host: str, port: int, reuse_port: bool = False) -> int:
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        # reuse_port: `serve --workers N` runs N processes on the same port.
        site = web.TCPSite(self.runner, host, port, reuse_address=True,
                           reuse_port=reuse_port or None)
        await site.start()
        server = site._server  # noqa: SLF001 — aiohttp exposes the bound port only here
        return int(server.sockets[0].getsockname()[1]) if server else port  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def healthz(self, request: web.Request) -> web.Response:
        checks = dict(self.health())
        try:
            async with self.store.read() as session:
                await session.execute(text("SELECT 1"))
            checks["database"] = True
        except (SQLAlchemyError, OSError):
            checks["database"] = False
        status = 200 if all(checks.values()) else 503
        body: dict[str, Any] = {"ok": status == 200, "checks": checks}
        degraded = self.degraded()
        body["status"] = "down" if status != 200 else "degraded" if degraded else "ok"
        if degraded:
            body["degraded"] = degraded
        return web.json_response(body, status=status)

    async def prometheus(self, request: web.Request) -> web.Response:
        async with self.store.read() as session:
            body = await self.metrics.render(session)
        return web.Response(body=body, content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    def _page(self, name: str, language: str | None, status: int = 200, **context: Any
              ) -> web.Response:
        lang = language if language in LANGUAGES else "en"
        html = self.pages.get_template(f"{lang}/{name}.html.j2").render(lang=lang, **context)
        return web.Response(text=html, content_type="text/html", status=status, headers={
            "Cache-Control": "no-store", "X-Frame-Options": "DENY",
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                                       "form-action 'self'"})

    async def verify_address(self, request: web.Request) -> web.Response:
        """The verification mail's link: the same proof as the code coming back by mail,
        since only someone reading that mailbox has the one-time code."""
        code = request.match_info["code"]
        async with self.store.transaction() as session:
            address = await session.scalar(select(Address).where(
                Address.verification_code == code, Address.verification_state == "pending"))
            if address is None or len(code) < 16:
                log.info("web.verification_refused")
                return self._page("refused", None, 404, reason="invalid")
            email = address.email
            released = await mark_verified(session, email, self.clock())
        log.info("web.verified", address=email, released=released)
        if self.released is not None:
            self.released()
        return self._page("verified", None, address=email, released=released)

    async def _invited(self, request: web.Request) -> Agent | web.Response:
        """The agent an invitation names, while it is unused and fresh."""
        try:
            agent_id = verify("invite", request.match_info["token"], self.keys, self.clock())
        except TokenError as exc:  # an old invitation reads like a used one: ask for a new one
            return self._page("refused", None, 410 if exc.reason == "expired" else 403,
                              reason="used" if exc.reason == "expired" else exc.reason)
        async with self.store.read() as session:
            agent = await session.get(Agent, int(agent_id))
        if agent is None or not agent.active or agent.credential_hash is not None:
            return self._page("refused", None, 410, reason="used")
        return agent

    async def invitation(self, request: web.Request) -> web.Response:
        agent = await self._invited(request)
        if isinstance(agent, web.Response):
            return agent
        return self._page("invite", None, agent=agent, submission=self.submission, error="",
                          action=request.path)

    async def set_password(self, request: web.Request) -> web.Response:
        agent = await self._invited(request)
        if isinstance(agent, web.Response):
            return agent
        form = await request.post()
        password, again = str(form.get("password", "")), str(form.get("again", ""))
        error = "mismatch" if password != again else ""
        if not error:
            try:
                hashed = hash_password(password)
            except ValueError:
                error = "short"
        if error:
            return self._page("invite", None, 400, agent=agent, submission=self.submission,
                              error=error, action=request.path)
        async with self.store.transaction() as session:  # only while still unset: single use
            result = await session.execute(update(Agent).where(
                Agent.id == agent.id, Agent.credential_hash.is_(None)).values(
                credential_hash=hashed))
        if not result.rowcount:
            return self._page("refused", None, 410, reason="used")
        log.info("web.password_set", agent=agent.email)
        return self._page("invited", None, agent=agent, submission=self.submission)

    async def _ticket(self, request: web.Request) -> tuple[Ticket, str] | web.Response:
        value = request.match_info["value"]
        try:
            number = verify("rate", request.match_info["token"], self.keys, self.clock())
        except TokenError as exc:
            log.info("web.rating_refused", reason=exc.reason)
            return self._page("refused", request.query.get("lang"), 410 if exc.reason ==
                              "expired" else 403, reason=exc.reason)
        if value not in VALUES:
            return self._page("refused", None, 404, reason="invalid")
        async with self.store.read() as session:
            row = (await session.execute(select(Ticket, Department.name).join(
                Department, Department.id == Ticket.department_id).where(
                Ticket.number == int(number)))).first()
        if row is None:
            return self._page("refused", None, 404, reason="invalid")
        return row[0], row[1]

    async def rate(self, request: web.Request) -> web.Response:
        """GET records the click at once, so it works from any mail client (issue 5)."""
        found = await self._ticket(request)
        if isinstance(found, web.Response):
            return found
        ticket, department = found
        value = request.match_info["value"]
        comment = await self._record(ticket, value, None)
        log.info("web.rated", ticket=ticket.number, value=value)
        return self._page("rated", ticket.language, ticket=ticket, department=department,
                          value=value, comment=comment or "", saved=False,
                          action=request.path)

    async def comment(self, request: web.Request) -> web.Response:
        found = await self._ticket(request)
        if isinstance(found, web.Response):
            return found
        ticket, department = found
        form = await request.post()
        text_value = str(form.get("comment", ""))[:MAX_COMMENT].strip()
        value = request.match_info["value"]
        await self._record(ticket, value, text_value)
        log.info("web.commented", ticket=ticket.number, value=value, length=len(text_value))
        return self._page("rated", ticket.language, ticket=ticket, department=department,
                          value=value, comment=text_value, saved=True, action=request.path)

    async def _record(self, ticket: Ticket, value: str, comment: str | None) -> str | None:
        """One rating per ticket: a repeat click is idempotent, a later one changes it."""
        try:
            return await self._write_rating(ticket, value, comment)
        except IntegrityError:  # two first clicks at once: the other one won, update it
            return await self._write_rating(ticket, value, comment)

    async def _write_rating(self, ticket: Ticket, value: str, comment: str | None
                            ) -> str | None:
        now = self.clock()
        async with self.store.transaction() as session:
            rating = await session.scalar(select(Rating).where(Rating.ticket_id == ticket.id))
            if rating is None:
                rating = Rating(ticket_id=ticket.id, department_id=ticket.department_id,
                                agent_id=ticket.owner_id, value=value, comment=comment,
                                created_at=now, updated_at=now)
                session.add(rating)
            elif rating.value != value or comment is not None:
                rating.value, rating.updated_at = value, now
                if comment is not None:
                    rating.comment = comment
            return rating.comment
