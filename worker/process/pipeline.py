"""Process role: one claimed job from spool to SR + SC in the outbox and delivery rows.

Eligibility gate, decoding, batched inference and the result objects; the ledger is only
written in one finishing transaction, and only while this worker's lease holds. An image
prepared on arrival (worker.process.prepare) is taken from the cache, its header alone read again;
the others are decoded and inferred here. Either way the job builds the same SR and SC.

A study with no eligible image gets no SR or SC. When at least one of its images is a chest
X-ray that the gate refused for a chest-domain reason (worker.process.eligibility.Refusal: view, age,
photometric interpretation, undecodable pixels) it gets a not-analysed notice instead (an
Enhanced SR saying so and why; ``PLEURA_NOTIFY_NOT_ANALYSED=false`` turns it off), recorded
and delivered like the others under the kind ``SR-NA``. The notice is a document of its own:
the findings SR of a later revision that has an eligible image does not name it as its
predecessor (it incorporates nothing of it); a later notice for the same study does.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import structlog
from pydicom import Dataset, dcmread
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from dicom_node.pixels import UndecodableImage, decode
from dicom_node.results.content import Algorithm, ImageResult
from dicom_node.results.not_analysed import build_not_analysed
from dicom_node.results.sc import display_image
from dicom_node.results.uids import derive_uid
from engines import Engine
from engines.batching import DynamicBatcher
from worker.embeddings import EmbeddingArchive
from worker.ledger import Attempt, Delivery, Finding, Instance, Job, OutputObject, Study
from worker.ledger.db import as_utc, utcnow
from worker.ledger.events import record
from worker.ledger.models import NOT_ANALYSED_KIND, SR_KIND, DeliveryState, JobState, StudyState
from worker.logging import log_context
from worker.notify import release
from worker.observability.metrics import observe_stage
from worker.process import eligibility
from worker.process.cache import Prepared, PreparedCache
from worker.process.jobs import (
    Isolation,
    LeaseKeeper,
    LeaseLost,
    claim,
    fail,
    give_back,
    ledger_unreachable,
    previous_attempt_died,
    still_owned,
)
from worker.process.result_objects import (
    NOT_ANALYSED_SERIES_NUMBER,
    Image,
    Output,
    StudyRevision,
    build_study,
    written,
)
from worker.queue import DELIVER_TASK, NOTIFY_TASK
from worker.runtime import Runtime
from worker.storage import Storage, instance_key, output_key
from worker.storage.base import fetched
from worker.version import __version__

log = structlog.get_logger(__name__)

#: ``studies.note`` of a study without an eligible image, with and without a not-analysed notice.
_NOTE_NO_ELIGIBLE = "no eligible images"
_NOTE_NOT_ANALYSED = "no eligible images; not-analysed SR produced"
#: One per process: jobs suspected of killing it run alone.
ISOLATION = Isolation()


@dataclass(frozen=True)
class _Source:
    instance_id: int
    sop_instance_uid: str
    path: str
    sha256: str
    number: int  # arrival rank in the study: the instance number of its SC


def run_job(rt: Runtime, job_id: int) -> None:
    """Claim, process and finish one job; failures are recorded and retried by the sweeper.

    A job whose previous attempt died with its worker runs alone in this process (see
    :class:`worker.process.jobs.Isolation`), so a poison study cannot take other studies down with it.
    """
    with log_context(job_id=job_id):
        with ISOLATION.hold(exclusive=previous_attempt_died(rt.ledger, job_id)):
            messages = _claim_and_process(rt, job_id)
        for task, row_id in messages:
            rt.publish(task, row_id)


def _claim_and_process(rt: Runtime, job_id: int) -> list[tuple[str, int]]:
    """The messages to publish once the job's results are committed: deliveries, notifications."""
    attempt_id = claim(rt.ledger, job_id, rt.settings.lease_seconds, rt.settings.max_attempts)
    if attempt_id is None:
        log.info("job not claimed (done, superseded, quarantined or leased elsewhere)", job_id=job_id)
        return []
    try:
        with LeaseKeeper(rt.ledger, job_id, rt.settings.lease_seconds):
            return _process(rt, job_id, attempt_id)
    except LeaseLost:
        log.warning("lease lost; results dropped", job_id=job_id)
    except Exception as exc:  # recorded against the attempt, which a ledger outage does not charge
        if ledger_unreachable(exc):
            log.warning("ledger unreachable; attempt given back", job_id=job_id, error=type(exc).__name__)
            give_back(rt.ledger, job_id, attempt_id, exc, rt.settings.lease_seconds)
            return []
        log.exception("job failed", job_id=job_id)
        try:
            fail(rt.ledger, job_id, attempt_id, f"{type(exc).__name__}: {exc}", rt.settings.max_attempts)
        except SQLAlchemyError:  # the ledger is down too: the lease expires and the sweeper re-queues
            log.exception("failure could not be recorded", job_id=job_id)
    return []


