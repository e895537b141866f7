"""The TID 1500 SR: validators, highdicom round trip, identity, revisions."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import Dataset
from pydicom.sr.codedict import codes

from dicom_node.results.content import Algorithm, FindingResult, ImageResult
from dicom_node.results.sr import QUALITATIVE_EVALUATIONS, build_sr
from dicom_node.results.uids import derive_uid
from tests.dicom_node.node_helpers import blob, decode_unit, make_findings
from worker.synth.studies import png_to_dataset, read_labels

NIH_IMAGES = ("00000100_000.png", "00000075_000.png")


def _build(results: list[ImageResult], algorithm: Algorithm, **kwargs) -> hd.sr.Comprehensive3DSR:
    study = results[0].source.StudyInstanceUID
    return build_sr(
        results, algorithm,
        series_instance_uid=derive_uid("sr-series", study, algorithm.name, algorithm.version),
        sop_instance_uid=derive_uid("sr", study, algorithm.name, algorithm.version,
                                    str(kwargs.pop("revision", 1))),
        series_number=9001, instance_number=1, **kwargs,
    )


def _read(sr: Dataset, path: Path) -> hd.sr.Comprehensive3DSR:
    sr.save_as(path, enforce_file_format=True)
    return hd.sr.srread(path)


@pytest.fixture(scope="module")
def nih_study(nih_dir: Path) -> list[ImageResult]:
    """Two NIH images put into one synthetic study (DX), with model-like findings."""
    rows = {row["image"]: row for row in read_labels(nih_dir / "labels.csv")}
    study = derive_uid("test-study", *NIH_IMAGES)
    results = []
    for seed, name in enumerate(NIH_IMAGES):
        ds = png_to_dataset(nih_dir / "images" / name, rows[name], modality="DX", study_uid=study)
        results.append(ImageResult(ds, decode_unit(ds), make_findings(seed)))
    return results


def _all_uidrefs(sr: Dataset) -> list[str]:
    found = []

    def walk(items) -> None:
        for item in items:
            if item.ValueType == "UIDREF":
                found.append(item.UID)
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return found


def test_real_cr_sr_is_valid(rg1_result, algorithm, summary, tmp_path, dciodvfy, dsrdump) -> None:
    path = tmp_path / "sr.dcm"
    _build([rg1_result], algorithm, study_summary=summary).save_as(path, enforce_file_format=True)
    errors, warnings = dciodvfy(path)
    assert errors == []
    # The only warning is inherited from the source: Referring Physician's Name "ward".
    assert all("Referring Physician" in line for line in warnings), warnings
    dumped = dsrdump(path)
    assert dumped.returncode == 0, dumped.stderr
    assert not [line for line in dumped.stderr.splitlines() if line.startswith(("E:", "F:"))]
    assert "Imaging Measurement Report" in dumped.stdout


def test_synthetic_study_sr_is_valid(nih_study, algorithm, summary, tmp_path, dciodvfy,
                                     dsrdump) -> None:
    path = tmp_path / "sr.dcm"
    _build(nih_study, algorithm, study_summary=summary).save_as(path, enforce_file_format=True)
    errors, warnings = dciodvfy(path)
    assert errors == [] and warnings == []
    assert dsrdump(path).returncode == 0


def _evaluations(sr: Dataset) -> list[Dataset]:
    """The CODE items of the Qualitative Evaluations container (TID 1500 row 13)."""
    (container,) = [item for item in sr.ContentSequence if item.name == QUALITATIVE_EVALUATIONS]
    return [item for item in container.ContentSequence if item.ValueType == "CODE"]


def _percent(item: Dataset, code: hd.sr.CodedConcept) -> float:
    (num,) = [child for child in item.ContentSequence if child.ValueType == "NUM"]
    assert num.name == code
    assert num.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "%"
    return float(num.MeasuredValueSequence[0].NumericValue)


def test_round_trip_groups_codes_and_probabilities(nih_study, algorithm, summary,
                                                   tmp_path) -> None:
    report = _read(_build(nih_study, algorithm, study_summary=summary), tmp_path / "sr.dcm")
    content = report.content
    evaluations = _evaluations(report)
    for result in nih_study:
        uid = result.source.SOPInstanceUID
        for finding in result.findings:
            code = hd.sr.CodedConcept(finding.code.value, finding.code.scheme, finding.code.meaning)
            planar = content.get_planar_roi_measurement_groups(
                finding_type=code, referenced_sop_instance_uid=uid)
            inferred = [item for item in evaluations if item.name == code and any(
                child.ValueType == "IMAGE"
                and child.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == uid
                for child in item.ContentSequence)]
            expected = codes.SCT.Present if finding.positive else codes.SCT.Absent
            if finding.positive and finding.heatmap is not None:  # marked on its image
                assert (len(planar), len(inferred)) == (1, 0), finding.name
                group = planar[0]
                (probability,) = group.get_measurements(name=code)
                assert probability.value == pytest.approx(100 * finding.probability, abs=1e-3)
                assert probability.unit == codes.UCUM.Percent
                (evaluation,) = group.get_qualitative_evaluations(name=code)
                assert evaluation.value == expected
                assert group.tracking_uid == derive_uid(
                    "tracking", uid, finding.code.scheme, finding.code.value, algorithm.name)
            else:  # in the SR for archives, out of the viewer's way
                assert (len(planar), len(inferred)) == (0, 1), finding.name
                assert inferred[0].ConceptCodeSequence[0].CodeValue == expected.value
                assert _percent(inferred[0], code) == pytest.approx(100 * finding.probability,
                                                                     abs=1e-3)
    summary_code = hd.sr.CodedConcept(summary.code.value, summary.code.scheme,
                                      summary.code.meaning)
    (score,) = [item for item in evaluations if item.name == summary_code]
    assert _percent(score, summary_code) == pytest.approx(100 * summary.probability)
    images = [child for child in score.ContentSequence if child.ValueType == "IMAGE"]
    assert len(images) == len(nih_study)


def test_every_measurement_group_has_one_region_on_one_image(nih_study, algorithm, summary,
                                                              tmp_path) -> None:
    """What OHIF requires of each Measurement Group (it fails on a group without a SCOORD)."""
    report = _read(_build(nih_study, algorithm, study_summary=summary), tmp_path / "sr.dcm")
    (measurements,) = [item for item in report.ContentSequence
                       if item.name == codes.DCM.ImagingMeasurements]
    groups = measurements.ContentSequence
    assert len(groups) == 2  # one positive mapped finding per image
    for group in groups:
        scoords = [item for item in group.ContentSequence if item.ValueType == "SCOORD"]
        assert len(scoords) == 1
        (image,) = scoords[0].ContentSequence
        assert image.ValueType == "IMAGE"


def test_regions_lie_on_the_right_image(nih_study, algorithm, tmp_path) -> None:
    report = _read(_build(nih_study, algorithm), tmp_path / "sr.dcm")
    for result in nih_study:
        groups = report.content.get_planar_roi_measurement_groups(
            referenced_sop_instance_uid=result.source.SOPInstanceUID)
        positives = [f for f in result.findings if f.positive and f.heatmap is not None]
        assert len(groups) == len(positives) == 1
        roi = groups[0].roi
        assert roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        reference = roi.ContentSequence[0].ReferencedSOPSequence[0]
        assert reference.ReferencedSOPInstanceUID == result.source.SOPInstanceUID
        points = roi.value
        assert np.array_equal(points[0], points[-1])  # closed
        assert points[:, 0].min() >= 0 and points[:, 0].max() <= result.source.Columns
        assert points[:, 1].min() >= 0 and points[:, 1].max() <= result.source.Rows
        # the cardiomegaly blob is centred at (row 0.6, column 0.55) of the image
        centre = points[:4].mean(axis=0) / [result.source.Columns, result.source.Rows]
        assert centre == pytest.approx([0.55, 0.6], abs=0.05)


def test_every_group_identifies_the_algorithm(nih_study, algorithm, summary, tmp_path) -> None:
    report = _read(_build(nih_study, algorithm, study_summary=summary), tmp_path / "sr.dcm")
    groups = report.content.get_planar_roi_measurement_groups()
    assert len(groups) == 2
    for group in groups:
        texts = {(item.name.value, item.value) for item in group[0].ContentSequence
                 if item.ValueType == "TEXT"}
        assert ("111001", algorithm.name) in texts
        assert ("111003", algorithm.version) in texts
        assert ("111002", "input_size=224") in texts
        assert ("111002", "operating_threshold=0.5") in texts


def test_document_says_what_produced_it(rg1_result, rg1, algorithm, tmp_path) -> None:
    sr = _read(_build([rg1_result], algorithm), tmp_path / "sr.dcm")
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.SeriesDescription == "AI findings (demo 0.1.0) - not for primary diagnosis"
    assert (sr.StudyInstanceUID, sr.PatientID) == (rg1.StudyInstanceUID, rg1.PatientID)
    assert sr.SeriesInstanceUID != rg1.SeriesInstanceUID
    (device,) = sr.content.get_observer_contexts(observer_type=codes.DCM.Device)
    assert device.observer_identifying_attributes.name == algorithm.name
    purposes = {(item.Manufacturer, item.get("ManufacturerModelName"),
                 item.PurposeOfReferenceCodeSequence[0].CodeValue)
                for item in sr.ContributingEquipmentSequence}
    assert ("Pleura", "demo", "109102") in purposes
    procedure = [item for item in sr.ContentSequence if item.name == codes.DCM.ProcedureReported]
    assert procedure[0].value.value == "363679005"  # CID 100 "Imaging procedure"
    comments = [item.value for container in sr.ContentSequence
                if container.name.value == "C0034375" for item in container.ContentSequence]
    assert any("not for primary diagnosis" in text for text in comments)


def test_uids_are_deterministic(nih_study, algorithm) -> None:
    first, second = _build(nih_study, algorithm), _build(nih_study, algorithm)
    assert first.SOPInstanceUID == second.SOPInstanceUID
    assert first.SeriesInstanceUID == second.SeriesInstanceUID
    assert _all_uidrefs(first) == _all_uidrefs(second)
    newer = Algorithm(name=algorithm.name, version="0.2.0", parameters=algorithm.parameters)
    other = _build(nih_study, newer)
    assert other.SOPInstanceUID != first.SOPInstanceUID
    assert _all_uidrefs(other) != _all_uidrefs(first)  # device observer UID differs


def test_revision_references_its_predecessor(rg1_result, algorithm, tmp_path, dciodvfy) -> None:
    first = _build([rg1_result], algorithm)
    second = _read(_build([rg1_result], algorithm, revision=2, predecessor=first),
                   tmp_path / "sr2.dcm")
    assert dciodvfy(tmp_path / "sr2.dcm")[0] == []
    assert second.SOPInstanceUID != first.SOPInstanceUID
    (study,) = second.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == first.StudyInstanceUID
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID


def test_sources_from_two_studies_are_refused(rg1_result, nih_study, algorithm) -> None:
    with pytest.raises(ValueError, match="same study"):
        _build([rg1_result, nih_study[0]], algorithm)


def test_nothing_to_report_is_refused(rg1, algorithm) -> None:
    with pytest.raises(ValueError, match="at least one ImageResult"):
        build_sr([], algorithm, series_instance_uid="1.2.3", sop_instance_uid="1.2.3.4",
                 series_number=1, instance_number=1)
    empty = ImageResult(rg1, np.zeros((4, 4), np.float32), ())
    with pytest.raises(ValueError, match="finding"):
        _build([empty], algorithm)


def test_summary_alone_is_enough(rg1, algorithm, summary, tmp_path, pixelmed_sr) -> None:
    empty = ImageResult(rg1, np.zeros((4, 4), np.float32), ())
    built = _build([empty], algorithm, study_summary=summary)
    containers = [item.name for item in built.ContentSequence if item.ValueType == "CONTAINER"]
    assert codes.DCM.ImagingMeasurements not in containers  # no empty container
    assert QUALITATIVE_EVALUATIONS in containers
    assert len(_evaluations(built)) == 1
    built.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    assert pixelmed_sr([tmp_path / "sr.dcm"])[tmp_path / "sr.dcm"][0] == []


def test_flat_map_is_not_marked(rg1, algorithm) -> None:
    flat = FindingResult("Cardiomegaly", make_findings()[0].code, 0.9, 0.5, np.zeros((8, 8)))
    built = _build([ImageResult(rg1, np.zeros((4, 4), np.float32), (flat,))], algorithm)
    sr = hd.sr.Comprehensive3DSR.from_dataset(built)
    assert sr.content.get_planar_roi_measurement_groups() == []
    (evaluation,) = _evaluations(built)
    assert evaluation.ConceptCodeSequence[0].CodeValue == codes.SCT.Present.value


def test_map_that_does_not_localize_is_marked_at_its_peak(rg1, algorithm) -> None:
    """A hot area over most of the image is a point where the map peaks, not a frame."""
    broad = 0.8 + 0.2 * blob((16, 16), centre=(0.25, 0.7), sigma=0.3)
    finding = FindingResult("Cardiomegaly", make_findings()[0].code, 0.9, 0.5, broad)
    built = _build([ImageResult(rg1, np.zeros((4, 4), np.float32), (finding,))], algorithm)
    (group,) = hd.sr.Comprehensive3DSR.from_dataset(built).content \
        .get_planar_roi_measurement_groups()
    assert group.roi.graphic_type == hd.sr.GraphicTypeValues.POINT
    (column, row) = group.roi.value[0] / [rg1.Columns, rg1.Rows]
    assert (row, column) == pytest.approx((0.25, 0.7), abs=1 / 16)


def test_all_negative_study_marks_its_triage_score(nih_study, algorithm, summary,
                                                   tmp_path) -> None:
    """OHIF fails on an SR without a Measurement Group: the triage finding is marked, Absent."""
    results = []
    for seed, result in enumerate(nih_study):
        negatives = tuple(FindingResult(f.name, f.code, 0.1, 0.5, f.heatmap)
                          for f in make_findings(seed))
        abnormal = FindingResult("Abnormal", summary.code, 0.2 + 0.1 * seed, 0.5,
                                 blob(centre=(0.4, 0.6)))
        results.append(ImageResult(result.source, result.pixels, (*negatives, abnormal)))
    report = _read(_build(results, algorithm, study_summary=results[1].findings[-1]),
                   tmp_path / "sr.dcm")
    (group,) = report.content.get_planar_roi_measurement_groups()
    code = hd.sr.CodedConcept(summary.code.value, summary.code.scheme, summary.code.meaning)
    assert group.finding_type == code
    reference = group.roi.ContentSequence[0].ReferencedSOPSequence[0]
    assert reference.ReferencedSOPInstanceUID == results[1].source.SOPInstanceUID  # the highest
    (evaluation,) = group.get_qualitative_evaluations(name=code)
    assert evaluation.value == codes.SCT.Absent
    (probability,) = group.get_measurements(name=code)
    assert probability.value == pytest.approx(30.0)
    assert len(_evaluations(report)) == 2 * 3 + 1 + 1  # the other findings, and the summary
