"""Metrics, readiness and correlated logs, in process: the listener's counters against a real DCMTK
peer, the batcher's observer, a database that does not answer, and the JSON log lines."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import structlog
from prometheus_client import REGISTRY
from pydicom import dcmread
from pydicom.uid import UID, generate_uid
from sqlalchemy import func, select

from dicom_node.scp import AssociationPolicy, StorageSCP
from dicom_node.spool import Spool
from engines import InferenceResult
from engines.batching import DynamicBatcher
from tests.support import free_port, wait_for
from tests.worker.listen.test_receiver import storescu
from worker.ledger import Instance
from worker.ledger.db import Ledger, upgrade
from worker.listen.receiver import LedgerReceiver
from worker.logging import configure, log_context
from worker.observability import readiness
from worker.observability.metrics import LedgerCollector


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[Ledger, StorageSCP]]:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    ledger = Ledger(url)
    scp = StorageSCP("PLEURA", "127.0.0.1", free_port(), Spool(tmp_path / "spool"), LedgerReceiver(ledger),
                     policy=AssociationPolicy(allowed_calling_aes=("MODALITY1",)))
    scp.start()
    yield ledger, scp
    scp.stop()
    ledger.close()


def test_listener_counts_instances_bytes_and_rejections(listener, real_cr: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ledger, scp = listener
    port = scp.address[1]
    syntax = UID(dcmread(real_cr, stop_before_pixels=True).file_meta.TransferSyntaxUID).name
    counts = {"accepted": syntax, "duplicate": syntax, "refused": ""}  # a refusal has no transfer syntax label
    before = {o: _value("pleura_instances_received_total", outcome=o, transfer_syntax=ts) for o, ts in counts.items()}
    bytes_before = _value("pleura_received_bytes_total")
    rejected_before = {r: _value("pleura_associations_rejected_total", reason=r) for r in ("called_ae", "calling_ae")}
    active_before = _value("pleura_associations_active")

    assert storescu(port, real_cr).returncode == 0
    assert storescu(port, real_cr).returncode == 0  # identical resend
    assert storescu(port, real_cr, called="OTHER").returncode != 0
    assert storescu(port, real_cr, calling="STRANGER").returncode != 0
    other = dcmread(real_cr)
    other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    other.save_as(tmp_path / "other.dcm")
    scp.spool.min_free_bytes = 1 << 60  # the disk is "full": 0xA700
    refused = storescu(port, tmp_path / "other.dcm")
    assert "refused: outofresources" in (refused.stdout + refused.stderr).lower()  # 0xA700

    with ledger.session() as s:
        size = s.scalar(select(func.sum(Instance.size_bytes)))
    assert size and size > 0
    for outcome, ts in counts.items():
        assert _value("pleura_instances_received_total", outcome=outcome, transfer_syntax=ts) == before[outcome] + 1
    assert _value("pleura_received_bytes_total") == bytes_before + 2 * size
    for reason, was in rejected_before.items():
        assert _value("pleura_associations_rejected_total", reason=reason) == was + 1, reason
    wait_for(lambda: _value("pleura_associations_active") == active_before, 5, "the associations to end")

    families = {f.name: f for f in LedgerCollector(readiness.probe_engine(ledger.url)).collect()}
    assert families["pleura_ledger_up"].samples[0].value == 1
    studies = {s.labels["state"]: s.value for s in families["pleura_studies"].samples}
    assert studies["RECEIVING"] == 1 and studies["DONE"] == 0


class _Engine:
    def infer(self, images: Sequence[np.ndarray]) -> InferenceResult:
        n = len(images)
        return InferenceResult(("A",), np.zeros((n, 2), np.float32), np.zeros((n, 1), np.float32),
                               np.zeros((n, 1, 2, 2), np.float32))


def test_batcher_reports_every_engine_call_and_survives_a_failing_observer() -> None:
    seen: list[tuple[int, float]] = []
    with DynamicBatcher(_Engine(), max_batch=4, on_batch=lambda n, s: seen.append((n, s))) as batcher:
        batcher.infer([np.zeros((2, 2))] * 3)
        batcher.infer([np.zeros((2, 2))] * 6)  # larger than max_batch: one call of its own
    assert [n for n, _ in seen] == [3, 6] and all(s >= 0 for _, s in seen)

    def broken(n: int, s: float) -> None:
        raise RuntimeError("observer down")

    with DynamicBatcher(_Engine(), on_batch=broken) as batcher:
        assert len(batcher.infer([np.zeros((2, 2))]).embeddings) == 1
        assert len(batcher.infer([np.zeros((2, 2))] * 2).embeddings) == 2  # the inference thread lives on


def test_unreachable_database_is_unready_and_reported_down() -> None:
    engine = readiness.probe_engine(f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/none")
    families = list(LedgerCollector(engine).collect())
    assert [(f.name, f.samples[0].value) for f in families] == [("pleura_ledger_up", 0)]
    response = readiness.page([lambda: readiness.database(engine), lambda: readiness.Check("spool", True, "x")])({})
    body = json.loads(response.body)
    assert response.status == 503 and body["ready"] is False
    assert [(c["name"], c["ok"]) for c in body["checks"]] == [("database", False), ("spool", True)]
    assert "OperationalError" in body["checks"][0]["detail"]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    structlog.contextvars.clear_contextvars()  # whatever an earlier test left bound in this thread
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    root.handlers, root.level = handlers, level
    logging.captureWarnings(False)


def test_json_lines_carry_correlation_fields_and_withhold_quoted_values(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure("INFO", "json")  # here: capsys gives the test's call its own stderr
    log = structlog.get_logger("test")
    with log_context(task_id="t-1", job_id=7):
        structlog.contextvars.bind_contextvars(study_id=3)  # as the pipeline does once it knows the study
        log.info("job done", images=2)
        try:
            raise ValueError("Invalid value for VR PN: 'DOE^JANE'")
        except ValueError:
            logging.getLogger("pydicom").exception("could not read 'DOE^JANE'")
    log.info("after the task")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert lines[0]["event"] == "job done" and lines[0]["level"] == "info"
    assert (lines[0]["task_id"], lines[0]["job_id"], lines[0]["study_id"], lines[0]["images"]) == ("t-1", 7, 3, 2)
    assert lines[1]["logger"] == "pydicom" and lines[1]["study_id"] == 3
    assert "DOE" not in json.dumps(lines[1]) and "ValueError" in lines[1]["exception"]
    assert lines[2]["event"] == "after the task" and not {"task_id", "job_id", "study_id"} & set(lines[2])
