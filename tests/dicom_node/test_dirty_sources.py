"""Dirty sources, clean outputs (issue 14): every dirty variant gives an SR and an SC that
dciodvfy, dsrdump and pixelmed accept, with the values the copying rules promise; and the rules
of :mod:`dicom_node.results.sanitize` one by one."""

from __future__ import annotations

import copy
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.tag import BaseTag

from dicom_node.results.content import Algorithm, ImageResult
from dicom_node.results.sanitize import InvalidSource, clean_header
from dicom_node.results.sc import build_sc
from dicom_node.results.sr import build_sr
from tests.dicom_node.dirty_sources import (
    LONG_TEXT,
    PIXELMED_SUBSET,
    VARIANT_NAMES,
    dirty_variants,
    raw,
    received,
)
from tests.dicom_node.node_helpers import decode_unit, make_findings
from worker.synth.studies import png_to_dataset, read_labels


@pytest.fixture(scope="module")
def nih_dx(nih_dir: Path) -> Dataset:
    row = read_labels(nih_dir / "labels.csv")[1]
    return png_to_dataset(nih_dir / "images" / row["image"], row, modality="DX")


@pytest.fixture(scope="module")
def built(rg1: Dataset, nih_dx: Dataset, tmp_path_factory: pytest.TempPathFactory
          ) -> dict[str, tuple[Path, Path]]:
    """Every variant's SR and SC, written once: name -> (SR path, SC path)."""
    algorithm = Algorithm(name="demo", version="0.1.0", software_version="0.1.0")
    folder = tmp_path_factory.mktemp("dirty")
    # a variant changes headers only: a quarter of its base's pixels draws a valid SC, faster
    pixels = {"rg1": decode_unit(rg1)[::4, ::4], "nih": decode_unit(nih_dx)[::4, ::4]}
    paths = {}
    for index, variant in enumerate(dirty_variants(rg1, nih_dx), start=1):
        result = ImageResult(variant.dataset, pixels[variant.base], make_findings(index % 5))
        sr = build_sr([result], algorithm, series_instance_uid=f"2.25.{index}1",
                      sop_instance_uid=f"2.25.{index}2", series_number=9901, instance_number=1)
        sc = build_sc(result, algorithm, series_instance_uid=f"2.25.{index}3",
                      sop_instance_uid=f"2.25.{index}4", series_number=9902, instance_number=1)
        paths[variant.name] = (folder / f"{variant.name}_sr.dcm", folder / f"{variant.name}_sc.dcm")
        sr.save_as(paths[variant.name][0], enforce_file_format=True)
        sc.save_as(paths[variant.name][1], enforce_file_format=True)
    return paths


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_outputs_of_dirty_source_validate(name: str, built, dciodvfy, dsrdump) -> None:
    sr, sc = built[name]
    assert dciodvfy(sr)[0] == [], f"{name}: SR"
    assert dciodvfy(sc)[0] == [], f"{name}: SC"
    assert dsrdump(sr).returncode == 0, name


@pytest.mark.slow
def test_pixelmed_accepts_dirty_source_srs(built, pixelmed_sr) -> None:
    reports = pixelmed_sr([built[name][0] for name in PIXELMED_SUBSET])
    assert {path.name: errors for path, (errors, _) in reports.items() if errors} == {}


