"""Operator rules end to end: routing, priority, quarantine, accounts, and a dry run that
agrees with what ingest then does."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from gateway.ingest.model import Envelope
from gateway.ingest.pipeline import Pipeline
from gateway.settings import parse_settings
from store import queries, repo
from store.engine import Store
from store.models import Account, Contact, Outbox, Quarantine, Ticket
from tests.conftest import settings_text
from tests.mailbuild import make_mail, send

RULES = '''
[[ticket_fields]]
name = "tier"
type = "choice"
choices = ["gold", "silver"]

[[rules]]
name = "paying-account"
when.account = ["BigCorp"]
then.department = "billing"
then.priority = "high"
then.tags = ["vip"]
then.set = { tier = "gold" }

[[rules]]
name = "spam-words"
when.subject_regex = "(?i)viagra|casino"
then.quarantine = true

[[rules]]
name = "refunds"
department = "support"
when.subject_words = ["refund", "erstattung"]
then.category = "Refunds"
then.suppress_ack = true
'''


def rules_config(db_url: str) -> str:
    return settings_text(db_url) + RULES


async def _start(make_gateway: Any, db_url: str) -> Any:
    gw = await make_gateway()
    await gw.reload(parse_settings(rules_config(db_url), "rules.toml"))
    return gw


async def test_mail_from_a_paying_account_goes_to_its_department_with_high_priority(
        make_gateway: Any, db_url: str) -> None:
    gw = await _start(make_gateway, db_url)
    async with gw.store.transaction() as session:
        from gateway.cli_rules import _add

        await _add(session, "BigCorp", ["bigcorp.example"])
    reply = await send(gw.inbound_port, make_mail(subject="Contract renewal",
                                                  sender="ceo@bigcorp.example"),
                       mail_from="ceo@bigcorp.example")
    assert reply.code == 250
    async with gw.store.transaction() as session:
        ticket = await queries.ticket_detail(session, 1)
        row = await session.scalar(select(Ticket).where(Ticket.number == 1))
        account = await session.scalar(select(Account.name).join(
            Contact, Contact.account_id == Account.id).where(Contact.email ==
                                                            "ceo@bigcorp.example"))
    assert (ticket["department"], ticket["priority"]) == ("billing", "high")
    assert (row.tags, row.custom_fields, account) == (["vip"], {"tier": "gold"}, "BigCorp")
    assert any(e["type"] == "rules_fired" and e["data"]["rules"] == ["paying-account"]
               for e in ticket["events"])


async def test_only_a_new_contact_asks_for_its_company(make_gateway: Any,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The account lookup by domain serves a new contact's row alone: the first mail makes
    the contact with its company, the known sender's next ticket skips the lookup (one
    statement fewer before the 250)."""
    gw = await make_gateway()
    asked: list[str] = []
    real = repo.account_for_domain

    async def recording(session: Any, domain: str) -> Any:
        asked.append(domain)
        return await real(session, domain)

    monkeypatch.setattr(repo, "account_for_domain", recording)
    for subject in ("First question", "Second question"):
        mail = make_mail(subject=subject, sender="ann@acme.example")
        assert (await send(gw.inbound_port, mail, mail_from="ann@acme.example")).code == 250
    async with gw.store.read() as session:
        account = await session.scalar(select(Account.name).join(
            Contact, Contact.account_id == Account.id).where(Contact.email == "ann@acme.example"))
        tickets = await session.scalar(select(func.count()).select_from(Ticket))
    assert (asked, account, tickets) == (["acme.example"], "acme.example", 2)


async def test_a_quarantine_rule_keeps_the_mail_and_sends_nothing(make_gateway: Any,
                                                                  db_url: str) -> None:
    gw = await _start(make_gateway, db_url)
    assert (await send(gw.inbound_port, make_mail(subject="Cheap CASINO chips"))).code == 250
    async with gw.store.transaction() as session:
        reasons = list(await session.scalars(select(Quarantine.reason)))
        tickets = await session.scalar(select(func.count()).select_from(Ticket))
        outbox = await session.scalar(select(func.count()).select_from(Outbox))
    assert reasons == ["quarantined by rule spam-words"]
    assert (tickets, outbox) == (0, 0)


