"""JSON text for the JSON columns and the log lines: orjson, with json.dumps where it refuses.

A mail's rows carry ~10 small JSON values (recipients, references, rule hits, event data)
and a mail makes two log lines; json.dumps took 1-3 µs each (2.6 % of the event loop under
load for the columns, 1.3 % for the lines: issue 10's profile), orjson a tenth of that.
orjson refuses what json.dumps takes: lone surrogates (a header decoded with
surrogateescape), integers beyond 64 bits, non-string keys. Those values go to json.dumps
as before, so nothing that was stored before fails now.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson


def dumps(value: Any) -> str:
    """A JSON column's text (SQLAlchemy's json_serializer)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(value)


def dumps_with(value: Any, default: Callable[[Any], Any] | None = None, **kwargs: Any) -> str:
    """json.dumps's signature, for structlog's JSONRenderer (which passes `default`)."""
    try:
        return orjson.dumps(value, default=default).decode()
    except TypeError:
        return json.dumps(value, default=default, **kwargs)
