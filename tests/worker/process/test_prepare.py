"""Issue 8: each image is decoded and inferred on arrival (``pleura.prepare``); its study's job
takes the cached outputs and builds the same SR and SC as without them.

In process, on SQLite, with the demo model (loaded once for the module); a synthetic chest CR
larger than the SC's image side, so that the cached display image is a reduced one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian
from sqlalchemy import select

from dicom_node.filing import StoredInstance
from dicom_node.results.content import Algorithm, ImageResult
from dicom_node.results.sc import display_image, render
from dicom_node.results.uids import derive_uid
from tests.support import wait_for
from worker.assemble.sweeper import sweep
from worker.ledger import Embedding, Event, Finding, Instance, OutputObject
from worker.ledger.db import Ledger, upgrade
from worker.listen.receiver import LedgerReceiver
from worker.process import pipeline
from worker.process.cache import ORPHAN_SECONDS, PREPARING_SECONDS, PreparedCache, prune
from worker.process.prepare import prepare
from worker.queue import PREPARE_TASK
from worker.runtime import Runtime
from worker.settings import Settings

ROWS, COLUMNS = 1100, 1300


def _chest_cr(name: str, rows: int = ROWS, columns: int = COLUMNS) -> Dataset:
    """A synthetic 12-bit chest CR (smooth ramp + noise) with UIDs derived from ``name``."""
    ds = Dataset()
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = derive_uid("prepare-sop", name)
    ds.StudyInstanceUID = derive_uid("prepare-study", name)
    ds.SeriesInstanceUID = derive_uid("prepare-series", name)
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition, ds.PatientAge = "CR", "CHEST", "PA", "050Y"
    ds.PatientName, ds.PatientID = "PREPARE^SYNTHETIC", "PREPARE-1"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ramp = np.add.outer(np.arange(rows), np.arange(columns)) * (4000 / (rows + columns))
    noise = np.random.default_rng(3).integers(0, 64, size=(rows, columns))
    ds.PixelData = np.clip(ramp + noise, 0, 4095).astype("<u2").tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _without_clock(data: bytes) -> bytes:
    """A DICOM file's bytes with every date and time blanked: what two runs at different moments share."""
    ds = dcmread(BytesIO(data))
    for element in ds.iterall():
        if element.VR in ("DA", "TM", "DT"):
            element.value = ""
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


class _Node:
    """A data folder, a SQLite ledger and a runtime sharing the module's loaded engine."""

    def __init__(self, folder: Path, base: Runtime, **settings: object) -> None:
        url = f"sqlite:///{folder / 'ledger.db'}"
        folder.mkdir()
        upgrade(url)
        self.ledger = Ledger(url)
        self.rt = dataclasses.replace(base, settings=Settings(data_dir=folder, **settings), ledger=self.ledger,
                                      publish=lambda task, row_id: True)
        self.cache = PreparedCache.of(self.rt.settings, base.engine().bundle)

    def receive(self, ds: Dataset) -> tuple[int, str]:
        """Spool and record ``ds`` as the listener does; its instance id and sha256."""
        path = self.rt.settings.spool_dir / f"{ds.SOPInstanceUID}.{hashlib.sha256(ds.PixelData).hexdigest()[:8]}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        LedgerReceiver(self.ledger).instance_stored(StoredInstance(
            association=None, sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID,
            study_instance_uid=ds.StudyInstanceUID, series_instance_uid=ds.SeriesInstanceUID,
            transfer_syntax_uid=ExplicitVRLittleEndian, modality="CR", path=str(path),
            size=path.stat().st_size, sha256=sha256))
        with self.ledger.session() as s:
            return s.scalars(select(Instance.id).where(Instance.sop_instance_uid == ds.SOPInstanceUID)).one(), sha256

    def process(self) -> dict:
        """Queue the study at once and run its job here; the job's recorded timings."""
        (job_id,) = sweep(self.ledger, 0, 60, self.rt.publish).queued
        pipeline.run_job(self.rt, job_id)
        with self.ledger.session() as s:
            detail = s.scalars(select(Event.detail).where(Event.kind == "job_succeeded", Event.job_id == job_id)).one()
        return json.loads(detail)["timings"]

    def results(self) -> tuple[dict[str, bytes], list[tuple], list[bytes]]:
        """SR/SC bytes by kind (creation dates and times blanked), findings and embeddings."""
        with self.ledger.session() as s:
            files = {o.kind: _without_clock(Path(o.path).read_bytes()) for o in s.scalars(select(OutputObject))}
            findings = [(f.finding, f.probability, f.threshold, f.positive) for f in s.scalars(select(Finding))]
            vectors = [e.vector for e in s.scalars(select(Embedding))]
        return files, findings, vectors


