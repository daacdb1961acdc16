"""Readable conversations (issue 12): best text, the sender's new words, safe HTML."""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from typing import Any

import pytest

from gateway.ingest.model import AttachmentPart
from gateway.ingest.parse import decode_bytes, parse
from gateway.ingest.quotes import reply_part, visible_text
from gateway.ingest.readable import (
    Readable,
    best_text,
    detect_language,
    html_safe,
    html_to_text,
    readable,
    readable_or_plain,
    stored_attachments,
)
from tests.conftest import need_peer
from tests.unit.test_corpus import CORPUS, _manifest

QUOTED = "> Ihre Bestellung 4711 wurde versandt.\n> Mit freundlichen Grüßen\n> Support\n"


def _mime(body: str, ctype: str = "text/plain", extra: str = "") -> bytes:
    head = ("From: Kim <kim@example.org>\r\nTo: support@example.test\r\nSubject: t\r\n"
            f"Message-ID: <r@example.org>\r\nMIME-Version: 1.0\r\n{extra}"
            f"Content-Type: {ctype}; charset=utf-8\r\n\r\n")
    return head.encode() + body.replace("\n", "\r\n").encode()


# Replies in the shape each client writes them; the new words are always "NEW".
REPLIES = {
    "en-gmail": "NEW\n\nOn Mon, Nov 23, 2026 at 10:00 AM Support <support@example.test>\nwrote:\n\n"
                "> Your order shipped.\n",
    "en-outlook": "NEW\n\n________________________________\nFrom: Support "
                  "<support@example.test>\nSent: Monday, November 23, 2026 10:00 AM\n"
                  "To: Kim <kim@example.org>\nSubject: RE: Order\n\nYour order shipped.\n",
    "en-apple": "NEW\n\n> On 23 Nov 2026, at 10:00, Support <support@example.test> wrote:\n>\n"
                "> Your order shipped.\n",
    "en-thunderbird": "NEW\n\nOn 23.11.26 10:00, Support wrote:\n> Your order shipped.\n",
    "de-gmail": "NEW\n\nAm Mo., 23. Nov. 2026 um 10:00 Uhr schrieb Support <"
                "support@example.test>:\n\n" + QUOTED,
    "de-outlook": "NEW\n\n-----Ursprüngliche Nachricht-----\nVon: Support "
                  "<support@example.test>\nGesendet: Montag, 23. November 2026 10:00\n"
                  "An: Kim <kim@example.org>\nBetreff: AW: Bestellung\n\n" + QUOTED,
    "de-outlook-rule": "NEW\n\n________________________________\nVon: Support "
                       "<support@example.test>\nGesendet: Montag, 23. November 2026 10:00\n"
                       "An: Kim <kim@example.org>\nBetreff: AW: Bestellung\n\nIhre Bestellung\n",
    "de-apple": "NEW\n\n> Am 23.11.2026 um 10:00 schrieb Support <support@example.test>:\n>\n"
                + QUOTED,
    "de-thunderbird": "NEW\n\nAm 23.11.26 um 10:00 schrieb Support:\n" + QUOTED,
    "nl-gmail": "NEW\n\nOp ma 23 nov 2026 om 10:00 schreef Support <support@example.test>:\n\n"
                "> Uw bestelling is verzonden.\n",
    "nl-outlook": "NEW\n\nVan: Support <support@example.test>\nVerzonden: maandag 23 november "
                  "2026 10:00\nAan: Kim <kim@example.org>\nOnderwerp: RE: Bestelling\n\n"
                  "Uw bestelling is verzonden.\n",
    "nl-apple": "NEW\n\n> Op 23 nov. 2026, om 10:00 heeft Support <support@example.test> het "
                "volgende geschreven:\n>\n> Uw bestelling is verzonden.\n",
    "nl-thunderbird": "NEW\n\nOp 23-11-2026 om 10:00 schreef Support:\n"
                      "> Uw bestelling is verzonden.\n",
    "zh-gmail": "NEW\n\nSupport <support@example.test> 于2026年11月23日周一 10:00写道：\n\n"
                "> 您的订单已发货。\n",
    "zh-outlook": "NEW\n\n发件人: Support <support@example.test>\n发送时间: 2026年11月23日 10:00\n"
                  "收件人: 张伟 <kim@example.org>\n主题: 回复: 订单\n\n您的订单已发货。\n",
    "zh-outlook-fullwidth": "NEW\n\n发件人：Support <support@example.test>\n"
                            "发送时间：2026年11月23日 10:00\n收件人：张伟\n主题：回复：订单\n\n"
                            "您的订单已发货。\n",
    "zh-apple": "NEW\n\n> 2026年11月23日 10:00，Support <support@example.test> 写道：\n>\n"
                "> 您的订单已发货。\n",
    "zh-thunderbird": "NEW\n\n在 2026/11/23 10:00, Support 写道:\n> 您的订单已发货。\n",
}


