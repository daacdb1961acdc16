"""What an agent's mail may do: the pure decision of gateway/agentmail/decide.py."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gateway.agentmail.decide import AgentFacts, Plan, decide_agent_mail
from gateway.agents import Profile

REPLY = AgentFacts(profile=Profile.AGENT, departments=frozenset({"support"}), ticket=7,
                   department="support", has_customer=True, has_text=True, has_commands=False,
                   note=False, force=False, collision=None)


def test_an_agent_of_the_department_replies() -> None:
    assert decide_agent_mail(REPLY).plan is Plan.REPLY
    assert not decide_agent_mail(REPLY).needs_approval


def test_another_department_is_refused_with_the_reason() -> None:
    decision = decide_agent_mail(replace(REPLY, department="billing"))
    assert decision.plan is Plan.REFUSE
    assert "'billing'" in decision.reason and "7" in decision.reason


@pytest.mark.parametrize("profile", [Profile.ADMINISTRATOR, Profile.SUPPORT_MANAGER])
def test_managers_act_in_every_department(profile: Profile) -> None:
    facts = replace(REPLY, profile=profile, departments=frozenset(), department="billing")
    assert decide_agent_mail(facts).plan is Plan.REPLY


def test_light_agent_notes_only() -> None:
    light = replace(REPLY, profile=Profile.LIGHT_AGENT)
    assert decide_agent_mail(light).plan is Plan.REFUSE
    assert "#note" in decide_agent_mail(light).reason
    assert decide_agent_mail(replace(light, note=True)).plan is Plan.NOTE
    assert decide_agent_mail(replace(light, ticket=None)).plan is Plan.REFUSE


def test_newbie_replies_need_approval() -> None:
    newbie = replace(REPLY, profile=Profile.NEWBIE_AGENT)
    assert decide_agent_mail(newbie).needs_approval
    assert decide_agent_mail(replace(newbie, ticket=None)).needs_approval
    assert not decide_agent_mail(replace(newbie, note=True)).needs_approval


def test_collision_holds_unless_forced() -> None:
    clash = replace(REPLY, collision="Kim")
    assert decide_agent_mail(clash).plan is Plan.HOLD and "Kim" in decide_agent_mail(clash).reason
    assert decide_agent_mail(replace(clash, force=True)).plan is Plan.REPLY
    assert decide_agent_mail(replace(clash, note=True)).plan is Plan.NOTE  # a note never clashes


def test_commands_without_text_send_nothing() -> None:
    facts = replace(REPLY, has_text=False, has_commands=True)
    assert decide_agent_mail(facts).plan is Plan.COMMANDS
    assert decide_agent_mail(replace(facts, has_commands=False)).plan is Plan.REFUSE
    assert decide_agent_mail(replace(facts, note=True)).plan is Plan.REFUSE  # empty note


def test_new_ticket_needs_a_customer_a_department_and_a_text() -> None:
    new = replace(REPLY, ticket=None)
    assert decide_agent_mail(new).plan is Plan.NEW_TICKET
    assert decide_agent_mail(replace(new, has_customer=False)).plan is Plan.REFUSE
    assert decide_agent_mail(replace(new, department=None)).plan is Plan.REFUSE
    assert decide_agent_mail(replace(new, has_text=False)).plan is Plan.REFUSE
