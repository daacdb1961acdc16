"""A department's SLA policy from its TOML table: business hours, targets, priority rules."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

from gateway.tickets.sla import WEEKDAYS, BusinessHours, SlaTarget, parse_range

PRIORITIES = ("high", "medium", "low", "none")  # strongest first
KEYS = frozenset({"business_hours", "holidays", "holiday_country", "sla", "default_priority",
                  "priority_rules", "pause_sla_when_waiting", "auto_close_waiting_days",
                  "escalation_warning_min"})
Fail = Callable[[str, str], None]


@dataclass(frozen=True, slots=True)
class PriorityRule:
    """Raise a new ticket's priority when the sender's domain or a subject word matches."""

    priority: str
    sender_domains: frozenset[str] = frozenset()
    subject_words: tuple[str, ...] = ()

    def matches(self, sender: str | None, subject: str) -> bool:
        domain = sender.rsplit("@", 1)[-1] if sender else ""
        words = set(re.findall(r"\w+", subject.lower()))
        return domain in self.sender_domains or any(w in words for w in self.subject_words)


@dataclass(frozen=True, slots=True)
class DepartmentSla:
    hours: BusinessHours = field(default_factory=BusinessHours.twenty_four_seven)
    targets: Mapping[str, SlaTarget] = field(default_factory=dict)
    default_priority: str = "none"
    priority_rules: tuple[PriorityRule, ...] = ()
    pause_when_waiting: bool = True
    auto_close_waiting_days: int = 0  # 0: never
    escalation_warning_min: int = 0  # 0: no warning before a breach

    def priority_for(self, sender: str | None, subject: str) -> str:
        """Department default, raised (never lowered) by every matching rule."""
        found = [self.default_priority, *(r.priority for r in self.priority_rules
                                          if r.matches(sender, subject))]
        return min(found, key=PRIORITIES.index)


def _weekly(value: Any, prefix: str, fail: Fail) -> tuple[tuple[Any, ...], ...]:
    if not isinstance(value, dict):
        fail(prefix, 'must be "24x7" or a table like { mon = ["09:00-18:00"], … }')
        return ((),) * 7
    for key in value:
        if key not in WEEKDAYS:
            fail(f"{prefix}.{key}", f"is not a weekday ({', '.join(WEEKDAYS)})")
    days = []
    for day in WEEKDAYS:
        ranges = []
        for i, text in enumerate(value.get(day, [])):
            try:
                ranges.append(parse_range(str(text)))
            except ValueError as exc:
                fail(f"{prefix}.{day}[{i}]", str(exc))
        days.append(tuple(sorted(ranges)))
    return tuple(days)


def _holidays(table: dict[str, Any], prefix: str, fail: Fail) -> frozenset[date]:
    days: set[date] = set()
    for i, text in enumerate(table.get("holidays", [])):
        try:
            days.add(date.fromisoformat(str(text)))
        except ValueError:
            fail(f"{prefix}.holidays[{i}]", f"{text!r} is not a date like 2026-12-25")
    country = table.get("holiday_country")
    if country:
        days |= _country_holidays(str(country), f"{prefix}.holiday_country", fail)
    return frozenset(days)


def _country_holidays(spec: str, dotted: str, fail: Fail) -> set[date]:
    """'DE' or 'DE-BY' (country-subdivision) through the holidays package, 5 years around now."""
    import holidays

    country, _, subdivision = spec.partition("-")
    this_year = date.today().year
    try:
        calendar = holidays.country_holidays(country, subdiv=subdivision or None,
                                             years=range(this_year - 1, this_year + 4))
    except (NotImplementedError, KeyError) as exc:
        fail(dotted, f"{spec!r} is not a country known to the holidays package ({exc})")
        return set()
    return set(calendar)


def _minutes(value: Any, dotted: str, fail: Fail) -> timedelta | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        fail(dotted, f"must be a positive number of minutes, not {value!r}")
        return None
    return timedelta(minutes=value)


def _targets(value: Any, prefix: str, fail: Fail) -> dict[str, SlaTarget]:
    targets = {}
    for priority, table in (value or {}).items():
        dotted = f"{prefix}.{priority}"
        if priority not in PRIORITIES or not isinstance(table, dict):
            fail(dotted, f"must be a table for one of {', '.join(PRIORITIES)}")
            continue
        for key in table:
            if key not in ("first_response_min", "resolution_min"):
                fail(f"{dotted}.{key}", "is not a known key (first_response_min, resolution_min)")
        targets[priority] = SlaTarget(
            _minutes(table.get("first_response_min"), f"{dotted}.first_response_min", fail),
            _minutes(table.get("resolution_min"), f"{dotted}.resolution_min", fail))
    return targets


def _rules(value: Any, prefix: str, fail: Fail) -> tuple[PriorityRule, ...]:
    rules = []
    for i, table in enumerate(value or []):
        dotted = f"{prefix}[{i}]"
        if not isinstance(table, dict) or table.get("priority") not in PRIORITIES:
            fail(f"{dotted}.priority", f"must be one of {', '.join(PRIORITIES)}")
            continue
        rules.append(PriorityRule(
            priority=table["priority"],
            sender_domains=frozenset(str(d).lower() for d in table.get("sender_domains", [])),
            subject_words=tuple(str(w).lower() for w in table.get("subject_words", []))))
    return tuple(rules)


def _int(table: dict[str, Any], key: str, prefix: str, default: int, fail: Fail) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        fail(f"{prefix}.{key}", f"must be a whole number >= 0, not {value!r}")
        return default
    return value


def parse_department_sla(table: dict[str, Any], prefix: str, timezone: str, fail: Fail
                         ) -> DepartmentSla:
    hours_value = table.get("business_hours", "24x7")
    holidays = _holidays(table, prefix, fail)
    if hours_value == "24x7":
        hours = BusinessHours(timezone=timezone, always_open=True, holidays=holidays)
    else:
        hours = BusinessHours(timezone, _weekly(hours_value, f"{prefix}.business_hours", fail),
                              holidays)
    default_priority = table.get("default_priority", "none")
    if default_priority not in PRIORITIES:
        fail(f"{prefix}.default_priority", f"must be one of {', '.join(PRIORITIES)}")
        default_priority = "none"
    pause = table.get("pause_sla_when_waiting", True)
    if not isinstance(pause, bool):
        fail(f"{prefix}.pause_sla_when_waiting", "must be true or false")
        pause = True
    return DepartmentSla(
        hours=hours, targets=_targets(table.get("sla"), f"{prefix}.sla", fail),
        default_priority=default_priority,
        priority_rules=_rules(table.get("priority_rules"), f"{prefix}.priority_rules", fail),
        pause_when_waiting=pause,
        auto_close_waiting_days=_int(table, "auto_close_waiting_days", prefix, 0, fail),
        escalation_warning_min=_int(table, "escalation_warning_min", prefix, 0, fail))
