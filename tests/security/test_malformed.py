"""Malformed input, issue 5 item 10: the committed corpus through a real C-STORE and the gate.

Each corpus file goes over a real association (pynetdicom SCU sending the file's bytes into
the P-DATA stream unchanged) to the real listener (StorageSCP + Spool + LedgerReceiver on
PostgreSQL); the expected status and, for refusals, the ``instance_refused`` event are
checked, then the pipeline's gate reads the spooled copy (or the file itself when refused).
The helpers here are shared with the fuzz and path tests.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config, build_context
from sqlalchemy import select

from dicom_node.filing import ACCEPTED_TRANSFER_SYNTAXES
from dicom_node.scp import StorageSCP
from dicom_node.spool import Spool
from tests.figures import save
from tests.security.make_corpus import CORPUS_DIR, MAX_FILE_BYTES, write
from tests.support import free_port
from worker.ledger import Event, Instance
from worker.ledger.db import Ledger, upgrade
from worker.listen.receiver import LedgerReceiver
from worker.process.pipeline import _gate, _Source

INTENDED_USE = {"modalities": ["CR", "DX"], "body_parts": ["CHEST"], "views": ["PA", "AP"]}
GATE_TIMEOUT_S = 120  # generous on 2 shared cores; a hang is what this catches
SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.1",)  # CR, the SOP class of every input here
MANIFEST = json.loads((CORPUS_DIR / "manifest.json").read_text())


@dataclass
class Listener:
    ledger: Ledger
    port: int
    spool: Path

    def refusals(self) -> list[dict]:
        with self.ledger.session() as s:
            events = s.scalars(select(Event).where(Event.kind == "instance_refused").order_by(Event.id)).all()
            return [json.loads(e.detail or "{}") for e in events]

    def instances(self) -> list[Instance]:
        with self.ledger.session() as s:
            return list(s.scalars(select(Instance).order_by(Instance.id)).all())


@pytest.fixture
def listener(pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    """The real listener on a fresh PostgreSQL ledger; the SCU sends files' bytes unchanged."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    upgrade(pg_url)
    ledger = Ledger(pg_url)
    port = free_port()
    scp = StorageSCP("PLEURA", "127.0.0.1", port, Spool(tmp_path / "spool"), LedgerReceiver(ledger))
    scp.start()
    try:
        yield Listener(ledger, port, tmp_path / "spool")
    finally:
        scp.stop()
        ledger.close()


def send_file(port: int, path: Path, timeout: float = 60) -> tuple[int | None, bool]:
    """C-STORE one file in its own association: (status or None, association still up after it)."""
    ae = AE(ae_title="FUZZER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    contexts = [build_context(c, [ts]) for c in SOP_CLASSES for ts in ACCEPTED_TRANSFER_SYNTAXES[:16]]
    assoc = ae.associate("127.0.0.1", port, contexts=contexts[:128], ae_title="PLEURA")
    assert assoc.is_established, "the listener refused the association"
    try:
        status = assoc.send_c_store(path)
        code = int(status.Status) if "Status" in status else None
        return code, assoc.is_established
    finally:
        if assoc.is_established:
            assoc.release()


def gate_file(path: Path) -> str | None:
    """The gate's reason for one file (None: eligible), in a thread so that a hang fails the test."""
    result: dict[str, object] = {}

    def run() -> None:
        try:
            eligible, reasons = _gate([_Source(1, "1.2.3", str(path), "0" * 64, 1)], INTENDED_USE)
            result["value"] = reasons.get(1) if not eligible else None
        except BaseException as exc:  # recorded and re-raised in the test thread
            result["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(GATE_TIMEOUT_S)
    assert not worker.is_alive(), f"the gate hung on {path.name}"
    if "error" in result:
        raise AssertionError(f"the gate raised on {path.name}") from result["error"]  # type: ignore[arg-type]
    return result["value"]  # type: ignore[return-value]


def leftovers(spool: Path) -> list[Path]:
    """Anything in the spool that is not a finished instance (temp files of an interrupted write)."""
    return [p for p in spool.rglob("*") if p.is_file() and (p.suffix != ".dcm" or p.name.startswith("."))]


def test_corpus_is_what_the_script_writes(tmp_path: Path) -> None:
    """The committed corpus is reproducible, small, and every file has a README line."""
    fresh = write(tmp_path)
    assert sorted(p.name for p in fresh) == sorted(MANIFEST) == sorted(p.name for p in CORPUS_DIR.glob("*.dcm"))
    readme = (CORPUS_DIR / "README.md").read_text()
    for path in fresh:
        assert path.read_bytes() == (CORPUS_DIR / path.name).read_bytes(), f"{path.name}: re-run make_corpus.py"
        assert path.stat().st_size < MAX_FILE_BYTES and f"`{path.name}`" in readme


@pytest.mark.integration
def test_corpus_through_cstore_and_gate(listener: Listener) -> None:
    """Every corpus file: the expected status, a recorded refusal with its reason, a clean gate reason."""
    seen: dict[str, dict] = {}
    wrong: list[str] = []
    for name, expected in sorted(MANIFEST.items()):
        path = CORPUS_DIR / name
        sop_uid = str(read_file_meta_info(path).MediaStorageSOPInstanceUID)
        status, still_up = send_file(listener.port, path)
        assert still_up, f"{name}: the association was aborted"
        assert status is not None, f"{name}: no status"
        stored = [i for i in listener.instances() if i.sop_instance_uid == sop_uid]
        if status == 0:
            assert len(stored) == 1 and Path(stored[0].spool_path).is_relative_to(listener.spool)
            reason = gate_file(Path(stored[0].spool_path))
        else:
            refusal = [r for r in listener.refusals() if r["sop_instance_uid"] == sop_uid]
            assert not stored and len(refusal) == 1, name
            assert refusal[0]["status"] == f"0x{status:04X}" and refusal[0]["reason"], refusal
            reason = gate_file(path)
        seen[name] = {"status": f"0x{status:04X}", "gate": reason}
        gate_ok = reason is None if expected["gate"] is None else (reason or "").startswith(expected["gate"])
        if status != expected["status"] or not gate_ok:
            wrong.append(f"{name}: {seen[name]}, expected 0x{expected['status']:04X} / {expected['gate']!r}")
    assert wrong == [], "\n".join(wrong)
    assert leftovers(listener.spool) == []
    assert send_file(listener.port, CORPUS_DIR / "valid_control.dcm") == (0, True)  # still serving
    statuses = [v["status"] for v in seen.values()]
    save("security-malformed-corpus", {
        "corpus_files": len(seen),
        "accepted": statuses.count("0x0000"),
        "refused_0xC000": statuses.count("0xC000"),
        "refusals_recorded": len(listener.refusals()),
        "results": seen,
    })
