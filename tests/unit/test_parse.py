"""parse(): tolerant MIME parsing, one behaviour per test, small literal mails."""

from __future__ import annotations

import hashlib
import random
from datetime import UTC, datetime, timedelta, timezone

import pytest

from gateway.ingest.parse import decode_bytes, decode_header, parse

PLAIN = (b"From: Jess Doe <Jess.Doe@Example.org>\r\n"
         b"To: support@example.test, Other <other@example.test>\r\n"
         b"Cc: cc@example.test\r\n"
         b"Reply-To: replies@example.org\r\n"
         b"Subject: Refund\r\n\tneeded\r\n"
         b"Date: Mon, 23 Nov 2026 10:00:00 +0100\r\n"
         b"Message-ID: <abc.123@example.org>\r\n"
         b"\r\n"
         b"Hello, I need help.\r\n")


def mime(content_type: str, body: bytes, extra: bytes = b"") -> bytes:
    return (b"From: a@example.org\r\nMessage-ID: <m@example.org>\r\nMIME-Version: 1.0\r\n"
            + extra + b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)


def test_message_id_loses_its_angle_brackets() -> None:
    assert parse(PLAIN).message_id == "abc.123@example.org"


def test_message_id_without_brackets_is_kept() -> None:
    assert parse(b"From: a@b.example\r\nMessage-ID: bare@id.example\r\n\r\nx").message_id == (
        "bare@id.example")


def test_in_reply_to_and_references_are_tuples_of_ids_ignoring_junk() -> None:
    raw = (b"From: a@b.example\r\nIn-Reply-To: <p1@x.example> (Jess's message of Monday)\r\n"
           b"References: <r1@x.example>\r\n junk <r2@x.example>,<r3@x.example>\r\n\r\nx")
    mail = parse(raw)
    assert mail.in_reply_to == ("p1@x.example",)
    assert mail.references == ("r1@x.example", "r2@x.example", "r3@x.example")


def test_from_addr_keeps_case_and_from_name_is_the_display_name() -> None:
    mail = parse(PLAIN)
    assert (mail.from_addr, mail.from_name) == ("Jess.Doe@Example.org", "Jess Doe")


def test_encoded_display_name_with_comma_stays_one_address() -> None:
    mail = parse(b"From: =?utf-8?Q?Doe=2C_J=C3=BCrgen?= <j@example.org>\r\n\r\nx")
    assert (mail.from_name, mail.from_addr) == ("Doe, Jürgen", "j@example.org")


def test_missing_from_gives_none() -> None:
    assert parse(b"Subject: hi\r\n\r\nbody").from_addr is None


def test_to_cc_and_reply_to_are_addr_specs() -> None:
    mail = parse(PLAIN)
    assert mail.to == ("support@example.test", "other@example.test")
    assert (mail.cc, mail.reply_to) == (("cc@example.test",), ("replies@example.org",))


def test_subject_is_unfolded() -> None:
    assert parse(PLAIN).subject == "Refund\tneeded"


@pytest.mark.parametrize(("word", "expected"), [
    ("=?iso-2022-jp?B?GyRCRnxLXDhsGyhC?=", "日本語"),
    ("=?koi8-r?B?8NLJ18XU?=", "Привет"),
    ("=?gb2312?B?xOO6ww==?=", "你好"),
    ("=?windows-1252?Q?=80_caf=E9?=", "€ café"),
    ("=?iso-8859-1?q?J=FCrgen?=", "Jürgen"),
])
def test_encoded_word_subjects_decode_in_their_charset(word: str, expected: str) -> None:
    assert parse(b"From: a@b.example\r\nSubject: " + word.encode() + b"\r\n\r\nx").subject == (
        expected)


def test_whitespace_between_adjacent_encoded_words_is_dropped() -> None:
    assert decode_header("=?utf-8?Q?a?= \r\n =?utf-8?Q?b?= c") == "ab c"


def test_character_split_across_two_encoded_words_is_joined() -> None:
    # "ä" is C3 A4 in UTF-8; some mailers split the bytes between words.
    assert decode_header("=?utf-8?B?w6=?= =?utf-8?B?pA==?=") == "ä"


