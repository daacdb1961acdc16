"""What an agent's mail may do, decided over plain facts (DESIGN 3a); pure."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from gateway.agents import Profile, may_act, may_reply_to_customers, replies_need_approval


class Plan(StrEnum):
    REFUSE = "refuse"  # 550 5.7.1 with the reason; nothing is written
    REPLY = "reply"  # recorded and relayed to the customer
    NOTE = "note"  # recorded, shared with the department's agents, never sent to the customer
    COMMANDS = "commands"  # no text: only the commands are applied
    HOLD = "hold"  # collision: someone else answered after the message being answered
    NEW_TICKET = "new_ticket"  # names no ticket, goes to a customer: the phone-call case


@dataclass(frozen=True, slots=True)
class AgentFacts:
    profile: Profile
    departments: frozenset[str]  # the agent's
    ticket: int | None  # number of the ticket the mail threads into
    department: str | None  # that ticket's department, or the new ticket's
    has_customer: bool  # a customer address among the recipients
    has_text: bool  # the agent wrote something besides commands and quotes
    has_commands: bool
    note: bool  # #note
    force: bool  # #force
    collision: str | None  # who answered the customer after the message being answered


@dataclass(frozen=True, slots=True)
class AgentDecision:
    plan: Plan
    reason: str = ""
    needs_approval: bool = False  # newbie agents: the reply waits for a supervisor


def _new_ticket(facts: AgentFacts) -> AgentDecision:
    if not facts.has_customer:
        return AgentDecision(Plan.REFUSE, "this mail names no ticket and no customer address")
    if facts.department is None:
        return AgentDecision(Plan.REFUSE, "you belong to no department")
    if not may_reply_to_customers(facts.profile):
        return AgentDecision(Plan.REFUSE, "light agents may only add internal notes")
    if not facts.has_text:
        return AgentDecision(Plan.REFUSE, "a new ticket needs a text for the customer")
    return AgentDecision(Plan.NEW_TICKET, needs_approval=replies_need_approval(facts.profile))


def decide_agent_mail(facts: AgentFacts) -> AgentDecision:
    if facts.ticket is None:
        return _new_ticket(facts)
    if facts.department is None or not may_act(facts.profile, facts.departments,
                                               facts.department):
        return AgentDecision(Plan.REFUSE, f"you are not an agent of the department "
                                          f"{facts.department!r} (ticket {facts.ticket})")
    if facts.note:
        if not facts.has_text:
            return AgentDecision(Plan.REFUSE, "#note without a text")
        return AgentDecision(Plan.NOTE)
    if not may_reply_to_customers(facts.profile):
        return AgentDecision(Plan.REFUSE,
                             "light agents may only add internal notes: start a line with #note")
    if not facts.has_text:
        if facts.has_commands:
            return AgentDecision(Plan.COMMANDS)
        return AgentDecision(Plan.REFUSE, "the mail has no text and no command")
    if facts.collision and not facts.force:
        return AgentDecision(Plan.HOLD, f"{facts.collision} answered the customer after the "
                                        f"message you replied to; resend with #force to send")
    return AgentDecision(Plan.REPLY, needs_approval=replies_need_approval(facts.profile))
