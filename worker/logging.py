"""structlog set-up: key=value (or JSON) lines on stderr. Never pass patient identifiers."""

from __future__ import annotations

import logging
import re
import sys

import structlog

_QUOTED = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"")


class WithholdQuotedValues(logging.Filter):
    """Libraries quote the values they complain about (pydicom: ``Invalid value for VR PN: '...'``),
    and those values may be patient identifiers: every quoted span of a stdlib record is withheld."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = _QUOTED.sub("'<withheld>'", record.getMessage()), ()
        if record.exc_info:
            record.exc_text = _QUOTED.sub("'<withheld>'", logging.Formatter().formatException(record.exc_info))
        return True


def configure(level: str = "INFO", json: bool = False) -> None:
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.captureWarnings(True)  # warnings.warn (pydicom's too) through the filter below
    for handler in logging.getLogger().handlers:
        handler.addFilter(WithholdQuotedValues())
    # pynetdicom at INFO/DEBUG can print dataset summaries; keep it to warnings.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