@pytest.fixture(scope="module")
def base() -> Iterator[Runtime]:
    """A runtime whose demo engine and batcher are loaded once; each node replaces the rest."""
    rt = Runtime(settings=Settings(), ledger=None, publish=lambda task, row_id: True)  # type: ignore[arg-type]
    yield rt
    rt.batcher().close()


@pytest.fixture
def node(tmp_path: Path, base: Runtime) -> Iterator[_Node]:
    n = _Node(tmp_path / "node", base)
    yield n
    n.ledger.close()


def test_display_image_draws_the_same_sc_as_the_full_image() -> None:
    pixels = np.random.default_rng(1).random((ROWS, COLUMNS), dtype=np.float32)
    reduced = display_image(pixels)
    assert reduced.shape == (866, 1024) and reduced.dtype == np.float32
    assert display_image(reduced) is reduced  # already at its display size: no second resize
    source, algorithm = _chest_cr("display"), Algorithm("demo", "0.1.0")
    assert np.array_equal(render(ImageResult(source, pixels, ()), algorithm),
                          render(ImageResult(source, reduced, ()), algorithm))


def test_a_prepared_image_gives_the_same_sr_sc_findings_and_embedding(
        node: _Node, base: Runtime, tmp_path: Path) -> None:
    ds = _chest_cr("same")
    plain = _Node(tmp_path / "plain", base)
    plain.receive(ds)
    assert plain.process()["prepared"] == 0

    instance_id, sha256 = node.receive(ds)
    prepare(node.rt, instance_id)
    entry = node.cache.path(sha256)
    assert entry.is_file()
    inferred = base.batcher().images
    prepare(node.rt, instance_id)  # a duplicated hint finds the entry
    timings = node.process()
    assert timings["prepared"] == 1 and base.batcher().images == inferred  # neither ran the model again
    files, findings, vectors = node.results()
    assert sorted(files) == ["SC", "SR"] and len(findings) == 4 and len(vectors) == 1
    assert (files, findings, vectors) == plain.results()  # byte for byte, but for the clock
    assert not entry.exists()  # the cache is emptied once the job has succeeded
    plain.ledger.close()


def test_changed_bytes_or_another_model_miss_the_cache(node: _Node, base: Runtime) -> None:
    ds = _chest_cr("changed")
    instance_id, first = node.receive(ds)
    prepare(node.rt, instance_id)
    assert first in node.cache
    bundle = base.engine().bundle
    retrained = SimpleNamespace(name=bundle.name, version=bundle.version, model_sha256="f" * 64,
                                reported_findings=bundle.reported_findings)  # same label, other weights
    other = PreparedCache.of(node.rt.settings, retrained)  # type: ignore[arg-type]
    assert first not in other and other.load(first) is None

    ds.PixelData = bytes(ds.PixelData[:-2]) + b"\x00\x01"  # the modality sends the image again, changed
    changed_id, second = node.receive(ds)
    assert changed_id == instance_id and second != first
    assert node.process()["prepared"] == 0


def test_prepare_leaves_studies_it_cannot_help(node: _Node, base: Runtime, tmp_path: Path) -> None:
    queued_id, queued = node.receive(_chest_cr("queued"))
    sweep(node.ledger, 0, 60, node.rt.publish)  # quiet: the job has the study
    prepare(node.rt, queued_id)
    lateral = _chest_cr("lateral")
    lateral.ViewPosition = "LL"
    lateral_id, lateral_sha = node.receive(lateral)
    prepare(node.rt, lateral_id)  # ineligible: the job records the reason
    prepare(node.rt, 10_000)  # no such instance
    switched_off = _Node(tmp_path / "off", base, prepare_on_arrival=False)
    off_id, off_sha = switched_off.receive(_chest_cr("off"))
    prepare(switched_off.rt, off_id)
    assert queued not in node.cache and lateral_sha not in node.cache and off_sha not in switched_off.cache
    assert not any(node.cache.folder.glob("*")) and not any(switched_off.cache.folder.glob("*"))
    switched_off.ledger.close()


