"""The outbound part of the settings tree: relay, outbox, acknowledgements, DKIM, dev bootstrap."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.settings import _Reader

SECURITY = ("none", "starttls", "tls")
ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
RELAY_KEYS = {"listen", "security", "username", "password_file", "timeout_s", "concurrency",
              "max_per_connection"}
SECTIONS = {"outbox", "acknowledgements", "dkim", "dev", "templates"}


@dataclass(frozen=True, slots=True)
class RelaySettings:
    security: str = "none"  # none | starttls | tls (implicit)
    username: str | None = None
    password: str | None = None  # read from password_file; never logged
    timeout_s: float = 30.0
    concurrency: int = 4  # connections to the relay at once
    max_per_connection: int = 50  # mails sent over one connection before it is renewed


@dataclass(frozen=True, slots=True)
class OutboxSettings:
    worker: bool = True  # run the relay worker in this instance
    lifetime_s: int = 5 * 24 * 3600  # give up on a mail this long after it was queued
    backoff_base_s: int = 60
    backoff_max_s: int = 3600
    lease_s: int = 300  # a claimed row is another instance's again after this
    shunt_after: int = 3  # our own exceptions before a row is shunted for a human
    poll_interval_s: float = 5.0
    batch: int = 50


@dataclass(frozen=True, slots=True)
class AckSettings:
    enabled: bool = True
    on_reopen: bool = False
    per_contact_per_hour: int = 3


@dataclass(frozen=True, slots=True)
class DkimKeySettings:
    domain: str
    selector: str
    algorithm: str
    key_file: str


@dataclass(frozen=True, slots=True)
class DevSettings:
    """Development conveniences; `deskgate check-config` refuses them outside the dev config."""

    bootstrap: bool = False  # config addresses count as verified; a DKIM key under dir/dkim
    dir: str = "var"
    catch: bool = False  # run the capture relay on the relay address, storing in dir/caught

    @property
    def enabled(self) -> bool:
        return self.bootstrap or self.catch


@dataclass(frozen=True, slots=True)
class OutboundSettings:
    relay: RelaySettings = field(default_factory=RelaySettings)
    outbox: OutboxSettings = field(default_factory=OutboxSettings)
    acknowledgements: AckSettings = field(default_factory=AckSettings)
    dkim: tuple[DkimKeySettings, ...] = ()
    template_dirs: tuple[tuple[str, str], ...] = ()  # (department slug, folder)
    dev: DevSettings = field(default_factory=DevSettings)


def _positive(r: _Reader, table: dict[str, Any], key: str, prefix: str, default: int) -> int:
    value = r.get(table, key, prefix, int, default)
    if value is not None and value < 1:
        r.fail(f"{prefix}.{key}", f"must be at least 1, not {value}")
    return int(value or default)


def _relay(r: _Reader, table: dict[str, Any]) -> RelaySettings:
    security = r.get(table, "security", "relay", str, "none")
    if security not in SECURITY:
        r.fail("relay.security", f"must be one of {', '.join(SECURITY)}, not {security!r}")
    password = None
    password_file = r.get(table, "password_file", "relay", str, None)
    if password_file:
        password = r.read_secret(password_file, "relay.password_file")
    username = r.get(table, "username", "relay", str, None)
    if username and not password_file:
        r.fail("relay.password_file", "is required when relay.username is set")
    return RelaySettings(
        security=security, username=username, password=password,
        timeout_s=float(_positive(r, table, "timeout_s", "relay", 30)),
        concurrency=_positive(r, table, "concurrency", "relay", 4),
        max_per_connection=_positive(r, table, "max_per_connection", "relay", 50))


def _outbox(r: _Reader, table: dict[str, Any]) -> OutboxSettings:
    r.unknown(table, {"worker", "lifetime_s", "backoff_base_s", "backoff_max_s", "lease_s",
                      "shunt_after", "poll_interval_s", "batch"}, "outbox")
    return OutboxSettings(
        worker=r.get(table, "worker", "outbox", bool, True),
        lifetime_s=_positive(r, table, "lifetime_s", "outbox", 5 * 24 * 3600),
        backoff_base_s=_positive(r, table, "backoff_base_s", "outbox", 60),
        backoff_max_s=_positive(r, table, "backoff_max_s", "outbox", 3600),
        lease_s=_positive(r, table, "lease_s", "outbox", 300),
        shunt_after=_positive(r, table, "shunt_after", "outbox", 3),
        poll_interval_s=float(_positive(r, table, "poll_interval_s", "outbox", 5)),
        batch=_positive(r, table, "batch", "outbox", 50))


def _acks(r: _Reader, table: dict[str, Any]) -> AckSettings:
    r.unknown(table, {"enabled", "on_reopen", "per_contact_per_hour"}, "acknowledgements")
    return AckSettings(
        enabled=r.get(table, "enabled", "acknowledgements", bool, True),
        on_reopen=r.get(table, "on_reopen", "acknowledgements", bool, False),
        per_contact_per_hour=_positive(r, table, "per_contact_per_hour", "acknowledgements", 3))


def _dkim(r: _Reader, table: dict[str, Any]) -> tuple[DkimKeySettings, ...]:
    r.unknown(table, {"keys"}, "dkim")
    keys = []
    for i, entry in enumerate(r.get(table, "keys", "dkim", list, [])):
        prefix = f"dkim.keys[{i}]"
        if not isinstance(entry, dict):
            r.fail(prefix, "must be a table {domain, selector, algorithm, key_file}")
            continue
        r.unknown(entry, {"domain", "selector", "algorithm", "key_file"}, prefix)
        algorithm = r.get(entry, "algorithm", prefix, str, "rsa-sha256")
        if algorithm not in ALGORITHMS:
            r.fail(f"{prefix}.algorithm", f"must be one of {', '.join(ALGORITHMS)}")
        key = DkimKeySettings(
            domain=(r.get(entry, "domain", prefix, str, "") or "").lower(),
            selector=r.get(entry, "selector", prefix, str, "") or "",
            algorithm=algorithm, key_file=r.get(entry, "key_file", prefix, str, "") or "")
        for name in ("domain", "selector", "key_file"):
            if not getattr(key, name):
                r.fail(f"{prefix}.{name}", "is required")
        keys.append(key)
    return tuple(keys)


def _dev(r: _Reader, table: dict[str, Any]) -> DevSettings:
    r.unknown(table, {"bootstrap", "dir", "catch"}, "dev")
    return DevSettings(bootstrap=r.get(table, "bootstrap", "dev", bool, False),
                       dir=r.get(table, "dir", "dev", str, "var"),
                       catch=r.get(table, "catch", "dev", bool, False))


def read_outbound(r: _Reader, data: dict[str, Any]) -> OutboundSettings:
    """Reads [relay] (beyond listen), [outbox], [acknowledgements], [dkim], [templates], [dev]."""
    def table(name: str) -> dict[str, Any]:
        value = data.get(name, {})
        return value if isinstance(value, dict) else {}

    templates = table("templates")
    dirs = tuple((slug, str(path)) for slug, path in templates.items())
    for slug, path in dirs:
        if not Path(path).is_dir():
            r.fail(f"templates.{slug}", f"{path!r} is not a folder")
    return OutboundSettings(relay=_relay(r, table("relay")), outbox=_outbox(r, table("outbox")),
                            acknowledgements=_acks(r, table("acknowledgements")),
                            dkim=_dkim(r, table("dkim")), template_dirs=dirs,
                            dev=_dev(r, table("dev")))
