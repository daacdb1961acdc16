"""DKIM keys and signing at send time (dkimpy), so keys can rotate without re-rendering."""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import dkim
import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.errors import ConfigError

ALGORITHMS = ("rsa-sha256", "ed25519-sha256")

# RFC 6376 5.4.1 recommends these; Reply-To and threading headers keep their meaning signed.
SIGNED_HEADERS = (b"from", b"to", b"subject", b"date", b"message-id", b"in-reply-to",
                  b"references", b"reply-to", b"mime-version", b"content-type",
                  b"auto-submitted")


@dataclass(frozen=True, slots=True)
class DkimKey:
    domain: str
    selector: str
    algorithm: str  # rsa-sha256 | ed25519-sha256
    private: bytes  # PEM (RSA) or base64 seed (ed25519), as dkimpy reads them


@dataclass(frozen=True, slots=True)
class NewKey:
    private: bytes
    dns_value: str  # what to publish at <selector>._domainkey.<domain> as TXT


def generate(algorithm: str = "rsa-sha256", bits: int = 2048) -> NewKey:
    if algorithm == "ed25519-sha256":
        seed = nacl.signing.SigningKey.generate()
        public = base64.b64encode(bytes(seed.verify_key)).decode()
        return NewKey(base64.b64encode(bytes(seed)) + b"\n", f"v=DKIM1; k=ed25519; p={public}")
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return NewKey(private, f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}")


def write_key(path: Path, key: NewKey) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(key.private)
    path.chmod(0o600)
    path.with_suffix(".txt").write_text(key.dns_value + "\n")


def record_name(selector: str, domain: str) -> str:
    return f"{selector}._domainkey.{domain}"


class Signer:
    """Signs with the key of the From domain; mail from a domain without a key goes unsigned."""

    def __init__(self, keys: Iterable[DkimKey]) -> None:
        self.keys = {k.domain.lower(): k for k in keys}

    @classmethod
    def from_files(cls, entries: Iterable[tuple[str, str, str, str]]) -> Signer:
        keys = []
        for domain, selector, algorithm, key_file in entries:
            try:
                keys.append(DkimKey(domain, selector, algorithm, Path(key_file).read_bytes()))
            except OSError as exc:
                raise ConfigError([f"dkim key for {domain}: {key_file}: {exc.strerror}"]) from None
        return cls(keys)

    def sign(self, mime: bytes, from_domain: str) -> bytes:
        key = self.keys.get(from_domain.lower())
        if key is None:
            return mime
        header = dkim.sign(mime, key.selector.encode(), key.domain.encode(), key.private,
                           signature_algorithm=key.algorithm.encode(),
                           include_headers=list(SIGNED_HEADERS))
        return header + mime
