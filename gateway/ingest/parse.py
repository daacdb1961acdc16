"""parse(raw) -> ParsedMail: tolerant MIME parsing that never raises (DESIGN 2, step 1)."""

from __future__ import annotations

import binascii
import codecs
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from email.feedparser import BufferedSubFile, FeedParser
from email.generator import BytesGenerator
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32
from email.utils import getaddresses, parsedate_to_datetime
from functools import lru_cache
from io import BytesIO

from gateway.ingest.charsets import guess_decode
from gateway.ingest.model import AttachmentPart, ParsedMail

# compat32 keeps header values as the raw strings we decode ourselves; policy.default parses
# every header eagerly and raises on odd ones (Group objects, unknown charsets).
_EMBED_LF = compat32.clone(max_line_length=None, linesep="\n")
_EMBED_CRLF = compat32.clone(max_line_length=None, linesep="\r\n")

_FOLD = re.compile(r"\r\n|\r|\n")
# RFC 2047 section 2 encoded-word; tolerant about the charset token (RFC 2231 language suffix).
_WORD = re.compile(r"=\?([^?\s]*)\?([bBqQ])\?([^?]*)\?=")
_BARE_ADDR = re.compile(r"[^\s<>,;\"]+@[^\s<>,;\"]+")
_ANGLE_ID = re.compile(r"<([^<>]*)>")
_SEPARATOR = re.compile(rb"\r\n\r\n|\n\r?\n|\r\r")
_FIRST_HEADER = re.compile(rb"(?:From [^\r\n]*(?:\r\n|\r|\n))?[!-9;-~]+[ \t]*:")
_BOM = b"\xef\xbb\xbf"
_MAX_DEFECTS = 32
# The email package builds objects of ~0.4 KB per header line or MIME part: 10 MiB of tiny
# headers cost 9 s and 430 MiB (measured, tests/unit/test_parser_abuse.py). Real mail stays far
# below these; beyond them only the first header lines are read and the mail is quarantined.
MAX_HEADER_LINES = 10_000
MAX_PART_DELIMITERS = 10_000
# Every body line is checked against every enclosing boundary: 900 nested multiparts around
# 100,000 lines took 29 s. Deeper nesting than this is read as one text part (defect noted).
MAX_MIME_DEPTH = 32
_SINGLE_BYTE = re.compile(r"cp12[0-9]{2}|iso8859|latin_1|koi8|mac_|ascii|cp874|cp8[56]")

# Labels mailers use that Python does not know, or that are subsets of what is really sent
# (the WHATWG encoding standard makes the same substitutions).
_CHARSET_ALIASES = {
    "us-ascii": "cp1252", "ascii": "cp1252", "iso-8859-1": "cp1252", "latin1": "cp1252",
    "gb2312": "gb18030", "gbk": "gb18030", "x-gbk": "gb18030", "euc-cn": "gb18030",
    "ks_c_5601-1987": "cp949", "euc-kr": "cp949", "big5": "big5hkscs",
    "shift_jis": "cp932", "x-sjis": "cp932", "iso-2022-jp": "iso2022_jp_ext",
    "x-mac-cyrillic": "mac_cyrillic", "iso-8859-8-i": "iso-8859-8", "tis-620": "cp874",
    "windows-874": "cp874", "unicode-1-1-utf-7": "utf-7", "utf8": "utf-8",
}
# Codecs that exist in Python but are not charsets a mail may declare.
_NOT_CHARSETS = {"undefined", "unicode_escape", "raw_unicode_escape", "idna", "punycode",
                 "mbcs", "oem", "palmos"}


@lru_cache(maxsize=256)
def _codec(charset: str | None) -> str | None:
    """Python codec name for a declared charset, or None when unknown or not a text charset."""
    if not charset:
        return None
    label = charset.strip().strip('"').split("*", 1)[0].lower()
    label = _CHARSET_ALIASES.get(label, label)
    try:
        info = codecs.lookup(label)
    except (LookupError, ValueError):
        return None
    if not info._is_text_encoding or info.name in _NOT_CHARSETS:  # type: ignore[attr-defined]
        return None
    return info.name


_JIS_MODES = {b"(B": 0, b"(J": 0, b"$@": 2, b"$B": 2, b"(I": 1}


