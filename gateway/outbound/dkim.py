"""DKIM keys and signing at send time (dkimpy), so keys can rotate without re-rendering.

rsa-sha256 signatures are dkimpy's header, tags and folding with the RSA step done by OpenSSL
(`cryptography`) on a key loaded once: dkimpy re-parses the PEM and signs with Python integers
on every call (~10 ms of a 2048-bit mail, on the relay's event loop). RSASSA-PKCS1-v1_5 is
deterministic, so the bytes are the same (tests/unit/test_dkim_fast.py compares them).
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import dkim
import dkim.crypto
import nacl.signing
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from gateway.errors import ConfigError

ALGORITHMS = ("rsa-sha256", "ed25519-sha256")

# RFC 6376 5.4.1 recommends these; Reply-To and threading headers keep their meaning signed.
SIGNED_HEADERS = (b"from", b"to", b"subject", b"date", b"message-id", b"in-reply-to",
                  b"references", b"reply-to", b"mime-version", b"content-type",
                  b"auto-submitted")

# dkimpy version and sha256 of the sources _OpenSSLDKIM mirrors or replaces, as read by
# _dkimpy_checked: another dkimpy keeps dkim.sign.
_CHECKED = ("1.1.8", "fd8323cc0e15cb9706209a53883befd45df9f7894aac59de95b4660b0e8abfc7")


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


def _dkimpy_checked() -> bool:
    try:
        installed = version("dkimpy")
        source = "".join(inspect.getsource(f) for f in (
            dkim.sign, dkim.DKIM.sign, dkim.DKIM.gen_header, dkim.crypto.RSASSA_PKCS1_v1_5_sign,
            dkim.crypto.EMSA_PKCS1_v1_5_encode, dkim.crypto.rsa_decrypt))
    except (PackageNotFoundError, OSError, TypeError):  # no metadata or no source to compare
        return False
    return (installed, hashlib.sha256(source.encode()).hexdigest()) == _CHECKED


FAST = _dkimpy_checked()


class _OpenSSLDKIM(dkim.DKIM):
    """dkimpy 1.1.8's DKIM.sign and gen_header for what Signer asks (relaxed/simple, i=@domain,
    no l=, no tlsrpt), less the PEM parsing, with OpenSSL's RSASSA-PKCS1-v1_5."""

    def sign_rsa(self, selector: bytes, domain: bytes, privkey: rsa.RSAPrivateKey,
                 include_headers: Sequence[bytes]) -> bytes:
        canon_policy = dkim.CanonicalizationPolicy.from_c_value(b"relaxed/simple")
        include_headers = tuple(x.lower() for x in include_headers)
        if b"from" not in include_headers:
            raise dkim.ParameterError("The From header field MUST be signed")
        for x in set(include_headers).intersection(self.should_not_sign):
            raise dkim.ParameterError(f"The {x!s} header field SHOULD NOT be signed")
        body = canon_policy.canonicalize_body(self.body)
        bodyhash = base64.b64encode(hashlib.sha256(body).digest())
        sigfields = [
            (b"v", b"1"),
            (b"a", b"rsa-sha256"),
            (b"c", canon_policy.to_c_value()),
            (b"d", domain),
            (b"i", b"@" + domain),
            (b"q", b"dns/txt"),
            (b"s", selector),
            (b"t", str(int(time.time())).encode("ascii")),
            (b"h", b" : ".join(include_headers)),
            (b"bh", bodyhash),
            (b"b", b"0" * 60),  # as dkimpy: b= folds onto its own line
        ]
        return b"DKIM-Signature: " + self.gen_header(sigfields, include_headers, canon_policy,
                                                     b"DKIM-Signature", privkey)

    def gen_header(self, fields: list[tuple[bytes, bytes]], include_headers: tuple[bytes, ...],
                   canon_policy: dkim.CanonicalizationPolicy, header_name: bytes,
                   pk: rsa.RSAPrivateKey, standardize: bool = False) -> bytes:
        header_value = b"; ".join(b"=".join(x) for x in fields)
        header_value = dkim.fold(header_value, namelen=len(header_name), linesep=b"\r\n")
        header_value = dkim.RE_BTAG.sub(b"\\1", header_value)
        header = (header_name, b" " + header_value)
        h = hashlib.sha256()
        headers = canon_policy.canonicalize_headers(self.headers)
        self.signed_headers = dkim.hash_headers(
            h, canon_policy, headers, include_headers, header, dict(fields))
        sig2 = pk.sign(h.digest(), padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
        fields[-1] = (b"b", base64.b64encode(sig2))
        header_value = b"; ".join(b"=".join(x) for x in fields) + self.linesep
        return dkim.fold(header_value, namelen=len(header_name), linesep=self.linesep)


def _openssl_key(pem: bytes) -> rsa.RSAPrivateKey | None:
    """The key for OpenSSL when dkimpy reads the very same numbers from the PEM, else None:
    a key only one of them reads, or one too small for a sha256 DigestInfo, keeps dkimpy's path
    (and its errors at send time). OpenSSL checks the key here (~50 ms for 2048 bits, once)."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
        ours = dkim.crypto.parse_pem_private_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm, dkim.crypto.UnparsableKeyError):
        return None
    if not isinstance(key, rsa.RSAPrivateKey) or key.key_size < 1024:
        return None
    n = key.private_numbers()
    same = (n.public_numbers.n, n.p, n.q, n.dmp1, n.dmq1, n.iqmp) == (
        ours["modulus"], ours["prime1"], ours["prime2"], ours["exponent1"], ours["exponent2"],
        ours["coefficient"])
    return key if same else None


class Signer:
    """Signs with the key of the From domain; mail from a domain without a key goes unsigned."""

    def __init__(self, keys: Iterable[DkimKey]) -> None:
        self.keys = {k.domain.lower(): k for k in keys}
        self._openssl = {
            domain: loaded for domain, k in self.keys.items()
            if FAST and k.algorithm == "rsa-sha256" and (loaded := _openssl_key(k.private))}

    @classmethod
    def from_files(cls, entries: Iterable[tuple[str, str, str, str]]) -> Signer:
        keys = []
        for domain, selector, algorithm, key_file in entries:
            try:
                keys.append(DkimKey(domain, selector, algorithm, Path(key_file).read_bytes()))
            except OSError as exc:
                raise ConfigError([f"dkim key for {domain}: {key_file}: {exc.strerror}"]) from None
        return cls(keys)

    def key_for(self, from_domain: str) -> DkimKey | None:
        return self.keys.get(from_domain.lower())

    def sign(self, mime: bytes, from_domain: str) -> bytes:
        key = self.keys.get(from_domain.lower())
        if key is None:
            return mime
        openssl = self._openssl.get(from_domain.lower())
        if openssl is not None:  # built as dkim.sign builds its DKIM
            signer = _OpenSSLDKIM(mime, signature_algorithm=b"rsa-sha256", linesep=b"\r\n")
            return signer.sign_rsa(key.selector.encode(), key.domain.encode(), openssl,
                                   SIGNED_HEADERS) + mime
        header = dkim.sign(mime, key.selector.encode(), key.domain.encode(), key.private,
                           signature_algorithm=key.algorithm.encode(),
                           include_headers=list(SIGNED_HEADERS))
        return header + mime


@cache
def _signer_of(key: DkimKey) -> Signer:
    return Signer([key])


def sign_with(key: DkimKey, mime: bytes) -> bytes:
    """Signer.sign in the parser process, for a big mail: dkimpy splits the whole mail into
    lines and canonicalizes it holding the GIL (measured: 200 ms for 10 MiB, on the loop)."""
    return _signer_of(key).sign(mime, key.domain)
