"""The fast quote cutting (gateway.ingest.quotes) gives exactly what running mail-parser-reply
and our patterns over the whole text gives: on the corpus, the readable tests' cases and
generated texts full of quote headers, signatures, disclaimers and rules."""

from __future__ import annotations

import os
import re
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mailparser_reply import EmailMessage

from gateway.ingest import quotes
from gateway.ingest.parse import parse
from tests.conftest import need_peer
from tests.unit.test_corpus import CORPUS, _manifest
from tests.unit.test_readable import REPLIES, SIGNATURES

EXAMPLES = int(os.environ.get("DESKGATE_FUZZ_EXAMPLES", "300"))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None,
                    derandomize=os.environ.get("CI") == "true",
                    suppress_health_check=[HealthCheck.too_slow])


def _same_as_reference(text: str) -> None:
    assert quotes.visible_text(text) == quotes._visible_text_reference(text)
    assert quotes.reply_part(text) == quotes._reply_part_reference(text)


def _same_parts(text: str) -> None:
    """Each shortcut agrees with the pattern it stands for, not just the end result."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    match = quotes._OUR_HEADERS.search(text)
    assert quotes._our_header_start(text) == (match.start() if match else None)
    message = EmailMessage(text=text, languages=list(quotes.REPLY_LANGUAGES),
                           keep_hyphen_lists=True)
    normal = quotes._normalized(text)
    assert normal == message.text
    headers = [h for groups in message.HEADER_REGEX.findall(normal) for h in groups if h]
    assert list(quotes._headers(normal)) == headers
    low = quotes._folded(normal)
    if not ("mail" in low and quotes._MAY_DISCLAIM.search(low)):
        assert message.DISCLAIMERS_REGEX.findall(normal) == []
    if not quotes._MAY_SIGN.search("\n" + low):
        assert message.SIGNATURE_REGEX.search(normal) is None
    reference = message.read().replies[0]
    fast = quotes._newest_reply(text, cuts=True)
    assert (fast.content, fast.headers, fast.signatures, fast.disclaimers) == (
        reference.content, reference.headers, reference.signatures, reference.disclaimers)


def test_the_fast_path_is_on_for_the_checked_library() -> None:
    assert quotes.FAST


def test_our_headers_are_the_alternatives_joined() -> None:
    assert quotes._OUR_HEADERS.pattern.count("|^") == len(quotes._OUR_ALTERNATIVES) - 1


def test_folding_keeps_every_letter_ignorecase_matches() -> None:
    """What re.IGNORECASE matches to a letter of the needed words folds to that letter."""
    every = "".join(map(chr, range(sys.maxunicode + 1)))
    letters = set("abcdefghijklmnopqrstuvwxyzüß")
    for char in set(re.findall(r"[a-zßü]", every, re.IGNORECASE)):
        (letter,) = [c for c in letters if re.fullmatch(c, char, re.IGNORECASE)]
        assert quotes._folded(char) == letter, hex(ord(char))


READABLE_CASES = [
    *REPLIES.values(), *SIGNATURES.values(),
    "Hello\n\nSent from my iPhone\n\nOn Mon, Nov 23, 2026 at 10:00 Support wrote:\n> Hi\n",
    "On 23.11.26 10:00, Support wrote:\n> Did it arrive?\nYes, thank you.\n",
    "> Which order?\n4711\n> Which colour?\nBlue\n",
    "Am 23.11.26 um 10:00 schrieb Support:\n",
    "Two problems:\n- the lid is broken\n- the manual is missing",
    "NEW\n\nOn Mon, Nov 23, 2026 at 10:00 Support wrote:\n" + "> old line\n" * 20_000,
    "Here is the log you asked for:\n" + "12:00:01 worker started\n" * 5_000,
    "", " ", "\n", "\r\n\r\n", "x",
]


@pytest.mark.parametrize("text", READABLE_CASES)
def test_readable_cases_are_the_same(text: str) -> None:
    _same_as_reference(text)
    _same_as_reference(text.replace("\n", "\r\n"))
    _same_parts(text[:quotes.SCAN_CHARS])


def _corpus_texts() -> list[tuple[str, str]]:
    texts = []
    for path, _ in _manifest():
        if (CORPUS / path).is_file():
            text = parse((CORPUS / path).read_bytes()).text
            if text:
                texts.append((path, text))
    return texts


def test_corpus_texts_are_the_same() -> None:
    texts = _corpus_texts()
    if not texts:
        need_peer("the shared corpus", "../shared/corpus is missing (or set DESKGATE_CORPUS)")
    for path, text in texts:
        assert quotes.visible_text(text) == quotes._visible_text_reference(text), path
        assert quotes.reply_part(text) == quotes._reply_part_reference(text), path
        _same_parts(text[:quotes.SCAN_CHARS])


# --- generated texts: lines from fragments that each trigger (or nearly trigger) a pattern ---

HEADER_LINES = [
    "On Mon, Nov 23, 2026 at 10:00 AM Support <support@example.test> wrote:",
    "On Mon, Nov 23, 2026 at 10:00 AM Support <support@example.test>", "wrote:",
    "On 23.11.26 10:00, Support wrote:", "On On 1 wrote:", "ON MON, KIM WROTE:",
    "--- On Wed, 4/4/12, Kim <k@x> wrote:", "Am 23.11.26 um 10:00 schrieb Support:",
    "Am Mo., 23. Nov. 2026 um 10:00 Uhr schrieb Support <s@x>:", "Am Am x schrieb y:",
    "Op 23-11-2026 om 10:00 schreef Support:", "Op ma 23 nov 2026 om 10:00 schreef Kim <k@x>:",
    "Op 23 nov. 2026, om 10:00 heeft Support <s@x> het volgende geschreven:",
    "Support <s@x> 于2026年11月23日周一 10:00写道：", "2026年11月23日 10:00，Support 写道：",
    "2026年11月23日写道：", "在 2026/11/23 10:00, Support 写道:", "Иван Петров написал:",
    "12.01.2024, 10:00, Иван", "написала:", "-----Original Message-----",
    "----- Original Message -----", "-----ORİGINAL MESSAGE-----",
    "-----Ursprüngliche Nachricht-----", "--- Oorspronkelijk bericht ---", "-----原始邮件-----",
    "From: Support <support@example.test>", "*From:* Kim", "Sent: Monday, November 23, 2026",
    "To: Kim <kim@example.org>", "Subject: RE: Order", "Date: today", "Cc: a@b",
    "Organization: ACME", "Von: Support", "Gesendet: Montag", "An: Kim", "Betreff: AW: x",
    "Datum: heute", "Organisation: ACME", "Van: Support", "Verzonden: maandag", "Aan: Kim",
    "Onderwerp: RE: x", "发件人: Support", "发件人：Support", "寄件者：Support", "发送时间: 10:00",
    "收件人：张伟", "主题：回复：订单", "抄送: a", "组织: b", "日期: 2026", "寄件日期: x",
    "FROM: X", "ſent: x", "to:", "plan: can: an:",
]
# Blocks: Outlook headers of each language, rules above them, a rule after a word.
BLOCKS = [
    "From: Support\nSent: Monday\nTo: Kim\nSubject: RE: x", "Von: S\n> Gesendet: Mo\nAn: K",
    "*Van:* S\n*Aan:* K\nOnderwerp: x", "发件人: S\n收件人: K", "发件人：S\n\n日期：x",
    "寄件者：S\n> 寄件日期：x", "_" * 32 + "\nFrom: S", "> " + "_" * 25 + "\n> Von: S",
    "_" * 20 + "\n发件人：S", "x\n\n" + "_" * 32, "NEW\n\n" + "-" * 35 + "\nFrom: S\nTo: K",
    "w\n\n\n " + "_" * 40,
]
SIGNATURE_LINES = [
    "-- ", "--", "__", "-_", "Best regards,", "best regards", "Kind Regards", "Thanks,",
    "Thank you,", "Best,", "All the best", "regards,", "Mit freundlichen Grüßen",
    "MIT FREUNDLICHEN GRÜSSEN", "Mit freundlichen Grüßen / Best regards,", "Viele Grüße",
    "Beste Grüße", "Besten Gruß", "Liebe Grüsse", "Gruss", "Gruß", "Grüße",
    "Met vriendelijke groet,", "Hartelijke groeten", "Bedankt,", "Dank u,", "此致，", "敬礼，",
    "谢谢，", "谢谢您的关注，", "祝好，",
    "Sent from my iPhone", "Sent from my", "Get Outlook for iOS<https://aka.ms/o0ukef>",
    "Gesendet von meinem iPhone", "Verzonden vanaf mijn iPhone", "从我的iPhone发送",
    "Von meinem iPhone gesendet", "Verstuurd vanaf mijn iPad", "Verzonden met mijn Galaxy",
    "发自我的iPhone", "从我的 iPhone 发送 Mail", "Sent from my iPhone x", "THANKS,",
    "ſent from my phone", "Tha\u212aks,",
]
DISCLAIMER_LINES = [
    "CAUTION: This email originated from outside of the organization.",
    "Disclaimer: this mail is confidential", "** Disclaimer ** This e-mail is private",
    "Confidential Notice: this e-mail and any attachment", "Important Information: mail",
    "Warning: mail", "CONFIDENTIALITY: mail", "Wichtiger Hinweis: Diese E-Mail",
    "Hinweis: mail", "Achtung: Diese Mail", "Waarschuwing: deze mail", "免责声明：mail",
    "注意：本邮件 mail", "重要信息：mail", "disclaimer", "Note: see mail.",
]
OTHER_LINES = [
    "> old words", ">> older words", "> > nested", ">", "> ", "- item", "-", "---",
    "-----", "-" * 40, "_" * 20, "_" * 32, "_" * 40, " ___________________________________",
    "Hello, the parcel is missing.", "4711", "NEW", "Yes, thank you.", "email me",
    "İstanbul", "ıi", "\u00a0", "\u200b", "\t", "",
]
PREFIXES = ["", "", "", "> ", ">> ", "> > ", "  ", "* ", "\t", "-- "]
WORD = st.text(alphabet="abcdeinorstwAEIOU .,:;!?>-_*年月日写道：\u00a0", max_size=12)
LINE = st.one_of(
    st.tuples(st.sampled_from(PREFIXES),
              st.sampled_from(HEADER_LINES + SIGNATURE_LINES + DISCLAIMER_LINES + OTHER_LINES),
              st.sampled_from(["", "", " ", "  ", "\t", " x"]), st.booleans())
    .map(lambda t: t[0] + (t[1].upper() if t[3] else t[1]) + t[2]),
    st.sampled_from(BLOCKS),
    WORD,
    st.text(max_size=20),
)
ENDING = st.sampled_from(["\n", "\n", "\n", "\r\n", "\r", "\n\n", "\n\n\n"])


@st.composite
def mails(draw: st.DrawFn) -> str:
    lines = draw(st.lists(st.tuples(LINE, ENDING), max_size=25))
    return "".join(line + ending for line, ending in lines)


@PROPERTY
@given(mails())
def test_generated_texts_are_the_same(text: str) -> None:
    _same_as_reference(text)
    _same_parts(text)


@settings(PROPERTY, max_examples=max(EXAMPLES // 10, 1))
@given(mails(), st.integers(min_value=1, max_value=400))
def test_long_generated_texts_are_the_same(text: str, times: int) -> None:
    """Past SCAN_CHARS only the head is searched; a cut must be found there the same way."""
    long = text + "line of words\n" * (quotes.SCAN_CHARS // 14 - times) + text
    _same_as_reference(long)


@pytest.mark.parametrize("fragment",
                         HEADER_LINES + SIGNATURE_LINES + DISCLAIMER_LINES + OTHER_LINES + BLOCKS)
def test_every_fragment_in_context_is_the_same(fragment: str) -> None:
    """Each fragment alone in a small mail: what a rare one triggers is not left to chance."""
    for line in (fragment, fragment.upper(), "> " + fragment, "* " + fragment):
        for text in (f"Hello Kim,\n\n{line}\nMax\n", f"{line}\n> old\nNew words.",
                     f"Hi\n{line}\n\n{line}\nmail"):
            _same_as_reference(text)
            _same_parts(text)


def test_another_library_version_takes_the_library_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quotes, "FAST", False)
    for text in READABLE_CASES[:-6]:
        _same_as_reference(text)
