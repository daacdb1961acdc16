"""[[imap]] tables -> frozen ImapSettings, validated with the key named in every error."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.settings import DepartmentSettings, _Reader

TLS_MODES = ("implicit", "starttls", "none")
AUTH_MODES = ("password", "xoauth2")
START_FROM = ("now", "all")
_KEYS = {"name", "host", "port", "tls", "ca_file", "allow_plaintext", "user", "auth",
         "password_file",
         "password_env", "token_command", "folder", "department", "after_import",
         "poll_interval_s", "batch_size", "from", "alert_after_s", "max_message_bytes",
         "token_url", "client_id", "client_secret_file", "refresh_token_file", "scope"}
ALERT_KEYS = {"operators", "imap_alert_after_s"}
DEFAULT_ALERT_AFTER_S = 15 * 60


@dataclass(frozen=True, slots=True)
class AlertSettings:
    """[alerts]: who hears of an operational problem (a mailbox deskgate cannot read)."""

    operators: tuple[str, ...] = ()
    imap_alert_after_s: int = DEFAULT_ALERT_AFTER_S


@dataclass(frozen=True, slots=True)
class OAuthRefresh:
    """XOAUTH2 by the OAuth 2.0 refresh-token grant (RFC 6749 6) against the provider."""

    token_url: str
    client_id: str
    refresh_token_file: str  # rewritten when the provider rotates the refresh token
    client_secret_file: str | None = None
    scope: str | None = None


@dataclass(frozen=True, slots=True)
class AfterImport:
    """What happens to a message once its ingest committed: flag, move, or delete."""

    action: str  # seen | move | delete
    folder: str = ""  # target of move

    def __str__(self) -> str:
        return f"move:{self.folder}" if self.action == "move" else self.action


def parse_after_import(value: str) -> AfterImport | None:
    """`seen`, `delete` or `move:Folder`; None when the value is none of these."""
    if value in ("seen", "delete"):
        return AfterImport(value)
    action, sep, folder = value.partition(":")
    if action == "move" and sep and folder.strip():
        return AfterImport("move", folder.strip())
    return None


@dataclass(frozen=True, slots=True)
class ImapSettings:
    name: str
    host: str
    port: int
    tls: str  # implicit | starttls | none
    ca_file: str | None  # PEM file of the CAs to trust instead of the system's
    user: str
    auth: str  # password | xoauth2
    password_file: str | None
    password_env: str | None
    token_command: str | None  # xoauth2: prints an access token on stdout
    folder: str
    department: str  # slug
    address: str  # the department's first address: the envelope recipient of every mail
    after_import: AfterImport
    poll_interval_s: int
    batch_size: int
    start_from: str = "now"  # first import: now (from UIDNEXT on) | all (history)
    alert_after_s: int = DEFAULT_ALERT_AFTER_S  # no successful fetch for this long: alert
    max_message_bytes: int = 50 * 2**20  # larger messages are skipped and recorded
    oauth: OAuthRefresh | None = None  # xoauth2 without token_command


def parse_alerts(r: _Reader, data: dict[str, Any]) -> AlertSettings:
    from gateway.settings import _address

    table = r.get(data, "alerts", "", dict, {})
    r.unknown(table, ALERT_KEYS, "alerts")
    raw = r.get(table, "operators", "alerts", list, [])
    operators = tuple(a for i, v in enumerate(raw)
                      if (a := _address(r, v, f"alerts.operators[{i}]")))
    after = r.get(table, "imap_alert_after_s", "alerts", int, DEFAULT_ALERT_AFTER_S)
    if after < 1:
        r.fail("alerts.imap_alert_after_s", "must be at least 1")
    return AlertSettings(operators, max(1, after))


def _oauth(r: _Reader, table: dict[str, Any], prefix: str) -> OAuthRefresh | None:
    """token_url + client_id + refresh_token_file, all or none."""
    token_url = r.get(table, "token_url", prefix, str, None)
    client_id = r.get(table, "client_id", prefix, str, None)
    refresh = r.get(table, "refresh_token_file", prefix, str, None)
    given = [v for v in (token_url, client_id, refresh) if v]
    if not given:
        return None
    if len(given) < 3:
        r.fail(f"{prefix}.token_url", "token_url, client_id and refresh_token_file go together")
        return None
    if not token_url or not token_url.startswith(("https://", "http://")):
        r.fail(f"{prefix}.token_url", f"must be an http(s) URL, not {token_url!r}")
    return OAuthRefresh(token_url or "", client_id or "", refresh or "",
                        r.get(table, "client_secret_file", prefix, str, None),
                        r.get(table, "scope", prefix, str, None))


def _auth(r: _Reader, table: dict[str, Any], prefix: str) -> dict[str, Any]:
    auth = r.get(table, "auth", prefix, str, "password")
    password_file = r.get(table, "password_file", prefix, str, None)
    password_env = r.get(table, "password_env", prefix, str, None)
    token_command = r.get(table, "token_command", prefix, str, None)
    oauth = _oauth(r, table, prefix)
    if auth not in AUTH_MODES:
        r.fail(f"{prefix}.auth", f"must be one of {', '.join(AUTH_MODES)}, not {auth!r}")
    elif auth == "password" and (password_file is None) == (password_env is None):
        r.fail(f"{prefix}.password_file", "give exactly one of password_file or password_env")
    elif auth == "xoauth2" and bool(token_command) == bool(oauth):
        r.fail(f"{prefix}.token_command", "auth = \"xoauth2\" needs either token_command or "
                                          "token_url + client_id + refresh_token_file")
    return {"auth": auth, "password_file": password_file, "password_env": password_env,
            "token_command": token_command, "oauth": oauth}


def _first_import(r: _Reader, table: dict[str, Any], prefix: str, poll_interval_s: int,
                  alerts: AlertSettings) -> tuple[str, int]:
    start_from = r.get(table, "from", prefix, str, "now")
    if start_from not in START_FROM:
        r.fail(f"{prefix}.from", f"must be now or all, not {start_from!r}")
    alert_after_s = r.get(table, "alert_after_s", prefix, int, alerts.imap_alert_after_s)
    if alert_after_s <= poll_interval_s:
        r.fail(f"{prefix}.alert_after_s", f"must be longer than poll_interval_s "
                                          f"({poll_interval_s}), not {alert_after_s}")
    return start_from, alert_after_s


def _inbound_limit(data: dict[str, Any]) -> int:
    inbound = data.get("inbound")
    value = inbound.get("max_message_bytes") if isinstance(inbound, dict) else None
    return value if isinstance(value, int) and value > 0 else 50 * 2**20


def _one(r: _Reader, table: dict[str, Any], index: int,
         departments: dict[str, DepartmentSettings], alerts: AlertSettings,
         inbound_limit: int) -> ImapSettings:
    from gateway.settings import _REQUIRED

    prefix = f"imap[{index}]"
    r.unknown(table, _KEYS, prefix)
    name = r.get(table, "name", prefix, str, f"imap{index}") or f"imap{index}"
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,100}", name):
        r.fail(f"{prefix}.name", f"must be letters, digits, '.', '_' or '-', not {name!r}")
    tls = r.get(table, "tls", prefix, str, "implicit")
    if tls not in TLS_MODES:
        r.fail(f"{prefix}.tls", f"must be one of {', '.join(TLS_MODES)}, not {tls!r}")
    if tls == "none" and not r.get(table, "allow_plaintext", prefix, bool, False):
        r.fail(f"{prefix}.tls", "is \"none\" (password in clear text): set allow_plaintext = "
                                "true to allow it")
    port = r.get(table, "port", prefix, int, 993 if tls == "implicit" else 143)
    if not 0 < port < 65536:
        r.fail(f"{prefix}.port", f"must be 1..65535, not {port}")
    auth = _auth(r, table, prefix)
    slug = r.get(table, "department", prefix, str, "")
    department = departments.get(slug)
    if department is None or not department.addresses:
        r.fail(f"{prefix}.department", f"{slug!r} is not the slug of a [[departments]] table")
    raw_action = r.get(table, "after_import", prefix, str, "seen")
    after_import = parse_after_import(raw_action)
    if after_import is None:
        r.fail(f"{prefix}.after_import", f"must be seen, delete or move:FOLDER, not {raw_action!r}")
    poll_interval_s = r.get(table, "poll_interval_s", prefix, int, 60)
    if poll_interval_s < 1:
        r.fail(f"{prefix}.poll_interval_s", "must be at least 1")
    batch_size = r.get(table, "batch_size", prefix, int, 50)
    if not 1 <= batch_size <= 1000:
        r.fail(f"{prefix}.batch_size", "must be 1..1000")
    start_from, alert_after_s = _first_import(r, table, prefix, poll_interval_s, alerts)
    max_bytes = r.get(table, "max_message_bytes", prefix, int, inbound_limit)
    if max_bytes < 1024:
        r.fail(f"{prefix}.max_message_bytes", "must be at least 1024")
    return ImapSettings(
        name=name, host=r.get(table, "host", prefix, str, _REQUIRED) or "",
        port=port, tls=tls, ca_file=r.get(table, "ca_file", prefix, str, None),
        user=r.get(table, "user", prefix, str, _REQUIRED) or "", **auth,
        folder=r.get(table, "folder", prefix, str, "INBOX"), department=slug,
        address=department.addresses[0] if department and department.addresses else "",
        after_import=after_import or AfterImport("seen"),
        poll_interval_s=max(1, poll_interval_s), batch_size=max(1, batch_size),
        start_from=start_from, alert_after_s=alert_after_s, max_message_bytes=max_bytes)


def parse_imap(r: _Reader, data: dict[str, Any], departments: list[DepartmentSettings],
               alerts: AlertSettings | None = None) -> tuple[ImapSettings, ...]:
    tables = r.get(data, "imap", "", list, [])
    by_slug = {d.slug: d for d in departments}
    limit = _inbound_limit(data)
    mailboxes = [_one(r, t, i, by_slug, alerts or AlertSettings(), limit)
                 for i, t in enumerate(tables) if isinstance(t, dict)]
    names = [m.name for m in mailboxes]
    for name in sorted({n for n in names if names.count(n) > 1}):
        r.fail("imap", f"name {name!r} is used twice")
    return tuple(mailboxes)
