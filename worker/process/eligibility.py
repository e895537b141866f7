"""Eligibility gate: which received images the bundle's intended use covers.

Returns a reason (stored in the ledger and shown by ``pleura status``) or None when eligible.
Absent attributes do not exclude an image: many PACS strip BodyPartExamined or ViewPosition.

Refusals come in two kinds (:class:`Refusal`):

- **outside the chest domain**: our own objects, non-images, hostile headers, other modalities
  and body parts. Nothing is said to the reader: the study was never the model's business.
- **chest domain**: a chest X-ray that the bundle's intended use excludes (a view it was not
  made for, a patient below its minimum age, a photometric interpretation it cannot read) or
  whose pixels cannot be decoded (:func:`undecodable`). The reader is told in the study that
  the model did not analyse it and why (``Refusal.notice``, plain words without patient data).

The rules run in that order, so an image is chest domain only after modality and body part
passed (e.g. a knee radiograph of a child is refused for its body part, silently).
"""

from __future__ import annotations

import re
from datetime import date

from pydicom import Dataset
from pydicom.datadict import dictionary_has_tag, dictionary_VR
from pydicom.uid import UID

_SECONDARY_CAPTURE = {
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
}
_CHEST_WORDS = {"CHEST", "THORAX", "LUNG", "TORAX", "THORAX_CHEST"}
_LATERAL_VIEWS = {"LL", "RL", "LATERAL", "LAT", "RLD", "LLD"}
#: An AS value, also as dirty PACS send it (``8Y``, ``62 y``); a bare number has no unit.
_AGE = re.compile(r"^(\d{1,3})\s*([DWMY])$", re.IGNORECASE)
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}
_DATE = re.compile(r"^(\d{4})(\d{2})(\d{2})$")


def age_in_years(patient_age: str) -> float | None:
    """Parse an AS value such as ``061Y`` (or ``8Y``); None when absent or without a unit."""
    match = _AGE.match(patient_age.strip()) if patient_age else None
    return int(match[1]) * _AGE_UNIT_YEARS[match[2].upper()] if match else None


def patient_age_years(ds: Dataset) -> float | None:
    """Patient's Age, else the years from Patient's Birth Date to the Study Date; None if unknown.

    A child whose PACS sends no usable age must not be read by an adult-only model.
    """
    age = age_in_years(str(ds.get("PatientAge", "")))
    if age is not None:
        return age
    birth, study = (_date(str(ds.get(k, ""))) for k in ("PatientBirthDate", "StudyDate"))
    return (study - birth).days / 365.25 if birth and study and study >= birth else None


def _date(value: str) -> date | None:
    match = _DATE.match(value.strip())
    if match is None:
        return None
    try:
        return date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:
        return None


#: Deepest sequence nesting accepted; images nest a few levels, a hostile header thousands.
MAX_SEQUENCE_DEPTH = 32

#: Manufacturer that Pleura writes into its own SR and SC objects.
OWN_MANUFACTURER = "Pleura"


class Refusal(str):
    """Why an image is not eligible: the reason text (a ``str``, as the ledger stores it) and,
    for a chest-domain refusal, ``notice``: the same in plain words for the radiologist, e.g.
    ``lateral view (the model is intended for AP or PA views)``; None outside the chest domain.

    A ``str`` so that every caller that only wants the reason keeps working unchanged.
    """

    notice: str | None

    def __new__(cls, reason: str, notice: str | None = None) -> Refusal:
        refusal = super().__new__(cls, reason)
        refusal.notice = notice
        return refusal

    @property
    def chest_domain(self) -> bool:
        """A chest X-ray the model may not read: the reader is told (see the module docstring)."""
        return self.notice is not None


def undecodable(reason: str) -> Refusal:
    """A chest X-ray in the intended use whose pixels could not be decoded (``reason``: the
    decoder's message, for the ledger)."""
    return Refusal(reason, "the image pixel data could not be decoded")


def check(ds: Dataset, intended_use: dict) -> Refusal | None:
    """Why ``ds`` (a header) is not eligible for the bundle, or None if it is."""
    if str(ds.get("Manufacturer", "")) == OWN_MANUFACTURER:
        return Refusal("produced by Pleura")
    if "Rows" not in ds or "Columns" not in ds:
        return Refusal(f"not an image (SOP class {UID(str(ds.get('SOPClassUID', ''))).name})")
    if _nesting_depth(ds) > MAX_SEQUENCE_DEPTH:
        return Refusal(f"sequences nested deeper than {MAX_SEQUENCE_DEPTH} levels")
    modality = str(ds.get("Modality", "")).upper()
    modalities = {m.upper() for m in intended_use.get("modalities", ["CR", "DX"])}
    is_sc = str(ds.get("SOPClassUID", "")) in _SECONDARY_CAPTURE
    if modality not in modalities and not (is_sc and _looks_like_chest(ds)):
        return Refusal(f"modality {modality or 'missing'} not in intended use {sorted(modalities)}")
    body_part = str(ds.get("BodyPartExamined", "")).upper()
    body_parts = {b.upper() for b in intended_use.get("body_parts", ["CHEST"])}
    if "CHEST" in body_parts:
        body_parts |= _CHEST_WORDS
    if body_part and body_part not in body_parts:
        return Refusal(
            f"body part {body_part} not in intended use {sorted(intended_use.get('body_parts', ['CHEST']))}")
    # from here on: a chest X-ray (or an image that does not say it is not one)
    view = str(ds.get("ViewPosition", "")).upper()
    views = {v.upper() for v in intended_use.get("views", ["PA", "AP"])}
    if view in _LATERAL_VIEWS or (view and view not in views):
        intended = f"the model is intended for {' or '.join(sorted(views)) or 'no'} views"
        what = "lateral view" if view in _LATERAL_VIEWS else f"view position {view[:16]}"
        return Refusal(f"view {view} not in intended use {sorted(views)}", f"{what} ({intended})")
    min_age = intended_use.get("min_age_years")
    age = patient_age_years(ds)
    if min_age is not None and age is not None and age < float(min_age):
        reason = f"patient age below the intended minimum of {min_age} years"
        return Refusal(reason, reason)  # the minimum, never the patient's age
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in {"MONOCHROME1", "MONOCHROME2"}:
        return Refusal(f"photometric interpretation {photometric or 'missing'} unsupported",
                       f"image type not supported (photometric interpretation {photometric[:16] or 'missing'})")
    return None


def _nesting_depth(ds: Dataset) -> int:
    """Deepest sequence nesting, found without recursion (only sequences are parsed)."""
    deepest, stack = 0, [(ds, 0)]
    while stack:
        current, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_SEQUENCE_DEPTH:
            break
        for raw in current.elements():
            vr = raw.VR or (dictionary_VR(raw.tag) if dictionary_has_tag(raw.tag) else None)
            if vr == "SQ":
                stack.extend((item, depth + 1) for item in current[raw.tag].value)
    return deepest


def _looks_like_chest(ds: Dataset) -> bool:
    text = " ".join(
        str(ds.get(k, "")) for k in ("BodyPartExamined", "StudyDescription", "SeriesDescription")
    ).upper()
    return any(word in text for word in _CHEST_WORDS)
