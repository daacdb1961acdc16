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

import re

from mailparser_reply import EmailMessage

# Languages whose quote headers and signatures mail-parser-reply should look for.
REPLY_LANGUAGES = ("en", "de", "nl", "zh")

_QUOTE = r"(?:> ?)*"
_OUR_HEADERS = re.compile("|".join([
    rf"^{_QUOTE}在\s*.{{4,200}}?写道\s*[:：]\s*$",
    # Gmail "Support <s@x> 于2026年11月23日周一 10:00写道：", Apple "2026年11月23日 … 写道："
    rf"^{_QUOTE}.{{0,200}}?\d{{4}}\s*年\s*\d{{1,2}}\s*月\s*\d{{1,2}}\s*日.{{0,200}}?写道\s*[:：]\s*$",
    rf"^{_QUOTE}Op\s.{{4,200}}?het volgende geschreven\s*:\s*$",
    rf"^{_QUOTE}Op\s.{{4,200}}?\sschreef\s.{{0,200}}?:\s*$",  # Gmail: "… schreef Naam <a@b>:"
    rf"^{_QUOTE}-+ ?On\s.{{4,200}}?wrote\s*:\s*$",  # Yahoo: "--- On Wed, 4/4/12, … wrote:"
    rf"^{_QUOTE}.{{4,200}}?(?:\n{_QUOTE}.{{0,200}}?)?написал[аи]?\s*:\s*$",  # Android, ru
    rf"^{_QUOTE}[* ]*(?:发件人|寄件者)\s*[:：].*\n(?:.*\n){{0,2}}?{_QUOTE}[* ]*"
    rf"(?:发送时间|日期|寄件日期|收件人|主题)\s*[:：]",
    rf"^{_QUOTE}-{{3,}} ?(?:Ursprüngliche Nachricht|Oorspronkelijk bericht|原始邮件) ?-{{3,}}\s*$",
    rf"^{_QUOTE}_{{20,}}\s*\n{_QUOTE}[* ]*(?:From|Von|Van|发件人)\s*[:：]",
]), re.MULTILINE)
# RFC 3676 section 4.3 "-- " and the phone footers mail-parser-reply knows only in English.
_SIGNATURE = re.compile(r"^(?:-- ?|Von meinem \S+ gesendet|Verstuurd vanaf mijn \S+"
                        r"|Verzonden (?:vanaf|met) mijn \S+|发自我的\s*\S+|从我的\s*\S+发送)\s*$",
                        re.MULTILINE)
_QUOTED_LINE = re.compile(r"^\s*>")
SCAN_CHARS = 50_000


def _cut_our_headers(text: str) -> str:
    """Text above the first quote header our own patterns know (all of it when none is)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    match = _OUR_HEADERS.search(text)
    return text[:match.start()] if match and text[:match.start()].strip() else text


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


def _parsed(text: str) -> EmailMessage:
    # keep_hyphen_lists: a "- item" line is a list, not the start of a signature.
    return EmailMessage(text=text, languages=list(REPLY_LANGUAGES),
                        keep_hyphen_lists=True).read()


def reply_part(text: str) -> str:
    """The newest reply with its signature: quoted history removed, nothing else."""
    text = _cut_our_headers(text)
    replies = _parsed(text).replies
    newest = replies[0].full_body if replies else text
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
    replies = _parsed(text).replies
    newest = replies[0].body if replies else text
    delimiter = _SIGNATURE.search(newest)
    if delimiter:
        newest = newest[:delimiter.start()]
    newest = _drop_outer_quotes(newest).strip()
    return newest or text.strip()
