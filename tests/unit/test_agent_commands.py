"""Agent commands by mail and what the customer sees of an agent's reply (pure, issue 6)."""

from __future__ import annotations

import pytest

from gateway.agentmail.commands import (
    KEYWORDS,
    PRIORITY_WORDS,
    REPLY_MARKER,
    REPLY_MARKERS,
    Command,
    canonical,
    parse_commands,
    strip_internal,
)
from gateway.tickets.sla_config import PRIORITIES


def body(text: str) -> tuple[Command, ...]:
    return parse_commands("", text).commands


# --- commands and keywords ----------------------------------------------------------------

@pytest.mark.parametrize(("keyword", "name"), [
    (k, name) for name, words in KEYWORDS.items() for k in words])
def test_every_keyword_is_canonicalised(keyword: str, name: str) -> None:
    assert canonical(keyword) == name
    assert canonical(keyword.upper()) == name


@pytest.mark.parametrize(("line", "name"), [
    ("#close", "close"), ("#Schließen", "close"), ("#SCHLIESSEN", "close"), ("#sluiten", "close"),
    ("#关闭", "close"), ("＃关闭", "close"), ("#hold", "hold"), ("#挂起", "hold"),
    ("#waiting", "waiting"), ("#warten", "waiting"), ("#wachten", "waiting"),
    ("#open", "open"), ("#escalate", "escalate"), ("#force", "force"), ("#erzwingen", "force"),
    ("  #note", "note"), ("#Notiz", "note"), ("#notitie", "note"), ("#备注", "note"),
])
def test_a_command_line_without_arguments(line: str, name: str) -> None:
    parsed = parse_commands("", f"Thanks for waiting.\n{line}\nBest, Ann")
    assert parsed.commands == (Command(name, (), "body"),)
    assert parsed.body == "Thanks for waiting.\nBest, Ann"
    assert parsed.unknown == parsed.errors == ()


@pytest.mark.parametrize(("line", "value"), [
    ("#priority high", "high"), ("#PRIORITY Low", "low"), ("#prio medium", "medium"),
    ("#priorität hoch", "high"), ("#prioritaet niedrig", "low"), ("#Priorität keine", "none"),
    ("#prioriteit hoog", "high"), ("#prioriteit gemiddeld", "medium"), ("#prioriteit laag", "low"),
    ("#优先级 高", "high"), ("#优先级 低", "low"), ("#优先级 无", "none"),
])
def test_priority_values_are_localized_and_canonical(line: str, value: str) -> None:
    assert body(line) == (Command("priority", (value,), "body"),)


def test_every_canonical_priority_has_words() -> None:
    assert set(PRIORITY_WORDS) == set(PRIORITIES)


def test_assign_takes_an_address_or_a_name() -> None:
    lines = "#assign Shawn@Example.ORG\n#zuweisen Kim\n#toewijzen Jan de Vries\n#分配 张三"
    assert body(lines) == (
        Command("assign", ("shawn@example.org",), "body"), Command("assign", ("Kim",), "body"),
        Command("assign", ("Jan de Vries",), "body"), Command("assign", ("张三",), "body"))


def test_tags_may_be_several_on_a_line_and_on_several_lines() -> None:
    assert body("#tag vip, refund\n#tag billing\n#label nl\n#标签 退款") == (
        Command("tag", ("vip", "refund"), "body"), Command("tag", ("billing",), "body"),
        Command("tag", ("nl",), "body"), Command("tag", ("退款",), "body"))


def test_set_takes_field_equals_value() -> None:
    assert body("#set product=Widget Pro\n#setzen order_no = 77") == (
        Command("set", ("product", "Widget Pro"), "body"),
        Command("set", ("order_no", "77"), "body"))


def test_a_note_keeps_the_words_after_it_as_text() -> None:
    parsed = parse_commands("", "#note called her back, she is fine\nMore details.")
    assert parsed.commands == (Command("note", (), "body"),)
    assert parsed.body == "called her back, she is fine\nMore details."


# --- the subject --------------------------------------------------------------------------

def test_subject_commands_are_taken_out_of_the_subject() -> None:
    parsed = parse_commands("Re: [#1234] Refund for order 77 #close #priority high", "Done.")
    assert parsed.commands == (Command("close", (), "subject"),
                               Command("priority", ("high",), "subject"))
    assert parsed.subject == "Re: [#1234] Refund for order 77"
    assert parsed.body == "Done."


