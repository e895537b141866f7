"""Dirty source images as PACS traffic really brings them, built at test time (no DICOM in git).

Each variant takes a clean base (the real Philips CR ``RG1_J2KI.dcm``, ISO_IR 100, JPEG 2000,
or an NIH-derived DX from :func:`worker.synth.studies.png_to_dataset`, no character set), breaks
its header with raw bytes where pydicom would refuse or fix the value, and comes back
*encoded and read again* (:func:`received`): its elements are raw, undecoded bytes, exactly
as the pipeline reads an instance from the spool. Only headers change, so a variant's pixels
are its base's.

What is broken (and what Pleura is expected to do with it) is in the variant's ``what``; the
rules themselves are in :mod:`dicom_node.results.sanitize`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO

import pydicom
from pydicom import Dataset
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.tag import BaseTag
from pydicom.uid import SecondaryCaptureImageStorage

#: Values that reach outputs, one per rule family; names never go to logs, these are made up.
LATIN1_NAME = "Müller^Jürgen".encode("latin-1")
UTF8_NAME = "Müller^Jürgen".encode()
LONG_TEXT = b"Klinikum fuer Radiologie und Nuklearmedizin, Universitaetsklinikum Nord, Haus 7"  # 80


@dataclass(frozen=True)
class Variant:
    """One dirty source: its name, its base (``rg1`` or ``nih``), what is wrong, the dataset."""

    name: str
    base: str
    what: str
    dataset: Dataset


def raw(ds: Dataset, keyword: str, value: bytes | str, vr: str | None = None) -> None:
    """Set ``keyword`` to exactly these bytes (``str`` as ASCII, padded with a space to even
    length), as a raw element that pydicom neither checks nor converts."""
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    data = value.encode("ascii") if isinstance(value, str) else value
    data += b" " * (len(data) % 2)
    ds[tag] = RawDataElement(BaseTag(tag), vr or dictionary_VR(tag), len(data), data, 0,
                             is_implicit_VR=False, is_little_endian=True)


def drop(ds: Dataset, *keywords: str) -> None:
    for keyword in keywords:
        if keyword in ds:
            delattr(ds, keyword)


def received(ds: Dataset) -> Dataset:
    """``ds`` (read from a file, then edited) as the pipeline sees it: written as a PS3.10 file
    and read back, its elements raw.

    The raw bytes are written as they are: pydicom would otherwise decode and re-encode them
    when the declared character set differs from the one read, and so repair the very fault a
    variant makes (Explicit VR Little Endian, as :func:`raw` makes them).
    """
    ds.set_original_encoding(False, True, ds._character_set)
    return _read_back(ds)


def _read_back(ds: Dataset) -> Dataset:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(BytesIO(buffer.getvalue()))


def _as_secondary_capture(ds: Dataset) -> None:
    """A CR stored as Secondary Capture by a gateway or film digitiser."""
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.ConversionType = "WSD"


def _bad_charset_latin1(ds: Dataset) -> None:
    ds.SpecificCharacterSet = "ISO_IR 192"  # declared UTF-8, bytes are Latin-1
    raw(ds, "PatientName", LATIN1_NAME)
    raw(ds, "InstitutionName", "Klinikum München".encode("latin-1"))
    raw(ds, "StudyDescription", "THORAX Übersicht".encode("latin-1"))


def _utf8_without_charset(ds: Dataset) -> None:
    drop(ds, "SpecificCharacterSet")
    raw(ds, "PatientName", UTF8_NAME)
    raw(ds, "ReferringPhysicianName", "Gómez^Zoë".encode())
    raw(ds, "StudyDescription", "Thorax p.a. Übersicht".encode())


def _missing_type2(ds: Dataset) -> None:
    drop(ds, "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
         "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName")


def _bad_codes(ds: Dataset) -> None:
    raw(ds, "PatientSex", "male")
    raw(ds, "BodyPartExamined", "chest x-ray")
    raw(ds, "Laterality", "B")
    raw(ds, "PatientOrientation", "X\\Y")


def _bad_numbers(ds: Dataset) -> None:
    raw(ds, "PatientSize", "1.75m")
    raw(ds, "PatientWeight", "70 kg")
    raw(ds, "PixelSpacing", "0.139mm\\0.139mm")
    raw(ds, "ImagerPixelSpacing", "0,139\\0,139")


def _overlong_equipment(ds: Dataset) -> None:
    raw(ds, "Manufacturer", LONG_TEXT)
    raw(ds, "InstitutionName", LONG_TEXT)
    raw(ds, "InstitutionalDepartmentName", LONG_TEXT[:70])
    raw(ds, "StationName", "THORAVISION-ROOM-2")  # SH, 18 chars
    raw(ds, "StudyDescription", LONG_TEXT)


def _everything(ds: Dataset) -> None:
    """Many faults at once, as a badly configured gateway produces them."""
    raw(ds, "PatientAge", "62")
    raw(ds, "StudyDate", "2023-05-01")
    raw(ds, "StudyTime", "25:61")
    raw(ds, "PatientBirthDate", "1961.02.30")
    raw(ds, "PatientName", "DOE^JANE^A^DR^PHD^X")
    raw(ds, "AccessionNumber", "ACC-2023-0000012345")
    raw(ds, "StudyID", "STUDY-2023-00012345")
    raw(ds, "ReferringPhysicianName", b"R" * 70 + b"^ANNA")
    raw(ds, "InstitutionName", LONG_TEXT)
    raw(ds, "DeidentificationMethod", LONG_TEXT)
    raw(ds, "PatientSex", "W")
    raw(ds, "StudyDescription", "Thorax Übersicht".encode("latin-1"))  # no charset declared


_Edit = Callable[[Dataset], None]

#: name -> (base, what, edit). RG1 is the real CR (ISO_IR 100); NIH is a synthetic DX.
_VARIANTS: dict[str, tuple[str, str, _Edit]] = {
    "cr_as_sc_age_62": ("rg1", "real-world case: CR stored as Secondary Capture, Patient's Age 62",
                        lambda ds: (_as_secondary_capture(ds), raw(ds, "PatientAge", "62"))),
    "age_62": ("rg1", "AS without unit or padding", lambda ds: raw(ds, "PatientAge", "62")),
    "age_62Y": ("rg1", "AS not zero-padded", lambda ds: raw(ds, "PatientAge", "62Y")),
    "age_062": ("rg1", "AS without unit", lambda ds: raw(ds, "PatientAge", "062")),
    "study_date_iso": ("rg1", "DA in ISO 8601 with hyphens",
                       lambda ds: raw(ds, "StudyDate", "2023-05-01")),
    "study_date_month_13": ("rg1", "DA that is no date",
                            lambda ds: raw(ds, "StudyDate", "20231345")),
    "birth_date_0": ("rg1", "DA of one digit", lambda ds: raw(ds, "PatientBirthDate", "0")),
    "study_time_25_61": ("rg1", "TM with colons, hour 25",
                         lambda ds: raw(ds, "StudyTime", "25:61")),
    "study_time_dots": ("rg1", "TM with dots", lambda ds: raw(ds, "StudyTime", "1230.5.3")),
    "name_6_components": ("rg1", "PN with six components",
                          lambda ds: raw(ds, "PatientName", "DOE^JANE^A^DR^PHD^X")),
    "name_long_component": ("rg1", "PN component group of 75 characters",
                            lambda ds: raw(ds, "PatientName", b"A" * 70 + b"^JANE")),
    "name_only_carets": ("rg1", "PN of six empty components",
                         lambda ds: raw(ds, "ReferringPhysicianName", "^^^^^^")),
    "institution_80": ("rg1", "LO of 80 characters",
                       lambda ds: raw(ds, "InstitutionName", LONG_TEXT)),
    "accession_20": ("rg1", "SH identifier of 20 characters",
                     lambda ds: raw(ds, "AccessionNumber", "ACC-2023-00000012345")),
    "study_id_20": ("rg1", "SH identifier of 20 characters",
                    lambda ds: raw(ds, "StudyID", "STUDY-2023-000012345")),
    "latin1_declared_utf8": ("rg1", "Latin-1 bytes under ISO_IR 192", _bad_charset_latin1),
    "utf8_no_charset": ("rg1", "UTF-8 bytes, no Specific Character Set", _utf8_without_charset),
    "charset_misspelled": ("rg1", "Specific Character Set ISO-IR 100 (not a defined term)",
                           lambda ds: (raw(ds, "SpecificCharacterSet", "ISO-IR 100"),
                                       raw(ds, "PatientName", LATIN1_NAME))),
    "missing_type2": ("rg1", "Type 2 patient/study attributes absent", _missing_type2),
    "bad_codes": ("rg1", "CS values: lower case, hyphen, not enumerated", _bad_codes),
    "overlong_equipment": ("rg1", "equipment LO/SH over length", _overlong_equipment),
    "nih_age_62": ("nih", "synthetic DX, Patient's Age 62", lambda ds: raw(ds, "PatientAge", "62")),
    "nih_bad_numbers": ("nih", "DS with units, decimal comma", _bad_numbers),
    "nih_utf8_no_charset": ("nih", "UTF-8 bytes, no Specific Character Set", _utf8_without_charset),
    "nih_missing_type2": ("nih", "Type 2 patient/study attributes absent", _missing_type2),
    "nih_everything": ("nih", "many faults at once", _everything),
}

VARIANT_NAMES = tuple(_VARIANTS)

#: The SRs for pixelmed (~3.5 s each, more on a busy machine): the real-world case, the
#: character-set repairs, and those that change the content tree's Image Library
#: (orientation, spacing) or empty most of the header.
PIXELMED_SUBSET = ("cr_as_sc_age_62", "latin1_declared_utf8", "missing_type2", "nih_everything")


def dirty_variants(rg1: Dataset, nih: Dataset) -> list[Variant]:
    """Every dirty variant of the two clean bases (which are left unchanged)."""
    bases = {"rg1": _read_back(rg1), "nih": _read_back(nih)}  # as received: raw elements
    variants = []
    for name, (base, what, edit) in _VARIANTS.items():
        ds = copy.deepcopy(bases[base])  # raw elements: the base itself stays as it is
        edit(ds)
        variants.append(Variant(name, base, what, received(ds)))
    return variants
