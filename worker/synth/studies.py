"""Synthetic CR/DX instances built from the NIH ChestX-ray14 sample, for tests and benchmarks.

Each 512x512 8-bit PNG is resampled (bicubic) back to its original matrix (the NIH
originals were squashed to a square, so this also restores the aspect ratio) and stored
as 12-bit MONOCHROME2 with the original pixel spacing, view position, age and sex from
``labels.csv``. Identities are synthetic and deterministic: patient 75 becomes
``SYNTH^P00000075`` / ``NIH-00000075`` with a birth date consistent with the listed age,
and all UIDs are derived from the image name (see :mod:`dicom_node.results.uids`).

Command line: ``pleura synth --images DIR --labels CSV --out DIR [--limit N] [--modality CR|DX]
[--transfer-syntax explicit|j2k|rle|jpegls] [--same-study]``.
"""

from __future__ import annotations

import csv
import datetime
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from dicom_node.results.uids import derive_uid

#: Lossless transfer syntaxes the generator can write (JPEG-LS needs ``pyjpegls``).
TRANSFER_SYNTAXES: dict[str, UID] = {
    "explicit": ExplicitVRLittleEndian,
    "j2k": JPEG2000Lossless,
    "rle": RLELossless,
    "jpegls": JPEGLSLossless,
}
_SOP_CLASSES = {"CR": ComputedRadiographyImageStorage, "DX": DigitalXRayImageStorageForPresentation}
_BITS_STORED = 12
_MAX_VALUE = (1 << _BITS_STORED) - 1
_VIEW_CODES = {"PA": codes.SCT.PosteroAnterior, "AP": codes.SCT.AnteroPosterior}
_FIRST_STUDY_DATE = datetime.date(2014, 1, 6)
_MANUFACTURER = "Pleura synthetic (NIH ChestX-ray14)"


def png_to_dataset(
    png_path: str | Path,
    row: Mapping[str, str],
    *,
    modality: str = "CR",
    transfer_syntax: str = ExplicitVRLittleEndian,
    study_uid: str | None = None,
) -> Dataset:
    """Build a CR or DX (For Presentation) instance from one NIH PNG and its labels row.

    ``study_uid`` puts the instance into an existing study (to build multi-image
    studies); by default each image is its own study, derived from the image name.
    """
    if modality not in _SOP_CLASSES:
        raise ValueError(f"modality must be CR or DX, not {modality!r}")
    transfer_syntax = UID(transfer_syntax)
    if transfer_syntax not in TRANSFER_SYNTAXES.values():
        raise ValueError(f"unsupported transfer syntax {transfer_syntax}")
    pixels = _resample(Path(png_path), rows=int(row["original_height"]),
                       columns=int(row["original_width"]))
    study_uid = study_uid or derive_uid("synthetic-study", row["image"])
    ds = Dataset()
    _add_patient(ds, row)
    _add_study(ds, row, study_uid)
    _add_series_and_instance(ds, row, modality, study_uid)
    _add_image_pixel(ds, pixels, float(row["pixel_spacing_mm"]))
    if modality == "DX":
        _add_dx_modules(ds, row["view"])
    ds.file_meta = _file_meta(ds)
    if transfer_syntax.is_compressed:
        ds.compress(transfer_syntax, pixels, generate_instance_uid=False)
    return ds