def test_localized_subject_commands() -> None:
    parsed = parse_commands("AW: [#9] Rechnung #Schließen #tag mahnung", "")
    assert parsed.commands == (Command("close", (), "subject"),
                               Command("tag", ("mahnung",), "subject"))
    assert parsed.subject == "AW: [#9] Rechnung"


def test_a_subject_command_missing_its_argument_is_an_error() -> None:
    parsed = parse_commands("Re: x #priority #close", "")
    assert parsed.errors == ("#priority needs one of: high, medium, low, none",)
    assert parsed.commands == (Command("close", (), "subject"),)
    assert parsed.subject == "Re: x"


def test_other_subject_hashtags_stay_and_are_not_reported() -> None:
    """A subject mostly repeats the customer's words; their hashtags are not commands."""
    parsed = parse_commands("Re: [#1234] Order #5521 for #TeamBlue", "")
    assert parsed == parse_commands("Re: [#1234] Order #5521 for #TeamBlue", "")
    assert (parsed.commands, parsed.unknown, parsed.errors) == ((), (), ())
    assert parsed.subject == "Re: [#1234] Order #5521 for #TeamBlue"


# --- unknown, malformed and non-commands --------------------------------------------------

def test_an_unknown_command_is_reported_and_removed_from_the_body() -> None:
    parsed = parse_commands("", "Your refund is on its way.\n#clsoe")
    assert parsed.unknown == ("#clsoe",)
    assert parsed.commands == ()
    assert parsed.body == "Your refund is on its way."


@pytest.mark.parametrize(("line", "error"), [
    ("#priority urgent", "#priority needs one of: high, medium, low, none"),
    ("#priority", "#priority needs one of: high, medium, low, none"),
    ("#assign", "#assign needs an agent's address or name"),
    ("#tag", "#tag needs at least one tag"),
    ("#set product", "#set needs field=value"),
    ("#set =x", "#set needs field=value"),
    ("#set product=", "#set needs field=value"),
    ("#close now please", "#close takes no argument (got 'now please')"),
    ("#Schließen bitte", "#Schließen takes no argument (got 'bitte')"),
])
def test_a_malformed_command_is_an_error_and_is_not_applied(line: str, error: str) -> None:
    parsed = parse_commands("", f"Hello\n{line}")
    assert parsed.errors == (error,)
    assert parsed.commands == () and parsed.unknown == ()
    assert parsed.body == "Hello"


@pytest.mark.parametrize("text", [
    "#1234 is your ticket number",
    "# Steps to reproduce",
    "## Heading",
    "##- Please type your reply above this line -##",
    "Use C# or F#, not #close in the middle of a line",
    "mail me at a#b@example.org",
    "#",
    "[#1234] was closed",
])
def test_hash_signs_that_are_not_commands(text: str) -> None:
    parsed = parse_commands("", text)
    assert (parsed.commands, parsed.unknown, parsed.errors) == ((), (), ())
    assert parsed.body == text


def test_commands_in_quoted_history_are_ignored() -> None:
    text = ("Sure.\n\nOn Mon, 23 Nov 2026 at 10:00, Kim <kim@example.test> wrote:\n"
            "> #close\n> #clsoe\n")
    parsed = parse_commands("", text)
    assert (parsed.commands, parsed.unknown) == ((), ())
    assert parsed.body == text.rstrip("\n")


def test_commands_below_the_marker_are_ignored() -> None:
    parsed = parse_commands("", f"#hold\n\n{REPLY_MARKER}\n#note (help text)\n#close\n")
    assert parsed.commands == (Command("hold", (), "body"),)


def test_commands_below_an_outlook_header_block_are_ignored() -> None:
    text = ("Erledigt.\n#waiting\n\nVon: Jess via Support <support+1.ab@example.test>\n"
            "Gesendet: Montag, 23. November 2026 10:00\nAn: Ann\n\n#close\n")
    assert body(text) == (Command("waiting", (), "body"),)


def test_a_from_line_of_the_agents_own_text_does_not_end_it() -> None:
    assert body("From: our warehouse, the parcel ships today.\n#close") == (
        Command("close", (), "body"),)


def test_crlf_bodies() -> None:
    parsed = parse_commands("", "Done.\r\n#close\r\n")
    assert parsed.commands == (Command("close", (), "body"),)
    assert parsed.body == "Done."


# --- what the customer sees ---------------------------------------------------------------

NOTIFICATION = (f"{REPLY_MARKER}\n\nNew ticket 12 from Jess <jess@example.org>:\n\n"
                "Hello, I need a refund.\n\nTicket:    12 (Support)\nOwner:     nobody yet\n")


