"""Agent notifications end to end: real inbound SMTP, a capture relay, both stores (issue 6)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select, update

from gateway.agentmail.commands import REPLY_MARKER, REPLY_MARKERS, strip_internal
from gateway.errors import ConfigError
from gateway.ingest.addresses import reply_address
from gateway.outbound.notify import Recipient, recipients, skip_reason
from gateway.settings import parse_settings
from gateway.tickets import actions
from gateway.tickets.lifecycle import Status
from store.models import Agent, AgentDepartment, Message, Ticket
from tests.conftest import SECRET, make_settings, settings_text
from tests.integration.test_outbound import Setup, _new_ticket, outbound  # noqa: F401
from tests.mailbuild import make_mail, send

AGENTS = (  # email, name, department, active
    ("ann@example.test", "Ann", "support", True),
    ("bob@example.test", "Bob", "support", True),
    ("dis@example.test", "Dis", "support", False),
    ("carl@example.test", "Carl", "billing", True),
)


# --- the pure parts -----------------------------------------------------------------------

ANN, BOB = Recipient(1, "ann@example.test"), Recipient(2, "bob@example.test")


@pytest.mark.parametrize(("mode", "owner", "sender", "expected"), [
    ("all", None, "jess@example.org", ("ann@example.test", "bob@example.test")),
    ("all", BOB, "jess@example.org", ("ann@example.test", "bob@example.test")),
    ("all", None, "ann@example.test", ("bob@example.test",)),
    ("owner", BOB, "jess@example.org", ("bob@example.test",)),
    ("owner", None, "jess@example.org", ("ann@example.test", "bob@example.test")),
    ("owner", Recipient(9, "outside@example.test"), None, ("outside@example.test",)),
    ("none", BOB, "jess@example.org", ()),
])
def test_who_is_notified(mode: str, owner: Recipient | None, sender: str | None,
                         expected: tuple[str, ...]) -> None:
    assert recipients(mode, [ANN, BOB], owner, sender) == expected


def test_what_is_never_news_for_the_agents() -> None:
    assert skip_reason(False, False) is None
    assert skip_reason(True, False) == "automated mail"
    assert skip_reason(False, True) == "the sender is an agent"


def test_notify_defaults_to_all_and_a_bad_mode_names_key_and_line() -> None:
    assert {d.notify for d in make_settings().departments} == {"all"}
    text = settings_text("sqlite+aiosqlite:///:memory:").replace(
        'slug = "billing"', 'slug = "billing"\nnotify = "sometimes"')
    with pytest.raises(ConfigError) as caught:
        parse_settings(text, "t.toml")
    line = text.splitlines().index('notify = "sometimes"') + 1
    assert caught.value.problems == [f"t.toml:{line}: departments[1].notify: must be one of "
                                     "all, owner, none, not 'sometimes'"]


# --- end to end ---------------------------------------------------------------------------

async def _team(setup: Setup, notify: dict[str, str] | None = None) -> dict[str, int]:
    """The agents above, and each department's notify mode (reloaded like a SIGHUP)."""
    gw = setup.gateway
    if notify:
        departments = tuple(replace(d, notify=notify.get(d.slug, d.notify))
                            for d in gw.settings.departments)
        await gw.reload(replace(gw.settings, departments=departments))
    ids = {}
    async with gw.store.transaction() as session:
        for email, name, slug, active in AGENTS:
            agent = Agent(email=email, name=name, profile="agent", active=active,
                          created_at=datetime.now(UTC))
            session.add(agent)
            await session.flush()
            session.add(AgentDepartment(agent_id=agent.id,
                                        department_id=gw.pipeline.department_ids[slug]))
            ids[email] = agent.id
    return ids


async def _notified(setup: Setup) -> list[str]:
    return sorted(r.recipient for r in await setup.rows(kind="notification"))


def _caught_for(setup: Setup, agent: str) -> list[Any]:
    return [c.message for c in setup.relay.caught if c.rcpt_tos == (agent,)]


