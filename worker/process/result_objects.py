"""A job's result objects: one SC per image and the study revision's SR, built and written.

:func:`build_study` takes picklable values and touches nothing but the outbox, so that the
pipeline runs it in a process of :mod:`worker.cpu` (highdicom and pydicom hold the GIL for the
whole build). UIDs derive from the inputs and the model: the same
images and model give the same objects, and an object already written (same UID) keeps its bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom import Dataset, dcmread

from dicom_node.results.content import Algorithm, FindingResult, ImageResult
from dicom_node.results.sc import build_sc
from dicom_node.results.sr import build_sr
from dicom_node.results.uids import derive_uid
from dicom_node.spool import atomic_write
from worker.ledger.models import SC_KIND, SR_KIND

SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
NOT_ANALYSED_SERIES_NUMBER = 9903
#: Name of the bundle finding used as the study-level triage summary, when the bundle has it.
SUMMARY_FINDING = "Abnormal"


@dataclass(frozen=True)
class Output:
    """One object in the outbox, as the ledger records it."""

    kind: str
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    path: Path
    source_sop_instance_uid: str | None = None
    predecessor_sop_instance_uid: str | None = None


@dataclass(frozen=True)
class Image:
    """One processed image: its SOP Instance UID, bytes' sha256, arrival rank and result."""

    sop_instance_uid: str
    sha256: str
    number: int
    result: ImageResult


@dataclass(frozen=True)
class StudyRevision:
    """What the builders need: the images of one study revision and the model's identity
    (``model``: the parts of the UIDs that name it)."""

    study_uid: str
    revision: int
    folder: Path
    algorithm: Algorithm
    model: tuple[str, str, str]
    images: tuple[Image, ...]
    previous_sr_path: str | None


def build_study(study: StudyRevision) -> list[Output]:
    """The SC of each image, then the SR, built and written in turn (one call: in one CPU process
    they leave the others to the next studies' decoding; built at once, each in its own, they made
    a backlog at 1 study/s on 2 cores, docs/performance.md)."""
    return [*(build_sc_object(study, image) for image in study.images), build_sr_object(study)]


def build_sc_object(study: StudyRevision, image: Image) -> Output:
    """The SC of one image, written to ``study.folder``."""
    sc_uid = derive_uid("sc", image.sop_instance_uid, image.sha256, *study.model)
    sc = build_sc(image.result, study.algorithm,
                  series_instance_uid=derive_uid("sc-series", study.study_uid, *study.model),
                  sop_instance_uid=sc_uid, series_number=SC_SERIES_NUMBER, instance_number=image.number)
    return written(SC_KIND, sc, study.folder / f"{sc_uid}.dcm", source=image.sop_instance_uid)


def build_sr_object(study: StudyRevision) -> Output:
    """The study revision's SR (superseding ``previous_sr_path``), written to ``study.folder``."""
    input_key = hashlib.sha256(
        "|".join(f"{image.sop_instance_uid}:{image.sha256}" for image in study.images).encode()).hexdigest()
    sr_uid = derive_uid("sr", study.study_uid, input_key, *study.model)
    predecessor = dcmread(study.previous_sr_path) if study.previous_sr_path else None
    if predecessor is not None and str(predecessor.SOPInstanceUID) == sr_uid:
        predecessor = None
    results = [image.result for image in study.images]
    sr = build_sr(results, study.algorithm,
                  series_instance_uid=derive_uid("sr-series", study.study_uid, *study.model),
                  sop_instance_uid=sr_uid, series_number=SR_SERIES_NUMBER, instance_number=study.revision,
                  predecessor=predecessor, study_summary=_summary(results))
    return written(SR_KIND, sr, study.folder / f"{sr_uid}.dcm", predecessor=predecessor)


def written(kind: str, dataset: Dataset, path: Path, source: str | None = None,
            predecessor: Dataset | None = None) -> Output:
    """``dataset`` written to ``path`` (atomically; unless that object is there already)."""
    if not path.exists():
        atomic_write(path, _encode(dataset))
    return Output(kind, str(dataset.SOPInstanceUID), str(dataset.SOPClassUID), str(dataset.SeriesInstanceUID),
                  path, source, str(predecessor.SOPInstanceUID) if predecessor is not None else None)


def _encode(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _summary(results: list[ImageResult]) -> FindingResult | None:
    """The study's triage score: the highest per-image value of the summary finding."""
    candidates = [f for r in results for f in r.findings if f.name == SUMMARY_FINDING]
    return max(candidates, key=lambda f: f.probability) if candidates else None