def _iso2022jp_as_cp932(data: bytes) -> str:
    """ISO-2022-JP as Windows writes it (CP50220: NEC row 13 like "№", "①"), via Shift_JIS."""
    out = bytearray()
    mode = 0  # 0 ASCII, 1 half-width katakana, 2 JIS X 0208 pairs
    i = 0
    while i < len(data):
        if data[i] == 0x1B and data[i + 1:i + 3] in _JIS_MODES:
            mode = _JIS_MODES[data[i + 1:i + 3]]
            i += 3
        elif mode == 2 and i + 1 < len(data) and data[i] > 0x20:
            j1, j2 = data[i], data[i + 1]
            s1 = (j1 + 1) // 2 + (0x70 if j1 <= 0x5E else 0xB0)
            s2 = j2 + (0x1F + (j2 >= 0x60) if j1 % 2 else 0x7E)
            out += bytes((s1 & 0xFF, s2 & 0xFF))
            i += 2
        else:
            out.append(data[i] | 0x80 if mode == 1 and 0x20 < data[i] < 0x60 else data[i])
            i += 1
    return out.decode("cp932", "replace")


def decode_bytes(data: bytes, charset: str | None) -> str:
    """Declared charset, else UTF-8, else the declared one (or Latin-1) with replacement."""
    codec = _codec(charset)
    if codec and _SINGLE_BYTE.match(codec) and not data.isascii():
        try:  # any byte string is "valid" cp1252; valid UTF-8 is nearly never an accident
            return data.decode("utf-8")
        except UnicodeError:
            pass
    if codec:
        try:
            return data.decode(codec)
        except (UnicodeError, ValueError):
            pass  # a lying charset label: UTF-8 is the usual truth
        if codec.startswith("iso2022_jp"):
            return _iso2022jp_as_cp932(data)
    try:
        return data.decode("utf-8")
    except UnicodeError:
        pass
    if charset:  # a declared charset that does not decode: ask a detector before replacing
        guessed = guess_decode(data)
        if guessed is not None:
            return guessed
    fallback = codec or ("latin-1" if charset else "cp1252")
    try:
        return data.decode(fallback, "replace")
    except (UnicodeError, ValueError, LookupError):
        return data.decode("latin-1")


def _recover_8bit(value: str, hint: str | None) -> str:
    """Raw 8-bit header bytes arrive as surrogates; read them as UTF-8 or the body's charset."""
    data = value.encode("utf-8", "surrogateescape")
    return decode_bytes(data, hint)


def _b64(text: str) -> bytes:
    text = text.strip()
    if len(text) % 4 == 1:
        text = text[:-1]  # a stray character; RFC 2047 words are padded to 4
    try:
        return binascii.a2b_base64(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return text.encode("ascii", "replace")


def _word_bytes(encoding: str, text: str) -> bytes:
    if encoding in "bB":
        return _b64(text)
    try:
        return binascii.a2b_qp(text.encode("ascii", "replace"), header=True)
    except (binascii.Error, ValueError):
        return text.encode("ascii", "replace")


def decode_words(value: str) -> str:
    """RFC 2047: decode encoded-words; whitespace between adjacent words is dropped (6.2)."""
    out: list[str] = []
    run: list[bytes] = []  # adjacent words of one charset: a character may span two words
    run_charset: str | None = None
    pos = 0
    for match in _WORD.finditer(value):
        gap = value[pos:match.start()]
        charset = match.group(1).split("*", 1)[0].lower()
        adjacent = pos > 0 and not gap.strip()
        if run and not (adjacent and charset == run_charset):
            out.append(decode_bytes(b"".join(run), run_charset))
            run = []
        if not adjacent:
            out.append(gap)
        run.append(_word_bytes(match.group(2), match.group(3)))
        run_charset = charset
        pos = match.end()
    if run:
        out.append(decode_bytes(b"".join(run), run_charset))
    out.append(value[pos:])
    return "".join(out)


def decode_header(value: str, hint: str | None = None) -> str:
    """Unfold (RFC 5322 2.2.3), recover raw 8-bit bytes, decode RFC 2047 words."""
    if "\n" in value or "\r" in value:
        value = _FOLD.sub("", value)
    if not value.isascii():
        value = _recover_8bit(value, hint)
    if "=?" in value:
        value = decode_words(value)
    return value


def _msg_ids(value: str) -> tuple[str, ...]:
    """Message-IDs without angle brackets; junk between them (comments, dates) is ignored."""
    ids = [re.sub(r"\s+", "", found) for found in _ANGLE_ID.findall(value)]
    if not ids:
        ids = [token for token in value.split() if "@" in token]
    return tuple(dict.fromkeys(i for i in ids if i))


def _addresses(values: Iterable[str], hint: str | None) -> list[tuple[str, str]]:
    """(decoded display name, addr-spec) pairs; names are decoded after splitting on commas."""
    unfolded = [_FOLD.sub("", v) for v in values]
    try:
        pairs = getaddresses(unfolded)
    except Exception:  # noqa: BLE001 — address parsing of hostile input must not stop ingest
        pairs = [("", found) for v in unfolded for found in _BARE_ADDR.findall(v)]
    result = []
    for name, addr in pairs:
        addr = addr.strip()
        if "@" not in addr or any(ch.isspace() for ch in addr):
            continue
        result.append((decode_header(name, hint).strip(), _recover_8bit(addr, "utf-8")))
    return result


def _date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError, IndexError):
        return None


