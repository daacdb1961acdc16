"""TOML configuration -> frozen settings tree, validated once; errors name the key and line."""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from email_validator import EmailNotValidError, validate_email

from gateway.errors import ConfigError
from gateway.ingest.authcheck import AUTH_INBOUND_KEYS, AuthSettings, parse_auth_settings
from gateway.outbound.config import RELAY_KEYS, SECTIONS, OutboundSettings, read_outbound
from gateway.settings_imap import AlertSettings, ImapSettings, parse_alerts, parse_imap
from gateway.settings_limits import KEYS as LIMIT_KEYS
from gateway.settings_limits import InboundLimits, parse_inbound_limits
from gateway.settings_rules import KEYS as RULES_KEYS
from gateway.settings_rules import RulesSettings, parse_rules_settings
from gateway.tickets.assignment import STRATEGIES
from gateway.tickets.sla_config import KEYS as SLA_KEYS
from gateway.tickets.sla_config import DepartmentSla, parse_department_sla

DEFAULT_CONFIG_PATHS = ("/etc/deskgate/deskgate.toml", "config/deskgate.dev.toml")
LANGUAGES = ("en", "de", "nl", "zh")
NOTIFY_MODES = ("all", "owner", "none")  # agent notifications per department (issue 6)


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class SubmissionSettings:
    """The agents' submission port (DESIGN 3a); off unless the config has a [submission] table."""

    enabled: bool = False
    listen: Listen = Listen("0.0.0.0", 587)  # STARTTLS required before AUTH
    tls_listen: Listen | None = None  # implicit TLS (465), when configured
    cert_file: str | None = None  # both or neither; neither: a self-signed one in tls_dir
    key_file: str | None = None
    tls_dir: str = ""  # "": [dev] dir in development, else the working directory (systemd:
    #                    /var/lib/deskgate)
    max_message_bytes: int = 25 * 2**20
    max_failures: int = 5  # failed logins of one address within failure_window_s -> locked
    max_failures_per_ip: int = 20  # the same for one client IP (an office shares one)
    failure_window_s: int = 900
    lockout_s: int = 900
    failure_delay_ms: int = 1000  # before the first 535; doubles per failure, at most 8x

    @property
    def host(self) -> str:
        return self.listen.host

    @property
    def port(self) -> int:
        return self.listen.port

    def __str__(self) -> str:
        return str(self.listen)


SUBMISSION_KEYS = {"listen", "tls_listen", "cert_file", "key_file", "tls_dir",
                   "max_message_bytes", "max_failures", "max_failures_per_ip",
                   "failure_window_s", "lockout_s", "failure_delay_ms"}


def _submission(r: _Reader, data: dict[str, Any]) -> SubmissionSettings:
    if "submission" not in data:
        return SubmissionSettings()
    table = _section(r, data, "submission", SUBMISSION_KEYS)
    tls_listen = (_listen(r, table, "submission", "", key="tls_listen")
                  if "tls_listen" in table else None)
    cert_file = r.get(table, "cert_file", "submission", str, None)
    key_file = r.get(table, "key_file", "submission", str, None)
    if bool(cert_file) != bool(key_file):
        r.fail("submission.cert_file", "cert_file and key_file go together (or neither: "
               "a self-signed certificate is made in tls_dir)")
    for key, path in (("cert_file", cert_file), ("key_file", key_file)):
        if path and not Path(path).is_file():
            r.fail(f"submission.{key}", f"{path} is not a readable file")
    numbers = {key: r.get(table, key, "submission", int, default) for key, default in (
        ("max_message_bytes", 25 * 2**20), ("max_failures", 5), ("max_failures_per_ip", 20),
        ("failure_window_s", 900), ("lockout_s", 900), ("failure_delay_ms", 1000))}
    for key, value in numbers.items():
        if value is not None and value < (0 if key == "failure_delay_ms" else 1):
            r.fail(f"submission.{key}", f"must be at least {0 if key == 'failure_delay_ms' else 1}")
    return SubmissionSettings(
        enabled=True, listen=_listen(r, table, "submission", "0.0.0.0:587"),
        tls_listen=tls_listen, cert_file=cert_file, key_file=key_file,
        tls_dir=r.get(table, "tls_dir", "submission", str, ""), **numbers)


@dataclass(frozen=True, slots=True)
class DepartmentSettings:
    name: str
    slug: str
    language: str
    timezone: str
    addresses: tuple[str, ...]
    sla: DepartmentSla = field(default_factory=DepartmentSla)
    assignment: str = "none"  # none | round_robin | least_open (issue 13)
    notify: str = "all"  # who is mailed new tickets and customer replies: all | owner | none


