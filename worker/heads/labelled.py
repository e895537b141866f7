"""Labelled image sets for evaluation and heads: CSV labels, images, and their embeddings.

Labels come from a CSV keyed by image file name (column ``image``, ``Image Index``, ``filename``
or ``--image-column``), either NIH-style (``findings`` or ``Finding Labels``: names joined by
``|``, ``No Finding`` for none; the finding ``Abnormal`` then means any label but ``No Finding``)
or one 0/1 column per finding. Patients come from ``patient_id``/``Patient ID`` (or
``--patient-column``); without one, every image counts as its own patient. Images are PNG/JPEG
or DICOM files; rows whose image is absent are left out and counted. Embeddings and
probabilities are cached in an ``.npz`` per bundle model hash (:func:`embed`).

:func:`ledger_table` reads instead the embeddings the worker archived (table ``embeddings``)
for a bundle, labelled by a CSV keyed by ``StudyInstanceUID`` (each of the study's images gets
the study's label) or ``SOPInstanceUID``; folds group by the CSV's patient column, else by study.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from worker.progress import Progress
from worker.settings import Settings

IMAGE_COLUMNS = ("image", "Image Index", "image_name", "filename", "file")
PATIENT_COLUMNS = ("patient_id", "Patient ID", "PatientID")
LIST_COLUMNS = ("findings", "Finding Labels")
NONE_LABEL = "No Finding"
CACHE = "embeddings.npz"


@dataclass(frozen=True)
class LabelTable:
    """Rows of a labels CSV whose image was found under the images folder."""

    names: list[str]
    paths: list[Path]
    patients: list[str]
    rows: list[dict[str, str]]
    list_column: str | None
    has_patients: bool
    n_missing: int

    def labels(self, finding: str) -> np.ndarray | None:
        """Boolean labels of ``finding``, or None when the CSV does not label it."""
        if self.list_column is not None:
            present = [set(r[self.list_column].split("|")) - {NONE_LABEL, ""} for r in self.rows]
            if finding == "Abnormal":
                return np.array([bool(p) for p in present])
            if not any(finding in p for p in present):
                return None
            return np.array([finding in p for p in present])
        if finding not in self.rows[0]:
            return None
        return np.array([r[finding].strip().lower() in ("1", "1.0", "true", "yes") for r in self.rows])


def read_labels(labels: Path, images: Path, image_column: str | None = None,
                patient_column: str | None = None) -> LabelTable:
    with open(labels, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{labels} has no rows")
    columns = list(rows[0])
    image_col = image_column or next((c for c in IMAGE_COLUMNS if c in columns), None)
    if image_col not in columns:
        raise ValueError(f"{labels}: no image-name column (one of {', '.join(IMAGE_COLUMNS)} or --image-column)")
    patient_col = patient_column or next((c for c in PATIENT_COLUMNS if c in columns), None)
    if patient_column and patient_column not in columns:
        raise ValueError(f"{labels}: no column {patient_column!r}")
    files = {p.name: p for p in sorted(images.rglob("*")) if p.is_file()}
    kept = [r for r in rows if r[image_col] in files]
    if not kept:
        raise ValueError(f"none of the {len(rows)} images named in {labels} is under {images}")
    names = [r[image_col] for r in kept]
    return LabelTable(
        names=names,
        paths=[files[n] for n in names],
        patients=[r[patient_col] for r in kept] if patient_col else names,
        rows=kept,
        list_column=next((c for c in LIST_COLUMNS if c in columns), None),
        has_patients=patient_col is not None,
        n_missing=len(rows) - len(kept),
    )


def read_image(path: Path) -> np.ndarray:
    """A 2-D float32 MONOCHROME2 image in [0, 1] from a PNG/JPEG (by its bit depth) or a DICOM file."""
    if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff"):
        from PIL import Image

        with Image.open(path) as im:
            pixels = np.asarray(im if im.mode in ("L", "I;16", "I") else im.convert("L"))
        top = 65535.0 if pixels.dtype != np.uint8 else 255.0
        return (pixels.astype(np.float32) / np.float32(top)).clip(0.0, 1.0)
    import pydicom

    from dicom_node.pixels import decode

    return decode(pydicom.dcmread(path))


def embed(settings: Settings, model: str, backend: str, table: LabelTable, cache: Path,
          progress=print) -> tuple[Any, np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """(bundle, embeddings, probabilities) of the table's images, from ``cache`` where it holds them."""
    from worker.bundles import catalogue

    bundle = catalogue.bundle(settings, model)
    known: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            if str(z["model_sha256"]) == bundle.model_sha256:
                known = {str(n): (e, p) for n, e, p in zip(z["images"], z["embeddings"], z["probabilities"],
                                                           strict=True)}
    todo = [i for i, n in enumerate(table.names) if n not in known]
    if todo:
        from engines.runtime import load

        engine = load(bundle, backend=backend)
        progress(f"running {bundle.name} {bundle.version} on {engine.backend} over {len(todo)} images "
                 f"({len(table.names) - len(todo)} cached)")
        bar = Progress(len(todo), "images")
        for start in range(0, len(todo), 64):
            part = todo[start:start + 64]
            result = engine.infer([read_image(table.paths[i]) for i in part])
            bar.advance(len(part))
            for i, e, p in zip(part, result.embeddings, result.probabilities, strict=True):
                known[table.names[i]] = (e, p)
        cache.parent.mkdir(parents=True, exist_ok=True)
        names = sorted(known)
        np.savez(cache, images=np.array(names), embeddings=np.stack([known[n][0] for n in names]),
                 probabilities=np.stack([known[n][1] for n in names]),
                 findings=np.array([f.name for f in bundle.findings]), bundle_name=bundle.name,
                 bundle_version=bundle.version, model_sha256=bundle.model_sha256)
    embeddings = np.stack([known[n][0] for n in table.names]).astype(np.float32)
    return bundle, embeddings, np.stack([known[n][1] for n in table.names]).astype(np.float32)


