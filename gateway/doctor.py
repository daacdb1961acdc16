"""`deskgate doctor`: checks a live setup and says, one line each, what is wrong."""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib
import nacl.signing
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from gateway.settings import Settings
from store.engine import Store
from store.migrate import pending
from store.models import Address

TxtLookup = Callable[[str], Awaitable[list[str] | None]]  # None: DNS cannot be asked


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    state: str  # ok | FAIL | skip
    detail: str

    def __str__(self) -> str:
        return f"{self.state:4}  {self.name}: {self.detail}"


async def resolve_txt(name: str) -> list[str] | None:
    import dns.asyncresolver
    import dns.exception
    import dns.resolver

    try:
        answer = await dns.asyncresolver.resolve(name, "TXT", lifetime=5)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except dns.exception.DNSException:
        return None
    return ["".join(part.decode() for part in record.strings) for record in answer]


async def check_database(store: Store) -> Check:
    try:
        behind = await pending(store)
    except (SQLAlchemyError, OSError) as exc:
        return Check("database", "FAIL", f"not reachable: {type(exc).__name__}")
    if behind:
        return Check("database", "FAIL", "schema out of date: run `deskgate db upgrade`")
    return Check("database", "ok", f"{store.engine.dialect.name}, schema up to date")


async def check_relay(settings: Settings) -> Check:
    relay, options = settings.relay, settings.outbound.relay
    client = aiosmtplib.SMTP(hostname=relay.host, port=relay.port, timeout=10,
                             use_tls=options.security == "tls",
                             start_tls=options.security == "starttls")
    try:
        await client.connect()
        code, _ = await client.ehlo()
        await client.quit()
    except (aiosmtplib.SMTPException, OSError) as exc:
        return Check("relay", "FAIL", f"{relay}: {type(exc).__name__}: {exc}")
    return Check("relay", "ok", f"{relay} answers EHLO ({code})")


def public_key(algorithm: str, private: bytes) -> str:
    """The p= value that belongs to a private key, as `dkim keygen` printed it."""
    if algorithm == "ed25519-sha256":
        seed = nacl.signing.SigningKey(base64.b64decode(private.strip()))
        return base64.b64encode(bytes(seed.verify_key)).decode()
    key = serialization.load_pem_private_key(private, password=None)
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode()


def _p_value(record: str) -> str:
    tags = dict(part.strip().split("=", 1) for part in record.split(";") if "=" in part)
    return tags.get("p", "").replace(" ", "")


async def check_dkim(settings: Settings, lookup: TxtLookup) -> list[Check]:
    checks = []
    for key in settings.outbound.dkim:
        name = f"dkim {key.selector}._domainkey.{key.domain}"
        try:
            expected = public_key(key.algorithm, Path(key.key_file).read_bytes())
        except (OSError, ValueError) as exc:
            checks.append(Check(name, "FAIL", f"{key.key_file} unreadable: {exc}"))
            continue
        records = await lookup(f"{key.selector}._domainkey.{key.domain}")
        if records is None:
            checks.append(Check(name, "skip", "key readable; DNS not reachable (offline?), "
                                              "record not compared"))
        elif expected in (_p_value(r) for r in records):
            checks.append(Check(name, "ok", "key readable, DNS record matches"))
        else:
            checks.append(Check(name, "FAIL", "the published TXT record does not carry this "
                                              "key (see `deskgate dkim keygen` output)"))
    return checks


async def check_addresses(settings: Settings, store: Store) -> list[Check]:
    async with store.read() as session:
        states = dict((await session.execute(select(Address.email,
                                                    Address.verification_state))).all())
    checks = []
    for address in sorted(settings.own_addresses):
        state = states.get(address, "unknown")
        checks.append(Check(f"address {address}", "ok" if state == "verified" else "FAIL",
                            state if state == "verified" else f"{state}: nothing is sent "
                            f"from it until verified (`deskgate address verify {address}`)"))
    return checks


async def run_checks(settings: Settings, store: Store, lookup: TxtLookup = resolve_txt
                     ) -> list[Check]:
    checks = [Check("config", "ok", settings.source), await check_database(store)]
    if checks[-1].state == "ok":
        checks += await check_addresses(settings, store)
    checks.append(await check_relay(settings))
    checks += await check_dkim(settings, lookup)
    return checks
