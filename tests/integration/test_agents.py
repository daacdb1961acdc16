"""Agents from the CLI to the invitation page: invite, set a password once, manage, disable."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import select

from gateway.agents import verify_password
from store.models import Agent, Event, Ticket
from tests.conftest import settings_text
from tests.mailbuild import make_mail, send


@pytest.fixture
def db_url(sqlite_url: str) -> str:
    """The CLI and the gateway share one SQLite file here; PostgreSQL adds nothing."""
    return sqlite_url


async def deskgate(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in its own process, without blocking the loop the gateway under test runs on."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "--config", str(config), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return subprocess.CompletedProcess(args, process.returncode or 0, out.decode(), err.decode())


async def test_invite_set_password_once_and_manage(make_gateway: Any, sqlite_url: str,
                                                   tmp_path: Path) -> None:
    gw = await make_gateway(url=sqlite_url)
    config = tmp_path / "deskgate.toml"
    config.write_text(settings_text(sqlite_url).replace(
        'listen = "127.0.0.1:0"\n[[departments]]',
        f'listen = "127.0.0.1:{gw.web_port}"\nbase_url = "http://127.0.0.1:{gw.web_port}"\n'
        '[[departments]]'))
    invited = await deskgate(config, "agent", "invite", "Shawn@Example.test", "--name", "Shawn",
                       "--department", "support", "--print-link")
    assert invited.returncode == 0, invited.stderr
    link = re.search(r"http://\S+/invite/\S+", invited.stdout).group(0)
    again = await deskgate(config, "agent", "invite", "shawn@example.test", "--name", "S",
                     "--department", "support")
    assert again.returncode == 1 and "already an agent" in again.stderr
    async with aiohttp.ClientSession() as http:
        async with http.get(link) as page:
            assert page.status == 200 and "shawn@example.test" in await page.text()
        async with http.post(link, data={"password": "short", "again": "short"}) as page:
            assert page.status == 400 and "too short" in await page.text()
        form = {"password": "a long enough secret", "again": "a long enough secret"}
        async with http.post(link, data=form) as page:
            assert page.status == 200 and "Password set" in await page.text()
        async with http.post(link, data=form) as page:  # the invitation is spent
            assert page.status == 410
    async with gw.store.transaction() as session:
        agent = await session.scalar(select(Agent).where(Agent.email == "shawn@example.test"))
        assert verify_password("a long enough secret", agent.credential_hash)
    granted = await deskgate(config, "agent", "grant", "shawn@example.test", "--department",
                             "billing")
    assert granted.returncode == 0
    promoted = await deskgate(config, "agent", "set-profile", "shawn@example.test", "supervisor")
    assert promoted.returncode == 0
    shown = (await deskgate(config, "agent", "show", "shawn@example.test", "--json")).stdout
    assert '"profile": "supervisor"' in shown and '"billing"' in shown
    bad = await deskgate(config, "agent", "grant", "shawn@example.test", "--department", "sales")
    assert bad.returncode == 1 and "department 'sales' is not in the config" in bad.stderr


async def test_disabling_an_agent_unowns_their_open_tickets(make_gateway: Any, sqlite_url: str,
                                                            tmp_path: Path) -> None:
    gw = await make_gateway(url=sqlite_url)
    config = tmp_path / "deskgate.toml"
    config.write_text(settings_text(sqlite_url))
    await deskgate(config, "agent", "invite", "kim@example.test", "--name", "Kim", "--department",
             "support")
    await send(gw.inbound_port, make_mail())
    async with gw.store.transaction() as session:
        agent_id = await session.scalar(select(Agent.id))
        ticket = await session.scalar(select(Ticket))
        ticket.owner_id = agent_id
    disabled = await deskgate(config, "agent", "disable", "kim@example.test")
    assert disabled.returncode == 0
    assert "1 open ticket(s): 0 reassigned, 1 unowned" in disabled.stdout
    async with gw.store.transaction() as session:
        assert (await session.scalar(select(Ticket.owner_id))) is None
        assert await session.scalar(select(Event.data).where(Event.type == "owner_changed"))