@pytest.mark.parametrize("client", sorted(REPLIES))
def test_quoted_history_is_cut_for_each_client_and_language(client: str) -> None:
    assert visible_text(REPLIES[client]) == "NEW"


SIGNATURES = {
    "dash-dash": "Das Paket fehlt.\n\n-- \nMax Mustermann\nACME GmbH, Berlin\n",
    "de-greeting": "Das Paket fehlt noch immer.\n\nMit freundlichen Grüßen\nMax Mustermann\n",
    "de-iphone": "Das Paket fehlt.\n\nVon meinem iPhone gesendet\n",
    "nl-greeting": "Het pakket ontbreekt.\n\nMet vriendelijke groet,\nJan de Vries\n",
    "nl-iphone": "Het pakket ontbreekt.\n\nVerstuurd vanaf mijn iPhone\n",
    "zh-greeting": "包裹还没到。\n\n祝好，\n张伟\n",
    "zh-iphone": "包裹还没到。\n\n发自我的iPhone\n",
    "en-phone": "The parcel is missing.\n\nSent from my iPhone\n",
}


@pytest.mark.parametrize("case", sorted(SIGNATURES))
def test_signature_is_cut(case: str) -> None:
    assert visible_text(SIGNATURES[case]) == SIGNATURES[case].split("\n\n")[0]


def test_reply_part_keeps_the_signature_but_not_the_quote() -> None:
    text = "Hello\n\nSent from my iPhone\n\nOn Mon, Nov 23, 2026 at 10:00 Support wrote:\n> Hi\n"
    assert reply_part(text) == "Hello\n\nSent from my iPhone"


def test_bottom_posted_reply_keeps_the_words_under_the_quote() -> None:
    text = "On 23.11.26 10:00, Support wrote:\n> Did it arrive?\nYes, thank you.\n"
    assert visible_text(text) == "Yes, thank you."


def test_inline_answers_keep_the_quotes_between_them() -> None:
    text = "> Which order?\n4711\n> Which colour?\nBlue\n"
    assert visible_text(text) == "4711\n> Which colour?\nBlue"


def test_a_mail_that_is_only_a_quote_header_shows_its_whole_text() -> None:
    text = "Am 23.11.26 um 10:00 schrieb Support:\n"
    assert visible_text(text) == text.strip()


def test_hyphen_list_is_not_taken_for_a_signature() -> None:
    text = "Two problems:\n- the lid is broken\n- the manual is missing"
    assert visible_text(text) == text


def test_plain_text_part_is_the_text() -> None:
    mail = parse(_mime("Plain words.\n"))
    assert best_text(mail).strip() == "Plain words."


def test_html_only_mail_becomes_readable_text() -> None:
    html = ("<html><body><p>Dear team,</p><ul><li>first</li><li>second</li></ul>"
            "<table><tr><td>Order</td><td>4711</td></tr></table></body></html>")
    text = best_text(parse(_mime(html, "text/html")))
    assert "Dear team," in text and "first" in text and "second" in text
    assert "Order" in text and "4711" in text and "<" not in text