@dataclass(frozen=True, slots=True)
class InboundSettings:
    listen: Listen
    max_message_bytes: int
    max_attachment_bytes: int
    trusted_authserv_ids: tuple[str, ...]
    limits: InboundLimits = InboundLimits()  # connections, rates, timeouts (issue 11)
    authentication: AuthSettings = AuthSettings()  # DKIM/SPF/DMARC, forwarders (issue 11)
    # Small mails' parse and readable view in a helper process (gateway/ingest/prep.py);
    # None: on for one serving process, off for workers sharing the port (Gateway)
    parse_helper: bool | None = None


@dataclass(frozen=True, slots=True)
class TicketSettings:
    tag_format: str  # must contain {number}
    follow_up_window_days: int
    reply_token_secret: bytes
    scheduler_tick_s: float = 30.0


@dataclass(frozen=True, slots=True)
class WebLinks:
    """What the links deskgate mails out look like, and how long they work."""

    base_url: str = "http://127.0.0.1:8080"
    rating_window_days: int = 30


WEB_KEYS = {"listen", "base_url", "rating_window_days"}


def _web_links(r: _Reader, data: dict[str, Any]) -> WebLinks:
    table = data.get("web", {}) if isinstance(data.get("web"), dict) else {}
    base_url = r.get(table, "base_url", "web", str, "http://127.0.0.1:8080").rstrip("/")
    if not base_url.startswith(("http://", "https://")):
        r.fail("web.base_url", f"must be an http(s) URL, not {base_url!r}")
    days = r.get(table, "rating_window_days", "web", int, 30)
    if days < 1:
        r.fail("web.rating_window_days", "must be at least 1")
    return WebLinks(base_url, days)


@dataclass(frozen=True, slots=True)
class Settings:
    source: str
    hostname: str
    database_url: str
    log_level: str
    inbound: InboundSettings
    tickets: TicketSettings
    departments: tuple[DepartmentSettings, ...]
    relay: Listen  # where outbound mail goes (outbound issue)
    submission: SubmissionSettings  # agents' authenticated submission (issue 6)
    web: Listen  # rating and verification links (web issue)
    imap: tuple[ImapSettings, ...] = ()  # mailboxes read over IMAP (issue 7)
    alerts: AlertSettings = AlertSettings()  # operators' address for alert mails (issue 7)
    # SIGTERM: how long in-flight mails may take before the daemon stops anyway (issue 9)
    drain_timeout_s: float = 30.0
    outbound: OutboundSettings = OutboundSettings()  # relay options, outbox, acks, DKIM (issue 4)
    rules: RulesSettings = RulesSettings()  # routing rules, ticket fields, accounts (issue 13)
    web_links: WebLinks = WebLinks()  # rating and verification links (issue 5)

    def department_of(self, address: str) -> DepartmentSettings | None:
        address = address.lower()
        for dept in self.departments:
            if address in dept.addresses:
                return dept
        return None

    @property
    def own_addresses(self) -> frozenset[str]:
        return frozenset(a for d in self.departments for a in d.addresses)

    @property
    def own_domains(self) -> frozenset[str]:
        return frozenset(a.rsplit("@", 1)[1] for a in self.own_addresses)


class _Reader:
    """Reads typed values from the parsed TOML and collects every problem, not just the first."""

    def __init__(self, text: str, source: str) -> None:
        self.lines = text.splitlines()
        self.source = source
        self.problems: list[str] = []

    def line_of(self, dotted: str) -> int | None:
        leaf = dotted.rsplit(".", 1)[-1].split("[")[0]
        pattern = re.compile(rf"^\s*{re.escape(leaf)}\s*=")
        for number, line in enumerate(self.lines, 1):
            if pattern.match(line):
                return number
        return None

    def fail(self, dotted: str, message: str) -> None:
        line = self.line_of(dotted)
        where = f"{self.source}:{line}" if line else self.source
        self.problems.append(f"{where}: {dotted}: {message}")

    def get(self, table: dict[str, Any], key: str, prefix: str, kind: type, default: Any) -> Any:
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in table:
            if default is _REQUIRED:
                self.fail(dotted, "is required")
            return default if default is not _REQUIRED else None
        value = table[key]
        if kind is int and isinstance(value, bool) or not isinstance(value, kind):
            self.fail(dotted, f"must be {_KIND_NAMES[kind]}, not {value!r}")
            return default if default is not _REQUIRED else None
        return value

    def read_secret(self, path: str, dotted: str) -> str | None:
        """A secret kept in its own file (readable only by deskgate), stripped."""
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            self.fail(dotted, f"cannot be read: {exc.strerror}")
            return None

    def unknown(self, table: dict[str, Any], known: set[str], prefix: str) -> None:
        for key in table:
            if key not in known:
                dotted = f"{prefix}.{key}" if prefix else key
                self.fail(dotted, "is not a known key (see config/deskgate.example.toml)")