def _process(rt: Runtime, job_id: int, attempt_id: int) -> list[tuple[str, int]]:
    engine = rt.engine()
    with rt.ledger.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        structlog.contextvars.bind_contextvars(study_id=job.study_id)
        study_uid, revision = job.study.study_instance_uid, job.revision
        # in arrival order, so an image keeps its SC instance number when the study grows
        sources = [
            _Source(i.id, i.sop_instance_uid, i.spool_path, i.sha256, number)
            for number, i in enumerate(sorted(job.study.instances, key=lambda i: i.id), start=1)
        ]
        previous_sr = _previous(s, job, engine.bundle.name, SR_KIND)
        previous_notice = _previous(s, job, engine.bundle.name, NOT_ANALYSED_KIND)

    storage = rt.storage()
    with ExitStack() as held:  # where the bytes are in the database, private copies for this job
        sources = [replace(source, path=_local(held, storage, instance_key(source.sha256), source.path))
                   for source in sources]
        previous_sr_path, previous_notice_path = (_local(held, storage, output_key(uid), path) if uid else None
                                                  for uid, path in (previous_sr, previous_notice))
        return _analyse(rt, engine, job_id, attempt_id, study_uid, revision, sources, previous_sr_path,
                        previous_notice_path)


def _local(held: ExitStack, storage: Storage, key: str, recorded: str) -> str:
    """A readable path of ``key``'s bytes for the rest of the job; the recorded one when they are not
    to be had (the gate then records the image as unreadable)."""
    try:
        return str(held.enter_context(fetched(storage, key, recorded)))
    except OSError as exc:
        log.warning("bytes not available", key=key.split(":")[0], error=type(exc).__name__)
        return recorded


