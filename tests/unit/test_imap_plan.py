"""The IMAP poller's decisions, without a server: resume point, batches, backoff, parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.inbound import imap_plan as plan
from gateway.inbound.imap_client import ImapProblem, read_secret
from gateway.settings_imap import AfterImport, parse_after_import
from tests.conftest import make_settings


def test_first_contact_from_now_starts_at_uidnext() -> None:
    assert plan.resume(None, 0, 77, uidnext=120) == plan.Resume(119, reset=False)
    assert plan.resume(None, 0, 77, uidnext=1) == plan.Resume(0, reset=False)  # empty folder


def test_first_contact_from_all_starts_at_uid_1_and_marks_the_history() -> None:
    start = plan.resume(None, 0, 77, uidnext=120, start_from="all")
    assert start == plan.Resume(0, reset=False, history_below=120)
    assert plan.is_history(119, start.history_below)
    assert not plan.is_history(120, start.history_below)
    assert not plan.is_history(5, None)


def test_same_uidvalidity_resumes_after_the_checkpoint() -> None:
    assert plan.resume(77, 41, 77) == plan.Resume(41, reset=False)
    # An interrupted history import goes on as history.
    assert plan.resume(77, 41, 77, uidnext=500, start_from="all", history_below=120) == \
        plan.Resume(41, reset=False, history_below=120)


def test_changed_uidvalidity_rescans_from_uid_1() -> None:
    assert plan.resume(77, 41, 78) == plan.Resume(0, reset=True)


def test_search_star_answer_below_the_checkpoint_is_not_pending() -> None:
    # UID SEARCH UID 42:* matches UID 41 when 41 is the highest (RFC 3501 6.4.8).
    assert plan.pending_uids([41], 41) == []
    assert plan.pending_uids([44, 42, 42, 41], 41) == [42, 44]


def test_batches_are_bounded() -> None:
    assert list(plan.batches([1, 2, 3, 4, 5], 2)) == [[1, 2], [3, 4], [5]]


def test_uid_set_compresses_runs() -> None:
    assert plan.uid_set([9, 1, 2, 3, 7, 10]) == "1:3,7,9:10"
    assert plan.uid_set([5]) == "5"


@pytest.mark.parametrize(("attempt", "low", "high"), [(1, 0.5, 1.0), (2, 1.0, 2.0),
                                                      (4, 4.0, 8.0), (30, 150.0, 300.0)])
def test_backoff_doubles_with_jitter_up_to_the_cap(attempt: int, low: float,
                                                   high: float) -> None:
    assert plan.backoff_delay(attempt, rand=lambda: 0.0) == low
    assert plan.backoff_delay(attempt, rand=lambda: 1.0) == high


def test_progress_is_logged_per_batch_only_for_a_big_import() -> None:
    assert not plan.progress_due(10, 10, 50)
    assert plan.progress_due(50, 120, 50)
    assert not plan.progress_due(51, 120, 50)
    assert plan.progress_due(120, 120, 50)


def test_envelope_sender_comes_from_return_path() -> None:
    assert plan.envelope_sender(b"Return-Path: <a@example.org>\r\nSubject: x\r\n\r\nb") == \
        "a@example.org"
    assert plan.envelope_sender(b"Return-Path: <>\r\n\r\nbounce") == ""
    assert plan.envelope_sender(b"Subject: x\r\n\r\nReturn-Path: <not@header>\r\n") is None


def test_lock_key_is_stable_and_signed_64_bit() -> None:
    key = plan.lock_key("support")
    assert key == plan.lock_key("support") != plan.lock_key("billing")
    assert -2**63 <= key < 2**63


def test_parse_search_with_and_without_the_keyword() -> None:
    assert plan.parse_search([b"1 2 5", b"Search completed."]) == [1, 2, 5]
    assert plan.parse_search([b"SEARCH 7", b"OK"]) == [7]
    assert plan.parse_search([b"", b"Search completed (0.001 secs)."]) == []


def test_parse_uidvalidity() -> None:
    lines = [b"FLAGS (\\Seen)", b"OK [UIDVALIDITY 1795457955] UIDs valid", b"Select done"]
    assert plan.parse_uidvalidity(lines) == 1795457955
    assert plan.parse_uidvalidity([b"Select done"]) is None


def test_parse_fetch_uid_before_or_after_the_body() -> None:
    lines = [b"1 FETCH (UID 3 BODY[] {5}", bytearray(b"hello"), b")",
             b"2 FETCH (BODY[] {3}", bytearray(b"bye"), b" UID 9)",
             b"3 FETCH (FLAGS (\\Seen))",
             b"Fetch completed."]
    assert plan.parse_fetch(lines) == [(3, b"hello"), (9, b"bye")]


def test_after_import_values() -> None:
    assert parse_after_import("seen") == AfterImport("seen")
    assert parse_after_import("delete") == AfterImport("delete")
    assert parse_after_import("move:Done/2026") == AfterImport("move", "Done/2026")
    assert parse_after_import("move:") is None
    assert parse_after_import("archive") is None


IMAP = """[[imap]]
name = "box"
host = "imap.example.org"
user = "support@example.org"
password_env = "BOX_PASSWORD"
department = "support"
"""


def test_imap_defaults() -> None:
    (box,) = make_settings(extra=IMAP).imap
    assert (box.port, box.tls, box.folder, str(box.after_import), box.batch_size) == \
        (993, "implicit", "INBOX", "seen", 50)
    assert box.address == "support@example.test"


@pytest.mark.parametrize(("change", "key"), [
    ('tls = "none"', "imap[0].tls"),
    ('tls = "ssl"', "imap[0].tls"),
    ('after_import = "archive"', "imap[0].after_import"),
    ('password_file = "/x"', "imap[0].password_file"),
    ('auth = "xoauth2"', "imap[0].token_command"),
    ('batch_size = 0', "imap[0].batch_size"),
    ('colour = "red"', "imap[0].colour"),
])
def test_imap_errors_name_the_key(change: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make_settings(extra=IMAP + change + "\n")
    assert any(f": {key}: " in problem for problem in caught.value.problems), \
        caught.value.problems


def test_imap_unknown_department_and_duplicate_names() -> None:
    with pytest.raises(ConfigError) as caught:
        make_settings(extra=IMAP.replace('"support"\n', '"sales"\n') + IMAP)
    text = "\n".join(caught.value.problems)
    assert "imap[0].department: 'sales'" in text
    assert "name 'box' is used twice" in text


def test_plaintext_when_allowed() -> None:
    (box,) = make_settings(extra=IMAP + 'tls = "none"\nallow_plaintext = true\n').imap
    assert (box.tls, box.port) == ("none", 143)


async def test_secret_from_file_env_or_token_command(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    base = IMAP.replace('password_env = "BOX_PASSWORD"\n', "")
    (by_file,) = make_settings(extra=base + f'password_file = "{secret}"\n').imap
    assert await read_secret(by_file) == "s3cret"
    (by_env,) = make_settings(extra=IMAP).imap
    monkeypatch.delenv("BOX_PASSWORD", raising=False)
    with pytest.raises(ImapProblem, match="BOX_PASSWORD is not set"):
        await read_secret(by_env)
    monkeypatch.setenv("BOX_PASSWORD", "from-env")
    assert await read_secret(by_env) == "from-env"
    (oauth,) = make_settings(extra=base + 'auth = "xoauth2"\ntoken_command = "echo tok-123"\n'
                             ).imap
    assert await read_secret(oauth) == "tok-123"
    (expired,) = make_settings(extra=base + 'auth = "xoauth2"\ntoken_command = "false"\n').imap
    with pytest.raises(ImapProblem, match="token_command failed"):
        await read_secret(expired)