def test_script_and_style_are_not_text() -> None:
    text = html_to_text("<style>p{color:red}</style><script>alert(1)</script><p>Hi</p>")
    assert text == "Hi"


def test_empty_text_part_falls_back_to_the_html() -> None:
    raw = (b"From: k@example.org\r\nMessage-ID: <e@x>\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/alternative; boundary=b\r\n\r\n--b\r\n"
           b"Content-Type: text/plain\r\n\r\n \r\n--b\r\nContent-Type: text/html\r\n\r\n"
           b"<p>From the HTML</p>\r\n--b--\r\n")
    assert best_text(parse(raw)) == "From the HTML"


HOSTILE = """<html><head><style>body{display:none}</style><script>steal()</script></head>
<body onload="steal()"><p onclick="steal()" onmouseover="steal()">Hello</p>
<a href="javascript:steal()">js link</a> <a href="https://example.com/help">help</a>
<div style="width: expression(steal()); color: red">css</div>
<div style="background-image: url(https://tracker.example/bg.png)">bg</div>
<svg onload="steal()"><script>steal()</script><circle r="1"/></svg>
<img src="https://tracker.example/open.gif?u=42" width="1" height="1">
<iframe src="https://evil.example/"></iframe><form action="https://evil.example/"><input></form>
<img src="cid:logo@example.org" alt="logo"></body></html>"""
LOGO = AttachmentPart("logo.png", "image/png", b"png-bytes", True, "logo@example.org")


@pytest.fixture
def cleaned() -> str:
    return html_safe(HOSTILE, (LOGO,), cid_url="/att/{sha256}")


def test_html_safe_removes_scripts_including_svg_scripts(cleaned: str) -> None:
    assert "<script" not in cleaned and "steal()" not in cleaned and "<svg" not in cleaned


def test_html_safe_removes_event_handlers(cleaned: str) -> None:
    assert "onload" not in cleaned and "onclick" not in cleaned and "onmouseover" not in cleaned


def test_html_safe_removes_javascript_links(cleaned: str) -> None:
    assert "javascript:" not in cleaned and "js link" in cleaned


def test_html_safe_drops_css_expressions_and_remote_backgrounds(cleaned: str) -> None:
    assert "expression" not in cleaned and "tracker.example/bg.png" not in cleaned


def test_html_safe_blocks_the_tracking_pixel(cleaned: str) -> None:
    assert "tracker.example" not in cleaned


def test_html_safe_drops_frames_and_forms(cleaned: str) -> None:
    assert "<iframe" not in cleaned and "<form" not in cleaned and "<input" not in cleaned


def test_html_safe_links_are_noopener_nofollow(cleaned: str) -> None:
    assert 'href="https://example.com/help" rel="noopener noreferrer nofollow"' in cleaned


def test_html_safe_points_cid_images_at_the_stored_attachment(cleaned: str) -> None:
    assert f'src="/att/{hashlib.sha256(b"png-bytes").hexdigest()}"' in cleaned


def test_html_safe_drops_a_cid_no_part_carries() -> None:
    assert "src" not in html_safe('<img src="cid:missing@x" alt="a">', (LOGO,))


def test_referenced_image_is_inline_and_an_unreferenced_one_an_attachment() -> None:
    raw = (b"From: k@example.org\r\nMessage-ID: <i@x>\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/related; boundary=b\r\n\r\n--b\r\n"
           b"Content-Type: text/html\r\n\r\n<p><img src=\"cid:shown@x\"></p>\r\n--b\r\n"
           b"Content-Type: image/png\r\nContent-ID: <shown@x>\r\n\r\nAAAA\r\n--b\r\n"
           b"Content-Type: application/pdf; name=invoice.pdf\r\nContent-ID: <pdf@x>\r\n"
           b"Content-Disposition: inline; filename=invoice.pdf\r\n\r\nBBBB\r\n--b--\r\n")
    flags = {p.content_id: p.inline for p in stored_attachments(parse(raw))}
    assert flags == {"shown@x": True, "pdf@x": False}