def _analyse(rt: Runtime, engine: Engine, job_id: int, attempt_id: int, study_uid: str, revision: int,
             sources: list[_Source], previous_sr_path: str | None,
             previous_notice_path: str | None) -> list[tuple[str, int]]:
    """Gate, infer, build and record the results of one job from readable ``sources``."""
    cache = PreparedCache.of(rt.settings, engine.bundle)
    t0 = time.perf_counter()
    eligible, reasons = _gate(sources, engine.bundle.intended_use, cache.load_when_ready,
                              rt.cpu().decode)
    t1 = time.perf_counter()
    results, embeddings = _infer(rt.batcher(), engine, eligible)
    t2 = time.perf_counter()
    outputs = _build_outputs(rt, engine, study_uid, revision, results, eligible, previous_sr_path)
    if not eligible and rt.settings.notify_not_analysed:
        outputs = _build_not_analysed(rt, engine, study_uid, revision, sources, reasons, previous_notice_path)
    # seconds per step, for the audit trail: read+decode, preprocess+inference, SR/SC build+write;
    # and how many images came prepared on arrival (read: header only; inference: none)
    timings = {"decode_s": round(t1 - t0, 4), "inference_s": round(t2 - t1, 4),
               "build_s": round(time.perf_counter() - t2, 4),
               "prepared": sum(isinstance(image, Prepared) for _, _, image in eligible)}

    now = utcnow()
    with rt.ledger.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        if not still_owned(s, job):
            raise LeaseLost(job_id)
        for source in sources:
            instance = s.get(Instance, source.instance_id)
            assert instance is not None
            reason = reasons.get(source.instance_id)
            instance.ineligible_reason = str(reason) if reason is not None else None  # a plain str
        for (source, _ds, _px), result in zip(eligible, results, strict=True):
            for f in result.findings:
                s.add(Finding(job_id=job_id, instance_id=source.instance_id, finding=f.name,
                              probability=f.probability, threshold=f.threshold, positive=f.positive))
        EmbeddingArchive(rt.ledger).store(
            s, job_id=job_id, study_id=job.study_id, bundle_name=engine.bundle.name,
            bundle_version=engine.bundle.version, now=now,
            vectors=[(source.instance_id, vector) for (source, _, _), vector in zip(eligible, embeddings, strict=True)])
        delivery_ids = _record_outputs(s, rt, job_id, outputs, now)
        sr = s.scalars(select(OutputObject).where(OutputObject.job_id == job_id, OutputObject.kind == SR_KIND)).first()
        notification_ids = release.create(s, rt.settings, engine.bundle, job_id, sr, now) if sr else []
        job.state, job.finished_at, job.error = JobState.SUCCEEDED, now, None
        job.bundle_name, job.bundle_version = engine.bundle.name, engine.bundle.version
        job.backend = engine.backend
        attempt = s.get(Attempt, attempt_id)
        assert attempt is not None
        attempt.finished_at, attempt.outcome = now, "SUCCEEDED"
        processing_seconds = (now - as_utc(attempt.started_at)).total_seconds()
        study = s.get(Study, job.study_id)
        assert study is not None
        if study.revision == job.revision:
            study.state, study.done_at = StudyState.DONE, now
            study.note = None if eligible else _NOTE_NOT_ANALYSED if outputs else _NOTE_NO_ELIGIBLE
        record(s, "job_succeeded", study_id=study.id, job_id=job_id, images=len(eligible),
               skipped=len(reasons), outputs=len(outputs), backend=engine.backend, timings=timings)
    cache.discard(source.sha256 for source in sources)  # the spool keeps the sources
    if rt.storage().shared:  # the database holds the results now
        for output in outputs:
            Path(output.path).unlink(missing_ok=True)
    observe_stage("processing_to_results", processing_seconds)
    log.info("job done", job_id=job_id, images=len(eligible), outputs=len(outputs))
    return [(DELIVER_TASK, i) for i in delivery_ids] + [(NOTIFY_TASK, i) for i in notification_ids]


#: An eligible source, its dataset and either its decoded pixels or its prepared entry (then the
#: dataset is the header alone).
_Eligible = tuple[_Source, Dataset, np.ndarray | Prepared]


def _no_cache(_sha256: str) -> Prepared | None:
    return None


def _decode_here(ds: Dataset, _path: str) -> np.ndarray:
    return decode(ds)


def _previous(s: Session, job: Job, bundle_name: str, kind: str) -> tuple[str | None, str]:
    """The SOP Instance UID and path of the newest object of ``kind`` that another job of this study
    made with this bundle; (None, "") when there is none."""
    previous = s.scalars(
        select(OutputObject)
        .join(Job)
        .where(Job.study_id == job.study_id, Job.bundle_name == bundle_name,
               OutputObject.kind == kind, Job.id != job.id)
        .order_by(OutputObject.created_at.desc())
    ).first()
    return (previous.sop_instance_uid, previous.path) if previous else (None, "")