def _quoted(text: str) -> str:
    return "\n".join(f"> {line}" if line else ">" for line in text.split("\n"))


def test_gmail_reply_keeps_the_answer_and_signature() -> None:
    reply = ("Hi Jess,\n\nyour refund is on its way.\n\nBest,\nAnn\n\n"
             "On Mon, 23 Nov 2026 at 10:00, Jess via Support <support+12.ab@example.test> "
             "wrote:\n" + _quoted(NOTIFICATION))
    assert strip_internal(reply) == "Hi Jess,\n\nyour refund is on its way.\n\nBest,\nAnn"


def test_outlook_reply_with_its_header_block_and_unquoted_copy() -> None:
    reply = ("Your refund is on its way.\r\n\r\nAnn\r\n\r\n"
             "________________________________\r\n"
             "From: Jess via Support <support+12.ab@example.test>\r\n"
             "Sent: Monday, November 23, 2026 10:00 AM\r\nTo: Ann <ann@example.test>\r\n"
             "Subject: [#12] New ticket: Refund\r\n\r\n" + NOTIFICATION.replace("\n", "\r\n"))
    assert strip_internal(reply) == "Your refund is on its way.\n\nAnn"


def test_thunderbird_german_reply() -> None:
    reply = ("Die Erstattung ist unterwegs.\n\nGrüße\nAnn\n\n"
             "Am 23.11.26 um 10:00 schrieb Jess via Support:\n"
             + _quoted(NOTIFICATION.replace(REPLY_MARKER, REPLY_MARKERS["de"])))
    assert strip_internal(reply) == "Die Erstattung ist unterwegs.\n\nGrüße\nAnn"


def test_chinese_gmail_reply() -> None:
    reply = ("退款已处理。\n\nJess via Support <support+12.ab@example.test> "
             "于2026年11月23日周一 10:00写道：\n"
             + _quoted(NOTIFICATION.replace(REPLY_MARKER, REPLY_MARKERS["zh"])))
    assert strip_internal(reply) == "退款已处理。"


@pytest.mark.parametrize("marker", list(REPLY_MARKERS.values()) + [
    "##- Antworten Sie bitte über dieser Linie (eigener Text) -##"])
def test_the_marker_is_found_by_its_shape_in_any_language(marker: str) -> None:
    assert strip_internal(f"Done.\n{marker}\nsecret internals") == "Done."


def test_a_reply_written_under_the_quoted_notification() -> None:
    reply = ("On Mon, 23 Nov 2026, Jess via Support wrote:\n" + _quoted(NOTIFICATION)
             + "\n\nYour refund is on its way.\n")
    assert strip_internal(reply) == "Your refund is on its way."


def test_a_reply_with_nothing_of_ours_is_left_as_written() -> None:
    assert strip_internal("Hi Jess,\n\n- step one\n- step two\n\nAnn") == (
        "Hi Jess,\n\n- step one\n- step two\n\nAnn")


def test_internals_never_survive_the_cut() -> None:
    reply = "OK\n\n" + NOTIFICATION
    assert "nobody yet" not in strip_internal(reply)
    assert strip_internal(NOTIFICATION) == ""  # nothing written: nothing for the customer


def test_the_readme_documents_every_keyword() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Commands by mail", 1)[1].split("\n## ", 1)[0]
    missing = [k for words in KEYWORDS.values() for k in words if k not in section]
    missing += [w for words in PRIORITY_WORDS.values() for w in words if w not in section]
    assert missing == []


@pytest.mark.parametrize("order", ["strip_then_parse", "parse_then_strip"])
def test_either_order_gives_the_same_commands_and_customer_text(order: str) -> None:
    reply = ("Done, refunded.\n#close\n#priority low\n\nBest,\nAnn\n\n"
             "On Mon, 23 Nov 2026 at 10:00, Jess via Support <support+12.ab@example.test> "
             "wrote:\n" + _quoted(NOTIFICATION + "#note (help text)\n"))
    if order == "strip_then_parse":
        parsed = parse_commands("Re: [#12] Refund", strip_internal(reply))
        text = parsed.body
    else:
        parsed = parse_commands("Re: [#12] Refund", reply)
        text = strip_internal(parsed.body)
    assert parsed.commands == (Command("close", (), "body"), Command("priority", ("low",), "body"))
    assert text == "Done, refunded.\n\nBest,\nAnn"
