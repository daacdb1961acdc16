"""Who is logging in: the agents table, checked with the slow hash off the event loop."""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass

from sqlalchemy import select

from gateway.agents import AgentIdentity, Profile, hash_password, verify_password
from store.engine import Store
from store.models import Agent, AgentDepartment, Department


@dataclass(frozen=True, slots=True)
class Login:
    agent: AgentIdentity | None  # set only when the login succeeded
    reason: str  # ok | unknown | disabled | no_password | wrong_password


def verdict(found: bool, active: bool, has_password: bool, password_ok: bool) -> str:
    """Why a login fails (for the log only; the client always hears the same 535)."""
    if not found:
        return "unknown"
    if not active:
        return "disabled"
    if not has_password:
        return "no_password"
    return "ok" if password_ok else "wrong_password"


@functools.cache
def _decoy_hash() -> str:
    """Checked for unknown logins too, so the answer's timing does not tell who exists."""
    return hash_password("decoy-password-never-valid")


def _verify(password: str, stored: str | None) -> bool:
    """In a worker thread: scrypt costs ~50 ms, the decoy hash too on its first use."""
    return verify_password(password, stored or _decoy_hash()) and stored is not None


async def check_login(store: Store, login: str, password: bytes) -> Login:
    """Active agents with a password only; raises what the store raises when it is down."""
    email = login.strip().lower()
    async with store.read() as session:
        row = (await session.execute(
            select(Agent.id, Agent.email, Agent.name, Agent.profile, Agent.active,
                   Agent.credential_hash).where(Agent.email == email))).one_or_none()
    try:
        text = password.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    stored = row.credential_hash if row is not None else None
    password_ok = text is not None and await asyncio.to_thread(_verify, text, stored)
    reason = verdict(row is not None, bool(row and row.active), stored is not None,
                     password_ok)
    if reason != "ok" or row is None:
        return Login(None, reason)
    async with store.read() as session:
        slugs = frozenset(await session.scalars(
            select(Department.slug).join(AgentDepartment,
                                         AgentDepartment.department_id == Department.id)
            .where(AgentDepartment.agent_id == row.id)))
    try:
        profile = Profile(row.profile)
    except ValueError:
        return Login(None, "bad_profile")
    return Login(AgentIdentity(id=row.id, email=row.email.lower(), name=row.name,
                               profile=profile, departments=slugs), "ok")