def test_unknown_charset_falls_back_without_raising() -> None:
    assert decode_header("=?x-klingon?Q?caf=E9?=") == "café"


def test_non_text_codec_names_are_not_used_as_charsets() -> None:
    assert decode_bytes(b"abc", "base64") == "abc"


def test_raw_utf8_bytes_in_a_header_are_decoded() -> None:
    assert parse("From: a@b.example\r\nSubject: Grüße\r\n\r\nx".encode()).subject == "Grüße"


def test_iso_2022_jp_with_windows_extensions_decodes() -> None:
    # "№" (NEC row 13) is not in JIS X 0208; Outlook sends it anyway (CP50220).
    assert decode_bytes(b"\x1b$B-b\x1b(B1", "iso-2022-jp") == "№1"


def test_date_is_timezone_aware() -> None:
    assert parse(PLAIN).date == datetime(2026, 11, 23, 9, 0, tzinfo=UTC).astimezone(
        timezone(timedelta(hours=1)))


def test_unparseable_date_is_none_but_kept_raw() -> None:
    mail = parse(b"From: a@b.example\r\nDate: yesterday-ish\r\n\r\nx")
    assert (mail.date, mail.date_raw) == (None, "yesterday-ish")


def test_headers_are_lowercased_decoded_and_in_order() -> None:
    assert [name for name, _ in parse(PLAIN).headers] == [
        "from", "to", "cc", "reply-to", "subject", "date", "message-id"]
    assert parse(PLAIN).header("SUBJECT") == "Refund\tneeded"


def test_plain_text_part_is_the_text_and_html_part_is_the_html() -> None:
    raw = mime("multipart/alternative; boundary=b",
               b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nplain \xc3\xa4\r\n"
               b"--b\r\nContent-Type: text/html\r\n\r\n<p>html</p>\r\n--b--\r\n")
    mail = parse(raw)
    assert (mail.text, mail.html) == ("plain ä", "<p>html</p>")


def test_text_is_decoded_with_its_declared_charset() -> None:
    raw = mime("text/plain; charset=koi8-r", "Привет".encode("koi8-r"))
    assert parse(raw).text == "Привет"


def test_lying_charset_label_falls_back_to_utf8() -> None:
    assert parse(mime("text/plain; charset=us-ascii", "naïve".encode())).text == "naïve"


def test_quoted_printable_body_is_decoded() -> None:
    raw = mime("text/plain; charset=utf-8", b"caf=C3=A9=\r\n!",
               b"Content-Transfer-Encoding: quoted-printable\r\n")
    assert parse(raw).text == "café!"


def test_attachment_payload_is_transfer_decoded_with_rfc2231_filename() -> None:
    raw = mime("multipart/mixed; boundary=b",
               b"--b\r\nContent-Type: text/plain\r\n\r\nsee file\r\n"
               b"--b\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
               b"Content-Disposition: attachment; filename*=utf-8''r%C3%A9sum%C3%A9.pdf\r\n\r\n"
               b"JVBERi0=\r\n--b--\r\n")
    (part,) = parse(raw).attachments
    assert (part.filename, part.content_type, part.payload, part.inline) == (
        "résumé.pdf", "application/pdf", b"%PDF-", False)


def test_encoded_word_filename_is_decoded() -> None:
    raw = mime("multipart/mixed; boundary=b",
               b"--b\r\nContent-Type: text/plain; name=\"=?utf-8?B?w6QudHh0?=\"\r\n\r\nx\r\n--b--")
    assert parse(raw).attachments[0].filename == "ä.txt"


def test_inline_image_keeps_its_content_id() -> None:
    raw = mime("multipart/related; boundary=b",
               b"--b\r\nContent-Type: text/html\r\n\r\n<img src=cid:logo1>\r\n"
               b"--b\r\nContent-Type: image/png\r\nContent-ID: <logo1>\r\n\r\nPNG\r\n--b--\r\n")
    (image,) = parse(raw).attachments
    assert (image.content_id, image.inline, image.filename) == ("logo1", True, None)