#: variant -> what both outputs carry (None: absent), per the copying rules.
EXPECTED: dict[str, dict[str, str | None]] = {
    "cr_as_sc_age_62": {"PatientAge": None, "PatientSex": "F"},
    "age_62Y": {"PatientAge": "062Y"},
    "age_062": {"PatientAge": None},
    "study_date_iso": {"StudyDate": "20230501"},
    "study_date_month_13": {"StudyDate": ""},
    "birth_date_0": {"PatientBirthDate": ""},
    "study_time_25_61": {"StudyTime": ""},
    "study_time_dots": {"StudyTime": ""},
    "name_6_components": {"PatientName": ""},
    "name_long_component": {"PatientName": ""},
    "name_only_carets": {"ReferringPhysicianName": ""},
    "accession_20": {"AccessionNumber": ""},
    "study_id_20": {"StudyID": ""},
    "latin1_declared_utf8": {"SpecificCharacterSet": "ISO_IR 192", "PatientName": "Müller^Jürgen",
                             "StudyDescription": "THORAX Übersicht"},
    "utf8_no_charset": {"SpecificCharacterSet": "ISO_IR 192", "PatientName": "Müller^Jürgen",
                        "ReferringPhysicianName": "Gómez^Zoë"},
    "charset_misspelled": {"SpecificCharacterSet": "ISO_IR 192", "PatientName": "Müller^Jürgen"},
    "missing_type2": {"PatientName": "", "PatientID": "", "StudyDate": "", "AccessionNumber": ""},
    "bad_codes": {"PatientSex": ""},
    "overlong_equipment": {"StudyDescription": LONG_TEXT[:64].decode()},
    "nih_age_62": {"PatientAge": None},
    "nih_utf8_no_charset": {"SpecificCharacterSet": "ISO_IR 192", "PatientName": "Müller^Jürgen"},
    "nih_everything": {"SpecificCharacterSet": "ISO_IR 192", "PatientAge": None,
                       "StudyDate": "20230501", "StudyTime": "", "PatientBirthDate": "",
                       "PatientName": "", "AccessionNumber": "", "PatientSex": "",
                       "StudyDescription": "Thorax Übersicht"},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_outputs_carry_the_corrected_values(name: str, built) -> None:
    for path in built[name]:
        ds = pydicom.dcmread(path)
        found = {keyword: (str(ds[keyword].value) if keyword in ds else None)
                 for keyword in EXPECTED[name]}
        assert found == EXPECTED[name], f"{name}: {path.name}"


def test_truncated_equipment_keeps_the_acquisition_item(built) -> None:
    """An 80-character Institution Name used to make highdicom leave the source's equipment out."""
    for path in built["institution_80"]:
        acquisition = pydicom.dcmread(path).ContributingEquipmentSequence[0]
        assert acquisition.PurposeOfReferenceCodeSequence[0].CodeValue == "109101"
        assert acquisition.InstitutionName == LONG_TEXT[:64].decode()


def test_sc_of_unparsable_orientation_and_laterality(built) -> None:
    sc = pydicom.dcmread(built["bad_codes"][1])
    assert sc.PatientOrientation == "" and sc.Laterality == ""
    assert "BodyPartExamined" not in sc  # "chest x-ray" is no code string


@pytest.mark.parametrize("keyword, value", [
    ("StudyInstanceUID", "1.2.840.0123.5"),  # leading zero
    ("SOPInstanceUID", "1.2.840.123.5 x"),
    ("SeriesInstanceUID", "1.2." + "9" * 70),
])
def test_invalid_required_uid_is_a_clear_error(rg1: Dataset, keyword: str, value: str) -> None:
    ds = copy.deepcopy(rg1)
    raw(ds, keyword, value)
    result = ImageResult(received(ds), np.zeros((64, 64), np.float32), make_findings())
    algorithm = Algorithm(name="demo", version="0.1.0")
    with pytest.raises(InvalidSource, match=keyword) as caught:
        build_sr([result], algorithm, series_instance_uid="2.25.1", sop_instance_uid="2.25.2",
                 series_number=1, instance_number=1)
    assert value not in str(caught.value)
    assert isinstance(caught.value, ValueError)


# --- the rules, one value at a time ---------------------------------------------------------

_UIDS = {"StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.4", "SOPInstanceUID": "1.2.3.4.5",
         "SOPClassUID": "1.2.840.10008.5.1.4.1.1.1"}


def _header(*elements: tuple[str, bytes], charset: bytes | None = None) -> Dataset:
    """:func:`clean_header` of a minimal received header with these raw elements."""
    ds = Dataset()
    for keyword, value in _UIDS.items():
        setattr(ds, keyword, value)
    if charset is not None:
        raw(ds, "SpecificCharacterSet", charset)
    for keyword, value in elements:
        raw(ds, keyword, value)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = _UIDS["SOPClassUID"]
    ds.file_meta.MediaStorageSOPInstanceUID = _UIDS["SOPInstanceUID"]
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    return clean_header(received(ds))[0]


def _cleaned(keyword: str, value: bytes | str) -> str | None:
    header = _header((keyword, value.encode() if isinstance(value, str) else value))
    if keyword not in header:
        return None
    value = header[keyword].value
    return "" if value is None else str(value)


@pytest.mark.parametrize("keyword, value, expected", [
    # AS: padded and upper-cased when the unit is there; dropped (Type 3) when it is not
    ("PatientAge", "062Y", "062Y"), ("PatientAge", "62Y", "062Y"), ("PatientAge", "5m", "005M"),
    ("PatientAge", "62", None), ("PatientAge", "062", None), ("PatientAge", "62 years", None),
    ("PatientAge", "1062Y", None),
    # DA: separators of a real date removed; anything else emptied (Type 2) or dropped (Type 3)
    ("StudyDate", "20230501", "20230501"), ("StudyDate", "2023-05-01", "20230501"),
    ("PatientBirthDate", "1961.02.28", "19610228"), ("PatientBirthDate", "1961.02.30", ""),
    ("StudyDate", "20231345", ""), ("StudyDate", "0", ""), ("StudyDate", "2023-5-1", ""),
    ("LastMenstrualDate", "2023-13-01", None),
    # TM: ACR-NEMA colons removed; out of range emptied
    ("StudyTime", "123000", "123000"), ("StudyTime", "12:30:00", "123000"),
    ("StudyTime", "12:30", "1230"), ("StudyTime", "123000.123456", "123000.123456"),
    ("StudyTime", "25:61", ""), ("StudyTime", "1230.5.3", ""), ("StudyTime", "2400", ""),
    # PN: trailing empty components removed; otherwise never altered
    ("PatientName", "DOE^JANE", "DOE^JANE"), ("PatientName", "DOE^JANE^^^", "DOE^JANE"),
    ("ReferringPhysicianName", "^^^^^^", ""), ("PatientName", "DOE^JANE^A^DR^PHD^X", ""),
    ("PatientName", "A" * 70 + "^JANE", ""), ("PatientName", "Yamada^Tarou=山田^太郎", "Yamada^Tarou=山田^太郎"),
    ("PatientName", "A=B=C=D", ""), ("OtherPatientNames", "DOE^J\\" + "X" * 65, None),
    # identifiers: never truncated
    ("PatientID", "P" * 65, ""), ("AccessionNumber", "A" * 17, ""), ("StudyID", "S" * 17, ""),
    ("IssuerOfPatientID", "I" * 65, None), ("AdmissionID", "X" * 65, None),
    ("AccessionNumber", "ACC\t1", ""),
    # descriptive text: truncated at the VR's length, control characters made spaces
    ("InstitutionName", "I" * 80, "I" * 64), ("StationName", "S" * 20, "S" * 16),
    ("StudyDescription", "CHEST\tPA", "CHEST PA"), ("StudyDescription", "THORAX", "THORAX"),
    ("AdditionalPatientHistory", "x" * 10300, "x" * 10240),
    # CS: upper-cased; enumerated values enforced
    ("PatientSex", "F", "F"), ("PatientSex", "f", "F"), ("PatientSex", "male", ""),
    ("PatientSex", "W", ""), ("BodyPartExamined", "chest", "CHEST"),
    ("BodyPartExamined", "chest x-ray", None), ("Laterality", "B", None),
    ("PatientOrientation", "A\\F", "['A', 'F']"), ("PatientOrientation", "X\\Y", None),
    ("PatientOrientation", "A", None), ("PatientOrientation", "FL\\A", None),
    # DS, IS
    ("PatientWeight", "70.5", "70.5"), ("PatientWeight", "70 kg", None),
    ("PatientSize", "1.75m", None), ("PatientSize", "0,175", None), ("PatientSize", "NaN", None),
    ("PatientSize", "1.7500000000000001", "1.75"),
    ("PixelSpacing", "0.139\\0.139", "[0.139, 0.139]"), ("PixelSpacing", "0.139", None),
    # UI (Type 3), DT
    ("FrameOfReferenceUID", "1.2.03", None), ("FrameOfReferenceUID", "1.2.3", "1.2.3"),
    ("AcquisitionDateTime", "20230501123000", "20230501123000"),
    ("AcquisitionDateTime", "20230501126000", None),
])
def test_rule(keyword: str, value: str, expected: str | None) -> None:
    assert _cleaned(keyword, value) == expected


def test_valid_values_are_copied_unchanged(rg1: Dataset) -> None:
    header, changes = clean_header(rg1)
    assert changes == []
    for element in rg1:
        if element.tag != 0x7FE00010:
            assert header[element.tag].value == element.value, element.keyword


def test_invalid_item_leaves_the_sequence() -> None:
    ds = Dataset()
    for keyword, value in _UIDS.items():
        setattr(ds, keyword, value)
    good, bad = Dataset(), Dataset()
    for item, value in ((good, "36643-5"), (bad, "C" * 20)):  # a code value: never truncated
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "LN", "XR Chest"
    ds.ProcedureCodeSequence = [good, bad]
    header, changes = clean_header(ds)
    assert [item.CodeValue for item in header.ProcedureCodeSequence] == ["36643-5"]
    assert changes and changes[0].keyword == "ProcedureCodeSequence"
    ds.ProcedureCodeSequence = [bad]
    assert "ProcedureCodeSequence" not in clean_header(ds)[0]  # Type 3: dropped when emptied


def test_invalid_type1_of_optional_module_drops_the_module() -> None:
    header = _header(("ClinicalTrialSponsorName", b"ACME"), ("ClinicalTrialProtocolID", b"P" * 70),
                     ("ClinicalTrialSiteName", b"North"))
    assert not any(k in header for k in ("ClinicalTrialSponsorName", "ClinicalTrialProtocolID",
                                         "ClinicalTrialSiteName"))


@pytest.mark.parametrize("charset, name, expected_charset", [
    (b"ISO_IR 100", "Müller^Jürgen".encode("latin-1"), "ISO_IR 100"),  # matches: kept
    (b"ISO_IR 192", "Müller^Jürgen".encode("latin-1"), "ISO_IR 192"),  # Latin-1 under UTF-8
    (None, "Müller^Jürgen".encode(), "ISO_IR 192"),  # UTF-8 without a character set
    (None, "Müller^Jürgen".encode("latin-1"), "ISO_IR 192"),  # Latin-1 without one
    (b"ISO-IR 100", "Müller^Jürgen".encode("latin-1"), "ISO_IR 192"),  # not a defined term
    (b"ISO-IR 100", b"DOE^JANE", None),  # unknown term, ASCII only: default repertoire
    (b"ISO_IR 192", "Müller^Jürgen".encode(), "ISO_IR 192"),
    (b"\\ISO 2022 IR 87", "Yamada^Tarou=山田^太郎".encode("iso2022_jp"), ["", "ISO 2022 IR 87"]),
])
def test_character_set_matches_the_bytes(charset: bytes | None, name: bytes,
                                         expected_charset: str | list[str] | None) -> None:
    header = _header(("PatientName", name), charset=charset)
    found = header.get("SpecificCharacterSet")
    assert (list(found) if isinstance(found, pydicom.multival.MultiValue) else found) == expected_charset
    assert str(header.PatientName) in ("Müller^Jürgen", "DOE^JANE", "Yamada^Tarou=山田^太郎")
    ds = Dataset()
    ds.update(header)
    assert pydicom.dcmread(_write(ds), force=True).PatientName == header.PatientName  # round trip


def _write(ds: Dataset) -> BytesIO:
    buffer = BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True)
    buffer.seek(0)
    return buffer


def test_already_decoded_values_are_checked_too() -> None:
    """A dataset built in memory (or read and accessed before) holds str, not bytes."""
    ds = Dataset()
    for keyword, value in _UIDS.items():
        setattr(ds, keyword, value)
    ds[0x00101010] = RawDataElement(BaseTag(0x00101010), "AS", 2, b"62", 0, False, True)
    ds.PatientAge  # noqa: B018  decoded by pydicom now
    ds.add_new(0x00080080, "LO", "I" * 70)
    header = clean_header(ds)[0]
    assert "PatientAge" not in header and header.InstitutionName == "I" * 64