def write_dataset_folder(
    images_dir: str | Path,
    labels_csv: str | Path,
    out_dir: str | Path,
    *,
    limit: int | None = None,
    modality: str = "CR",
    transfer_syntax: str = ExplicitVRLittleEndian,
    single_study: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Write one ``<image stem>.dcm`` per labels row (the first ``limit`` rows) to ``out_dir``.

    ``single_study`` puts every image into one study of the first row's patient (a
    multi-image study for pipeline and fault tests). ``progress(done, total)`` is called
    after each file.
    """
    rows = read_labels(labels_csv)[:limit]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    study_uid = derive_uid("synthetic-study", rows[0]["image"]) if single_study and rows else None
    for done, row in enumerate(rows, start=1):
        if single_study:
            row = {**row, **{k: rows[0][k] for k in ("patient_id", "follow_up", "age", "sex")}}
        ds = png_to_dataset(Path(images_dir) / row["image"], row, modality=modality,
                            transfer_syntax=transfer_syntax, study_uid=study_uid)
        path = out / f"{Path(row['image']).stem}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
        if progress is not None:
            progress(done, len(rows))
    return written


def read_labels(labels_csv: str | Path) -> list[dict[str, str]]:
    """The rows of ``labels.csv`` as dicts, in file order."""
    with open(labels_csv, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _resample(png_path: Path, *, rows: int, columns: int) -> np.ndarray:
    """The PNG resampled to ``rows`` x ``columns`` and rescaled to 12 bits (uint16)."""
    with Image.open(png_path) as image:
        gray = image.convert("L").convert("F")
    resized = gray.resize((columns, rows), Image.Resampling.BICUBIC)
    scaled = np.asarray(resized, dtype=np.float32) * (_MAX_VALUE / 255.0)
    return np.clip(np.rint(scaled), 0, _MAX_VALUE).astype(np.uint16)


def _study_date(row: Mapping[str, str]) -> datetime.date:
    """A synthetic, deterministic study date (follow-ups are 30 days apart)."""
    offset = int(row["patient_id"]) % 1000 + 30 * int(row["follow_up"])
    return _FIRST_STUDY_DATE + datetime.timedelta(days=offset)


def _birth_date(study_date: datetime.date, age: int, patient_id: int) -> datetime.date:
    """A birth date that makes the patient exactly ``age`` years old on ``study_date``."""
    try:
        anniversary = study_date.replace(year=study_date.year - age)
    except ValueError:  # 29 February in a non-leap year
        anniversary = study_date.replace(year=study_date.year - age, day=28)
    return anniversary - datetime.timedelta(days=1 + patient_id % 364)


def _add_patient(ds: Dataset, row: Mapping[str, str]) -> None:
    patient_id, age = int(row["patient_id"]), int(row["age"])
    ds.PatientName = f"SYNTH^P{patient_id:08d}"
    ds.PatientID = f"NIH-{patient_id:08d}"
    ds.IssuerOfPatientID = "PLEURA-SYNTHETIC"
    ds.PatientBirthDate = _birth_date(_study_date(row), age, patient_id).strftime("%Y%m%d")
    ds.PatientSex = row["sex"] if row["sex"] in ("M", "F") else "O"
    ds.PatientAge = f"{age:03d}Y"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "Synthetic identity derived from NIH ChestX-ray14 patient id"


def _add_study(ds: Dataset, row: Mapping[str, str], study_uid: str) -> None:
    stem = Path(row["image"]).stem
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = _study_date(row).strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "093000"
    ds.AccessionNumber = stem.replace("_", "")[:16]
    ds.StudyID = ds.AccessionNumber
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "XR CHEST"


def _add_series_and_instance(
    ds: Dataset, row: Mapping[str, str], modality: str, study_uid: str
) -> None:
    image = row["image"]
    ds.SOPClassUID = _SOP_CLASSES[modality]
    ds.SOPInstanceUID = derive_uid("synthetic-instance", study_uid, image, modality)
    ds.SeriesInstanceUID = derive_uid("synthetic-series", study_uid, image, modality)
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SeriesDescription = f"Chest {row['view']} (synthetic)"
    ds.Manufacturer = _MANUFACTURER
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = row["view"]
    ds.PatientOrientation = ["L", "F"]
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.DerivationDescription = (
        f"Synthetic: NIH ChestX-ray14 {image} (512x512, 8 bit) resampled to the original "
        f"matrix and rescaled to {_BITS_STORED} bits"
    )
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"


def _add_image_pixel(ds: Dataset, pixels: np.ndarray, spacing_mm: float) -> None:
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = _BITS_STORED
    ds.HighBit = _BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.PixelSpacing = ds.ImagerPixelSpacing = [f"{spacing_mm:g}", f"{spacing_mm:g}"]
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.WindowCenter = str((_MAX_VALUE + 1) // 2)
    ds.WindowWidth = str(_MAX_VALUE + 1)
    ds.PixelData = pixels.tobytes()


def _add_dx_modules(ds: Dataset, view: str) -> None:
    """DX Series, Anatomy Imaged, Image, Detector, Positioning and Acquisition Context."""
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageLaterality = "U"
    ds.AnatomicRegionSequence = [_code_item(codes.SCT.Chest)]
    if view in _VIEW_CODES:
        ds.ViewCodeSequence = [_code_item(_VIEW_CODES[view])]
    ds.PositionerType = ""
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = -1
    ds.PresentationLUTShape = "IDENTITY"
    ds.DetectorType = ""
    ds.AcquisitionContextSequence = []


def _code_item(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _file_meta(ds: Dataset) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta
