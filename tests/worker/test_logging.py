"""The stdlib log filter withholds what could be patient values and keeps Pleura's own words."""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections.abc import Iterator

import pytest
import structlog
from pydicom import config
from pydicom.valuerep import validate_value

from engines.backends.tensorrt import NOT_INSTALLED
from tests.figures import save
from worker.logging import configure

SELECTED = ("auto selected backend onnxruntime:CPUExecutionProvider for bundle demo 0.1.0 (first in auto's order"
            " (onnxruntime > torch, fastest first) to load and pass the parity gate;"
            f" tensorrt skipped: {NOT_INSTALLED})")
OLD_RULE = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"")  # the filter before: every quoted span, for the figure only


@pytest.fixture
def json_logs(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure("INFO", "json")
    yield capsys
    structlog.reset_defaults()
    root.handlers, root.level = handlers, level
    logging.captureWarnings(False)


def _emitted(capsys: pytest.CaptureFixture[str]) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines()]


def test_pleura_messages_come_out_as_written_and_library_values_are_withheld(
    json_logs: pytest.CaptureFixture[str],
) -> None:
    cases = [  # (logger, message)
        ("engines.runtime", f"auto: tensorrt skipped: {NOT_INSTALLED}"),
        ("engines.runtime", SELECTED),
        ("pydicom", "Invalid value for VR PN: 'QUIZZLEWORTH^ZENOBIA'."),
        ("pydicom", "Invalid value for VR PN: \"O'BRIEN^PATRICK\"."),
        ("pynetdicom.dsutils", "The element's value 'VANTERPOOL^OPHELIA' could not be encoded"),
        ("sqlalchemy.engine.Engine", "[generated in 0.0001s] (b'PHI-7741-QXZ', 3)"),
    ]
    for name, message in cases:
        logging.getLogger(name).warning("%s", message)
    events = [line["event"] for line in _emitted(json_logs)]
    assert events[:2] == [cases[0][1], SELECTED]
    assert "pip package 'tensorrt'" in events[1] and "auto's order" in events[1]
    assert events[2:] == ["Invalid value for VR PN: '<withheld>'.", "Invalid value for VR PN: '<withheld>'.",
                          "The element's value '<withheld>' could not be encoded",
                          "[generated in 0.0001s] (b'<withheld>', 3)"]
    save("log_filter", {"lines": [
        {"logger": name, "before": OLD_RULE.sub("'<withheld>'", message), "after": event}
        for (name, message), event in zip(cases, events, strict=True)
    ]})


def test_a_real_pydicom_warning_quoting_a_birth_date_is_withheld(json_logs: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # pydicom logs it and warns it: both reach the handler
        validate_value("DA", "1947-02-03", config.WARN)
    lines = _emitted(json_logs)
    assert sorted(line["logger"] for line in lines) == ["py.warnings", "pydicom"]
    assert all("1947" not in line["event"] and "VR DA: '<withheld>'" in line["event"] for line in lines)


def test_an_exception_quoting_a_value_is_withheld_even_under_a_pleura_logger(
    json_logs: pytest.CaptureFixture[str],
) -> None:
    try:
        raise ValueError("Invalid value for VR PN: 'QUIZZLEWORTH^ZENOBIA'")
    except ValueError:
        logging.getLogger("engines.batching").exception("batch observer failed")
    [line] = _emitted(json_logs)
    assert line["event"] == "batch observer failed"
    assert "QUIZZLEWORTH" not in line["exception"]
    assert line["exception"].endswith("ValueError: Invalid value for VR PN: '<withheld>'")
    assert re.search(r'File ".*test_logging\.py", line \d+, in test_an_exception', line["exception"])
