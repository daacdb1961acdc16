"""The data model of DESIGN 5 as SQLAlchemy tables; schema changes go through Alembic."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}



class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps in UTC on both stores; SQLite keeps no zone, so it is put back on read."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC)
            return value.replace(tzinfo=None) if dialect.name == "sqlite" else value
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


TZ = UTCDateTime()


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: TZ}


class Department(Base):
    __tablename__ = "departments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slug: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    language: Mapped[str] = mapped_column(String(8), default="en")
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")


class Address(Base):
    __tablename__ = "addresses"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    department_id: Mapped[int] = mapped_column(ForeignKey("departments.id"))
    display_name: Mapped[str | None] = mapped_column(String(200))
    verification_state: Mapped[str] = mapped_column(String(16), default="pending")
    verification_code: Mapped[str | None] = mapped_column(String(64))
    verified_at: Mapped[datetime | None]


class Account(Base):
    """A company: its contacts share a mail domain (or were put here by the CLI)."""

    __tablename__ = "accounts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime]


class AccountDomain(Base):
    __tablename__ = "account_domains"
    domain: Mapped[str] = mapped_column(String(255), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)


class Contact(Base):
    __tablename__ = "contacts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    account_id: Mapped[int | None] = mapped_column(ForeignKey("accounts.id"))
    created_at: Mapped[datetime]


class Agent(Base):
    __tablename__ = "agents"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    profile: Mapped[str] = mapped_column(String(32), default="agent")
    credential_hash: Mapped[str | None] = mapped_column(Text)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime]


class AgentDepartment(Base):
    __tablename__ = "agent_departments"
    agent_id: Mapped[int] = mapped_column(ForeignKey("agents.id"), primary_key=True)
    department_id: Mapped[int] = mapped_column(ForeignKey("departments.id"), primary_key=True)


class Ticket(Base):
    __tablename__ = "tickets"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    number: Mapped[int] = mapped_column(BigInteger, unique=True)
    department_id: Mapped[int] = mapped_column(ForeignKey("departments.id"), index=True)
    contact_id: Mapped[int] = mapped_column(ForeignKey("contacts.id"), index=True)
    subject: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[str] = mapped_column(String(24), default="open", index=True)
    priority: Mapped[str] = mapped_column(String(8), default="none")
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("agents.id"))
    channel: Mapped[str] = mapped_column(String(16), default="email")
    reply_to: Mapped[str | None] = mapped_column(String(320))
    language: Mapped[str | None] = mapped_column(String(8))
    follow_up_of_id: Mapped[int | None] = mapped_column(ForeignKey("tickets.id"))
    tags: Mapped[list[Any]] = mapped_column(default=list)
    category: Mapped[str | None] = mapped_column(String(200))
    subcategory: Mapped[str | None] = mapped_column(String(200))
    product: Mapped[str | None] = mapped_column(String(200))
    custom_fields: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    first_response_due_at: Mapped[datetime | None]
    due_at: Mapped[datetime | None]
    first_response_at: Mapped[datetime | None]
    closed_at: Mapped[datetime | None]
    sla_paused_at: Mapped[datetime | None]  # entered On Hold / Waiting on customer
    sla_warned_at: Mapped[datetime | None]  # the warning before a breach went out


class Raw(Base):
    """Every received mail verbatim, content-addressed by sha256. A big mail's bytes are in
    `parts` pieces (BlobPart) and `content` is empty."""

    __tablename__ = "raws"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    content: Mapped[bytes] = mapped_column(LargeBinary)
    size: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime]
    parts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class BlobValue(Base):
    """A big value whose pieces are stored but that no row points at yet: a mail in flight,
    or one whose sender gave up after a 451. The row that claims the pieces deletes this one
    in the mail's own transaction, so the table stays small and blobs.drop_orphans() reads
    only it."""

    __tablename__ = "blob_values"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(index=True)


class BlobPart(Base):
    """One piece of a big value (a big mail's raw bytes, a big attachment), keyed by the whole
    value's sha256: each piece is written in a short transaction of its own, so SQLite's one
    write lock is never held for a whole 10 MB value while small mails wait (store/blobs.py)."""

    __tablename__ = "blob_parts"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    content: Mapped[bytes] = mapped_column(LargeBinary)


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (Index("ix_messages_ticket_from", "ticket_id", "from_addr"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id"), index=True)
    direction: Mapped[str] = mapped_column(String(3))  # in | out
    kind: Mapped[str] = mapped_column(String(24))
    message_id: Mapped[str | None] = mapped_column(String(998), index=True)
    # One fingerprint per distinct received mail: a redelivery collides here (DESIGN 4).
    fingerprint: Mapped[str | None] = mapped_column(String(64), unique=True)
    in_reply_to: Mapped[list[Any]] = mapped_column(default=list)
    references: Mapped[list[Any]] = mapped_column(default=list)
    from_addr: Mapped[str | None] = mapped_column(String(320))
    from_name: Mapped[str] = mapped_column(String(200), default="")
    reply_to: Mapped[list[Any]] = mapped_column(default=list)
    to: Mapped[list[Any]] = mapped_column(default=list)
    cc: Mapped[list[Any]] = mapped_column(default=list)
    subject: Mapped[str] = mapped_column(Text, default="")
    date: Mapped[datetime | None]
    received_at: Mapped[datetime]
    text: Mapped[str] = mapped_column(Text, default="")
    html: Mapped[str | None] = mapped_column(Text)
    # What the customer newly wrote (no quoted history, no signature) and sanitised HTML.
    visible_text: Mapped[str | None] = mapped_column(Text)
    html_safe: Mapped[str | None] = mapped_column(Text)
    language: Mapped[str | None] = mapped_column(String(16))
    auth_results: Mapped[str | None] = mapped_column(Text)
    raw_sha256: Mapped[str | None] = mapped_column(ForeignKey("raws.sha256"))
    envelope_from: Mapped[str | None] = mapped_column(String(320))
    envelope_to: Mapped[list[Any]] = mapped_column(default=list)
    peer: Mapped[str | None] = mapped_column(String(100))
    channel: Mapped[str] = mapped_column(String(16), default="smtp")
    rule_hits: Mapped[list[Any]] = mapped_column(default=list)
    defects: Mapped[list[Any]] = mapped_column(default=list)
    agent_id: Mapped[int | None] = mapped_column(ForeignKey("agents.id"))  # who wrote it (out)


class Attachment(Base):
    __tablename__ = "attachments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id"), index=True)
    filename: Mapped[str | None] = mapped_column(Text)
    content_type: Mapped[str] = mapped_column(String(200))
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64), index=True)  # blobs.drop_orphans()
    inline: Mapped[bool] = mapped_column(Boolean, default=False)
    content_id: Mapped[str | None] = mapped_column(String(998))
    content: Mapped[bytes | None] = mapped_column(LargeBinary)
    not_kept_reason: Mapped[str | None] = mapped_column(Text)
    parts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # BlobPart


class Quarantine(Base):
    """Mail that could not be made sense of: kept raw with the reason, answered 250."""

    __tablename__ = "quarantine"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    raw_sha256: Mapped[str] = mapped_column(ForeignKey("raws.sha256"), unique=True)
    reason: Mapped[str] = mapped_column(Text)
    envelope_from: Mapped[str | None] = mapped_column(String(320))
    envelope_to: Mapped[list[Any]] = mapped_column(default=list)
    peer: Mapped[str | None] = mapped_column(String(100))
    channel: Mapped[str] = mapped_column(String(16), default="smtp")
    received_at: Mapped[datetime]
    state: Mapped[str] = mapped_column(String(16), default="held")  # held | released
    released_to_ticket: Mapped[int | None] = mapped_column(BigInteger)


class Outbox(Base):
    __tablename__ = "outbox"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(24), default="ack")  # what caused it
    ticket_id: Mapped[int | None] = mapped_column(ForeignKey("tickets.id"), index=True)
    cause_message_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id"))
    envelope_from: Mapped[str] = mapped_column(String(320))
    envelope_to: Mapped[list[Any]] = mapped_column(default=list)
    # Header From and main recipient: a held row waits for its From to be verified, and
    # acknowledgements are rate-limited per recipient across instances (DESIGN 4).
    from_addr: Mapped[str] = mapped_column(String(320), default="")
    recipient: Mapped[str] = mapped_column(String(320), default="", index=True)
    message_id: Mapped[str] = mapped_column(String(998))
    mime: Mapped[bytes] = mapped_column(LargeBinary)
    # queued | sending | sent | failed | held | shunted (ours kept failing: for a human)
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    internal_errors: Mapped[int] = mapped_column(Integer, default=0)
    bounce: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    next_attempt_at: Mapped[datetime]
    lease_until: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    sent_at: Mapped[datetime | None]


class Rating(Base):
    __tablename__ = "ratings"
    __table_args__ = (UniqueConstraint("ticket_id", name="uq_ratings_ticket_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id"))
    department_id: Mapped[int] = mapped_column(ForeignKey("departments.id"))
    agent_id: Mapped[int | None] = mapped_column(ForeignKey("agents.id"))
    value: Mapped[str] = mapped_column(String(8))  # good | okay | bad
    comment: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class Event(Base):
    """The ticket's timeline: what happened and why."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id"), index=True)
    type: Mapped[str] = mapped_column(String(40))
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    at: Mapped[datetime]


class RateCount(Base):
    """Inbound SMTP mails per rate-limit key and time bucket, added up by every instance
    (issue 11); buckets older than the window are deleted."""

    __tablename__ = "rate_counts"
    key: Mapped[str] = mapped_column(String(400), primary_key=True)  # sender:…, domain:…, ip:…
    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True, index=True)  # start, epoch s
    hits: Mapped[int] = mapped_column(Integer)


class ImapMailbox(Base):
    """IMAP checkpoints: exactly-once import across restarts (UIDVALIDITY + last UID)."""

    __tablename__ = "imap_mailboxes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    uidvalidity: Mapped[int | None] = mapped_column(BigInteger)
    last_uid: Mapped[int] = mapped_column(BigInteger, default=0)
    backlog: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_polled_at: Mapped[datetime | None]
    # from = "all": UIDs below this one are the mailbox's history (no acks, issue 7).
    history_below: Mapped[int | None] = mapped_column(BigInteger)
    # First UID of the last imported group (up to last_uid): its after-import action may
    # not have run (crash, failure), so a reconnect applies it again. None after a skipped
    # message or a fresh start.
    action_uid: Mapped[int | None] = mapped_column(BigInteger)
    # The operators were mailed about the current outage (once per outage, issue 7).
    alerted_at: Mapped[datetime | None]