def test_declared_utf8_that_is_really_windows_1251_is_repaired() -> None:
    data = "Здравствуйте, мой заказ до сих пор не пришёл, помогите пожалуйста.".encode("cp1251")
    assert decode_bytes(data, "utf-8").startswith("Здравствуйте")


@pytest.mark.parametrize(("charset", "words"), [
    ("iso-2022-jp", "日本語のテスト"), ("gb2312", "您的订单已发货"), ("koi8-r", "Привет мир"),
    ("x-mac-cyrillic", "Привет мир"), ("windows-1250", "Žluťoučký kůň"),
    ("windows-1252", "Grüße aus Köln"),
])
def test_legacy_charsets_decode(charset: str, words: str) -> None:
    codec = {"x-mac-cyrillic": "mac_cyrillic"}.get(charset, charset)
    raw = (f"From: k@example.org\r\nMessage-ID: <c@x>\r\nMIME-Version: 1.0\r\n"
           f"Content-Type: text/plain; charset={charset}\r\n\r\n").encode() + words.encode(codec)
    assert best_text(parse(raw)).strip() == words


def test_content_language_header_names_the_language() -> None:
    mail = parse(_mime("Hallo", extra="Content-Language: de-DE\r\n"))
    assert detect_language(mail, "Hallo") == "de"


@pytest.mark.parametrize(("text", "language"), [
    ("Guten Tag, meine Bestellung ist leider immer noch nicht angekommen.", "de"),
    ("Goedendag, mijn bestelling is helaas nog steeds niet aangekomen.", "nl"),
    ("您好，我的订单到现在还没有收到，请帮我查一下物流情况。", "zh"),
    ("Hello, my order has still not arrived, could you look into it please?", "en"),
])
def test_language_is_detected_from_the_new_words(text: str, language: str) -> None:
    assert detect_language(parse(_mime(text)), text) == language


def test_too_short_text_has_no_language() -> None:
    assert detect_language(parse(_mime("Ok")), "Ok") is None


def test_readable_fills_all_views_of_an_html_reply() -> None:
    html = ("<p>NEW</p><div>On Mon, Nov 23, 2026 at 10:00 Support wrote:</div>"
            "<blockquote>Old words</blockquote>")
    view = readable(parse(_mime(html, "text/html")))
    assert view.visible_text == "NEW" and "Old words" in view.text
    assert view.html_safe is not None and "<blockquote>" in view.html_safe


def test_readable_or_plain_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.ingest.readable as module

    def broken(*_: object) -> str:
        raise RuntimeError("library bug")

    monkeypatch.setattr(module, "visible_text", broken)
    view = readable_or_plain(parse(_mime("Plain words.")))
    assert view.visible_text == view.text and "Plain words." in view.text


# --- the shared corpus: every file readable, the manifest's reply and body facts hold ------

def _corpus_rows() -> list[tuple[str, dict[str, Any]]]:
    return [(path, facts) for path, facts in _manifest() if (CORPUS / path).is_file()]


def _same_text(got: str, expected: str) -> bool:
    """Equal up to line endings and trailing blanks on lines (clients pad them)."""
    def norm(value: str) -> str:
        return "\n".join(line.rstrip() for line in value.replace("\r\n", "\n").split("\n")).strip()
    return norm(got) == norm(expected)


def _check(fact: str, expected: Any, view: Readable) -> bool | None:
    """Whether a manifest fact about readable text holds; None for facts not about it."""
    if fact == "reply_text_without_quote":
        return _same_text(reply_part(view.text), expected)
    if fact == "stripped_reply_nonempty":
        return bool(view.visible_text.strip()) == expected
    if fact == "stripped_reply_contains_From":
        return ("From:" in view.visible_text) == expected
    if fact == "text_body":
        return _same_text(view.text, expected)
    if fact == "text_body_contains":
        # The value came from a parser that wrote "?" for characters it could not decode
        # (gb2312 labelled Japanese); we decode them, so a "?" there stands for any character.
        return re.search(re.escape(expected).replace(r"\?", "."), view.text) is not None
    return None


