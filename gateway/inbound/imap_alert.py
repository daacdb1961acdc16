"""The operators' alert mail for a mailbox deskgate cannot read (issue 7): once per outage.

Queued through the outbox like the escalation mails; the outbox rows and the mailbox's
`alerted_at` commit together, so a restart or a second instance does not mail again.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import structlog

from gateway.outbound import queue
from gateway.outbound.compose import Outgoing, compose
from gateway.outbound.render import Renderer
from gateway.settings import Settings
from gateway.settings_imap import ImapSettings
from store import imap_checkpoints
from store.engine import Store

log = structlog.get_logger("deskgate.imap")


def already_alerted(alerted_at: datetime | None, last_success: datetime | None) -> bool:
    """This outage was mailed about: the alert is younger than the last successful fetch."""
    return alerted_at is not None and (last_success is None or alerted_at >= last_success)


class AlertMail:
    def __init__(self, settings: Settings, renderer: Renderer, clock: Callable[[], datetime],
                 queued: Callable[[], None] = lambda: None) -> None:
        self.settings, self.renderer, self.clock, self.queued = settings, renderer, clock, queued

    async def send(self, store: Store, cfg: ImapSettings, reason: str,
                   since: datetime | None) -> list[str]:
        """Queue the alert to every operator; [] when already sent or nobody to send to."""
        operators = self.settings.alerts.operators
        dept = next((d for d in self.settings.departments if d.slug == cfg.department), None)
        now = self.clock()
        async with store.transaction() as session:
            row = await imap_checkpoints.load(session, cfg.name)
            if already_alerted(row.alerted_at, row.last_polled_at):
                return []
            await imap_checkpoints.save(session, cfg.name, alerted_at=now)
            if not operators or dept is None:
                log.error("imap.alert_unsent", mailbox=cfg.name,
                          reason="no operators: set [alerts] operators = [\"ops@…\"]")
                return []
            rendered = self.renderer.render("alert", dept.language, {
                "mailbox": cfg.name, "server": f"{cfg.host}:{cfg.port}", "folder": cfg.folder,
                "user": cfg.user, "department": dept.name, "error": reason,
                "since": f"{since:%Y-%m-%d %H:%M} UTC" if since else "-",
                "hostname": self.settings.hostname,
            }, department=dept.slug)
            sender = dept.addresses[0]
            for operator in operators:
                composed = compose(rendered, Outgoing(
                    from_addr=sender, from_name="deskgate", to=operator,
                    hostname=self.settings.hostname, date=now, auto_submitted="auto-generated",
                    language=dept.language))
                # Exempt from the unverified-sender hold: a held alert would be the silence
                # this mail exists to break.
                await queue.enqueue(session, kind="alert", from_addr=sender, to=operator,
                                    message_id=composed.message_id, mime=composed.mime,
                                    now=now, exempt_from_hold=True)
        self.queued()
        log.info("imap.alert_queued", mailbox=cfg.name, to=list(operators))
        return list(operators)
