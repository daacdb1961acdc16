"""Agent commands by mail (`#close`, `#priority high` …) and what of a reply the customer sees.

Pure: text in, parsed commands and cleaned text out. The agent path (path.py) applies them.
Keywords are accepted in en, de, nl and zh, case-insensitively, with full-width `＃` too
(NFKC), and canonicalised; README "Commands by mail" lists them.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from gateway.ingest.quotes import reply_part
from gateway.tickets.sla_config import PRIORITIES

# Top line of every notification: the agent's answer is what they type above it. Matched by
# its `##- … -##` shape, so a department's own wording (any language) cuts the same way.
REPLY_MARKER = "##- Please type your reply above this line -##"
REPLY_MARKERS = {
    "en": REPLY_MARKER,
    "de": "##- Bitte geben Sie Ihre Antwort oberhalb dieser Zeile ein -##",
    "nl": "##- Typ uw antwoord boven deze regel -##",
    "zh": "##- 请在此行上方输入您的回复 -##",
}
_MARKER_LINE = re.compile(r"^[>\s]*##-.*-##\s*$")

# Canonical name -> accepted keywords (compared after NFKC + casefold: "ß" -> "ss").
KEYWORDS: dict[str, tuple[str, ...]] = {
    "close": ("close", "schliessen", "schließen", "sluiten", "关闭"),
    "hold": ("hold", "on-hold", "zurückstellen", "zurueckstellen", "parkeren", "挂起"),
    "waiting": ("waiting", "wait", "warten", "wachten", "等待"),
    "open": ("open", "reopen", "öffnen", "oeffnen", "openen", "heropenen", "打开", "重新打开"),
    "escalate": ("escalate", "eskalieren", "escaleren", "升级"),
    "note": ("note", "notiz", "notitie", "备注"),
    "assign": ("assign", "zuweisen", "toewijzen", "分配"),
    "priority": ("priority", "prio", "priorität", "prioritaet", "prioriteit", "优先级"),
    "tag": ("tag", "schlagwort", "label", "标签"),
    "set": ("set", "setzen", "instellen", "设置"),
    "force": ("force", "erzwingen", "forceren", "强制"),
}
# Localized priority values -> canonical (gateway/tickets/sla_config.PRIORITIES).
PRIORITY_WORDS: dict[str, tuple[str, ...]] = {
    "high": ("high", "hoch", "hoog", "高"),
    "medium": ("medium", "mittel", "gemiddeld", "中"),
    "low": ("low", "niedrig", "laag", "低"),
    "none": ("none", "keine", "geen", "无"),
}
assert set(PRIORITY_WORDS) == set(PRIORITIES)
NO_ARGS = frozenset({"close", "hold", "waiting", "open", "escalate", "force"})

_LOOKUP = {unicodedata.normalize("NFKC", k).casefold(): name
           for name, words in KEYWORDS.items() for k in words}
_PRIORITY = {unicodedata.normalize("NFKC", k).casefold(): name
             for name, words in PRIORITY_WORDS.items() for k in words}
# A command word: `#` then a letter (not a digit: `#1234` is a ticket number, `# Title` and
# `##-` are not words), then letters, digits or hyphens.
_WORD = r"[#＃]([^\W\d_][\w-]*)"
_BODY_COMMAND = re.compile(rf"^\s*{_WORD}(?:\s+(.*?))?\s*$")
_SUBJECT_TOKEN = re.compile(rf"(?<!\S){_WORD}(?=\s|$)")
_FIELD = re.compile(r"^([A-Za-z_][\w.-]*)\s*=\s*(.*)$")
# Where the agent's own text ends and quoted history begins (commands below it are quotes).
_HISTORY = re.compile("|".join([
    r"^\s*>",
    r"^.{0,300}\b(?:wrote|schrieb|schreef|geschreven)\s*:\s*$",
    r"^.{0,300}写道\s*[:：]\s*$",
    r"^\s*-{2,}\s*(?:Original Message|Ursprüngliche Nachricht|Oorspronkelijk bericht|"
    r"原始邮件|Forwarded message|Weitergeleitete Nachricht|Doorgestuurd bericht)\s*-{2,}",
    r"^\s*_{10,}\s*$",
]), re.IGNORECASE)
# Outlook's header block: "From:" followed by "Sent:" (or its kin) within the next lines.
_HEADER_FROM = re.compile(r"^\s*[*]?(?:From|Von|Van|发件人|寄件者)\s*[*]?\s*[:：]\s*\S", re.I)
_HEADER_NEXT = re.compile(r"^\s*[*]?(?:Sent|Date|To|Gesendet|Datum|An|Verzonden|Aan|发送时间|日期|"
                          r"收件人|寄件日期)\s*[*]?\s*[:：]", re.I)


@dataclass(frozen=True, slots=True)
class Command:
    name: str  # canonical: one of KEYWORDS
    args: tuple[str, ...]
    source: str  # "subject" | "body"


@dataclass(frozen=True, slots=True)
class ParsedCommands:
    commands: tuple[Command, ...]
    unknown: tuple[str, ...]  # e.g. ("#clsoe",): reported back to the agent, never sent
    errors: tuple[str, ...]  # e.g. "#priority needs one of: high, medium, low, none"
    subject: str  # subject with command words removed
    body: str  # body with command lines removed

    def has(self, name: str) -> bool:
        return any(c.name == name for c in self.commands)


def canonical(word: str) -> str | None:
    """`Schließen` -> "close"; None when the word is no command."""
    return _LOOKUP.get(unicodedata.normalize("NFKC", word).casefold())


def _args(name: str, written: str, rest: str, source: str) -> tuple[Command | None, str | None]:
    """The command with its checked arguments, or the error to report back."""
    words = rest.split()
    if name in NO_ARGS:
        if words:
            return None, f"{written} takes no argument (got {rest!r})"
        return Command(name, (), source), None
    if name == "note":  # the rest of the line stays as text of the note (see parse_commands)
        return Command(name, (), source), None
    if name == "priority":
        value = _PRIORITY.get(unicodedata.normalize("NFKC", rest).strip().casefold())
        if value is None:
            return None, f"{written} needs one of: {', '.join(PRIORITIES)}"
        return Command(name, (value,), source), None
    if name == "assign":
        if not words:
            return None, f"{written} needs an agent's address or name"
        who = " ".join(words)
        return Command(name, (who.lower() if "@" in who else who,), source), None
    if name == "tag":
        tags = tuple(t for t in re.split(r"[\s,]+", rest) if t)
        if not tags:
            return None, f"{written} needs at least one tag"
        return Command(name, tags, source), None
    match = _FIELD.match(rest.strip())  # set
    if not match or not match.group(2).strip():
        return None, f"{written} needs field=value"
    return Command(name, (match.group(1), match.group(2).strip()), source), None


def _own_text_end(lines: list[str]) -> int:
    """Index of the first line of quoted history (or of the marker); len(lines) if none."""
    for index, line in enumerate(lines):
        if _MARKER_LINE.match(line) or _HISTORY.match(line):
            return index
        if _HEADER_FROM.match(line) and any(map(_HEADER_NEXT.match, lines[index + 1:index + 4])):
            return index
    return len(lines)


def _parse_body(body: str) -> tuple[list[Command], list[str], list[str], str]:
    lines = body.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    end = _own_text_end(lines)
    commands: list[Command] = []
    unknown: list[str] = []
    errors: list[str] = []
    kept: list[str] = []
    for index, line in enumerate(lines):
        match = _BODY_COMMAND.match(line) if index < end else None
        if match is None:
            kept.append(line)
            continue
        written, rest = f"#{match.group(1)}", match.group(2) or ""
        name = canonical(match.group(1))
        if name is None:
            unknown.append(written)
            continue
        command, error = _args(name, written, rest, "body")
        if command is not None:
            commands.append(command)
            if name == "note" and rest:
                kept.append(rest)  # "#note called her back" keeps its words as the note
        if error is not None:
            errors.append(error)
    return commands, unknown, errors, "\n".join(kept).strip("\n")


# In the subject a command may take its argument from the next word.
_SUBJECT_ARGS = frozenset({"priority", "assign", "tag", "set"})


def _parse_subject(subject: str) -> tuple[list[Command], list[str], str]:
    """Known command words are taken out of the subject; other `#words` stay, unreported:
    a subject usually repeats the customer's words, and those are not commands."""
    text = subject
    commands: list[Command] = []
    errors: list[str] = []
    spans: list[tuple[int, int]] = []
    for match in _SUBJECT_TOKEN.finditer(text):
        name = canonical(match.group(1))
        if name is None or spans and match.start() < spans[-1][1]:
            continue
        end, rest = match.end(), ""
        if name in _SUBJECT_ARGS:
            following = re.match(r"\s+(\S+)", text[end:])
            if following and not following.group(1).startswith(("#", "＃")):
                end, rest = end + following.end(), following.group(1)
        command, error = _args(name, f"#{match.group(1)}", rest, "subject")
        commands += [command] if command else []
        errors += [error] if error else []
        spans.append((match.start(), end))
    for start, end in reversed(spans):
        text = text[:start] + text[end:]
    return commands, errors, " ".join(text.split()) if spans else subject


def parse_commands(subject: str, body: str) -> ParsedCommands:
    """Commands of an agent's mail: `#word` lines of their own text, `#word`s of the subject."""
    subject_commands, subject_errors, clean_subject = _parse_subject(subject)
    body_commands, unknown, body_errors, clean_body = _parse_body(body)
    return ParsedCommands(tuple(subject_commands + body_commands), tuple(unknown),
                          tuple(subject_errors + body_errors), clean_subject, clean_body)


def strip_internal(text: str) -> str:
    """What the customer may see of an agent's reply: the text above the notification's
    marker, without the quoted history ("On … wrote:", Outlook's header block, "> " lines)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    cut = next((i for i, line in enumerate(lines) if _MARKER_LINE.match(line)), None)
    own = "\n".join(lines[:cut]).strip()
    answer = reply_part(own) if own else ""
    return answer or _bottom_posted(lines[cut + 1:] if cut is not None else [])


def _bottom_posted(below: list[str]) -> str:
    """Nothing above the marker: an answer written under the quoted notification."""
    quoted = [i for i, line in enumerate(below) if line.lstrip().startswith(">")]
    return "\n".join(below[quoted[-1] + 1:]).strip() if quoted else ""
