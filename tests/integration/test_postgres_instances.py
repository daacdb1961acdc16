"""Several deskgate instances on one PostgreSQL database (DESIGN 6)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import func, select

from store.models import Message, Ticket
from tests.mailbuild import make_mail, send


@pytest.fixture
def db_url(pg_url: str) -> str:
    return pg_url


async def test_two_instances_hand_out_unique_ticket_numbers(make_gateway: Any) -> None:
    first, second = await make_gateway(), await make_gateway()
    ports = [first.inbound_port, second.inbound_port]
    replies = await asyncio.gather(*(
        send(ports[i % 2], make_mail(subject=f"Mail {i}", sender=f"c{i}@example.org"),
             mail_from=f"c{i}@example.org") for i in range(40)))
    assert [r.code for r in replies] == [250] * 40
    async with first.store.transaction() as session:
        numbers = list(await session.scalars(select(Ticket.number)))
    assert len(numbers) == 40
    assert sorted(numbers) == list(range(1, 41))


async def test_same_mail_to_both_instances_at_once_is_stored_once(make_gateway: Any) -> None:
    first, second = await make_gateway(), await make_gateway()
    for i in range(10):
        mail = make_mail(subject=f"Twice {i}", message_id=f"<twice{i}@example.org>")
        replies = await asyncio.gather(send(first.inbound_port, mail),
                                       send(second.inbound_port, mail))
        assert [r.code for r in replies] == [250, 250]
    async with first.store.transaction() as session:
        messages = await session.scalar(select(func.count()).select_from(Message)
                                        .where(Message.direction == "in"))
        tickets = await session.scalar(select(func.count()).select_from(Ticket))
    assert (messages, tickets) == (10, 10)


async def test_instances_starting_together_share_the_departments(make_gateway: Any) -> None:
    gateways = await asyncio.gather(*(make_gateway() for _ in range(4)))
    assert len({tuple(sorted(g.pipeline.department_ids.items())) for g in gateways}) == 1