async def test_suppress_ack_rule_sets_category_and_no_acknowledgement(make_gateway: Any,
                                                                      db_url: str) -> None:
    gw = await _start(make_gateway, db_url)
    await send(gw.inbound_port, make_mail(subject="Refund please"))
    await send(gw.inbound_port, make_mail(subject="Printer question", sender="b@example.net"),
               mail_from="b@example.net")
    async with gw.store.transaction() as session:
        categories = dict((await session.execute(select(Ticket.number, Ticket.category))).all())
        acked = list(await session.scalars(select(Outbox.ticket_id)))
    assert categories == {1: "Refunds", 2: None}
    assert len(acked) == 1  # only the printer question was acknowledged


_numbers = itertools.count()
subjects = st.sampled_from(["Refund please", "casino bonus", "Hello", "Erstattung bitte",
                            "Invoice", "question about REFUND"])
senders = st.sampled_from(["a@bigcorp.example", "b@gmail.com", "c@small.example",
                           "d@bigcorp.example"])
recipients = st.sampled_from(["support@example.test", "billing@example.test"])


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(subject=subjects, sender=senders, recipient=recipients)
async def test_rules_test_agrees_with_ingest(sqlite_url: str, subject: str, sender: str,
                                             recipient: str) -> None:
    store = Store(sqlite_url)
    pipeline = Pipeline(parse_settings(rules_config(sqlite_url), "rules.toml"), store)
    try:
        await pipeline.start()
        raw = make_mail(subject=subject, sender=sender, to=recipient,
                        message_id=f"<p{next(_numbers)}@example.org>")
        envelope = Envelope(mail_from=sender, rcpt_tos=(recipient,))
        predicted = await pipeline.dry_run(raw, envelope)
        verdict = await pipeline.ingest(raw, envelope)
        assert predicted["outcome"] == verdict.outcome.value
        if verdict.ticket_number is not None and "new_ticket" in predicted:
            async with store.transaction() as session:
                detail = await queries.ticket_detail(session, verdict.ticket_number)
                row = await session.scalar(select(Ticket).where(
                    Ticket.number == verdict.ticket_number))
            plan = predicted["new_ticket"]
            assert (detail["department"], detail["priority"], row.category, row.tags) == (
                plan["department"], plan["priority"], plan["category"], plan["tags"])
    finally:
        await store.dispose()


async def test_paying_account_high_priority_and_round_robin_across_three_agents(
        make_gateway: Any, db_url: str) -> None:
    from gateway.agents import Profile
    from store.models import Agent, AgentDepartment

    gw = await make_gateway()
    text = rules_config(db_url).replace('slug = "billing"', 'slug = "billing"\n'
                                        'assignment = "round_robin"', 1)
    await gw.reload(parse_settings(text, "rules.toml"))
    async with gw.store.transaction() as session:
        from gateway.cli_rules import _add

        await _add(session, "BigCorp", ["bigcorp.example"])
        billing = gw.pipeline.department_ids["billing"]
        for name in ("ann", "bob", "cem"):
            agent = Agent(email=f"{name}@example.test", name=name, profile=Profile.AGENT.value,
                          active=True, created_at=datetime.now(UTC))
            session.add(agent)
            await session.flush()
            session.add(AgentDepartment(agent_id=agent.id, department_id=billing))
    for i in range(6):
        reply = await send(gw.inbound_port, make_mail(subject=f"Contract {i}",
                                                      sender=f"p{i}@bigcorp.example"),
                           mail_from=f"p{i}@bigcorp.example")
        assert reply.code == 250
    async with gw.store.transaction() as session:
        details = [await queries.ticket_detail(session, n) for n in range(1, 7)]
    assert {(d["department"], d["priority"]) for d in details} == {("billing", "high")}
    assert [d["owner"].split("@")[0] for d in details] == ["ann", "bob", "cem"] * 2
    from gateway.cli_agents import _reassign

    async with gw.store.transaction() as session:  # what `deskgate agent disable ann@…` does
        ann = await session.scalar(select(Agent).where(Agent.email == "ann@example.test"))
        ann.active = False
        await session.flush()
        moved = await _reassign(session, gw.settings, ann, datetime.now(UTC))
        details = [await queries.ticket_detail(session, n) for n in (1, 4)]
    assert len(moved) == 2 and None not in moved
    assert {d["owner"] for d in details} <= {"bob@example.test", "cem@example.test"}