def _first_id(value: str | None) -> str | None:
    if not value:
        return None
    ids = _msg_ids(value)
    if ids:
        return ids[0]
    tokens = value.split()
    if not tokens:
        return None
    return tokens[0].strip("<>") or None


@dataclass(slots=True)
class _Parts:
    """What the walk over the MIME tree collects."""

    linesep: bytes
    hint: str | None
    text: str | None = None
    html: str | None = None
    attachments: list[AttachmentPart] = field(default_factory=list)
    defects: list[str] = field(default_factory=list)


def _filename(part: Message, hint: str | None) -> str | None:
    try:
        name = part.get_filename()  # RFC 2231 parameters; falls back to Content-Type name=
    except Exception:  # noqa: BLE001 — a broken parameter list only costs us the name
        return None
    if not isinstance(name, str) or not name.strip():
        return None
    return decode_header(name, hint).strip()


def _payload(part: Message, parts: _Parts) -> bytes:
    """Transfer-decoded bytes (base64, quoted-printable, uuencode); raw bytes when broken."""
    try:
        data = part.get_payload(decode=True)
    except Exception as exc:  # noqa: BLE001 — a bad transfer encoding keeps the raw payload
        parts.defects.append(f"payload-undecodable:{type(exc).__name__}")
        raw = part._payload  # the undecoded text as parsed; get_payload() failed on it
        return raw.encode("ascii", "surrogateescape") if isinstance(raw, str) else b""
    return data if isinstance(data, bytes) else b""


class _VerbatimGenerator(BytesGenerator):
    """Writes header lines as received; the stock folding re-encodes every header (slow)."""

    def _write_headers(self, msg: Message) -> None:
        newline = self._NL.encode("ascii")
        for name, value in msg.raw_items():
            self._fp.write(f"{name}: {value}".encode("ascii", "surrogateescape") + newline)
        self._fp.write(newline)

    def _handle_multipart(self, msg: Message) -> None:
        # A multipart whose boundary never occurs keeps its body as one string; the stock
        # code reads it through get_payload(), which turns raw 8-bit bytes into U+FFFD and
        # then fails to encode them (found by fuzzing: the forwarded mail came out empty).
        if isinstance(msg._payload, str):
            self._write_lines(msg._payload)
            return
        super()._handle_multipart(msg)


def _flatten(messages: list[Message], parts: _Parts) -> bytes:
    """Bytes of enclosed messages (message/rfc822, delivery-status blocks), as received."""
    policy = _EMBED_CRLF if parts.linesep == b"\r\n" else _EMBED_LF
    out = BytesIO()
    try:
        for inner in messages:
            if isinstance(inner, Message):
                _VerbatimGenerator(out, mangle_from_=False, policy=policy).flatten(inner)
    except Exception as exc:  # noqa: BLE001 — keep what was written; the raw mail is stored anyway
        parts.defects.append(f"embedded-message-incomplete:{type(exc).__name__}")
    return out.getvalue()


def _content_id(part: Message) -> str | None:
    value = part.get("content-id")
    if not isinstance(value, str):
        return None
    value = _FOLD.sub("", value).strip().strip("<>").strip()
    return value or None


