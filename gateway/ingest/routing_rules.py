"""Operator rules from the config: ordered, named, explain themselves (STYLE habit 4).

Conditions under `when` must all match (a list means any of its values); `then` says what
the ticket becomes. Patterns are RE2, so no rule can backtrack the daemon into a stall.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import re2

WHEN_KEYS = frozenset({"sender", "sender_domain", "sender_pattern", "recipient",
                       "subject_words", "subject_regex", "body_regex", "language",
                       "has_attachment", "auth", "business_hours", "account"})
THEN_KEYS = frozenset({"department", "priority", "category", "subcategory", "product", "tags",
                       "owner", "suppress_ack", "quarantine", "stop", "set"})
PRIORITIES = ("high", "medium", "low", "none")
Fail = Callable[[str, str], None]


@dataclass(frozen=True, slots=True)
class MailFacts:
    """What a rule may look at, gathered by the pipeline (or `rules test`) beforehand."""

    sender: str | None
    recipients: tuple[str, ...]
    subject: str
    body: str
    department: str
    language: str | None = None
    has_attachment: bool = False
    auth: str = "none"  # pass | fail | none (nobody trusted said)
    in_business_hours: bool = True
    account: str | None = None

    @property
    def sender_domain(self) -> str:
        return self.sender.rsplit("@", 1)[-1] if self.sender else ""


@dataclass(frozen=True, slots=True)
class Effects:
    department: str | None = None
    priority: str | None = None
    category: str | None = None
    subcategory: str | None = None
    product: str | None = None
    tags: tuple[str, ...] = ()
    owner: str | None = None
    suppress_ack: bool = False
    quarantine: bool = False
    fields: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    scope: str | None  # department slug, or None for every mail
    conditions: tuple[Callable[[MailFacts], bool], ...]
    then: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Outcome:
    effects: Effects = field(default_factory=Effects)
    fired: tuple[str, ...] = ()
    errors: tuple[tuple[str, str], ...] = ()  # (rule, error): skipped, mail goes on


def _any_of(value: Any) -> tuple[str, ...]:
    return tuple(str(v).lower() for v in (value if isinstance(value, list) else [value]))


def _condition(key: str, value: Any) -> Callable[[MailFacts], bool]:
    """One `when` entry as a predicate; raises ValueError for a value that cannot work."""
    if key in ("subject_regex", "body_regex", "sender_pattern"):
        pattern = re2.compile(str(value))  # re2.error is a ValueError-like; caught by caller
        attr = {"subject_regex": "subject", "body_regex": "body", "sender_pattern": "sender"}[key]
        return lambda f: bool(pattern.search(getattr(f, attr) or ""))
    if key in ("has_attachment", "business_hours"):
        if not isinstance(value, bool):
            raise ValueError("must be true or false")
        attr = "has_attachment" if key == "has_attachment" else "in_business_hours"
        return lambda f: getattr(f, attr) is value
    wanted = _any_of(value)
    if key == "subject_words":
        return lambda f: any(w in f.subject.lower() for w in wanted)
    if key == "recipient":
        return lambda f: any(r.lower() in wanted for r in f.recipients)
    if key == "auth" and not set(wanted) <= {"pass", "fail", "none"}:
        raise ValueError("must be pass, fail or none")
    attr = {"sender": "sender", "sender_domain": "sender_domain", "language": "language",
            "auth": "auth", "account": "account"}[key]
    return lambda f: (getattr(f, attr) or "").lower() in wanted


def _check_then(then: dict[str, Any], prefix: str, departments: frozenset[str],
                fields: dict[str, str], fail: Fail) -> None:
    for key, value in then.items():
        dotted = f"{prefix}.then.{key}"
        if key not in THEN_KEYS:
            fail(dotted, f"is not a known action ({', '.join(sorted(THEN_KEYS))})")
        elif key == "department" and value not in departments:
            fail(dotted, f"{value!r} is not a department slug")
        elif key == "priority" and value not in PRIORITIES:
            fail(dotted, f"must be one of {', '.join(PRIORITIES)}")
        elif key in ("suppress_ack", "quarantine", "stop") and not isinstance(value, bool):
            fail(dotted, "must be true or false")
        elif key == "set":
            for name, field_value in (value or {}).items():
                problem = check_field_value(fields, name, field_value)
                if problem:
                    fail(f"{dotted}.{name}", problem)


def check_field_value(fields: dict[str, str], name: str, value: Any) -> str | None:
    """None when `value` suits the declared custom field, else the readable problem."""
    kind = fields.get(name)
    if kind is None:
        return f"{name!r} is not a declared ticket field"
    if kind == "number" and (isinstance(value, bool) or not isinstance(value, int | float)):
        return f"must be a number, not {value!r}"
    if kind.startswith("choice:") and str(value) not in kind[7:].split("|"):
        return f"must be one of {kind[7:].replace('|', ', ')}"
    if kind == "date":
        from datetime import date

        try:
            date.fromisoformat(str(value))
        except ValueError:
            return f"must be a date like 2026-12-25, not {value!r}"
    return None


def parse_rules(tables: list[Any], departments: frozenset[str], fields: dict[str, str],
                fail: Fail) -> tuple[Rule, ...]:
    rules, names = [], set()
    for index, table in enumerate(tables):
        prefix = f"rules[{index}]"
        if not isinstance(table, dict) or not isinstance(table.get("name"), str):
            fail(f"{prefix}.name", "every rule needs a name")
            continue
        prefix = f"rules[{index}] {table['name']!r}"
        if table["name"] in names:
            fail(prefix, "the name is used twice")
        names.add(table["name"])
        for key in set(table) - {"name", "department", "when", "then"}:
            fail(f"{prefix}.{key}", "is not a known key (name, department, when, then)")
        scope = table.get("department")
        if scope is not None and scope not in departments:
            fail(f"{prefix}.department", f"{scope!r} is not a department slug")
        conditions = []
        for key, value in (table.get("when") or {}).items():
            if key not in WHEN_KEYS:
                fail(f"{prefix}.when.{key}", f"is not a known condition "
                     f"({', '.join(sorted(WHEN_KEYS))})")
                continue
            try:
                conditions.append(_condition(key, value))
            except (ValueError, re2.error) as exc:
                fail(f"{prefix}.when.{key}", f"{value!r}: {exc}")
        then = table.get("then") or {}
        _check_then(then, prefix, departments, fields, fail)
        rules.append(Rule(table["name"], scope, tuple(conditions), dict(then)))
    return tuple(rules)


def _apply(effects: Effects, then: dict[str, Any]) -> Effects:
    simple = {k: then[k] for k in ("department", "priority", "category", "subcategory",
                                   "product", "owner") if k in then}
    return replace(
        effects, **simple,
        tags=tuple(dict.fromkeys((*effects.tags, *map(str, then.get("tags", []))))),
        suppress_ack=effects.suppress_ack or bool(then.get("suppress_ack")),
        quarantine=effects.quarantine or bool(then.get("quarantine")),
        fields=tuple({**dict(effects.fields), **(then.get("set") or {})}.items()))


def evaluate(rules: tuple[Rule, ...], facts: MailFacts) -> Outcome:
    """Rules in order; a rule that errors is skipped and reported, never stops the mail."""
    effects, fired, errors = Effects(), [], []
    for rule in rules:
        if rule.scope is not None and rule.scope != facts.department:
            continue
        try:
            matched = all(condition(facts) for condition in rule.conditions)
        except Exception as exc:  # noqa: BLE001 — a bad rule must not lose a mail
            errors.append((rule.name, f"{type(exc).__name__}: {exc}"))
            continue
        if matched:
            effects = _apply(effects, rule.then)
            fired.append(rule.name)
            if rule.then.get("stop"):
                break
    return Outcome(effects, tuple(fired), tuple(errors))


def language_of(headers: Any) -> str | None:
    """The mail's declared language (Content-Language: de-DE -> de), if it says one."""
    for name, value in headers:
        if name == "content-language" and value.strip():
            return value.split(",")[0].strip().split("-")[0].lower() or None
    return None


@dataclass(frozen=True, slots=True)
class TicketPlan:
    """What a new ticket becomes: the rules' effects over the department's defaults."""

    department: str
    priority: str
    category: str | None
    subcategory: str | None
    product: str | None
    tags: tuple[str, ...]
    owner: str | None
    fields: dict[str, Any]
    suppress_ack: bool
    quarantine: bool
    fired: tuple[str, ...]


def plan_ticket(outcome: Outcome | None, routed_department: str,
                default_priority: Callable[[str], str]) -> TicketPlan:
    """`default_priority(slug)` is the department's SLA priority for this mail."""
    effects = outcome.effects if outcome else Effects()
    department = effects.department or routed_department
    return TicketPlan(
        department=department, priority=effects.priority or default_priority(department),
        category=effects.category, subcategory=effects.subcategory, product=effects.product,
        tags=effects.tags, owner=effects.owner, fields=dict(effects.fields),
        suppress_ack=effects.suppress_ack, quarantine=effects.quarantine,
        fired=outcome.fired if outcome else ())
