"""Agents: profiles, what each may do, and their passwords (scrypt, a slow hash)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from enum import StrEnum

MIN_PASSWORD = 12
# scrypt cost: ~50 ms and 16 MiB per check here; slow for a guesser, fine for a login.
_N, _R, _P = 2**14, 8, 1


class Profile(StrEnum):
    ADMINISTRATOR = "administrator"
    SUPPORT_MANAGER = "support_manager"
    SUPERVISOR = "supervisor"
    AGENT = "agent"
    LIGHT_AGENT = "light_agent"  # internal notes only, never a customer reply
    NEWBIE_AGENT = "newbie_agent"  # customer replies wait for a supervisor's approval


def may_reply_to_customers(profile: Profile) -> bool:
    return profile is not Profile.LIGHT_AGENT


def replies_need_approval(profile: Profile) -> bool:
    return profile is Profile.NEWBIE_AGENT


def may_act_in_every_department(profile: Profile) -> bool:
    return profile in (Profile.ADMINISTRATOR, Profile.SUPPORT_MANAGER)


def may_act(profile: Profile, agent_departments: frozenset[str], department: str) -> bool:
    """An agent acts only on tickets of their departments; managers on all of them."""
    return may_act_in_every_department(profile) or department in agent_departments


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise ValueError(f"a password needs at least {MIN_PASSWORD} characters")
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    encoded = (base64.b64encode(part).decode() for part in (salt, digest))
    return "$".join(("scrypt", str(_N), str(_R), str(_P), *encoded))


def verify_password(password: str, stored: str | None) -> bool:
    """Constant-time check; parameters come from the stored hash so the cost can rise."""
    if not stored or not stored.startswith("scrypt$"):
        return False
    try:
        _, n, r, p, salt, digest = stored.split("$")
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n),
                                r=int(r), p=int(p), dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


@dataclass(frozen=True, slots=True)
class AgentIdentity:
    """An agent as the submission port knows them after AUTH: who, what profile, where."""

    id: int
    email: str  # normalized (lower case)
    name: str
    profile: Profile
    departments: frozenset[str]  # department slugs
