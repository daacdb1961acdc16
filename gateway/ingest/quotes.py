"""What the sender newly wrote: quoted history and signature cut off a plain text (issue 12).

mail-parser-reply finds the quote headers and signatures of many languages; the patterns
here cover what it misses for our customers (checked for en, de, nl and zh):
- Chinese "在 … 写道：" (Gmail, Thunderbird) and Apple Mail's "2024年1月5日 … 写道：" (its own
  zh pattern can never match: its negative lookahead forbids what the group requires);
- Apple Mail's Dutch "Op … heeft … het volgende geschreven:";
- Outlook header blocks written with a full-width colon ("发件人：") or after a rule line;
- "-----Original Message-----" in German and Dutch, Yahoo's "--- On … wrote:", and the
  Russian "… написал:" of Android's mail app;
- phone footers in German, Dutch and Chinese ("Von meinem iPhone gesendet", "发自我的iPhone").
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from itertools import chain

from mailparser_reply import EmailMessage
from mailparser_reply.constants import GENERIC_MAIL_SEPARATOR, MAIL_LANGUAGES
from mailparser_reply.parser import EmailReply

# Languages whose quote headers and signatures mail-parser-reply should look for.
REPLY_LANGUAGES = ("en", "de", "nl", "zh")

_QUOTE = r"(?:> ?)*"
# Each quote header of ours (the "^" in front left off) with the literals one of which it
# needs: a text holding none of them cannot match it, so it is not searched for.
_OUR_ALTERNATIVES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (rf"{_QUOTE}在\s*.{{4,200}}?写道\s*[:：]\s*$", ("写道",)),
    # Gmail "Support <s@x> 于2026年11月23日周一 10:00写道：", Apple "2026年11月23日 … 写道："
    (rf"{_QUOTE}.{{0,200}}?\d{{4}}\s*年\s*\d{{1,2}}\s*月\s*\d{{1,2}}\s*日.{{0,200}}?写道\s*[:：]\s*$",
     ("写道",)),
    (rf"{_QUOTE}Op\s.{{4,200}}?het volgende geschreven\s*:\s*$", ("het volgende geschreven",)),
    (rf"{_QUOTE}Op\s.{{4,200}}?\sschreef\s.{{0,200}}?:\s*$",  # Gmail: "… schreef Naam <a@b>:"
     ("schreef",)),
    (rf"{_QUOTE}-+ ?On\s.{{4,200}}?wrote\s*:\s*$", ("wrote",)),  # Yahoo: "--- On … wrote:"
    (rf"{_QUOTE}.{{4,200}}?(?:\n{_QUOTE}.{{0,200}}?)?написал[аи]?\s*:\s*$",  # Android, ru
     ("написал",)),
    (rf"{_QUOTE}[* ]*(?:发件人|寄件者)\s*[:：].*\n(?:.*\n){{0,2}}?{_QUOTE}[* ]*"
     rf"(?:发送时间|日期|寄件日期|收件人|主题)\s*[:：]", ("发件人", "寄件者")),
    (rf"{_QUOTE}-{{3,}} ?(?:Ursprüngliche Nachricht|Oorspronkelijk bericht|原始邮件) ?-{{3,}}\s*$",
     ("Ursprüngliche Nachricht", "Oorspronkelijk bericht", "原始邮件")),
    (rf"{_QUOTE}_{{20,}}\s*\n{_QUOTE}[* ]*(?:From|Von|Van|发件人)\s*[:：]", ("_" * 20,)),
)
_OUR_HEADERS = re.compile("|".join("^" + alt for alt, _ in _OUR_ALTERNATIVES), re.MULTILINE)
# RFC 3676 section 4.3 "-- " and the phone footers mail-parser-reply knows only in English.
_SIGNATURE_LINES = (r"(?:-- ?|Von meinem \S+ gesendet|Verstuurd vanaf mijn \S+"
                    r"|Verzonden (?:vanaf|met) mijn \S+|发自我的\s*\S+|从我的\s*\S+发送)\s*$")
_SIGNATURE = re.compile("^" + _SIGNATURE_LINES, re.MULTILINE)
# The same searched in "\n" + text: a line start is just after a "\n", and a pattern with a
# literal first character is found by a fast scan instead of trying every position.
_SIGNATURE_NL = re.compile(r"\n" + _SIGNATURE_LINES, re.MULTILINE)
_QUOTED_LINE = re.compile(r"^\s*>")
SCAN_CHARS = 50_000


def _cut_our_headers(text: str) -> str:
    """Text above the first quote header our own patterns know (all of it when none is)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = _our_header_start(text)
    return text[:start] if start is not None and text[:start].strip() else text


def _our_header_start(text: str) -> int | None:
    """Where _OUR_HEADERS.search(text) matches: the leftmost match of any alternative, so
    the alternatives whose literals are missing can be left out of the search."""
    chosen = tuple(i for i, (_, needs) in enumerate(_OUR_ALTERNATIVES)
                   if any(word in text for word in needs))
    if not chosen:
        return None
    match = _our_pattern(chosen).search("\n" + text)
    return match.start() if match else None


