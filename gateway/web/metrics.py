"""Prometheus metrics: process counters from the hot path, store-wide figures at scrape time."""

from __future__ import annotations

from contextlib import suppress
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from store.models import Event, Outbox

# Events whose counts operators watch; read from the store, so every instance agrees.
WATCHED_EVENTS = ("created", "reopened", "ack_suppressed", "escalated", "auto_closed",
                  "rules_fired")


class Metrics:
    """One registry per gateway (tests run several in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.mails = Counter("deskgate_mails", "Mails at end of DATA, by outcome",
                             ["outcome"], registry=self.registry)
        self.refused = Counter("deskgate_recipients_refused", "RCPT refusals, by reason",
                               ["reason"], registry=self.registry)
        self.ingest_seconds = Histogram(
            "deskgate_ingest_seconds", "Time from end of DATA to the answer",
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry)
        self.outbox = Gauge("deskgate_outbox_rows", "Outbox rows by state", ["state"],
                            registry=self.registry)
        self.events = Gauge("deskgate_ticket_events", "Ticket events recorded, by type",
                            ["type"], registry=self.registry)
        # IMAP mailboxes (issue 7): alert on deskgate_imap_alerting, or on the age of the
        # last successful fetch.
        self.imap_mails = Counter("deskgate_imap_mails", "IMAP mails by mailbox and outcome",
                                  ["mailbox", "outcome"], registry=self.registry)
        self.imap_failures = Gauge("deskgate_imap_failures", "Failed attempts in a row",
                                   ["mailbox"], registry=self.registry)
        self.imap_alerting = Gauge("deskgate_imap_alerting",
                                   "1 while no fetch succeeded for alert_after_s", ["mailbox"],
                                   registry=self.registry)
        self.imap_last_success = Gauge("deskgate_imap_last_success_timestamp_seconds",
                                       "Unix time of the last successful fetch", ["mailbox"],
                                       registry=self.registry)
        self.limited = Counter("deskgate_smtp_limited",
                               "Inbound connections, commands and mails refused by an abuse "
                               "limit, by limit", ["limit"], registry=self.registry)
        self.logins = Counter("deskgate_submission_logins",
                              "Submission AUTH attempts, by result (ok, failed, locked)",
                              ["result"], registry=self.registry)

    def observe_mail(self, outcome: str, seconds: float) -> None:
        self.mails.labels(outcome).inc()
        self.ingest_seconds.observe(seconds)

    def observe_refusal(self, reason: str) -> None:
        self.refused.labels(reason).inc()

    def imap_mail(self, mailbox: str, outcome: str) -> None:
        self.imap_mails.labels(mailbox, outcome).inc()

    def observe_imap(self, mailbox: str, failures: int, alerting: bool,
                     last_success: datetime | None) -> None:
        self.imap_failures.labels(mailbox).set(failures)
        self.imap_alerting.labels(mailbox).set(1 if alerting else 0)
        if last_success is not None:
            self.imap_last_success.labels(mailbox).set(last_success.timestamp())

    def forget_imap(self, mailbox: str) -> None:
        """A mailbox removed by a reload: its series end instead of freezing."""
        for gauge in (self.imap_failures, self.imap_alerting, self.imap_last_success):
            with suppress(KeyError):
                gauge.remove(mailbox)

    def observe_limit(self, limit: str) -> None:
        """An inbound abuse limit answered (issue 11): connections_per_ip, rate_sender, …"""
        self.limited.labels(limit).inc()

    async def render(self, session: AsyncSession) -> bytes:
        for state, count in await session.execute(
                select(Outbox.state, func.count()).group_by(Outbox.state)):
            self.outbox.labels(state).set(count)
        counts = dict((await session.execute(
            select(Event.type, func.count()).where(Event.type.in_(WATCHED_EVENTS))
            .group_by(Event.type))).all())
        for kind in WATCHED_EVENTS:
            self.events.labels(kind).set(counts.get(kind, 0))
        return generate_latest(self.registry)