def _add_enclosed(part: Message, ctype: str, inner: list[Message], parts: _Parts) -> None:
    """message/* parts: forwarded mails, a bounce's returned message, report fields."""
    name = _filename(part, parts.hint)
    if name is None and ctype in ("message/rfc822", "message/global"):
        name = "forwarded.eml"
    data = _flatten(inner, parts)
    parts.attachments.append(AttachmentPart(name, ctype, data, False, _content_id(part)))


def _add_leaf(part: Message, ctype: str, parts: _Parts) -> None:
    name = _filename(part, parts.hint)
    disposition = part.get_content_disposition()
    # A multipart without a usable boundary arrives as one text blob: show it as text.
    textual = ctype in ("text/plain", "text/html") or ctype.startswith("multipart/")
    if textual and name is None and disposition != "attachment":
        if ctype == "text/html":
            if parts.html is None:
                parts.html = decode_bytes(_payload(part, parts), part.get_content_charset())
        elif parts.text is None:
            parts.text = decode_bytes(_payload(part, parts), part.get_content_charset())
        return
    cid = _content_id(part)
    inline = disposition == "inline" or (disposition is None and cid is not None)
    parts.attachments.append(AttachmentPart(name, ctype, _payload(part, parts), inline, cid))


def _visit(part: Message, parts: _Parts, stack: list[Message]) -> None:
    parts.defects.extend(type(defect).__name__ for defect in part.defects)
    ctype = part.get_content_type()
    if not part.is_multipart():
        _add_leaf(part, ctype, parts)
        return
    children = [p for p in part.get_payload() if isinstance(p, Message)]
    if ctype.startswith("message/"):
        _add_enclosed(part, ctype, children, parts)
    else:
        stack.extend(reversed(children))


def _walk(msg: Message, parts: _Parts) -> None:
    """Depth-first, iteratively: hostile nesting must not exhaust the Python stack."""
    stack = [msg]
    while stack:
        part = stack.pop()
        try:
            _visit(part, parts, stack)
        except Exception as exc:  # noqa: BLE001 — one broken part must not cost the others
            parts.defects.append(f"part-unreadable:{type(exc).__name__}")


def _trim(raw: bytes) -> tuple[bytes, list[str]]:
    """Skip a byte-order mark and leading blank lines some exporters put before the headers."""
    notes = []
    data = raw
    if data.startswith(_BOM):
        data = data[len(_BOM):]
        notes.append("leading-bom")
    stripped = data.lstrip(b" \t\r\n")
    if len(stripped) != len(data) and stripped:
        notes.append("leading-whitespace")
        data = stripped
    return data, notes


def _body_sha256(data: bytes) -> str:
    match = _SEPARATOR.search(data)
    return hashlib.sha256(data[match.end():] if match else data).hexdigest()


def _over_limits(data: bytes) -> tuple[bytes, str | None]:
    """The bytes to hand to the email package, and why the mail is too odd to use, if it is."""
    match = _SEPARATOR.search(data)
    end = match.start() if match else len(data)
    newline = b"\n" if b"\n" in data[:4096] else b"\r"
    lines = data.count(newline, 0, end)
    if lines > MAX_HEADER_LINES:
        cut = 0
        for _ in range(MAX_HEADER_LINES):
            cut = data.find(newline, cut) + 1
        return data[:cut] + newline, f"too many header lines ({lines} > {MAX_HEADER_LINES})"
    delimiters = data.count(newline + b"--", end)
    if delimiters > MAX_PART_DELIMITERS:
        return data[:end] + newline * 2, (
            f"too many MIME parts ({delimiters} delimiters > {MAX_PART_DELIMITERS})")
    return data, None


class MimeTooDeep(Exception):
    """More nested multiparts than MAX_MIME_DEPTH."""


class _DepthLimitedInput(BufferedSubFile):
    def push_eof_matcher(self, pred):  # type: ignore[no-untyped-def]
        if len(self._eofstack) >= MAX_MIME_DEPTH:  # type: ignore[attr-defined]
            raise MimeTooDeep(f"more than {MAX_MIME_DEPTH} nested multiparts")
        super().push_eof_matcher(pred)