# Floors measured on the visible corpus (hits/total, rounded down); raise them, never lower.
READABLE_FLOORS = {"reply_text_without_quote": 1.0, "stripped_reply_nonempty": 1.0,
                   "stripped_reply_contains_From": 1.0, "text_body": 1.0,
                   "text_body_contains": 1.0}


@pytest.fixture(scope="module")
def corpus_views() -> list[tuple[str, dict[str, Any], Readable]]:
    """Every corpus file through parse() and readable() once for the whole module."""
    return [(path, facts, readable(parse((CORPUS / path).read_bytes())))
            for path, facts in _corpus_rows()]


def _corpus_results(views: list[tuple[str, dict[str, Any], Readable]]
                    ) -> dict[tuple[str, str], list[bool]]:
    results: dict[tuple[str, str], list[bool]] = {}
    for path, facts, view in views:
        for fact, expected in facts.items():
            hit = _check(fact, expected, view)
            if hit is not None:
                results.setdefault((path.split("/")[0], fact), []).append(hit)
    return results


def test_every_corpus_file_yields_text_without_an_exception(
        corpus_views: list[tuple[str, dict[str, Any], Readable]]) -> None:
    if not corpus_views:
        need_peer("the shared corpus", "../shared/corpus is missing (or set DESKGATE_CORPUS)")
    for path, _, view in corpus_views:  # readable() itself ran in the fixture
        assert isinstance(view.text, str) and isinstance(view.visible_text, str), path


def test_corpus_reply_and_body_facts_stay_above_their_floors(
        corpus_views: list[tuple[str, dict[str, Any], Readable]]) -> None:
    results = _corpus_results(corpus_views)
    if not results:
        need_peer("the shared corpus", "../shared/corpus is missing (or set DESKGATE_CORPUS)")
    totals: dict[str, list[bool]] = {}
    for (folder, fact), hits in sorted(results.items()):
        print(f"{folder:12s} {fact:30s} {sum(hits):3d}/{len(hits):<3d} {sum(hits)/len(hits):6.1%}")
        totals.setdefault(fact, []).extend(hits)
    for fact, hits in totals.items():
        assert sum(hits) / len(hits) >= READABLE_FLOORS[fact], fact


def test_winmail_dat_yields_its_named_attachments_and_is_kept() -> None:
    path = CORPUS / "attachments" / "mimekit__tnef_rich-text.eml"
    if not path.is_file():
        need_peer("the shared corpus", "../shared/corpus is missing (or set DESKGATE_CORPUS)")
    names = [p.filename for p in stored_attachments(parse(path.read_bytes()))]
    assert names[0] == "winmail.dat"
    assert "kitten-playing-with-a-christmas-tree.jpg" in names[1:]


def test_winmail_dat_body_is_the_text_when_the_mail_has_none() -> None:
    path = CORPUS / "attachments" / "mimekit__tnef_ukr.eml"
    if not path.is_file():
        need_peer("the shared corpus", "../shared/corpus is missing (or set DESKGATE_CORPUS)")
    mail = parse(path.read_bytes())
    bare = replace(mail, text="", html=None)
    view = readable(bare)
    assert view.text.startswith("шостий") and view.html_safe is not None


def test_a_long_text_is_cut_when_its_head_has_a_quote_header() -> None:
    text = "NEW\n\nOn Mon, Nov 23, 2026 at 10:00 Support wrote:\n" + "> old line\n" * 20_000
    assert visible_text(text) == "NEW"


def test_a_long_text_without_a_quote_in_its_head_shows_whole() -> None:
    text = "Here is the log you asked for:\n" + "12:00:01 worker started\n" * 5_000
    assert visible_text(text) == text.strip()
