"""Recipient -> department or ticket reply token; the same function serves handle_RCPT."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from email_validator import EmailNotValidError, validate_email

_TOKEN = re.compile(r"^t(\d{1,12})-([a-z2-7]{10})$")
_BOUNCE_TOKEN = re.compile(r"^o(\d{1,15})-([a-z2-7]{10})$")
BOUNCE_LOCAL = "bounces"  # VERP envelope sender: bounces+<token>@domain names an outbox row


class RouteKind(StrEnum):
    DEPARTMENT = "department"  # one of our addresses
    REPLY = "reply"  # support+<token>@…: names a ticket, HMAC-protected
    UNKNOWN = "unknown"  # our domain, no such address: 550 5.1.1
    RELAY = "relay"  # someone else's domain: 554 5.7.1
    BOUNCE = "bounce"  # bounces+<token>@…: a DSN for one of our outbox rows (VERP)


@dataclass(frozen=True, slots=True)
class Route:
    kind: RouteKind
    address: str  # lower-cased recipient as given
    department: str | None = None  # slug
    ticket_number: int | None = None
    outbox_id: int | None = None

    @property
    def accepted(self) -> bool:
        return self.kind in (RouteKind.DEPARTMENT, RouteKind.REPLY, RouteKind.BOUNCE)


@dataclass(frozen=True, slots=True)
class Directory:
    """Our addresses and domains, built from settings; reloaded with them."""

    addresses: Mapping[str, str]  # email -> department slug
    domains: frozenset[str]
    secret: bytes

    @classmethod
    def from_departments(cls, departments: Mapping[str, tuple[str, ...]], secret: bytes
                         ) -> Directory:
        addresses = {a: slug for slug, addrs in departments.items() for a in addrs}
        return cls(addresses, frozenset(a.rsplit("@", 1)[1] for a in addresses), secret)


def _mac(secret: bytes, number: int, purpose: str = "reply") -> str:
    digest = hmac.new(secret, f"{purpose}:{number}".encode(), hashlib.sha256).digest()
    return base64.b32encode(digest).decode("ascii")[:10].lower()


def reply_token(number: int, secret: bytes) -> str:
    return f"t{number}-{_mac(secret, number)}"


def reply_address(base: str, number: int, secret: bytes) -> str:
    local, domain = base.rsplit("@", 1)
    return f"{local}+{reply_token(number, secret)}@{domain}"


def parse_reply_token(token: str, secret: bytes) -> int | None:
    """The ticket number if the token is ours; a guessed or altered token gives None."""
    match = _TOKEN.match(token.lower())
    if not match:
        return None
    number = int(match.group(1))
    return number if hmac.compare_digest(match.group(2), _mac(secret, number)) else None


def bounce_address(domain: str, outbox_id: int, secret: bytes) -> str:
    return f"{BOUNCE_LOCAL}+o{outbox_id}-{_mac(secret, outbox_id, 'bounce')}@{domain}"


def parse_bounce_token(token: str, secret: bytes) -> int | None:
    match = _BOUNCE_TOKEN.match(token.lower())
    if not match:
        return None
    row = int(match.group(1))
    return row if hmac.compare_digest(match.group(2), _mac(secret, row, "bounce")) else None


def _ascii_domain(address: str) -> str:
    """local@<A-label domain>: a client speaking SMTPUTF8 may name our domain in Unicode,
    and our addresses are kept in ASCII (settings)."""
    try:
        valid = validate_email(address, check_deliverability=False, test_environment=True,
                               globally_deliverable=False, allow_smtputf8=True,
                               allow_quoted_local=True)
    except EmailNotValidError:
        return address
    return f"{valid.local_part}@{valid.ascii_domain}".lower()


def route_recipient(recipient: str, directory: Directory) -> Route:
    address = recipient.strip().strip("<>").lower()
    if not address.isascii():
        address = _ascii_domain(address)
    local, at, domain = address.rpartition("@")
    if not at or not local:
        return Route(RouteKind.UNKNOWN, address)
    if address in directory.addresses:
        return Route(RouteKind.DEPARTMENT, address, directory.addresses[address])
    if domain not in directory.domains:
        return Route(RouteKind.RELAY, address)
    base_local, plus, detail = local.partition("+")
    if base_local == BOUNCE_LOCAL and (row := parse_bounce_token(detail, directory.secret)):
        return Route(RouteKind.BOUNCE, address, outbox_id=row)
    department = directory.addresses.get(f"{base_local}@{domain}")
    if not plus or department is None:
        return Route(RouteKind.UNKNOWN, address)
    number = parse_reply_token(detail, directory.secret)
    if number is None:  # ordinary sub-addressing (RFC 5233): the department still owns it
        return Route(RouteKind.DEPARTMENT, address, department)
    return Route(RouteKind.REPLY, address, department, number)


def tag_pattern(tag_format: str) -> re.Pattern[str]:
    before, _, after = tag_format.partition("{number}")
    return re.compile(re.escape(before) + r"(\d{1,12})" + re.escape(after))


def find_tag(subject: str, pattern: re.Pattern[str]) -> int | None:
    match = pattern.search(subject)
    return int(match.group(1)) if match else None
