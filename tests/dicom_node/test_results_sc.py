"""The heatmap Secondary Capture: validity, identity, pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from dicom_node.results.content import Algorithm, FindingResult, ImageResult
from dicom_node.results.sc import (
    BANNER_COLOUR,
    BANNER_HEIGHT,
    IMAGE_SIDE,
    OVERLAY_COLOURS,
    PANEL_WIDTH,
    build_sc,
)
from dicom_node.results.uids import derive_uid
from tests.dicom_node.node_helpers import blob, decode_unit, make_findings
from worker.synth.studies import png_to_dataset, read_labels


def _build(result: ImageResult, algorithm: Algorithm) -> Dataset:
    source = result.source
    return build_sc(
        result, algorithm,
        series_instance_uid=derive_uid("sc-series", source.StudyInstanceUID, algorithm.name),
        sop_instance_uid=derive_uid("sc", source.SOPInstanceUID, algorithm.name,
                                    algorithm.version),
        series_number=9002, instance_number=1,
    )


def _saved(ds: Dataset, path: Path) -> Dataset:
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


@pytest.fixture(scope="module")
def rg1_sc(rg1_result: ImageResult, tmp_path_factory) -> Dataset:
    algorithm = Algorithm(name="demo", version="0.1.0")
    return _saved(_build(rg1_result, algorithm), tmp_path_factory.mktemp("sc") / "sc.dcm")


def test_real_cr_sc_is_valid(rg1_sc: Dataset, dciodvfy) -> None:
    errors, warnings = dciodvfy(Path(rg1_sc.filename))
    assert errors == []
    # The only warning is inherited from the source: Referring Physician's Name "ward".
    assert all("Referring Physician" in line for line in warnings), warnings


def test_synthetic_dx_sc_is_valid(nih_dir: Path, algorithm, tmp_path, dciodvfy) -> None:
    row = read_labels(nih_dir / "labels.csv")[0]
    source = png_to_dataset(nih_dir / "images" / row["image"], row, modality="DX")
    sc = _build(ImageResult(source, decode_unit(source), make_findings()), algorithm)
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    assert dciodvfy(path) == ([], [])


def test_identity_and_derivation(rg1_sc: Dataset, rg1: Dataset) -> None:
    assert (rg1_sc.StudyInstanceUID, rg1_sc.PatientID) == (rg1.StudyInstanceUID, rg1.PatientID)
    assert rg1_sc.SeriesInstanceUID != rg1.SeriesInstanceUID
    (reference,) = rg1_sc.SourceImageSequence
    assert reference.ReferencedSOPInstanceUID == rg1.SOPInstanceUID
    assert reference.ReferencedSOPClassUID == rg1.SOPClassUID
    assert (rg1_sc.BurnedInAnnotation, rg1_sc.ConversionType) == ("YES", "WSD")
    assert rg1_sc.LossyImageCompression == "01"  # the source was lossy JPEG 2000
    assert "not for primary diagnosis" in rg1_sc.SeriesDescription
    assert "demo 0.1.0" in rg1_sc.DerivationDescription
    purposes = {item.PurposeOfReferenceCodeSequence[0].CodeValue
                for item in rg1_sc.ContributingEquipmentSequence}
    assert "109102" in purposes


def test_uids_are_deterministic(rg1_result: ImageResult) -> None:
    first = _build(rg1_result, Algorithm(name="demo", version="0.1.0"))
    second = _build(rg1_result, Algorithm(name="demo", version="0.1.0"))
    newer = _build(rg1_result, Algorithm(name="demo", version="0.2.0"))
    assert first.SOPInstanceUID == second.SOPInstanceUID != newer.SOPInstanceUID
    assert np.array_equal(first.pixel_array, second.pixel_array)


def test_pixels_are_rgb_with_image_banner_and_legend(rg1_sc: Dataset, rg1: Dataset) -> None:
    pixels = rg1_sc.pixel_array
    assert rg1_sc.PhotometricInterpretation == "RGB" and rg1_sc.SamplesPerPixel == 3
    image_rows = IMAGE_SIDE  # RG1 is taller than wide
    image_columns = round(rg1.Columns * IMAGE_SIDE / rg1.Rows)
    assert pixels.shape == (BANNER_HEIGHT + image_rows, image_columns + PANEL_WIDTH, 3)
    assert pixels.dtype == np.uint8
    banner = pixels[:BANNER_HEIGHT]
    assert (banner == BANNER_COLOUR).all(axis=2).mean() > 0.8  # yellow, with dark text
    assert (banner.max(axis=2) < 60).sum() > 500
    panel = pixels[BANNER_HEIGHT:, image_columns:]
    assert (panel.min(axis=2) > 200).sum() > 500  # light legend text on the dark panel
    assert (panel == OVERLAY_COLOURS[0]).all(axis=2).sum() > 100  # legend swatch


def test_overlay_colours_the_hot_area(rg1_sc: Dataset, rg1: Dataset) -> None:
    pixels = rg1_sc.pixel_array.astype(int)
    image_columns = round(rg1.Columns * IMAGE_SIDE / rg1.Rows)
    image = pixels[BANNER_HEIGHT:, :image_columns]
    redness = image[..., 0] - (image[..., 1] + image[..., 2]) / 2
    # cardiomegaly (positive) blob at (row 0.6, column 0.55); effusion (negative) not drawn
    hot = redness[int(0.6 * IMAGE_SIDE) - 10:int(0.6 * IMAGE_SIDE) + 10,
                  int(0.55 * image_columns) - 10:int(0.55 * image_columns) + 10]
    assert hot.mean() > 60
    negative_area = image[int(0.8 * IMAGE_SIDE), int(0.2 * image_columns)]
    assert np.ptp(negative_area) < 5  # still grey


def test_no_positive_finding_means_no_colour(rg1_result: ImageResult, algorithm) -> None:
    negatives = tuple(
        FindingResult(f.name, f.code, 0.1, f.threshold, f.heatmap) for f in make_findings()
    )
    sc = _build(ImageResult(rg1_result.source, rg1_result.pixels, negatives), algorithm)
    image_columns = round(rg1_result.source.Columns * IMAGE_SIDE / rg1_result.source.Rows)
    image = sc.pixel_array[BANNER_HEIGHT:, :image_columns].astype(int)
    assert np.abs(image[..., 0] - image[..., 1]).max() == 0
    assert np.abs(image[..., 1] - image[..., 2]).max() == 0


def test_map_that_does_not_localize_gets_a_ring_at_its_peak(rg1_result: ImageResult,
                                                            algorithm) -> None:
    """Same rule as the SR: no frame around most of the image, a ring where the map peaks."""
    broad = 0.8 + 0.2 * blob((16, 16), centre=(0.25, 0.7), sigma=0.3)
    finding = FindingResult("Cardiomegaly", make_findings()[0].code, 0.9, 0.5, broad)
    sc = _build(ImageResult(rg1_result.source, rg1_result.pixels, (finding,)), algorithm)
    columns = round(rg1_result.source.Columns * IMAGE_SIDE / rg1_result.source.Rows)
    image = sc.pixel_array[BANNER_HEIGHT:, :columns].astype(int)
    drawn = np.all(image == OVERLAY_COLOURS[0], axis=2)
    rows, cols = np.nonzero(drawn)
    assert len(rows) > 0
    centre = (rows.mean() / IMAGE_SIDE, cols.mean() / columns)
    assert centre == pytest.approx((0.25, 0.7), abs=1 / 16 + 0.01)
    assert np.ptp(rows) < 40 and np.ptp(cols) < 40  # a small ring, not a frame