@lru_cache(maxsize=64)
def _our_pattern(chosen: tuple[int, ...]) -> re.Pattern[str]:
    alternatives = "|".join(_OUR_ALTERNATIVES[i][0] for i in chosen)
    return re.compile(rf"\n(?:{alternatives})", re.MULTILINE)


def _drop_outer_quotes(text: str) -> str:
    """Blocks of "> " lines at the start (bottom-posting) or end are quoted history even
    without a header line; quotes between new lines (inline answers) stay."""
    lines = text.strip().split("\n")
    start, end = 0, len(lines)
    while end > start and (_QUOTED_LINE.match(lines[end - 1]) or not lines[end - 1].strip()):
        end -= 1
    while start < end and (_QUOTED_LINE.match(lines[start]) or not lines[start].strip()):
        start += 1
    return "\n".join(lines[start:end])


def _message(text: str) -> EmailMessage:
    # keep_hyphen_lists: a "- item" line is a list, not the start of a signature.
    return EmailMessage(text=text, languages=list(REPLY_LANGUAGES), keep_hyphen_lists=True)


def _parsed(text: str) -> EmailMessage:
    return _message(text).read()


# --- the newest reply as mail-parser-reply finds it, without running what cannot match ------
#
# EmailMessage.read() runs its header, signature and disclaimer patterns over the whole text
# (about 2.5 ms per 5 KB), although we only keep replies[0]. Below is the same computation:
# its headers are found lazily until the first reply with content, and a pattern is run only
# when the text holds what every match of it needs. Those needs were read off the patterns of
# mail-parser-reply 1.36 (_CHECKED); any other version takes the library's own path.

_LIBRARY = _message("")
_HEADER_REGEX = _LIBRARY.HEADER_REGEX
_SIGNATURE_REGEX = _LIBRARY.SIGNATURE_REGEX
_DISCLAIMERS_REGEX = _LIBRARY.DISCLAIMERS_REGEX
_CHECKED = ("1.36", "ddc2c6cac177c60f99c56d1a059f3c97b9bfdf4702eb35a48ed0bbddc6e7869e")
_LANGS = _LIBRARY.languages
_HEADER_ALTERNATIVES = (
    [MAIL_LANGUAGES[lang]["wrote_header"] for lang in _LANGS]
    + [MAIL_LANGUAGES[lang]["from_header"] for lang in _LANGS]
    + [f"({GENERIC_MAIL_SEPARATOR})"])


def _library_checked() -> bool:
    patterns = (_HEADER_REGEX.pattern, _SIGNATURE_REGEX.pattern, _DISCLAIMERS_REGEX.pattern)
    digest = hashlib.sha256("\n".join(patterns).encode()).hexdigest()
    try:
        installed = version("mail-parser-reply")
    except PackageNotFoundError:
        return False
    return ((installed, digest) == _CHECKED
            and "|".join(_HEADER_ALTERNATIVES) == _HEADER_REGEX.pattern)


FAST = _library_checked()

# Header fields per language, from its from_header pattern ("(?:From|Sent|…):").
_FIELDS = [{w.lower() for w in re.search(r"\(\?:([^()]*)\):", MAIL_LANGUAGES[lang]["from_header"])
            .group(1).split("|")} for lang in _LANGS]
# A field line as the from_header patterns start one, in "\n" + the folded text.
_FIELD_LINE = re.compile(r"\n[> *]*({}):".format("|".join(sorted(set().union(*_FIELDS)))))
# What a match of each wrote_header and of the generic separator needs (folded).
_WROTE_NEEDS = {"en": "wrote:", "de": "schrieb", "nl": "schreef:", "zh": "写道："}
_GENERIC_NEEDS = "original message"
# What a match of SIGNATURE_REGEX needs at a line start: "--"/"__" on its own line, the
# Outlook rule, "sent from" words or a signature word (each only as far as is sure).
_MAY_SIGN = re.compile(
    r"\n(?:\n ?[_-]{32}|[> ]*(?:[-_]{2}\n|sent from my|get outlook for|gesendet von"
    r"|verzonden vanaf mijn|从我的|best|kind regards|thank|all the best|regards,"
    r"|mit freundlichen|beste|liebe |viele |gr[üu]|met vriendelijke groet|hartelijke groeten"
    r"|bedankt,|dank u,|此致，|敬礼，|谢谢|祝好，))")
# A match of DISCLAIMERS_REGEX has one of these words and "mail".
_MAY_DISCLAIM = re.compile(r"caution:|disclaimer|warning:|confidential|notice:|note:"
                           r"|information:|hinweis:|achtung:|waarschuwing:|免责声明：|注意：|重要信息：")
_SEPARATOR_HINT = re.compile(r"\n\n ?[_-]{32}")


def _folded(text: str) -> str:
    """Lower case such that every text an IGNORECASE pattern of the library matches holds
    the pattern's literal in lower case: re also matches "İ" and "ı" to "i", "ſ" to "s"."""
    low = text.lower()
    if not low.isascii():
        low = low.replace("\u0307", "").replace("ı", "i").replace("ſ", "s")
    return low


