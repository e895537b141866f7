"""Synthetic CR/DX instances from the NIH ChestX-ray14 sample."""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.pixels.encoders import JPEGLSLosslessEncoder
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from tests.support import NIH
from worker.synth.studies import png_to_dataset, read_labels, write_dataset_folder

#: 00000100_000.png: 2500 x 2048 (the smallest matrix in the first rows), male, PA.
IMAGE = "00000100_000.png"


@pytest.fixture(scope="module")
def nih_dir() -> Path:
    if not (NIH / "labels.csv").is_file():
        pytest.skip(f"NIH sample {NIH} absent: the shared data folder is not beside the repo")
    return NIH


@pytest.fixture(scope="module")
def row(nih_dir: Path) -> dict[str, str]:
    return next(r for r in read_labels(nih_dir / "labels.csv") if r["image"] == IMAGE)


@pytest.fixture(scope="module")
def reference(nih_dir: Path, row: dict[str, str]) -> Dataset:
    """The uncompressed CR, saved and read back."""
    return png_to_dataset(nih_dir / "images" / IMAGE, row)


def _round_trip(ds: Dataset, path: Path) -> Dataset:
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def test_geometry_and_bit_depth(reference: Dataset, row: dict[str, str]) -> None:
    spacing = float(row["pixel_spacing_mm"])
    assert (reference.Rows, reference.Columns) == (
        int(row["original_height"]), int(row["original_width"])
    )
    assert [float(v) for v in reference.PixelSpacing] == [spacing, spacing]
    assert [float(v) for v in reference.ImagerPixelSpacing] == [spacing, spacing]
    assert (reference.BitsAllocated, reference.BitsStored, reference.HighBit) == (16, 12, 11)
    assert reference.PhotometricInterpretation == "MONOCHROME2"
    pixels = reference.pixel_array
    assert pixels.shape == (reference.Rows, reference.Columns)
    assert pixels.min() >= 0 and pixels.max() <= 4095
    assert pixels.max() > 3000  # the full 12-bit range is used, not just 8 bits


def test_identity_is_synthetic_and_consistent(reference: Dataset, row: dict[str, str]) -> None:
    assert str(reference.PatientName) == "SYNTH^P00000100"
    assert reference.PatientID == "NIH-00000100"
    assert reference.PatientAge == f"{int(row['age']):03d}Y"
    assert reference.PatientSex == row["sex"]
    assert (reference.Modality, reference.SOPClassUID) == ("CR", ComputedRadiographyImageStorage)
    assert (reference.BodyPartExamined, reference.ViewPosition) == ("CHEST", row["view"])
    born = datetime.datetime.strptime(reference.PatientBirthDate, "%Y%m%d").date()
    studied = datetime.datetime.strptime(reference.StudyDate, "%Y%m%d").date()
    had_birthday = (studied.month, studied.day) >= (born.month, born.day)
    assert studied.year - born.year - (0 if had_birthday else 1) == int(row["age"])


def test_uids_are_deterministic(nih_dir: Path, row: dict[str, str], reference: Dataset) -> None:
    again = png_to_dataset(nih_dir / "images" / IMAGE, row)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert again[keyword].value == reference[keyword].value
    other_row = read_labels(nih_dir / "labels.csv")[0]
    other = png_to_dataset(nih_dir / "images" / other_row["image"], other_row)
    assert other.StudyInstanceUID != reference.StudyInstanceUID
    assert other.SOPInstanceUID != reference.SOPInstanceUID


def test_study_uid_groups_images(nih_dir: Path, row: dict[str, str], reference: Dataset) -> None:
    joined = png_to_dataset(nih_dir / "images" / IMAGE, row, study_uid="1.2.3.4")
    assert joined.StudyInstanceUID == "1.2.3.4"
    assert joined.SOPInstanceUID != reference.SOPInstanceUID


@pytest.mark.parametrize(
    "syntax",
    [ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless,
     pytest.param(JPEGLSLossless, marks=pytest.mark.skipif(
         not JPEGLSLosslessEncoder.is_available, reason="no JPEG-LS encoder (pyjpegls)"))],
    ids=lambda syntax: syntax.name,
)
def test_transfer_syntax_round_trip(
    syntax: str, nih_dir: Path, row: dict[str, str], reference: Dataset, tmp_path: Path
) -> None:
    ds = png_to_dataset(nih_dir / "images" / IMAGE, row, transfer_syntax=syntax)
    read = _round_trip(ds, tmp_path / "image.dcm")
    assert read.file_meta.TransferSyntaxUID == syntax
    assert read.SOPInstanceUID == reference.SOPInstanceUID  # lossless: same instance
    np.testing.assert_array_equal(read.pixel_array, reference.pixel_array)


@pytest.mark.parametrize(("modality", "syntax"), [("CR", JPEG2000Lossless),
                                                  ("DX", ExplicitVRLittleEndian),
                                                  ("DX", RLELossless)])
def test_dciodvfy_reports_no_errors(
    modality: str, syntax: str, nih_dir: Path, row: dict[str, str], tmp_path: Path, dciodvfy
) -> None:
    ds = png_to_dataset(nih_dir / "images" / IMAGE, row, modality=modality,
                        transfer_syntax=syntax)
    path = tmp_path / f"{modality}.dcm"
    ds.save_as(path, enforce_file_format=True)
    errors, _ = dciodvfy(path)
    assert errors == []
    if modality == "DX":
        assert ds.SOPClassUID == DigitalXRayImageStorageForPresentation
        assert ds.PresentationIntentType == "FOR PRESENTATION"


def test_write_dataset_folder(nih_dir: Path, tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    paths = write_dataset_folder(nih_dir / "images", nih_dir / "labels.csv", tmp_path,
                                 limit=2, modality="DX", transfer_syntax=JPEG2000Lossless,
                                 progress=lambda done, total: seen.append((done, total)))
    rows = read_labels(nih_dir / "labels.csv")[:2]
    assert [p.name for p in paths] == [Path(r["image"]).stem + ".dcm" for r in rows]
    assert seen == [(1, 2), (2, 2)]
    for path, row in zip(paths, rows, strict=True):
        ds = pydicom.dcmread(path)
        assert ds.Modality == "DX"
        assert ds.Columns == int(row["original_width"])


def test_bad_arguments_are_refused(nih_dir: Path, row: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="modality"):
        png_to_dataset(nih_dir / "images" / IMAGE, row, modality="CT")
    with pytest.raises(ValueError, match="transfer syntax"):
        png_to_dataset(nih_dir / "images" / IMAGE, row, transfer_syntax="1.2.840.10008.1.2.4.50")
