"""How values are turned into what the database and the log get (issue 10's cheaper paths):
the same text as before, or text that reads back the same, for every value."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from enum import StrEnum
from pathlib import Path

import orjson
import pytest
import structlog
from sqlalchemy import JSON, DateTime, String
from sqlalchemy.dialects import postgresql, sqlite

from store import jsontext, sqlite_inline
from store.direct import _remembering
from store.models import TZ, Message, Ticket

VALUES = [[], {}, ["a@example.org", "b@example.org"], {"rule": "x", "hits": [1, 2.5, None]},
          {"subject": "Grüße — 日本"}, [True, False], 0, "plain"]
# What orjson refuses and json.dumps takes: each must still be stored.
REFUSED = [["\udce9 surrogate-escaped header byte"], 2**70, {1: "int key"}, {"k": {2: 3}}]


@pytest.mark.parametrize("value", VALUES + REFUSED)
def test_a_json_column_value_reads_back_as_json_dumps_would_have_stored_it(value: object
                                                                           ) -> None:
    assert json.loads(jsontext.dumps(value)) == json.loads(json.dumps(value))


def test_values_orjson_refuses_go_to_json_dumps() -> None:
    for value in REFUSED:
        with pytest.raises(orjson.JSONEncodeError):
            orjson.dumps(value)
        assert jsontext.dumps(value) == json.dumps(value)


def test_a_log_line_with_a_value_orjson_refuses_is_still_written() -> None:
    """The renderer of gateway/logs.py (not configured here: its loggers are cached)."""
    render = structlog.processors.JSONRenderer(serializer=jsontext.dumps_with)
    odd = json.loads(render(None, "info", {"event": "mail.odd", "subject": "\udce9",
                                           "size": 2**70, "obj": object()}))
    plain = json.loads(render(None, "info", {"event": "mail.plain", "subject": "Grüße"}))
    assert (odd["event"], odd["subject"], odd["size"]) == ("mail.odd", "\udce9", 2**70)
    assert odd["obj"].startswith("<object object")  # repr, as JSONRenderer's fallback did
    assert (plain["event"], plain["subject"]) == ("mail.plain", "Grüße")


def test_the_daemons_log_lines_are_json_whatever_the_values() -> None:
    """logs.configure in a process of its own (its loggers are cached once configured)."""
    code = ("import structlog; from gateway import logs; logs.configure('info'); "
            "log = structlog.get_logger('t'); "
            "log.info('mail.odd', subject='\\udce9', size=2**70, obj=object()); "
            "log.bind(peer='p').info('mail.plain', subject='Grüße'); "
            "log.debug('not.shown')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True,
                            cwd=Path(__file__).resolve().parents[2], timeout=60)
    odd, plain = (json.loads(line) for line in result.stderr.decode().splitlines())
    assert (odd["event"], odd["subject"], odd["size"], odd["level"]) == \
        ("mail.odd", "\udce9", 2**70, "info")
    assert (plain["event"], plain["subject"], plain["peer"]) == ("mail.plain", "Grüße", "p")


@pytest.mark.parametrize("dialect", [sqlite.dialect(), postgresql.asyncpg.dialect()],
                         ids=["sqlite", "postgresql"])
def test_a_remembered_timestamp_bind_gives_each_value_its_own_text(dialect: object) -> None:
    plain = TZ.dialect_impl(dialect).bind_processor(dialect)  # type: ignore[arg-type]
    remembered = _remembering(TZ, dialect)  # type: ignore[arg-type]
    now = datetime(2026, 11, 25, 9, 30, 15, 123456, tzinfo=UTC)
    later = now + timedelta(seconds=1)
    same_instant = now.astimezone(timezone(timedelta(hours=2)))
    naive = datetime(2026, 11, 25, 9, 30, 15)
    sequence = [now, now, later, now, same_instant, naive, naive, None, now]

    def text(process: object, value: object) -> object:
        return value if process is None else process(value)  # type: ignore[operator]

    assert [text(remembered, v) for v in sequence] == [text(plain, v) for v in sequence]


def test_every_statements_timestamp_binds_share_one_remembering_processing() -> None:
    dialect = sqlite.dialect()
    received, created = (_remembering(c.type, dialect) for c in (
        Message.__table__.c.received_at, Ticket.__table__.c.created_at))
    assert received is created  # the ticket's and the message's `now`: processed once
    now = datetime(2026, 11, 25, 9, 30, 15, tzinfo=UTC)
    assert received(now) == created(now) == "2026-11-25 09:30:15.000000"


def test_only_timestamp_binds_are_remembered() -> None:
    dialect = sqlite.dialect()
    assert _remembering(TZ, dialect).__name__ == "remembered"  # type: ignore[union-attr]
    assert _remembering(DateTime(), dialect).__name__ == "remembered"  # type: ignore[union-attr]
    assert _remembering(JSON(), dialect).__name__ != "remembered"  # type: ignore[union-attr]
    assert _remembering(String(), dialect) is None


class Kind(StrEnum):
    CUSTOMER = "customer"


def test_a_statements_value_bytes_count_text_and_binary_of_any_class() -> None:
    values = (1, None, 2.5, True, "abc", b"de", bytearray(b"f"), memoryview(b"gh"),
              Kind.CUSTOMER, "x" * 70_000)
    assert sqlite_inline._values_bytes(values) == 3 + 2 + 1 + 2 + 8 + 70_000
    assert sqlite_inline._values_bytes({"a": "abc", "b": None, "c": Kind.CUSTOMER}) == 11