def test_forwarded_message_becomes_an_eml_attachment() -> None:
    inner = b"From: x@y.example\r\nSubject: inner\r\n\r\ninner body\r\n"
    raw = mime("multipart/mixed; boundary=b",
               b"--b\r\nContent-Type: text/plain\r\n\r\nFYI\r\n"
               b"--b\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"--b--\r\n")
    mail = parse(raw)
    (part,) = mail.attachments
    assert (mail.text, part.filename, part.content_type) == ("FYI", "forwarded.eml",
                                                             "message/rfc822")
    assert part.payload.startswith(b"From: x@y.example\r\nSubject: inner\r\n\r\ninner body")


def test_tnef_winmail_dat_is_an_attachment() -> None:
    raw = mime("multipart/mixed; boundary=b",
               b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n"
               b"--b\r\nContent-Type: application/ms-tnef\r\n\r\n\x78\x9f\x3e\x22\r\n--b--\r\n")
    assert [a.content_type for a in parse(raw).attachments] == ["application/ms-tnef"]


def test_unnamed_non_text_part_is_kept_as_attachment() -> None:
    raw = mime("multipart/mixed; boundary=b",
               b"--b\r\nContent-Type: text/calendar\r\n\r\nBEGIN:VCALENDAR\r\n--b--\r\n")
    assert [a.content_type for a in parse(raw).attachments] == ["text/calendar"]


def test_bad_base64_does_not_raise() -> None:
    raw = mime("text/plain", b"!!!not base64***\r\n", b"Content-Transfer-Encoding: base64\r\n")
    assert parse(raw).fatal is None


def test_missing_boundary_keeps_the_body_as_text() -> None:
    mail = parse(mime("multipart/mixed", b"just text\r\n"))
    assert "just text" in mail.text
    assert "NoBoundaryInMultipartDefect" in mail.defects


def test_cr_only_line_ends_are_understood() -> None:
    mail = parse(b"From: a@b.example\rSubject: hi\r\rbody\r")
    assert (mail.subject, mail.text) == ("hi", "body\r")


def test_mbox_from_line_is_skipped() -> None:
    mail = parse(b"From someone Mon Jan  1 00:00:00 2024\nFrom: a@b.example\nSubject: s\n\nx")
    assert (mail.from_addr, mail.fatal) == ("a@b.example", None)


def test_leading_bom_and_blank_lines_are_skipped() -> None:
    mail = parse(b"\xef\xbb\xbf   \nFrom: a@b.example\n\nx")
    assert mail.from_addr == "a@b.example"


def test_deep_nesting_still_yields_a_mail() -> None:
    nest = b"".join(b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1)
                    for i in range(3000))
    mail = parse(mime("multipart/mixed; boundary=b0", nest))
    assert mail.from_addr == "a@example.org"


def test_body_sha256_covers_the_bytes_after_the_blank_line() -> None:
    assert parse(PLAIN).body_sha256 == hashlib.sha256(b"Hello, I need help.\r\n").hexdigest()


def test_body_sha256_covers_everything_without_a_separator() -> None:
    raw = b"From: a@b.example\r\nSubject: x"
    assert parse(raw).body_sha256 == hashlib.sha256(raw).hexdigest()


def test_valid_mail_is_not_fatal() -> None:
    assert parse(PLAIN).fatal is None


@pytest.mark.parametrize("raw", [b"", b"  \r\n", b"\x00\x01binary\xff garbage", b"no header\n\nx"])
def test_input_that_is_no_mail_is_fatal(raw: bytes) -> None:
    assert parse(raw).fatal


def test_mail_without_sender_id_or_body_is_fatal() -> None:
    assert parse(b"X-Foo: bar\r\n\r\n").fatal == "no sender, message-id or body"


def test_random_bytes_never_raise() -> None:
    rnd = random.Random(2047)
    seeds = [PLAIN, mime("multipart/mixed; boundary=b", b"--b\r\nContent-Type: text/plain\r\n\r\n")]
    for _ in range(2000):
        data = bytearray(rnd.choice(seeds))
        for _ in range(rnd.randrange(1, 20)):
            data[rnd.randrange(len(data))] = rnd.randrange(256)
        parse(bytes(data))