_REQUIRED = object()
_KIND_NAMES = {str: "a string", int: "an integer", list: "a list", dict: "a table",
               bool: "true/false"}


def _listen(r: _Reader, table: dict[str, Any], prefix: str, default: str,
            key: str = "listen") -> Listen:
    value = r.get(table, key, prefix, str, default)
    host, sep, port = (value or default).rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        r.fail(f"{prefix}.{key}", f"must look like HOST:PORT, not {value!r}")
        host, port = "127.0.0.1", "0"
    return Listen(host.strip("[]"), int(port))


def _section(r: _Reader, data: dict[str, Any], name: str, known: set[str]) -> dict[str, Any]:
    table = r.get(data, name, "", dict, {})
    r.unknown(table, known, name)
    return table


def _address(r: _Reader, value: Any, dotted: str) -> str | None:
    if not isinstance(value, str):
        r.fail(dotted, f"must be an e-mail address, not {value!r}")
        return None
    try:
        # Our addresses go into headers we write (From, To) and SMTP envelopes without
        # SMTPUTF8: a domain is kept in its ASCII form (IDNA A-label), a local part must be
        # ASCII. Otherwise composing the first acknowledgement raised, and every mail to that
        # address got 451 4.3.0 for as long as its sender retried.
        valid = validate_email(value, check_deliverability=False, test_environment=True,
                               globally_deliverable=False, allow_smtputf8=False)
    except EmailNotValidError as exc:
        r.fail(dotted, f"{value!r} is not an e-mail address deskgate can send from: {exc}")
        return None
    return str(valid.ascii_email or valid.normalized).lower()


def _department(r: _Reader, table: dict[str, Any], index: int) -> DepartmentSettings:
    prefix = f"departments[{index}]"
    r.unknown(table, {"name", "slug", "language", "timezone", "addresses", "assignment",
                      "notify"} | SLA_KEYS, prefix)
    name = r.get(table, "name", prefix, str, _REQUIRED) or f"#{index}"
    slug = r.get(table, "slug", prefix, str, re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))
    language = r.get(table, "language", prefix, str, "en")
    if language not in LANGUAGES:
        r.fail(f"{prefix}.language", f"must be one of {', '.join(LANGUAGES)}, not {language!r}")
    timezone = r.get(table, "timezone", prefix, str, "UTC")
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        r.fail(f"{prefix}.timezone", f"{timezone!r} is not a known time zone")
    raw_addresses = r.get(table, "addresses", prefix, list, _REQUIRED) or []
    addresses = tuple(
        a for i, v in enumerate(raw_addresses) if (a := _address(r, v, f"{prefix}.addresses[{i}]"))
    )
    if not raw_addresses:
        r.fail(f"{prefix}.addresses", "must list at least one address")
    sla = parse_department_sla(table, prefix, timezone if timezone else "UTC", r.fail)
    assignment = r.get(table, "assignment", prefix, str, "none")
    if assignment not in STRATEGIES:
        r.fail(f"{prefix}.assignment", f"must be one of {', '.join(STRATEGIES)}")
    notify = r.get(table, "notify", prefix, str, "all")
    if notify not in NOTIFY_MODES:
        r.fail(f"{prefix}.notify", f"must be one of {', '.join(NOTIFY_MODES)}, not {notify!r}")
    return DepartmentSettings(name, slug, language, timezone, addresses, sla, assignment,
                              notify)


def _secret(r: _Reader, tickets: dict[str, Any]) -> bytes:
    secret = r.get(tickets, "secret", "tickets", str, None)
    secret_file = r.get(tickets, "secret_file", "tickets", str, None)
    if secret_file:
        secret = r.read_secret(secret_file, "tickets.secret_file")
    if not secret or len(secret) < 16:
        r.fail("tickets.secret", "must be set (or secret_file) to at least 16 characters")
        return b"x" * 16
    return secret.encode()


def _check_departments(r: _Reader, departments: list[DepartmentSettings]) -> None:
    seen: dict[str, str] = {}
    slugs: set[str] = set()
    for dept in departments:
        if dept.slug in slugs:
            r.fail("departments", f"slug {dept.slug!r} is used twice")
        slugs.add(dept.slug)
        for address in dept.addresses:
            if address in seen:
                r.fail("departments", f"{address} belongs to {seen[address]} and {dept.name}")
            seen[address] = dept.name
    if not departments:
        r.fail("departments", "at least one [[departments]] table is required")


