"""rsa-sha256 signing through OpenSSL gives dkim.sign's bytes exactly (gateway/outbound/dkim.py)."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import dkim
import pytest
from cryptography.hazmat.primitives import serialization

from gateway.outbound import dkim as ours
from gateway.outbound.compose import Outgoing, compose
from gateway.outbound.dkim import SIGNED_HEADERS, DkimKey, NewKey, Signer, generate
from gateway.outbound.render import Rendered

NOW = 1_795_000_000.75
DOMAIN, SELECTOR = "example.test", "s1"
LOREM = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\n"


@pytest.fixture(autouse=True)
def _frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """dkimpy and our signer both read time.time() for t=."""
    monkeypatch.setattr(time, "time", lambda: NOW)


@pytest.fixture(scope="module")
def keys() -> dict[str, NewKey]:
    made = {f"rsa{bits}": generate("rsa-sha256", bits) for bits in (1024, 2048, 3072)}
    loaded = serialization.load_pem_private_key(made["rsa2048"].private, password=None)
    pkcs8 = loaded.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    made["pkcs8"] = NewKey(pkcs8, made["rsa2048"].dns_value)
    return made


def _composed(**changes: object) -> bytes:
    text = changes.pop("text", "Hello Jess,\n\nwe got your mail: ticket [#1234].\n\n" + LOREM * 30)
    subject = changes.pop("subject", "We received your request")
    rendered = Rendered(subject=str(subject), text=str(text), html=f"<p>{text}</p>",
                        language="en")
    out = Outgoing(from_addr="support@example.test", from_name="Example Support",
                   to="jess@example.org", hostname="deskgate.example.test",
                   date=datetime(2026, 11, 23, 10, 0, tzinfo=UTC), tag="[#1234]",
                   **changes)  # type: ignore[arg-type]
    return compose(rendered, out, message_id="abc@deskgate.example.test").mime


HEAD = (b"From: Support <support@example.test>\r\nTo: jess@example.org\r\n"
        b"Subject: Hello\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
        b"Message-ID: <a@deskgate.test>\r\n")

MESSAGES = {
    # as compose() builds what the relay sends: CRLF, multipart/alternative
    "ack": _composed(),
    "reply_threaded": _composed(
        reply_to="t+abc@example.test", in_reply_to="x1@customer.example",
        references=tuple(f"ref{i}.{'r' * 30}@customer.example" for i in range(25)),
        auto_submitted="auto-generated"),
    "utf8_qp_and_encoded_subject": _composed(
        subject="Ihre Anfrage – Grüße aus Köln " * 4, text="Grüße, 你好 " * 300),
    "long_body": _composed(text=LOREM * 2500),
    "empty_text": _composed(text=""),
    "extra_headers": _composed(extra_headers=(("List-Id", "Support <support.example.test>"),
                                              ("X-Deskgate-Ticket", "1234"))),
    # by hand: what the relay does not send today, but dkimpy takes
    "plain": HEAD + b"\r\nYour ticket is 7.\r\n",
    "missing_optional_headers": b"From: support@example.test\r\n\r\nbody\r\n",
    "lf_only": HEAD.replace(b"\r\n", b"\n") + b"\nline 1\nline 2\n\n\n",
    "mixed_line_ends": HEAD + b"\nline 1\r\nline 2\nline 3\r\n",
    "folded_headers": (b"From: Support\r\n <support@example.test>\r\nTo: a@example.org,\r\n"
                       b"\tb@example.org,\r\n  c@example.org\r\nSubject:   spaced   out  \r\n"
                       b"SUBJECT: second\r\nreferences:<a@b>\r\n <c@d>\r\n\r\nbody\r\n"),
    "eight_bit": (HEAD.replace(b"Hello", "Grüße 你好".encode()) + b"\r\n"
                  + "Grüße, 你好\r\n".encode() * 50 + "caf\xe9\r\n".encode("latin-1")),
    "trailing_whitespace_and_blank_lines": HEAD + b"\r\nbody  \r\n\t\r\n\r\n\r\n",
    "no_final_newline": HEAD + b"\r\nno newline at the end",
    "no_body": HEAD,
    "duplicate_from": HEAD + b"From: other@example.test\r\n\r\nbody\r\n",
}


def _reference(key: NewKey, mime: bytes) -> bytes:
    header = dkim.sign(mime, SELECTOR.encode(), DOMAIN.encode(), key.private,
                       signature_algorithm=b"rsa-sha256", include_headers=list(SIGNED_HEADERS))
    return header + mime


def _dnsfunc(key: NewKey):  # type: ignore[no-untyped-def]
    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return key.dns_value.encode() if name == b"s1._domainkey.example.test." else None
    return dnsfunc


def test_the_installed_dkimpy_is_the_checked_one() -> None:
    assert ours.FAST


@pytest.mark.parametrize("key_name", ["rsa1024", "rsa2048", "rsa3072", "pkcs8"])
@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_same_bytes_as_dkim_sign_and_it_verifies(keys: dict[str, NewKey], key_name: str,
                                                 name: str) -> None:
    key, mime = keys[key_name], MESSAGES[name]
    signer = Signer([DkimKey(DOMAIN, SELECTOR, "rsa-sha256", key.private)])
    assert DOMAIN in signer._openssl  # the OpenSSL path, not dkim.sign
    signed = signer.sign(mime, "Example.TEST")
    assert signed == _reference(key, mime)
    if name != "duplicate_from":  # dkim.verify adds a second from to h= on purpose: fails
        assert dkim.verify(signed, dnsfunc=_dnsfunc(key))
        assert not dkim.verify(signed.replace(b"From: ", b"From: x@evil.example, ", 1),
                               dnsfunc=_dnsfunc(key))


def test_another_dkimpy_is_noticed(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ours._dkimpy_checked()
    with monkeypatch.context() as patch:
        patch.setattr(ours, "version", lambda name: "1.1.9")
        assert not ours._dkimpy_checked()
    assert ours._dkimpy_checked()
    changed = dkim.DKIM.gen_header
    monkeypatch.setattr(dkim.DKIM, "gen_header",
                        lambda self, *args, **kwargs: changed(self, *args, **kwargs))
    assert not ours._dkimpy_checked()


def test_another_dkimpy_takes_dkim_sign(monkeypatch: pytest.MonkeyPatch,
                                        keys: dict[str, NewKey]) -> None:
    monkeypatch.setattr(ours, "FAST", False)
    calls = []
    library_sign = dkim.sign

    def spy(*args: object, **kwargs: object) -> bytes:
        calls.append(args)
        return library_sign(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(dkim, "sign", spy)
    key, mime = keys["rsa2048"], MESSAGES["ack"]
    signer = Signer([DkimKey(DOMAIN, SELECTOR, "rsa-sha256", key.private)])
    assert signer.sign(mime, DOMAIN) == _reference(key, mime)
    assert len(calls) == 2  # ours and the reference
    assert dkim.verify(signer.sign(mime, DOMAIN), dnsfunc=_dnsfunc(key))


def test_keys_dkimpy_cannot_read_fail_at_send_time_as_before(keys: dict[str, NewKey]) -> None:
    """A CRLF PEM is fine for OpenSSL, not for dkimpy; neither reads an encrypted one."""
    loaded = serialization.load_pem_private_key(keys["rsa2048"].private, password=None)
    encrypted = loaded.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.TraditionalOpenSSL,
                                     serialization.BestAvailableEncryption(b"secret"))
    unreadable = {"crlf.test": keys["rsa2048"].private.replace(b"\n", b"\r\n"),
                  "encrypted.test": encrypted, "garbage.test": b"not a key\n"}
    signer = Signer([DkimKey(d, SELECTOR, "rsa-sha256", pem) for d, pem in unreadable.items()])
    assert signer._openssl == {}
    for domain, pem in unreadable.items():
        with pytest.raises(Exception) as library:
            dkim.sign(MESSAGES["ack"], SELECTOR.encode(), domain.encode(), pem,
                      include_headers=list(SIGNED_HEADERS))
        with pytest.raises(library.type):
            signer.sign(MESSAGES["ack"], domain)


def test_ed25519_keeps_dkimpy() -> None:
    key = generate("ed25519-sha256")
    signer = Signer([DkimKey(DOMAIN, SELECTOR, "ed25519-sha256", key.private)])
    assert signer._openssl == {}
    mime = MESSAGES["ack"]
    signed = signer.sign(mime, DOMAIN)
    assert signed == dkim.sign(mime, SELECTOR.encode(), DOMAIN.encode(), key.private,
                               signature_algorithm=b"ed25519-sha256",
                               include_headers=list(SIGNED_HEADERS)) + mime
    assert dkim.verify(signed, dnsfunc=_dnsfunc(key))