UID_COLUMNS = ("StudyInstanceUID", "SOPInstanceUID")


def ledger_table(settings: Settings, model: str, labels: Path,
                 patient_column: str | None = None) -> tuple[Any, LabelTable, np.ndarray]:
    """(bundle, table, unit embeddings) of the archived images of ``model`` that the CSV labels."""
    from sqlalchemy import select

    from worker.bundles import catalogue
    from worker.ledger import Embedding, Instance, Study
    from worker.ledger.db import Ledger

    bundle = catalogue.bundle(settings, model)
    with open(labels, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = list(rows[0]) if rows else []
    key = next((c for c in UID_COLUMNS if c in columns), None)
    if key is None:
        raise ValueError(f"{labels}: --from-ledger needs a {' or '.join(UID_COLUMNS)} column")
    patient_col = patient_column or next((c for c in PATIENT_COLUMNS if c in columns), None)
    by_uid = {r[key]: r for r in rows}
    ledger = Ledger(settings.effective_database_url)
    try:
        with ledger.session() as s:
            found = s.execute(
                select(Instance.sop_instance_uid, Study.study_instance_uid, Embedding.vector)
                .join(Instance, Instance.id == Embedding.instance_id).join(Study, Study.id == Embedding.study_id)
                .where(Embedding.bundle_name == bundle.name, Embedding.bundle_version == bundle.version)
                .order_by(Instance.sop_instance_uid)).all()
    finally:
        ledger.engine.dispose()
    kept = [(sop, study, vector) for sop, study, vector in found
            if (study if key == "StudyInstanceUID" else sop) in by_uid]
    if not kept:
        raise ValueError(f"the ledger holds no {bundle.name} {bundle.version} embedding of the {len(rows)} "
                         f"UIDs in {labels}")
    csv_rows = [by_uid[study if key == "StudyInstanceUID" else sop] for sop, study, _ in kept]
    table = LabelTable(
        names=[sop for sop, _, _ in kept], paths=[], rows=csv_rows,
        patients=[r[patient_col] for r in csv_rows] if patient_col else [study for _, study, _ in kept],
        list_column=next((c for c in LIST_COLUMNS if c in columns), None), has_patients=patient_col is not None,
        n_missing=len(rows) - len({r[key] for r in csv_rows}))
    return bundle, table, np.stack([np.frombuffer(v, dtype=np.float32) for _, _, v in kept])


def report_table(settings: Settings, model: str, finding: str,
                 uncertain: str = "exclude") -> tuple[Any, LabelTable, np.ndarray]:
    """(bundle, table, unit embeddings) of the archived images of ``model`` whose study has a current
    final report, labelled for ``finding`` by it (worker.reports.labels); folds group by study."""
    from sqlalchemy import select

    from worker.bundles import catalogue
    from worker.ledger import Embedding, Instance, Study
    from worker.ledger.db import Ledger
    from worker.reports.labels import current_labels, finding_label, truth

    bundle = catalogue.bundle(settings, model)
    ledger = Ledger(settings.effective_database_url)
    try:
        with ledger.session() as s:
            labels = current_labels(s)
            found = s.execute(
                select(Instance.sop_instance_uid, Study.study_instance_uid, Study.id, Embedding.vector)
                .join(Instance, Instance.id == Embedding.instance_id).join(Study, Study.id == Embedding.study_id)
                .where(Embedding.bundle_name == bundle.name, Embedding.bundle_version == bundle.version,
                       Study.id.in_(list(labels)))
                .order_by(Instance.sop_instance_uid)).all()
    finally:
        ledger.engine.dispose()
    said = [(sop, study, vector, truth(finding_label(labels[sid], finding), uncertain))  # type: ignore[arg-type]
            for sop, study, sid, vector in found]
    kept = [(sop, study, vector, y) for sop, study, vector, y in said if y is not None]
    if not kept:
        raise ValueError(f"the ledger holds no {bundle.name} {bundle.version} embedding of a study with a final "
                         f"report labelling {finding!r} ({len(labels)} studies have one)")
    table = LabelTable(
        names=[sop for sop, *_ in kept], paths=[], rows=[{finding: "1" if y else "0"} for *_, y in kept],
        patients=[study for _, study, _, _ in kept], list_column=None, has_patients=False,
        n_missing=len(said) - len(kept))
    return bundle, table, np.stack([np.frombuffer(v, dtype=np.float32) for _, _, v, _ in kept])