def test_a_damaged_entry_is_recomputed(node: _Node) -> None:
    instance_id, sha256 = node.receive(_chest_cr("damaged"))
    prepare(node.rt, instance_id)
    node.cache.path(sha256).write_bytes(b"PK\x03\x04 not a whole npz")
    assert node.process()["prepared"] == 0
    files, findings, _ = node.results()
    assert sorted(files) == ["SC", "SR"] and len(findings) == 4


def test_a_job_waits_for_a_hint_at_work_instead_of_decoding_twice(node: _Node, base: Runtime) -> None:
    instance_id, sha256 = node.receive(_chest_cr("in-flight"))
    prepare(node.rt, instance_id)
    entry = node.cache.load(sha256)
    assert entry is not None
    node.cache.discard([sha256])
    inferred = base.batcher().images
    with node.cache.preparing(sha256) as mine:  # a hint is at work on this image
        assert mine
        prepare(node.rt, instance_id)  # a duplicated hint leaves it to the first
        assert sha256 not in node.cache and base.batcher().images == inferred
        threading.Timer(0.3, node.cache.store, args=(sha256, entry)).start()
        started = time.perf_counter()
        waited = node.cache.load_when_ready(sha256)
        assert waited is not None and time.perf_counter() - started >= 0.25
        assert np.array_equal(waited.probabilities, entry.probabilities)
    assert not node.cache.marker(sha256).exists()
    assert node.process()["prepared"] == 1 and base.batcher().images == inferred


def test_a_marker_left_by_a_dead_hint_is_not_waited_for(node: _Node) -> None:
    _instance_id, sha256 = node.receive(_chest_cr("stale-marker"))
    with node.cache.preparing(sha256):
        old = time.time() - PREPARING_SECONDS - 1
        os.utime(node.cache.marker(sha256), (old, old))  # as a killed worker leaves it
        started = time.perf_counter()
        assert node.cache.load_when_ready(sha256) is None
        assert time.perf_counter() - started < 0.5
    assert node.process()["prepared"] == 0  # the job decoded and inferred it itself


def test_a_fresh_marker_of_a_killed_process_is_not_waited_for(node: _Node) -> None:
    _instance_id, sha256 = node.receive(_chest_cr("dead-holder"))
    dead = subprocess.Popen(["true"])  # a pid that has just ended
    dead.wait()
    with node.cache.preparing(sha256):
        node.cache.marker(sha256).write_text(f"{socket.gethostname()}:serve:{dead.pid}")  # kill -9 left it
        started = time.perf_counter()
        assert node.cache.load_when_ready(sha256) is None
        assert time.perf_counter() - started < 0.5


def test_intake_hints_accepted_instances_without_waiting_for_the_broker(node: _Node) -> None:
    release, hints = threading.Event(), []

    def slow_broker(task: str, row_id: int) -> bool:
        release.wait(5)
        hints.append((task, row_id))
        return True

    receiver = LedgerReceiver(node.ledger, slow_broker)
    stored = [StoredInstance(association=None, sop_class_uid=ComputedRadiographyImageStorage, sop_instance_uid=sop,
                             study_instance_uid="1.2.3", series_instance_uid="1.2.3.1",
                             transfer_syntax_uid=ExplicitVRLittleEndian, modality="CR", path=f"/spool/{sop}",
                             size=10, sha256="a" * 64) for sop in ("1.2.3.1.1", "1.2.3.1.1", "1.2.3.1.2")]
    started = time.perf_counter()
    for instance in stored:  # the second is an identical duplicate
        receiver.instance_stored(instance)
    assert time.perf_counter() - started < 0.5 and hints == []  # the broker has not answered yet
    release.set()
    wait_for(lambda: len(hints) >= 2, 5, "the hints")  # in order: one for the duplicate would come second
    with node.ledger.session() as s:
        ids = s.scalars(select(Instance.id).order_by(Instance.id)).all()
    assert hints == [(PREPARE_TASK, ids[0]), (PREPARE_TASK, ids[1])]


def test_prune_removes_only_entries_older_than_the_orphan_age(tmp_path: Path) -> None:
    old, fresh, stray = (tmp_path / "demo-0.1.0-abc" / name for name in ("a.npz", "b.npz", ".c.tmp"))
    old.parent.mkdir()
    for path in (old, fresh, stray):
        path.write_bytes(b"x")
    day_ago = time.time() - ORPHAN_SECONDS - 60
    for path in (old, stray):
        os.utime(path, (day_ago, day_ago))
    assert prune(tmp_path) == 2
    assert sorted(p.name for p in old.parent.iterdir()) == ["b.npz"]
    assert prune(tmp_path / "missing") == 0