def _normalized(text: str) -> str:
    """EmailMessage's text: line ends, stripped lines, rules after a word moved down."""
    lines = "\n".join([line.strip() for line in text.replace("\r\n", "\n").split("\n")])
    return _message(text).text if _SEPARATOR_HINT.search(lines) else lines


def _header_pattern(low: str) -> re.Pattern[str] | None:
    """HEADER_REGEX without the alternatives that cannot match (None when none can)."""
    chosen = [i for i, lang in enumerate(_LANGS) if _WROTE_NEEDS[lang] in low]
    lines = [0] * len(_LANGS)
    for match in _FIELD_LINE.finditer("\n" + low):
        for i, fields in enumerate(_FIELDS):
            lines[i] += match.group(1) in fields
    chosen += [len(_LANGS) + i for i, count in enumerate(lines) if count >= 2]  # {2,} lines
    if _GENERIC_NEEDS in low:
        chosen.append(2 * len(_LANGS))
    return _headers_of(tuple(chosen)) if chosen else None


@lru_cache(maxsize=128)
def _headers_of(chosen: tuple[int, ...]) -> re.Pattern[str]:
    return re.compile("|".join(_HEADER_ALTERNATIVES[i] for i in chosen),
                      re.MULTILINE | re.IGNORECASE)


def _headers(text: str) -> chain[str]:
    """The flat list of header texts read() finds, lazily."""
    pattern = _header_pattern(_folded(text))
    matches = pattern.finditer(text) if pattern else ()
    return chain.from_iterable((group for group in m.groups() if group) for m in matches)


def _newest_reply(text: str, cuts: bool) -> EmailReply:
    """_parsed(text).replies[0]; its signature and disclaimers only when cuts is true."""
    text = _normalized(text)
    current_position, previous_header = 0, ""
    content = None
    for header in _headers(text):  # the loop of EmailMessage.read() up to its first reply
        position = text.find(header, current_position + 1 if current_position > 0
                             else current_position)
        if text[current_position:position].strip():
            content = text[current_position:position]
            break
        current_position = position if position >= 0 else 0
        previous_header = header
    if content is None:
        content = text[current_position:]
    if not cuts:
        return EmailReply(content=content, headers=previous_header)
    low = _folded(content)
    disclaimers = (_DISCLAIMERS_REGEX.findall(content)
                   if "mail" in low and _MAY_DISCLAIM.search(low) else [])
    signature = _SIGNATURE_REGEX.search(content) if _MAY_SIGN.search("\n" + low) else None
    return EmailReply(content=content, headers=previous_header, disclaimers=disclaimers,
                      signatures=signature.group() if signature else "")


def _library_part(text: str, attribute: str) -> str:
    """The newest reply's body or full_body as the library finds it (the text if none)."""
    replies = _parsed(text).replies
    return str(getattr(replies[0], attribute)) if replies else text


def reply_part(text: str) -> str:
    """The newest reply with its signature: quoted history removed, nothing else."""
    text = _cut_our_headers(text)
    newest = _newest_reply(text, cuts=False).full_body if FAST else \
        _library_part(text, "full_body")
    return _drop_outer_quotes(newest).strip()


def visible_text(text: str) -> str:
    """What the sender newly wrote, without quoted history and signature.

    Falls back to the whole text when cutting would leave nothing: an agent must never
    see an empty message that had words in it. Only the first SCAN_CHARS are searched
    (the cost is linear, about a second per MB); a longer text shows whole unless a cut
    was found there.
    """
    if len(text) > SCAN_CHARS:
        newest = _visible(text[:SCAN_CHARS])
        return newest if len(newest) < SCAN_CHARS // 2 else text.strip()
    return _visible(text)


def _visible(text: str) -> str:
    text = _cut_our_headers(text)
    newest = _newest_reply(text, cuts=True).body if FAST else _library_part(text, "body")
    delimiter = _SIGNATURE_NL.search("\n" + newest)
    if delimiter:
        newest = newest[:delimiter.start()]
    newest = _drop_outer_quotes(newest).strip()
    return newest or text.strip()


# --- the straightforward path: what the above must equal (tests compare the two) ------------

def _reply_part_reference(text: str) -> str:
    text = _cut_our_headers_reference(text)
    replies = _parsed(text).replies
    newest = replies[0].full_body if replies else text
    return _drop_outer_quotes(newest).strip()


def _visible_text_reference(text: str) -> str:
    if len(text) > SCAN_CHARS:
        newest = _visible_reference(text[:SCAN_CHARS])
        return newest if len(newest) < SCAN_CHARS // 2 else text.strip()
    return _visible_reference(text)


def _cut_our_headers_reference(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    match = _OUR_HEADERS.search(text)
    return text[:match.start()] if match and text[:match.start()].strip() else text


def _visible_reference(text: str) -> str:
    text = _cut_our_headers_reference(text)
    replies = _parsed(text).replies
    newest = replies[0].body if replies else text
    delimiter = _SIGNATURE.search(newest)
    if delimiter:
        newest = newest[:delimiter.start()]
    newest = _drop_outer_quotes(newest).strip()
    return newest or text.strip()
