"""Issue 14: the not-analysed notice (an Enhanced SR, TID 2000) validates, says what and why in
plain words, and copies the patient and study of the images it is about."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import Dataset, dcmread
from pydicom.sr.coding import Code as DicomCode
from pydicom.uid import EnhancedSRStorage

from dicom_node.results import not_analysed
from dicom_node.results.content import Algorithm
from dicom_node.results.not_analysed import DISCLAIMER_TEXT, build_not_analysed, not_analysed_text
from dicom_node.results.uids import derive_uid
from tests.support import require_tool
from worker.synth.studies import png_to_dataset, read_labels

#: An NIH image of a 12-year-old (PatientAge 012Y): below the demo bundle's minimum age.
CHILD = "00004934_000.png"
REASON = "patient age below the intended minimum of 18 years"
#: The section heading as pixelmed's CID 7001 (2005) knew it; PS3.16 now lists LOINC 59776-5.
OLD_FINDINGS = DicomCode("121070", "DCM", "Findings")


@pytest.fixture(scope="module")
def child(nih_dir: Path) -> Dataset:
    row = next(r for r in read_labels(nih_dir / "labels.csv") if r["image"] == CHILD)
    return png_to_dataset(nih_dir / "images" / CHILD, row, modality="DX")


def _build(sources: list[Dataset], algorithm: Algorithm, reason: str = REASON, **kwargs) -> hd.sr.EnhancedSR:
    study = sources[0].StudyInstanceUID
    return build_not_analysed(
        sources, algorithm, reason,
        series_instance_uid=derive_uid("na-series", study), sop_instance_uid=derive_uid("na", study, reason),
        series_number=9903, instance_number=1, **kwargs)


def _texts(ds: Dataset) -> list[tuple[str, str]]:
    """(concept meaning, text) of every TEXT item, depth first."""
    found = []

    def walk(items) -> None:
        for item in items:
            if item.ValueType == "TEXT":
                found.append((item.ConceptNameCodeSequence[0].CodeMeaning, item.TextValue))
            walk(item.get("ContentSequence", []))

    walk(ds.ContentSequence)
    return found


def test_notice_validates_and_says_what_and_why(child: Dataset, algorithm: Algorithm, tmp_path: Path,
                                                 dciodvfy, pixelmed_sr, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "na.dcm"
    _build([child], algorithm).save_as(path, enforce_file_format=True)
    assert dciodvfy(path) == ([], [])
    dump = subprocess.run([require_tool("dsrdump"), "+Pl", "+Pc", "+Pt", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert dump.returncode == 0 and "Error" not in dump.stdout + dump.stderr, dump.stderr
    assert ('<contains TEXT:(121071,DCM,"Finding")="Not analysed by AI model demo 0.1.0: '
            'patient age below the intended minimum of 18 years.">') in dump.stdout

    # the same tree with the section heading pixelmed's context groups know: the items inside it
    # are checked against TID 2002 too, which they are not when the heading is not recognised
    old = tmp_path / "na-old-heading.dcm"
    monkeypatch.setattr(not_analysed, "FINDINGS", OLD_FINDINGS)
    _build([child], algorithm).save_as(old, enforce_file_format=True)
    reports = pixelmed_sr([path, old])
    assert reports[old] == ([], [])
    errors, warnings = reports[path]
    assert errors == []
    # pixelmed's CID 7001 predates the LOINC headings: it cannot place the section (and so the
    # two sentences in it); nothing else
    assert len(warnings) == 3 and all(w.endswith("Content Item not in template") for w in warnings)
    assert all('CONTAINER (59776-5,LN,"Findings")' in w for w in warnings), warnings


def test_content_header_and_flags(child: Dataset, algorithm: Algorithm, tmp_path: Path) -> None:
    built = _build([child], algorithm)
    built.save_as(tmp_path / "na.dcm", enforce_file_format=True)
    ds = dcmread(tmp_path / "na.dcm")
    assert ds.SOPClassUID == EnhancedSRStorage and ds.Modality == "SR"
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "2000"
    title = ds.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("18748-4", "LN")
    assert _texts(ds)[-2:] == [
        ("Finding", "Not analysed by AI model demo 0.1.0: patient age below the intended minimum of 18 years."),
        ("Finding", DISCLAIMER_TEXT),
    ]
    assert DISCLAIMER_TEXT.startswith("AI result - not for primary diagnosis")
    assert ds.SeriesDescription == "AI not analysed (demo 0.1.0) - not for primary diagnosis"
    assert (ds.CompletionFlag, ds.PreliminaryFlag, ds.VerificationFlag) == ("COMPLETE", "PRELIMINARY", "UNVERIFIED")
    assert ds.Manufacturer == "Pleura" and ds.ManufacturerModelName == "demo"
    assert ("Pleura", "demo", "109102") in [  # the model as processing equipment
        (item.Manufacturer, item.get("ManufacturerModelName"), item.PurposeOfReferenceCodeSequence[0].CodeValue)
        for item in ds.ContributingEquipmentSequence]
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID"):
        assert ds[keyword].value == child[keyword].value, keyword
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == child.SOPInstanceUID
    assert "PixelData" not in ds and "PredecessorDocumentsSequence" not in ds
    assert child.PatientAge == "012Y" and "12" not in " ".join(text for _, text in _texts(ds)[-2:])


def test_a_later_notice_names_the_earlier_one(child: Dataset, algorithm: Algorithm) -> None:
    first = _build([child], algorithm)
    second = _build([child], algorithm, reason="lateral view (the model is intended for AP or PA views)",
                    predecessor=first)
    predecessor = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert second.SeriesInstanceUID == first.SeriesInstanceUID


def test_wording_and_refusals(child: Dataset, algorithm: Algorithm) -> None:
    assert not_analysed_text(algorithm, " lateral view\n(AP or PA only). ") == \
        "Not analysed by AI model demo 0.1.0: lateral view (AP or PA only)."
    with pytest.raises(ValueError, match="reason"):
        not_analysed_text(algorithm, " . ")
    with pytest.raises(ValueError, match="at least one"):
        build_not_analysed([], algorithm, REASON, series_instance_uid="1.2.3", sop_instance_uid="1.2.4",
                           series_number=1, instance_number=1)
    other = copy.deepcopy(child)
    other.StudyInstanceUID = derive_uid("another study")
    with pytest.raises(ValueError, match="same study"):
        _build([child, other], algorithm)
