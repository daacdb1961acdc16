"""structlog set-up: one JSON event per line on stderr, for journald and log shippers."""

from __future__ import annotations

import logging
import sys

import structlog

from store.jsontext import dumps_with

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


def configure(level: str = "info") -> None:
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=dumps_with),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        # One write and a flush per line (PrintLogger's print() writes twice, then flushes).
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        # Configured once per process, before the first line: each logger is built on its
        # first use, not again on every bind() and call (~1 % of the loop, issue 10). Tests
        # that capture log events never call this.
        cache_logger_on_first_use=True,
    )
    # aiosmtpd logs every connection at INFO through stdlib logging; keep only its warnings.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    logging.getLogger("mail.log").setLevel(logging.WARNING)