def parse_settings(text: str, source: str = "<config>") -> Settings:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: not valid TOML: {exc}"]) from None
    r = _Reader(text, source)
    known = {"hostname", "log_level", "database", "inbound", "tickets", "departments", "relay",
             "imap", "alerts",
             "submission", "web", "drain_timeout_s"} | SECTIONS | RULES_KEYS
    r.unknown(data, known, "")
    hostname = r.get(data, "hostname", "", str, "deskgate.localdomain")
    log_level = r.get(data, "log_level", "", str, "info")
    drain_timeout_s = r.get(data, "drain_timeout_s", "", int, 30)
    if not 0 < drain_timeout_s <= 600:
        r.fail("drain_timeout_s", f"must be between 1 and 600 seconds, not {drain_timeout_s}")
    if log_level not in ("debug", "info", "warning", "error"):
        r.fail("log_level", f"must be debug, info, warning or error, not {log_level!r}")
    database = _section(r, data, "database", {"url"})
    url = r.get(database, "url", "database", str, "sqlite+aiosqlite:///var/deskgate.sqlite3")
    if not url.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
        r.fail("database.url", "must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
    inbound = _section(r, data, "inbound", {"listen", "max_message_bytes",
                                            "max_attachment_bytes", "trusted_authserv_ids",
                                            "parse_helper"}
                       | LIMIT_KEYS | AUTH_INBOUND_KEYS)
    inbound_settings = InboundSettings(
        listen=_listen(r, inbound, "inbound", "127.0.0.1:2525"),
        max_message_bytes=r.get(inbound, "max_message_bytes", "inbound", int, 50 * 2**20),
        max_attachment_bytes=r.get(inbound, "max_attachment_bytes", "inbound", int, 20 * 2**20),
        trusted_authserv_ids=tuple(r.get(inbound, "trusted_authserv_ids", "inbound", list, [])),
        limits=parse_inbound_limits(r, inbound),
        authentication=parse_auth_settings(r, inbound),
        parse_helper=r.get(inbound, "parse_helper", "inbound", bool, None),
    )
    tickets = _section(r, data, "tickets", {"tag_format", "follow_up_window_days", "secret",
                                            "secret_file", "scheduler_tick_s"})
    tag_format = r.get(tickets, "tag_format", "tickets", str, "[#{number}]")
    if "{number}" not in tag_format:
        r.fail("tickets.tag_format", "must contain {number}")
    ticket_settings = TicketSettings(
        tag_format=tag_format,
        follow_up_window_days=r.get(tickets, "follow_up_window_days", "tickets", int, 14),
        reply_token_secret=_secret(r, tickets),
        scheduler_tick_s=r.get(tickets, "scheduler_tick_s", "tickets", int, 30),
    )
    tables = r.get(data, "departments", "", list, [])
    departments = [_department(r, t, i) for i, t in enumerate(tables) if isinstance(t, dict)]
    _check_departments(r, departments)
    alerts = parse_alerts(r, data)
    imap = parse_imap(r, data, departments, alerts)
    listens = {
        name: _listen(r, _section(r, data, name, RELAY_KEYS if name == "relay" else
                      WEB_KEYS if name == "web" else {"listen"}),
                      name, default)
        for name, default in (("relay", "127.0.0.1:2526"), ("web", "127.0.0.1:8080"))
    }
    submission = _submission(r, data)
    outbound = read_outbound(r, data)
    rules = parse_rules_settings(r, data, frozenset(d.slug for d in departments))
    web_links = _web_links(r, data)
    if r.problems:
        raise ConfigError(r.problems)
    return Settings(imap=imap, alerts=alerts, outbound=outbound, rules=rules, web_links=web_links,
                    source=source, hostname=hostname, database_url=url, log_level=log_level,
                    inbound=inbound_settings, tickets=ticket_settings,
                    departments=tuple(departments), drain_timeout_s=float(drain_timeout_s),
                    submission=submission, **listens)


def find_config(explicit: str | None) -> Path:
    """--config, else $DESKGATE_CONFIG, else the system file, else the dev checkout's file."""
    candidates = [explicit] if explicit else []
    if not explicit and os.environ.get("DESKGATE_CONFIG"):
        candidates = [os.environ["DESKGATE_CONFIG"]]
    if not candidates:
        candidates = list(DEFAULT_CONFIG_PATHS)
    for candidate in candidates:
        if Path(candidate).is_file():
            return Path(candidate)
    raise ConfigError([f"no configuration file found (tried {', '.join(candidates)}); "
                       "pass --config PATH"])


def load_settings(path: Path) -> Settings:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot be read: {exc}"]) from None
    return parse_settings(text, str(path))