async def test_a_new_ticket_notifies_the_active_agents_of_its_department_only(
        outbound: Any) -> None:  # noqa: F811
    setup = await outbound()
    await _team(setup)
    await _new_ticket(setup)
    assert await _notified(setup) == ["ann@example.test", "bob@example.test"]
    await setup.drain()
    assert {c.rcpt_tos for c in setup.relay.caught} == {
        ("jess@example.org",), ("ann@example.test",), ("bob@example.test",)}
    [ann], [bob] = _caught_for(setup, "ann@example.test"), _caught_for(setup, "bob@example.test")
    assert ann["Message-ID"] == bob["Message-ID"]  # one recorded notification, two envelopes
    assert ann["To"] == "ann@example.test" and bob["To"] == "bob@example.test"


async def test_the_notification_carries_text_properties_history_marker_and_threading(
        outbound: Any) -> None:  # noqa: F811
    setup = await outbound()
    await _team(setup)
    first = await _new_ticket(setup, subject="Login fails")
    number = await _new_ticket(setup, subject="Refund for order 77", message_id="<r77@ex.org>",
                               body="Hello,\r\nplease refund order 77.\r\n\r\n"
                                    "> an old quote\r\n")
    await setup.drain()
    [mail] = [m for m in _caught_for(setup, "ann@example.test") if "77" in m["Subject"]]
    text = mail.get_body(("plain",)).get_content()
    html = mail.get_body(("html",)).get_content()
    assert text.startswith(REPLY_MARKER) and REPLY_MARKER in html.split("\n", 1)[0]
    assert "please refund order 77." in text and "an old quote" not in text  # visible text
    for expected in (f"Ticket:    {number} (Support)", "Subject:   Refund for order 77",
                     "Status:    Open", "Priority:  None", "Owner:     nobody yet", "Due:"):
        assert expected in text, expected
    assert f"  {first}  Login fails (Open)" in text  # the contact's previous ticket
    # The subject is the ticket's: an agent's reply to it goes to the customer as "Re: …".
    assert mail["Subject"] == f"[#{number}] Refund for order 77"
    assert f"New ticket {number} from Jess <jess@example.org>:" in text
    assert mail["In-Reply-To"] == "<r77@ex.org>"
    assert mail["Reply-To"].addresses[0].addr_spec == reply_address(
        "support@example.test", number, SECRET.encode())
    assert mail["From"].addresses[0].addr_spec == "support@example.test"
    assert mail["From"].addresses[0].display_name == "Jess via Support"
    assert mail["Auto-Submitted"] == "auto-generated"
    # What a reply above the marker leaves for the customer: only the agent's words.
    assert strip_internal("We refunded it.\n\n" + text) == "We refunded it."


async def test_a_german_department_notifies_in_german(outbound: Any) -> None:  # noqa: F811
    setup = await outbound()
    await _team(setup)
    number = await _new_ticket(setup, to="billing@example.test", subject="Rechnung falsch")
    await setup.drain()
    [mail] = _caught_for(setup, "carl@example.test")
    assert mail["Subject"] == f"[#{number}] Rechnung falsch"
    text = mail.get_body(("plain",)).get_content()
    assert text.startswith(REPLY_MARKERS["de"]) and "Zuständig:   noch niemand" in text
    assert f"Neues Ticket {number} von Jess <jess@example.org>:" in text


async def test_a_reply_to_the_notification_threads_into_the_ticket(
        outbound: Any) -> None:  # noqa: F811
    setup = await outbound()
    await _team(setup)
    number = await _new_ticket(setup, message_id="<cust1@example.org>")
    await setup.drain()
    [notification] = _caught_for(setup, "ann@example.test")
    notification_id = notification["Message-ID"].strip("<>")
    async with setup.gateway.store.transaction() as session:
        [row] = list(await session.scalars(select(Message).where(
            Message.message_id == notification_id)))
        assert (row.kind, row.direction, row.in_reply_to) == (
            "notification", "out", ["cust1@example.org"])
        assert sorted(row.to) == ["ann@example.test", "bob@example.test"]
    token = notification["Reply-To"].addresses[0].addr_spec
    reply = await send(setup.port, make_mail(
        subject=f"Re: {notification['Subject']}", sender="Ann <ann@example.test>", to=token,
        body="On it.\r\n", in_reply_to=f"<{notification_id}>"),
        mail_from="ann@example.test", rcpts=(token,))
    assert reply.code == 250 and reply.message.endswith(f"ticket {number}")
    async with setup.gateway.store.transaction() as session:
        assert await session.scalar(select(Ticket.id).where(Ticket.number == number + 1)) is None
    # The agent's own mail is not news for the agents: nobody is notified of it.
    assert len(await setup.rows(kind="notification")) == 2