def _feed(data: bytes, headersonly: bool) -> Message:
    """BytesParser.parsebytes with a bound on the multipart nesting."""
    parser = FeedParser(policy=compat32)
    parser._input = _DepthLimitedInput()  # type: ignore[attr-defined]
    if headersonly:
        parser._set_headersonly()  # type: ignore[attr-defined]
    text = data.decode("ascii", "surrogateescape")
    for start in range(0, len(text), 8192):  # in pieces, as Parser.parse() reads a file
        parser.feed(text[start:start + 8192])
    return parser.close()


def _message(data: bytes, notes: list[str], headersonly: bool = False) -> Message:
    try:
        return _feed(data, headersonly)
    except Exception as exc:  # noqa: BLE001 — e.g. RecursionError on absurd nesting
        notes.append(f"mime-unparsed:{type(exc).__name__}")
        return BytesParser(policy=compat32).parsebytes(data, headersonly=True)


def _charset_hint(msg: Message) -> str | None:
    try:
        return msg.get_content_charset()
    except Exception:  # noqa: BLE001 — only a hint for raw 8-bit headers
        return None


def _empty(raw: bytes, fatal: str, defects: tuple[str, ...] = ()) -> ParsedMail:
    return ParsedMail(
        message_id=None, in_reply_to=(), references=(), from_addr=None, from_name="",
        reply_to=(), to=(), cc=(), subject="", date=None, date_raw="", headers=(), text="",
        html=None, attachments=(), defects=defects, body_sha256=_body_sha256(raw), fatal=fatal)


def _fatal(data: bytes, mail: ParsedMail) -> str | None:
    if not _FIRST_HEADER.match(data):
        return "no header section"
    if mail.from_addr is None and mail.message_id is None and not (
            mail.text.strip() or mail.html or mail.attachments):
        return "no sender, message-id or body"
    return None


def _build(msg: Message, parts: _Parts, data: bytes) -> ParsedMail:
    raw_items = [(name.lower(), value) for name, value in msg.raw_items()
                 if isinstance(name, str) and isinstance(value, str)]
    headers = tuple((_recover_8bit(name, None) if not name.isascii() else name,
                     decode_header(value, parts.hint)) for name, value in raw_items)
    first: dict[str, str] = {}
    for name, value in headers:
        first.setdefault(name, value)

    def addresses(name: str) -> list[tuple[str, str]]:
        return _addresses((v for n, v in raw_items if n == name), parts.hint)

    senders = addresses("from")
    date_raw = first.get("date", "").strip()
    return ParsedMail(
        message_id=_first_id(first.get("message-id")),
        in_reply_to=_msg_ids(first.get("in-reply-to", "")),
        references=_msg_ids(first.get("references", "")),
        from_addr=senders[0][1] if senders else None,
        from_name=senders[0][0] if senders else "",
        reply_to=tuple(addr for _, addr in addresses("reply-to")),
        to=tuple(addr for _, addr in addresses("to")),
        cc=tuple(addr for _, addr in addresses("cc")),
        subject=first.get("subject", ""),
        date=_date(date_raw), date_raw=date_raw, headers=headers,
        text=parts.text or "", html=parts.html, attachments=tuple(parts.attachments),
        defects=tuple(dict.fromkeys(parts.defects))[:_MAX_DEFECTS],
        body_sha256=_body_sha256(data))


def _parse(raw: bytes) -> ParsedMail:
    data, notes = _trim(bytes(raw))
    if not data.strip():
        return _empty(data, "empty input", tuple(notes))
    bounded, limit = _over_limits(data)
    msg = _message(bounded, notes, headersonly=limit is not None)
    linesep = b"\r\n" if b"\r\n" in data[:4096] else b"\n"
    parts = _Parts(linesep=linesep, hint=_charset_hint(msg), defects=notes)
    if limit is None:
        _walk(msg, parts)
    mail = _build(msg, parts, data)
    fatal = limit or _fatal(data, mail)
    return replace(mail, fatal=fatal) if fatal else mail


def parse(raw: bytes) -> ParsedMail:
    """Make what we can of any bytes; never raises (DESIGN 2: defects listed, not thrown)."""
    try:
        return _parse(raw)
    except Exception as exc:  # noqa: BLE001 — unparseable mail is quarantined, not refused
        reason = f"parser error: {type(exc).__name__}"
        return _empty(bytes(raw) if isinstance(raw, bytes | bytearray) else b"", reason,
                      (f"parser-error:{type(exc).__name__}",))
