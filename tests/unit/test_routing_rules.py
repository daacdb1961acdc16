"""The operator's rules engine: matching, each action, order and stop, bad rules."""

from __future__ import annotations

import time
from typing import Any

import pytest

from gateway.ingest.routing_rules import MailFacts, evaluate, parse_rules

DEPARTMENTS = frozenset({"support", "billing"})
FIELDS = {"contract": "text", "seats": "number", "renewal": "date", "tier": "choice:gold|silver"}


def rules(*tables: dict[str, Any]) -> Any:
    problems: list[str] = []
    parsed = parse_rules(list(tables), DEPARTMENTS, FIELDS,
                         lambda key, msg: problems.append(f"{key}: {msg}"))
    assert problems == []
    return parsed


def facts(**kw: Any) -> MailFacts:
    base: dict[str, Any] = {"sender": "jess@bigcorp.example", "recipients": ("support@x.test",),
                            "subject": "Refund for invoice 42", "body": "Please refund.",
                            "department": "support"}
    return MailFacts(**(base | kw))


def test_sender_domain_sets_department_priority_and_tags() -> None:
    outcome = evaluate(rules({"name": "vip", "when": {"sender_domain": ["bigcorp.example"]},
                              "then": {"department": "billing", "priority": "high",
                                       "tags": ["vip"]}}), facts())
    assert outcome.fired == ("vip",)
    e = outcome.effects
    assert (e.department, e.priority, e.tags) == ("billing", "high", ("vip",))


def test_all_conditions_must_match() -> None:
    rule = rules({"name": "r", "when": {"sender_domain": "bigcorp.example",
                                        "subject_words": ["cancel"]}, "then": {"tags": ["x"]}})
    assert evaluate(rule, facts()).fired == ()
    assert evaluate(rule, facts(subject="Cancel my plan")).fired == ("r",)


def test_regex_language_attachment_auth_hours_and_account() -> None:
    rule = rules({"name": "r", "when": {
        "body_regex": r"(?i)invoice\s+\d+|refund", "language": ["de", "nl"],
        "has_attachment": True, "auth": "pass", "business_hours": False,
        "account": "BigCorp"}, "then": {"category": "Refunds"}})
    matching = facts(language="nl", has_attachment=True, auth="pass", in_business_hours=False,
                     account="bigcorp")
    assert evaluate(rule, matching).effects.category == "Refunds"
    assert evaluate(rule, facts(language="en", has_attachment=True, auth="pass",
                                in_business_hours=False, account="BigCorp")).fired == ()


def test_rules_run_in_order_and_stop_stops() -> None:
    ordered = rules({"name": "first", "when": {}, "then": {"priority": "low", "stop": True}},
                    {"name": "second", "when": {}, "then": {"priority": "high"}})
    outcome = evaluate(ordered, facts())
    assert (outcome.fired, outcome.effects.priority) == (("first",), "low")


def test_later_rules_override_and_tags_accumulate() -> None:
    both = rules({"name": "a", "when": {}, "then": {"priority": "low", "tags": ["a"]}},
                 {"name": "b", "when": {}, "then": {"priority": "high", "tags": ["b", "a"]}})
    effects = evaluate(both, facts()).effects
    assert (effects.priority, effects.tags) == ("high", ("a", "b"))


def test_department_scoped_rule_ignores_other_departments() -> None:
    scoped = rules({"name": "billing-only", "department": "billing", "when": {},
                    "then": {"tags": ["b"]}})
    assert evaluate(scoped, facts()).fired == ()
    assert evaluate(scoped, facts(department="billing")).fired == ("billing-only",)


def test_quarantine_suppress_ack_owner_and_fields() -> None:
    effects = evaluate(rules({"name": "q", "when": {"subject_words": ["refund"]}, "then": {
        "quarantine": True, "suppress_ack": True, "owner": "shawn@x.test",
        "set": {"tier": "gold", "seats": 25}}}), facts()).effects
    assert effects.quarantine and effects.suppress_ack and effects.owner == "shawn@x.test"
    assert dict(effects.fields) == {"tier": "gold", "seats": 25}


def test_a_rule_that_fails_at_evaluation_is_skipped_and_reported() -> None:
    broken = rules({"name": "words", "when": {"subject_words": ["x"]}, "then": {"tags": ["x"]}},
                   {"name": "fine", "when": {}, "then": {"tags": ["ok"]}})
    outcome = evaluate(broken, facts(subject=None))  # type: ignore[arg-type]
    assert outcome.fired == ("fine",)
    assert [name for name, _ in outcome.errors] == ["words"]


def test_catastrophic_regex_is_linear_time() -> None:
    evil = rules({"name": "evil", "when": {"body_regex": "(a+)+$"}, "then": {"tags": ["x"]}})
    started = time.perf_counter()
    assert evaluate(evil, facts(body="a" * 100_000 + "b")).fired == ()
    assert time.perf_counter() - started < 1.0  # backtracking engines take hours here


@pytest.mark.parametrize(("table", "problem"), [
    ({"name": "r", "when": {"subject_regex": "(unclosed"}}, "rules[0] 'r'.when.subject_regex"),
    ({"name": "r", "when": {"colour": "red"}}, "rules[0] 'r'.when.colour: is not a known"),
    ({"name": "r", "then": {"department": "sales"}}, "'sales' is not a department slug"),
    ({"name": "r", "then": {"priority": "urgent"}}, "then.priority: must be one of"),
    ({"name": "r", "then": {"set": {"tier": "bronze"}}}, "then.set.tier: must be one of gold"),
    ({"name": "r", "then": {"set": {"colour": 1}}}, "'colour' is not a declared ticket field"),
    ({"when": {}}, "rules[0].name: every rule needs a name"),
])
def test_bad_rules_are_named_in_the_error(table: dict[str, Any], problem: str) -> None:
    problems: list[str] = []
    parse_rules([table], DEPARTMENTS, FIELDS, lambda key, msg: problems.append(f"{key}: {msg}"))
    assert any(problem in p for p in problems), problems