async def test_a_customer_reply_notifies_and_says_so(outbound: Any) -> None:  # noqa: F811
    setup = await outbound()
    await _team(setup)
    number = await _new_ticket(setup, message_id="<c1@example.org>")
    await _new_ticket(setup, subject="Re: Refund needed", message_id="<c2@example.org>",
                      in_reply_to="<c1@example.org>", body="Any news?")
    await setup.drain()
    mails = {m["In-Reply-To"]: m.get_body(("plain",)).get_content()
             for m in _caught_for(setup, "bob@example.test")}
    assert set(mails) == {"<c1@example.org>", "<c2@example.org>"}
    assert f"New ticket {number} from Jess" in mails["<c1@example.org>"]
    assert f"Jess <jess@example.org> replied in ticket {number}:" in mails["<c2@example.org>"]
    assert "Any news?" in mails["<c2@example.org>"]


async def test_owner_mode_mails_the_owner_and_everyone_when_there_is_none(
        outbound: Any) -> None:  # noqa: F811
    setup = await outbound()
    ids = await _team(setup, notify={"support": "owner"})
    number = await _new_ticket(setup, message_id="<o1@example.org>")
    assert await _notified(setup) == ["ann@example.test", "bob@example.test"]  # no owner yet
    async with setup.gateway.store.transaction() as session:
        await session.execute(update(Ticket).where(Ticket.number == number)
                              .values(owner_id=ids["bob@example.test"]))
    await _new_ticket(setup, subject="Re: Refund needed", in_reply_to="<o1@example.org>")
    assert await _notified(setup) == ["ann@example.test", "bob@example.test",
                                      "bob@example.test"]
    await setup.drain()
    texts = [m.get_body(("plain",)).get_content() for m in _caught_for(setup, "bob@example.test")]
    [latest] = [t for t in texts if "replied in ticket" in t]
    assert "Owner:     Bob" in latest


async def test_none_mode_notifies_nobody_but_still_acknowledges(
        outbound: Any) -> None:  # noqa: F811
    setup = await outbound()
    await _team(setup, notify={"support": "none"})
    await _new_ticket(setup)
    assert await _notified(setup) == []
    assert len(await setup.rows(kind="ack")) == 1


async def test_an_auto_reply_or_an_agents_own_mail_notifies_nobody(
        outbound: Any) -> None:  # noqa: F811
    setup = await outbound()
    await _team(setup)
    await _new_ticket(setup, subject="Out of office", headers={"Auto-Submitted": "auto-replied"})
    await _new_ticket(setup, sender="Ann <ann@example.test>", subject="Phone call")
    assert await _notified(setup) == []
    await _new_ticket(setup, sender="Dis <dis@example.test>", subject="Disabled agent")
    assert await _notified(setup) == []  # a disabled agent is still an agent, not a customer


async def test_a_reopened_ticket_notifies_and_says_so(outbound: Any) -> None:  # noqa: F811
    setup = await outbound()
    await _team(setup)
    number = await _new_ticket(setup, message_id="<z1@example.org>")
    async with setup.gateway.store.transaction() as session:
        await actions.change_status(session, setup.gateway.settings, number, Status.CLOSED,
                                    setup.clock.now, "test")
    setup.clock.advance(3600)
    await _new_ticket(setup, subject="Re: Refund needed", message_id="<z2@example.org>",
                      in_reply_to="<z1@example.org>", body="It broke again.")
    await setup.drain()
    [reopened] = [m.get_body(("plain",)).get_content()
                  for m in _caught_for(setup, "ann@example.test")
                  if m["In-Reply-To"] == "<z2@example.org>"]
    assert f"Jess <jess@example.org> reopened ticket {number}:" in reopened
    assert "Status:    Open" in reopened and "It broke again." in reopened