def _gate(
    sources: list[_Source], intended_use: dict, prepared: Callable[[str], Prepared | None] = _no_cache,
    decode_image: Callable[[Dataset, str], np.ndarray] = _decode_here,
) -> tuple[list[_Eligible], dict[int, eligibility.Refusal]]:
    """Read, check and decode every instance; return the eligible ones and the reasons of the rest.

    An instance with a ``prepared(sha256)`` entry is not decoded: its header is read and
    checked again (the bundle's intended use decides, as for any other image). The others are
    decoded by ``decode_image(dataset, path)`` (the worker's decoder processes; here by default).
    A hostile or broken file costs only its own image: any failure becomes its reason (the
    exception's type, never its message, which may quote attribute values). Only the gate's
    chest-domain refusals and pixels that cannot be decoded are chest domain; a file that
    cannot be read or parsed is not (nothing says it is a chest X-ray).
    """
    eligible: list[_Eligible] = []
    reasons: dict[int, eligibility.Refusal] = {}
    for source in sources:
        entry = prepared(source.sha256)
        try:
            ds = dcmread(source.path, stop_before_pixels=entry is not None)
        except MemoryError:
            raise
        except Exception as exc:  # unreadable file: reason in the ledger, study goes on
            reasons[source.instance_id] = eligibility.Refusal(f"unreadable: {type(exc).__name__}")
            continue
        try:
            reason = eligibility.check(ds, intended_use)
            if reason is None:
                eligible.append((source, ds, entry if entry is not None else decode_image(ds, source.path)))
                continue
        except UndecodableImage as exc:  # passed the gate: a chest X-ray the model cannot read
            reason = eligibility.undecodable(str(exc))
        except MemoryError:  # the machine's state, not the image's: the job fails and is retried
            raise
        except Exception as exc:  # e.g. an attribute that cannot be parsed, nesting too deep
            reason = eligibility.Refusal(f"invalid header: {type(exc).__name__}")
        reasons[source.instance_id] = reason
    return eligible, reasons


def _infer(
    batcher: DynamicBatcher, engine: Engine, eligible: list[_Eligible]
) -> tuple[list[ImageResult], list[np.ndarray]]:
    """The images not prepared in one request to the batcher, which merges concurrent studies;
    the image results (pixels reduced to the SC's size) and each image's embedding."""
    entries = {i: image for i, (_, _, image) in enumerate(eligible) if isinstance(image, Prepared)}
    decoded = [(i, image) for i, (_, _, image) in enumerate(eligible) if not isinstance(image, Prepared)]
    if decoded:
        out = batcher.infer([pixels for _, pixels in decoded])
        entries.update({i: Prepared.from_output(out, row, display_image(pixels))
                        for row, (i, pixels) in enumerate(decoded)})
    specs = {f.name: f for f in engine.bundle.reported_findings}
    results = [entries[i].image_result(ds, specs) for i, (_, ds, _) in enumerate(eligible)]
    return results, [entries[i].embedding for i in range(len(eligible))]


def _build_outputs(
    rt: Runtime,
    engine: Engine,
    study_uid: str,
    revision: int,
    results: list[ImageResult],
    eligible: list[_Eligible],
    previous_sr_path: str | None,
) -> list[Output]:
    """One SR per study revision and one SC per image (worker.process.result_objects), built in a CPU process."""
    if not results:
        return []
    algorithm, model = _algorithm(engine)
    images = tuple(Image(source.sop_instance_uid, source.sha256, source.number, result)
                   for (source, _ds, _px), result in zip(eligible, results, strict=True))
    study = StudyRevision(study_uid, revision, rt.settings.outbox_dir / study_uid, algorithm, model, images,
                          previous_sr_path)
    return rt.cpu().call(build_study, study)


