"""[[rules]], [[ticket_fields]] and [accounts] from the config (issue 13)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.ingest.routing_rules import Rule, parse_rules

KEYS = frozenset({"rules", "ticket_fields", "accounts"})
FIELD_TYPES = ("text", "number", "date", "choice")
# Mail providers whose users are people, not companies: never grouped into an account.
FREE_MAIL = frozenset({
    "gmail.com", "googlemail.com", "outlook.com", "hotmail.com", "live.com", "msn.com",
    "yahoo.com", "ymail.com", "icloud.com", "me.com", "mac.com", "aol.com", "proton.me",
    "protonmail.com", "gmx.de", "gmx.net", "gmx.at", "web.de", "t-online.de", "freenet.de",
    "posteo.de", "mail.de", "ziggo.nl", "kpnmail.nl", "hotmail.nl", "live.nl", "planet.nl",
    "qq.com", "163.com", "126.com", "sina.com", "foxmail.com", "mail.ru", "yandex.ru"})


@dataclass(frozen=True, slots=True)
class RulesSettings:
    rules: tuple[Rule, ...] = ()
    on_every_message: bool = False  # evaluate for replies too, not only for new tickets
    fields: dict[str, str] = field(default_factory=dict)  # name -> text|number|date|choice:a|b
    free_mail_domains: frozenset[str] = FREE_MAIL


def _fields(r: Any, tables: list[Any]) -> dict[str, str]:
    fields: dict[str, str] = {}
    for index, table in enumerate(tables):
        prefix = f"ticket_fields[{index}]"
        if not isinstance(table, dict) or not isinstance(table.get("name"), str):
            r.fail(f"{prefix}.name", "every ticket field needs a name")
            continue
        r.unknown(table, {"name", "type", "choices"}, prefix)
        kind = table.get("type", "text")
        if kind not in FIELD_TYPES:
            r.fail(f"{prefix}.type", f"must be one of {', '.join(FIELD_TYPES)}, not {kind!r}")
        if kind == "choice":
            choices = table.get("choices") or []
            if not choices:
                r.fail(f"{prefix}.choices", "a choice field lists its choices")
            kind = "choice:" + "|".join(map(str, choices))
        fields[table["name"]] = kind
    return fields


def parse_rules_settings(r: Any, data: dict[str, Any], departments: frozenset[str]
                         ) -> RulesSettings:
    fields = _fields(r, r.get(data, "ticket_fields", "", list, []))
    accounts = r.get(data, "accounts", "", dict, {})
    r.unknown(accounts, {"free_mail_domains", "extra_free_mail_domains",
                         "rules_on_every_message"}, "accounts")
    free = accounts.get("free_mail_domains")
    free_mail = frozenset(str(d).lower() for d in free) if free is not None else FREE_MAIL
    free_mail |= {str(d).lower() for d in accounts.get("extra_free_mail_domains", [])}
    rules = parse_rules(r.get(data, "rules", "", list, []), departments, fields, r.fail)
    return RulesSettings(rules=rules,
                         on_every_message=bool(accounts.get("rules_on_every_message", False)),
                         fields=fields, free_mail_domains=free_mail)
