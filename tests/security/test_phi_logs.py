"""Issue 5 item 12: an end-to-end run's logs carry no patient names, IDs or birth dates.

`pleura serve` at DEBUG with a DCMTK storescp destination receives studies whose patient
attributes the test sets to distinctive values, some of them malformed so that the error
paths log too; every line Pleura wrote is then scanned for those values in every form.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import _config

from tests.e2e.harness import embedded_env, pleura, pleura_run, running, storescp, wait_port
from tests.figures import save
from tests.security.make_corpus import base_dataset, encode_body, find, part10, set_value
from tests.security.test_malformed import send_file
from tests.support import free_port, wait_for

QUIET = 3
PHI = {
    "PatientName": "QUIZZLEWORTH^ZENOBIA^MARGUERITE",
    "PatientID": "PHI-7741-QXZ",
    "PatientBirthDate": "19470203",
    "OtherPatientIDs": "OTHER-99812-ZQV",
    "PatientAddress": "17 XYLOPHONE LANE KRAKOWIEC",
    "PatientMotherBirthName": "VANTERPOOL^OPHELIA",
}


def needles() -> list[str]:
    """Every form a value could take in a log line: whole, by component, date spelt out, bytes repr."""
    found = set()
    for value in PHI.values():
        found |= {value, value.replace("^", " "), repr(value.encode())[2:-1]}
        found |= {part for part in re.split(r"[\^ ]", value) if len(part) >= 5}
    found.add("1947-02-03")
    return sorted(found)


def scan(text: str) -> list[str]:
    return [n for n in needles() if n.lower() in text.lower()]


def _with_phi(ds):  # type: ignore[no-untyped-def]
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    return ds


def _inputs(real_cr: Path, folder: Path) -> list[Path]:
    """A valid real CR, plus broken ones: pixels too short, an over-long name, a path for a study UID."""
    folder.mkdir()
    real = _with_phi(dcmread(real_cr))
    real.save_as(folder / "real.dcm", enforce_file_format=True)
    paths = [folder / "real.dcm"]
    for name, change in (("short", {"Rows": 128}), ("longname", {}), ("badstudy", {})):
        ds = _with_phi(base_dataset(f"phi-{name}"))
        for keyword, value in change.items():
            setattr(ds, keyword, value)
        body = encode_body(ds)
        if name == "longname":  # PN over 64 characters per group: pydicom's validation warns with the value
            body = set_value(body, find(body, 0x00100010), (PHI["PatientName"] * 3).encode() + b" ")
        if name == "badstudy":
            body = set_value(body, find(body, 0x0020000D), PHI["PatientID"].encode())
        path = folder / f"{name}.dcm"
        path.write_bytes(part10(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian, body))
        paths.append(path)
    return paths


def test_scanner_finds_what_it_looks_for() -> None:
    """The scan can fail: a control line with the test patient's identifiers is caught."""
    assert scan("C-STORE refused reason='invalid value QUIZZLEWORTH^ZENOBIA' patient=PHI-7741-QXZ")
    assert scan("dob=1947-02-03") and scan("b'OTHER-99812-ZQV'") and not scan("study done images=1")


@pytest.mark.integration
def test_no_phi_in_logs_of_an_end_to_end_run(real_cr: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    dest, dest_port = storescp(tmp_path / "received", tmp_path / "storescp.log")
    port = free_port()
    env = {**embedded_env(tmp_path, port, dest_port, QUIET), "PLEURA_LOG_LEVEL": "DEBUG"}
    serve = pleura("serve", env, tmp_path / "serve.log")
    with running(serve, dest):
        wait_port(port, serve, timeout=120)
        statuses = {p.name: send_file(port, p)[0] for p in _inputs(real_cr, tmp_path / "in")}
        assert statuses["real.dcm"] == 0 and statuses["badstudy.dcm"] == 0xC000, statuses

        def settled() -> list | None:
            rows = json.loads(pleura_run(env, "status", "--json"))
            accepted = sum(s == 0 for s in statuses.values())
            done = [r for r in rows if r["state"] in ("DONE", "FAILED")]
            delivered = any(r.get("deliveries", {}).get("DELIVERED") for r in rows)
            return rows if len(done) == accepted and delivered else None

        rows = wait_for(settled, QUIET + 120, "every accepted study processed and results delivered")
    text = (tmp_path / "serve.log").read_text(errors="replace")
    lines = text.splitlines()
    hits = [(n, line[:200]) for line in lines for n in scan(line)]
    save("security-phi-logs", {"studies_sent": len(statuses), "statuses": statuses,
                               "studies_settled": [r["state"] for r in rows], "log_lines_scanned": len(lines),
                               "needles": len(needles()), "phi_hits": len(hits)})
    assert len(lines) > 20, "DEBUG logging produced almost nothing: the scan would prove nothing"
    assert hits == [], hits[:10]
