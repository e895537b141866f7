"""structlog set-up: JSON lines on stderr for log shippers, or a human console format in a terminal.

Correlation fields come from structlog's context variables (:func:`log_context`):
``association_id`` and ``study_id`` on the C-STORE path, ``task_id``, ``job_id``,
``delivery_id`` and ``study_id`` in the worker's tasks. Standard-library records (Celery,
pynetdicom, pydicom warnings) are rendered the same way. Never pass patient identifiers.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog

_QUOTED = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"")
FORMATS = ("auto", "json", "console")


class WithholdQuotedValues(logging.Filter):
    """Libraries quote the values they complain about (pydicom: ``Invalid value for VR PN: '...'``),
    and those values may be patient identifiers: every quoted span of a stdlib record is withheld."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = _QUOTED.sub("'<withheld>'", record.getMessage()), ()
        if record.exc_info:
            record.exc_text = _QUOTED.sub("'<withheld>'", logging.Formatter().formatException(record.exc_info))
            record.exc_info = None  # never rendered again from the exception itself
        return True


class _CurrentStderr:
    """Whatever ``sys.stderr`` is at each write (a test's capture, a replaced stream), never a stale one."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Pleura's root handler: replaced by the next :func:`configure`, other handlers left alone."""


def _withheld_traceback(_logger: object, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """A stdlib record's traceback as :class:`WithholdQuotedValues` left it."""
    record = event_dict.get("_record")
    if record is not None and record.exc_text:
        event_dict["exception"] = record.exc_text
    return event_dict


def uses_json(fmt: str = "auto") -> bool:
    """``auto``: JSON unless stderr is a terminal."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")
    return fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())


def configure(level: str = "INFO", fmt: str = "auto") -> None:
    as_json = uses_json(fmt)
    renderer: Any = (structlog.processors.JSONRenderer() if as_json
                     else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        cache_logger_on_first_use=True,
    )
    handler = _Handler(_CurrentStderr())
    handler.addFilter(WithholdQuotedValues())
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, _withheld_traceback],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    root = logging.getLogger()
    for previous in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(previous)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # warnings.warn (pydicom's too) through the filter above
    # pynetdicom at INFO/DEBUG can print dataset summaries; keep it to warnings.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # a line per attribute module copied
    logging.getLogger("alembic").setLevel(logging.WARNING)


@contextmanager
def log_context(**fields: object) -> Iterator[None]:
    """Bind correlation ``fields`` for the block; on exit the context is as before, whatever the
    block bound meanwhile (worker threads are reused from task to task)."""
    saved = structlog.contextvars.get_contextvars()
    structlog.contextvars.bind_contextvars(**fields)
    try:
        yield
    finally:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(**saved)
