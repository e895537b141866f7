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


def _span(quote: str) -> str:
    """A span opened by ``quote`` up to the next ``quote`` that ends a word, or the end of the line.

    Inside, a backslash escapes a character and a quote followed by a letter (``O'BRIEN``) is text.
    """
    return rf"{quote}(?:\\.|[^{quote}\\\n]|{quote}(?=\w))*(?:{quote}(?!\w)|$)"


# An opening quote starts a word (or follows a bytes repr's ``b``): ``auto's`` opens nothing.
_QUOTED = re.compile(r"(?:(?<!\w)|(?<=(?<!\w)b))(?:" + _span("'") + "|" + _span('"') + ")", re.MULTILINE)
_FRAME = re.compile(r'  File "[^"\n]*", line \d+, in \S+')  # a traceback's frame header: code, not data
_OWN = ("engines", "worker", "dicom_node")  # Pleura's packages
FORMATS = ("auto", "json", "console")


class WithholdQuotedValues(logging.Filter):
    """Withholds the quoted spans of standard-library records that could hold patient values.

    - A message from a third-party logger (pydicom, pynetdicom, highdicom, ``py.warnings``,
      Celery, SQLAlchemy...) has every quoted span replaced by ``'<withheld>'``: libraries quote
      the values they complain about (pydicom: ``Invalid value for VR PN: 'DOE^JANE'``) and
      SQLAlchemy quotes bound parameters.
    - A message from Pleura's own packages (``engines``, ``worker``, ``dicom_node``) is kept as
      written: Pleura never logs patient values, and ``engines`` never sees DICOM attributes.
    - A traceback, whoever logged it, has its quoted spans withheld (an exception's text is
      written by whichever library raised it), except its ``File "...", line N, in f`` headers.

    A quote opens a span only at the start of a word (or after a bytes repr's ``b``), so a
    possessive or contraction (``auto's``, ``can't``) opens nothing; a span opened and not
    closed on its line is withheld to the end of the line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not _is_own(record.name):
            record.msg, record.args = _withheld(record.getMessage()), ()
        if record.exc_info:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text = "\n".join(
                line if _FRAME.fullmatch(line) else _withheld(line) for line in text.splitlines())
            record.exc_info = None  # never rendered again from the exception itself
        return True


def _is_own(name: str) -> bool:
    return name.split(".", 1)[0] in _OWN


def _withheld(text: str) -> str:
    return _QUOTED.sub("'<withheld>'", text)


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
