"""What the SR and SC builders share: wording, source header copies, equipment, and the
common header (:class:`ResultHeader`) of every object they build."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Any

import highdicom as hd
from highdicom.sr import DeviceObserverIdentifyingAttributes, ObservationContext, ObserverContext
from pydicom import Dataset
from pydicom.sr.codedict import codes

from dicom_node.results.content import Algorithm
from dicom_node.results.sanitize import clean_header
from dicom_node.results.uids import derive_uid

#: Burned into every SC and written into every SR.
DISCLAIMER = "AI result - not for primary diagnosis"

_LO_MAX = 64
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
#: Type 2 patient/study attributes the builders copy; added empty when a source lacks them.
_TYPE2_IDENTITY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName",
)


def series_description(kind: str, algorithm: Algorithm) -> str:
    """E.g. ``AI findings (demo 0.1.0) - not for primary diagnosis`` (at most 64 chars)."""
    suffix = ") - not for primary diagnosis"
    prefix = f"AI {kind} ("
    label = f"{algorithm.name} {algorithm.version}"[: _LO_MAX - len(prefix) - len(suffix)]
    return f"{prefix}{label}{suffix}"


def source_header(source: Dataset) -> Dataset:
    """A copy of ``source`` without pixel data, made safe to copy into Pleura's objects.

    The attributes that reach the SR or SC are valid for their VR
    (:func:`dicom_node.results.sanitize.clean_header`: corrected, truncated, emptied or
    dropped; text decoded, Specific Character Set ISO_IR 192 when the source's did not match
    its bytes); missing Type 2 identity attributes are added empty. Raises
    :class:`~dicom_node.results.sanitize.InvalidSource` (a ValueError) for an invalid Study,
    Series, SOP Instance or SOP Class UID.
    """
    header, _changes = clean_header(source, skip=_PIXEL_TAGS)
    for keyword in _TYPE2_IDENTITY:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def processing_equipment(algorithm: Algorithm) -> hd.ContributingEquipment:
    """Contributing Equipment item for the model (purpose DCM 109102 "Processing Equipment").

    Software Versions holds ``model <version>`` then ``software <software_version>``.
    """
    return hd.ContributingEquipment(
        manufacturer=algorithm.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=algorithm.name[:_LO_MAX],
        software_versions=[
            f"model {algorithm.version}"[:_LO_MAX],
            f"software {algorithm.software_version}"[:_LO_MAX],
        ],
        contribution_description=f"AI model {algorithm.name} {algorithm.version}"[:1024],
    )


def observation_context(algorithm: Algorithm) -> ObservationContext:
    """The model as device observer (TID 1004); its UID is derived from the model's identity."""
    device = DeviceObserverIdentifyingAttributes(
        uid=derive_uid("device", algorithm.manufacturer, algorithm.name, algorithm.version),
        name=algorithm.name,
        manufacturer_name=algorithm.manufacturer,
        model_name=f"{algorithm.name} {algorithm.version}",
    )
    return ObservationContext(
        observer_device_context=ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


@dataclass(frozen=True)
class ResultHeader:
    """The header every result object shares: its place in the study (series and instance
    UIDs and numbers) and the model as manufacturer, Series Description and Contributing
    Equipment. ``kind`` names the object in its Series Description (see
    :func:`series_description`)."""

    algorithm: Algorithm
    kind: str
    _: KW_ONLY
    series_instance_uid: str
    sop_instance_uid: str
    series_number: int
    instance_number: int

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for a highdicom SOP class constructor (SR or Secondary Capture)."""
        algorithm = self.algorithm
        return {
            "series_instance_uid": self.series_instance_uid,
            "series_number": self.series_number,
            "sop_instance_uid": self.sop_instance_uid,
            "instance_number": self.instance_number,
            "manufacturer": algorithm.manufacturer,
            "manufacturer_model_name": algorithm.name[:_LO_MAX],
            "software_versions": algorithm.software_version[:_LO_MAX],
            "series_description": series_description(self.kind, algorithm),
            "contributing_equipment": [processing_equipment(algorithm)],
        }

    def sr_kwargs(self, predecessor: Dataset | None = None) -> dict[str, Any]:
        """:meth:`kwargs` plus the SR document state: complete, preliminary, unverified, and
        ``predecessor`` (the document this one supersedes) as its previous version."""
        return {
            **self.kwargs(),
            "is_complete": True,
            "is_final": False,
            "is_verified": False,
            "previous_versions": [predecessor] if predecessor is not None else None,
        }
