"""Malformed input, issue 5 item 10: a Hypothesis fuzz harness through a real C-STORE and the gate.

Bases: the corpus' synthetic CR and the real header of RG1_J2KI.dcm (with small native
pixels). Mutations: truncations, byte flips, bad VRs, bad and huge declared lengths
(0xFFFFFFF0), sequences nested up to 20,000 levels, pixel matrices that do not fit the
data, wrong transfer syntaxes and garbage in UIDs. Every C-STORE must get a status with the
association intact, every refusal an ``instance_refused`` event with its reason, nothing
half-written may stay in the spool, the listener must still take a good instance, and the
gate must give every accepted instance a clean answer. Deterministic and bounded:
``derandomize=True``, a fixed example count, no example database.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pydicom.data
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)
from sqlalchemy import select

from tests.figures import save
from tests.security.make_corpus import (
    HUGE,
    UNDEFINED,
    base_dataset,
    elements,
    encode_body,
    insert_before,
    nested_sequence,
    part10,
    set_length,
    set_value,
)
from tests.security.test_malformed import Listener, gate_file, leftovers, listener, send_file  # noqa: F401
from tests.support import wait_for
from worker.ledger import Association

PLEURA = str(Path(sys.executable).with_name("pleura"))
#: pydicom's own test files, installed with it (no download).
PYDICOM_TEST_FILES = Path(pydicom.data.__file__).with_name("test_files")
#: What the listener and the sender make of them with pydicom 3.0: (stored, refused by the listener,
#: not sent by the sender: not DICOM, no File Meta header, no SOP class, cannot be encoded).
PYDICOM_OUTCOMES = {"stored": 144, "refused": 4, "not sent": 28}

MAX_EXAMPLES = 120
UID_TAGS = (0x00080018, 0x0020000D, 0x0020000E)
SYNTAXES = (ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian, JPEG2000Lossless,
            RLELossless, JPEGBaseline8Bit)

mutations = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=8)),
    st.tuples(st.just("vr"), st.integers(0, 100), st.binary(min_size=2, max_size=2)),
    st.tuples(st.just("length"), st.integers(0, 100), st.sampled_from([0, 1, 3, 0xFFFF, HUGE, UNDEFINED])),
    st.tuples(st.just("deep"), st.sampled_from([40, 1000, 5000, 20000]), st.booleans()),
    st.tuples(st.just("uid"), st.sampled_from(UID_TAGS),
              st.one_of(st.binary(max_size=80), st.text(max_size=70).map(lambda t: t.encode("utf-8")),
                        st.sampled_from([b"../../x", b"/etc/passwd", b"1.2.3/../../x", b"1.2\x003", b"."]))),
    st.tuples(st.just("pixels"), st.sampled_from([0, 1, 63, 64, 128, 4096, 65535]),
              st.sampled_from([0, 64, 65535]), st.sampled_from([1, 8, 16, 32, 3])),
    st.tuples(st.just("syntax"), st.sampled_from(SYNTAXES)),
)


def _rg1_base(real_cr: Path):  # type: ignore[no-untyped-def]
    """RG1's real header with the synthetic CR's small native pixels (a real modality's attributes)."""
    ds = dcmread(real_cr, stop_before_pixels=True)
    small = base_dataset("fuzz-rg1")
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"):
        setattr(ds, keyword, small[keyword].value)
    ds.add_new(0x7FE00010, "OW", small.PixelData)
    for elem in ds.iterall():  # defined lengths, so that every top-level element can be mutated
        if elem.VR == "SQ":
            elem.is_undefined_length = False
    return ds


def mutate(ds, mutation: tuple) -> tuple[str, bytes]:  # type: ignore[no-untyped-def]
    """(transfer syntax to declare, body bytes) for one mutation of ``ds``."""
    kind, *args = mutation
    body = encode_body(ds)
    tops = [e for e in elements(body) if e.tag != 0x7FE00010] or elements(body)
    if kind == "truncate":
        return ExplicitVRLittleEndian, body[:int(args[0] * len(body))]
    if kind == "flip":
        data = bytearray(body)
        for where, value in args[0]:
            data[min(int(where * len(data)), len(data) - 1)] = value
        return ExplicitVRLittleEndian, bytes(data)
    if kind == "vr":
        e = tops[args[0] % len(tops)]
        return ExplicitVRLittleEndian, body[:e.offset + 4] + args[1] + body[e.offset + 6:]
    if kind == "length":
        return ExplicitVRLittleEndian, set_length(body, tops[args[0] % len(tops)], args[1])
    if kind == "deep":
        depth, defined = args
        return ExplicitVRLittleEndian, insert_before(body, 0x00081140, nested_sequence(min(depth, 5000) if defined
                                                                                     else depth, defined))
    if kind == "uid":
        return ExplicitVRLittleEndian, set_value(body, next(e for e in tops if e.tag == args[0]), args[1])
    if kind == "pixels":
        rows, columns, bits = args
        ds = ds.copy()
        ds.Rows, ds.Columns, ds.BitsAllocated = rows, columns, bits
        return ExplicitVRLittleEndian, encode_body(ds)
    return args[0], body  # "syntax": the same bytes under another transfer syntax


@pytest.mark.integration
@pytest.mark.slow
def test_fuzzed_cstores_get_clean_statuses_and_gate_reasons(listener: Listener, real_cr: Path,  # noqa: F811
                                                            tmp_path: Path) -> None:
    bases = {"synthetic": base_dataset("fuzz-synthetic"), "rg1": _rg1_base(real_cr)}
    tried: list[dict] = []
    started = time.monotonic()

    @settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(base=st.sampled_from(sorted(bases)), mutation=mutations)
    def one(base: str, mutation: tuple) -> None:
        ds = bases[base]
        syntax, body = mutate(ds, mutation)
        path = tmp_path / f"input-{len(tried)}.dcm"
        path.write_bytes(part10(ds.SOPClassUID, ds.SOPInstanceUID, syntax, body))
        status, still_up = send_file(listener.port, path)
        tried.append({"base": base, "mutation": mutation[0], "status": status})
        path.unlink()
        assert status is not None and still_up, f"{base} {mutation[:2]}: status {status}, association up {still_up}"

    one()
    statuses = [t["status"] for t in tried]
    refused = [s for s in statuses if s != 0]
    refusals = listener.refusals()
    assert len(refusals) == len(refused)  # every refusal in the event trail ...
    assert all(r["reason"] and r["status"] in ("0xC000", "0xA700") for r in refusals)  # ... with why
    assert set(statuses) <= {0x0000, 0xC000, 0xA700}, sorted(set(statuses))
    assert leftovers(listener.spool) == []
    instances = listener.instances()
    assert all(Path(i.spool_path).is_relative_to(listener.spool) and Path(i.spool_path).is_file() for i in instances)
    good = tmp_path / "good.dcm"
    good.write_bytes(part10(bases["synthetic"].SOPClassUID, "1.2.826.0.1.3680043.10.1.1", ExplicitVRLittleEndian,
                            encode_body(_with_uid(bases["synthetic"], "1.2.826.0.1.3680043.10.1.1"))))
    assert send_file(listener.port, good) == (0, True)  # the listener still serves

    reasons: dict[str, int] = {}
    for path in sorted(listener.spool.rglob("*.dcm")):  # every accepted version through the gate
        reason = gate_file(path)
        key = "eligible" if reason is None else reason.split(":")[0][:60]
        reasons[key] = reasons.get(key, 0) + 1
    by_kind: dict[str, dict[str, int]] = {}
    for t in tried:
        row = by_kind.setdefault(t["mutation"], {})
        row[f"0x{t['status']:04X}"] = row.get(f"0x{t['status']:04X}", 0) + 1
    save("security-fuzz-cstore", {
        "inputs_tried": len(tried),
        "accepted": statuses.count(0),
        "refused": len(refused),
        "refusals_recorded": len(refusals),
        "association_aborts": 0,
        "statuses_by_mutation": by_kind,
        "spooled_instances_gated": sum(reasons.values()),
        "gate_outcomes": reasons,
        "seconds": round(time.monotonic() - started, 1),
    })


def _with_uid(ds, uid: str):  # type: ignore[no-untyped-def]
    ds = ds.copy()
    ds.SOPInstanceUID = uid
    return ds


@pytest.mark.integration
def test_pydicom_test_files_through_pleura_send(listener: Listener, tmp_path: Path,  # noqa: F811
                                                capsys: pytest.CaptureFixture[str],
                                                caplog: pytest.LogCaptureFixture) -> None:
    """All of pydicom's test files in one ``pleura send``: each is stored, refused with a recorded reason, or
    reported by the sender; the association ends in a release; nothing raises in the listener."""
    caplog.set_level(logging.WARNING)
    done = subprocess.run([PLEURA, "send", "127.0.0.1", str(listener.port), str(PYDICOM_TEST_FILES), "--json"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PLEURA_DATA_DIR": str(tmp_path / "var")})
    assert done.returncode == 1, done.stderr  # some files are not DICOM instances
    results = json.loads(done.stdout)["results"]
    assert len(results) == sum(1 for p in PYDICOM_TEST_FILES.rglob("*") if p.is_file())
    outcome = Counter("stored" if r["ok"] else "refused" if r["status"] else "not sent" for r in results)
    assert dict(outcome) == PYDICOM_OUTCOMES, [(Path(r["file"]).name, r["status"], r["error"]) for r in results
                                               if not r["ok"]]
    instances = {i.sop_instance_uid for i in listener.instances()}
    assert {r["sop_instance_uid"] for r in results if r["ok"]} <= instances
    refusals = {(r["sop_instance_uid"], r["status"]) for r in listener.refusals() if r["reason"]}
    refused = [(r["sop_instance_uid"], r["status"]) for r in results if r["status"] and not r["ok"]]
    assert set(refused) <= refusals  # each with its status and a reason in the event trail
    assert all(r["error"] and "association lost" not in r["error"] for r in results if r["status"] is None)

    def ends() -> list[str | None] | None:
        with listener.ledger.session() as s:
            reasons = [a.end_reason for a in s.scalars(select(Association))]
        return reasons if all(reasons) else None

    assert wait_for(ends, 10, "the association's end to be recorded") == ["released"]
    assert leftovers(listener.spool) == []
    logged = capsys.readouterr()
    listener_log = logged.out + logged.err + caplog.text
    assert "C-STORE refused" in listener_log  # the listener's log is what was captured here
    assert "Traceback" not in listener_log
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info] == []
