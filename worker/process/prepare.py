"""Prepare role: decode and infer each image as soon as it arrives, into the prepared cache.

The listener publishes a ``pleura.prepare`` hint per accepted instance; when the study's quiet
period ends, its job finds the images' outputs ready and only builds and delivers the SR and
SC. A hint may be lost, duplicated or late: the job computes whatever the cache lacks, so a
failure here is logged (its type only) and dropped.
"""

from __future__ import annotations

import structlog
from pydicom import dcmread

from dicom_node.results.sc import display_image
from worker.ledger import Instance, Study
from worker.ledger.models import StudyState
from worker.process import eligibility
from worker.process.cache import Prepared, PreparedCache
from worker.runtime import Runtime
from worker.storage import instance_key
from worker.storage.base import fetched

log = structlog.get_logger(__name__)

#: Study states in which the job has read, or will not read, the cache: an entry written now is an orphan.
_FINISHED = (StudyState.DONE, StudyState.FAILED)


def prepare(rt: Runtime, instance_id: int) -> None:
    """Cache the outputs of one instance unless its study's job has claimed it or they are cached."""
    if not rt.settings.prepare_on_arrival:
        return
    try:
        _prepare(rt, instance_id)
    except Exception as exc:  # a hint: the job does the work instead
        log.warning("prepare failed; the job will decode and infer the image", instance_id=instance_id,
                    error=type(exc).__name__)


def _prepare(rt: Runtime, instance_id: int) -> None:
    with rt.ledger.session() as s:
        instance = s.get(Instance, instance_id)
        if instance is None:
            return
        recorded, sha256, study_id = instance.spool_path, instance.sha256, instance.study_id
        state = instance.study.state
    if state != StudyState.RECEIVING:
        log.debug("prepare skipped: the study's job has it", instance_id=instance_id, state=state)
        return
    engine = rt.engine()
    cache = PreparedCache.of(rt.settings, engine.bundle)
    if sha256 in cache:
        return
    with cache.preparing(sha256) as mine:
        if not mine:
            return  # a duplicated hint: the other one computes it
        with fetched(rt.storage(), instance_key(sha256), recorded) as path:
            ds = dcmread(path)
            if eligibility.check(ds, engine.bundle.intended_use) is not None:
                return  # the job records the reason
            pixels = rt.cpu().decode(ds, str(path))
        entry = Prepared.from_output(rt.batcher().infer([pixels]), 0, display_image(pixels))
        cache.store(sha256, entry)
    with rt.ledger.session() as s:
        study = s.get(Study, study_id)
        finished = study is None or study.state in _FINISHED
    if finished:  # the job ran meanwhile and has already emptied the cache
        cache.discard([sha256])