def _build_not_analysed(
    rt: Runtime,
    engine: Engine,
    study_uid: str,
    revision: int,
    sources: list[_Source],
    reasons: dict[int, eligibility.Refusal],
    previous_path: str | None,
) -> list[Output]:
    """The not-analysed notice for a study without an eligible image, when at least one of its
    images was refused for a chest-domain reason; else nothing.

    It covers those images (its evidence) and says each distinct reason once, in arrival
    order. Its UID is derived from them (SOP Instance UID, bytes, reason) and the model, so the
    same refusals give the same notice, and an image outside the chest domain arriving later
    changes nothing.
    """
    refused = [(source, reasons[source.instance_id]) for source in sources
               if source.instance_id in reasons and reasons[source.instance_id].chest_domain]
    if not refused:
        return []
    algorithm, model = _algorithm(engine)
    notices = list(dict.fromkeys(str(refusal.notice) for _, refusal in refused))
    input_key = hashlib.sha256("|".join(
        f"{source.sop_instance_uid}:{source.sha256}:{refusal.notice}" for source, refusal in refused
    ).encode()).hexdigest()
    uid = derive_uid("not-analysed", study_uid, input_key, *model)
    predecessor = dcmread(previous_path, stop_before_pixels=True) if previous_path else None
    if predecessor is not None and str(predecessor.SOPInstanceUID) == uid:
        predecessor = None
    try:
        notice = build_not_analysed(
            [dcmread(source.path, stop_before_pixels=True) for source, _ in refused],  # read by the gate
            algorithm,
            "; ".join(notices),
            series_instance_uid=derive_uid("not-analysed-series", study_uid, *model),
            sop_instance_uid=uid,
            series_number=NOT_ANALYSED_SERIES_NUMBER,
            instance_number=revision,
            predecessor=predecessor,
        )
        outputs = [written(NOT_ANALYSED_KIND, notice, rt.settings.outbox_dir / study_uid / f"{uid}.dcm",
                           predecessor=predecessor)]
    except MemoryError:
        raise
    except Exception as exc:  # a header the SR cannot carry: the study ends without a notice, not FAILED
        log.warning("not-analysed SR not built", error=type(exc).__name__)  # the type: messages quote values
        return []
    return outputs


def _algorithm(engine: Engine) -> tuple[Algorithm, tuple[str, str, str]]:
    """What the result objects say produced them (with the trusted key that signed the bundle, when
    signatures are required), and the parts of their UIDs that name the model (its weights, not just its label)."""
    bundle = engine.bundle
    algorithm = Algorithm(
        name=bundle.name,
        manufacturer=eligibility.OWN_MANUFACTURER,
        version=bundle.version,
        software_version=__version__,
        parameters={"model_sha256": bundle.model_sha256[:16],
                    **({"signer_key": bundle.signer} if bundle.signer else {})},
    )
    return algorithm, (bundle.name, bundle.version, bundle.model_sha256[:16])


def _record_outputs(s: Session, rt: Runtime, job_id: int, outputs: list[Output], now: datetime) -> list[int]:
    """Insert output objects (skipping UIDs already produced) and one delivery per destination."""
    delivery_ids: list[int] = []
    for output in outputs:
        uid = output.sop_instance_uid
        if s.scalars(select(OutputObject.id).where(OutputObject.sop_instance_uid == uid)).first():
            continue
        obj = OutputObject(
            job_id=job_id,
            kind=output.kind,
            sop_instance_uid=uid,
            sop_class_uid=output.sop_class_uid,
            series_instance_uid=output.series_instance_uid,
            source_sop_instance_uid=output.source_sop_instance_uid,
            predecessor_sop_instance_uid=output.predecessor_sop_instance_uid,
            path=str(output.path),
            created_at=now,
        )
        s.add(obj)
        s.flush()
        rt.storage().keep(s, output_key(uid), Path(output.path))
        for destination in rt.settings.destinations:
            delivery = Delivery(output_object_id=obj.id, destination=str(destination),
                                state=DeliveryState.PENDING, next_attempt_at=now, published_at=now)
            s.add(delivery)
            s.flush()
            delivery_ids.append(delivery.id)
    return delivery_ids
