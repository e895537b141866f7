"""The TID 1500 Measurement Report (Comprehensive 3D SR) holding a model's findings.

Content tree (codes are listed in the constants below)::

    Imaging Measurement Report (TID 1500)
      Language, Observation Context (device observer = the model), Procedure Reported
      Image Library (TID 1600): every source image
      Imaging Measurements
        per source image, per finding, one Measurement Group:
          TID 1410 (planar ROI) when the finding is positive and has a localization map:
            Image Region = closed POLYLINE around the map's hot area on the source image
          TID 1501 otherwise, with the source image as "Source of Measurement"
          each group: Tracking Identifier + UID, Finding = the finding code,
            Algorithm Identification (TID 4019, with the operating threshold as a
            parameter), qualitative evaluation <finding> = Present | Absent (per
            threshold), NUM Probability in {probability}
        optionally one study-level TID 1501 group (the study summary / triage score)
      Qualitative Evaluations: TEXT Comment = "AI result - not for primary diagnosis ..."

Tracking UIDs are derived from (source instance, finding code, model name), so the same
finding on the same image keeps its tracking UID across SR revisions.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    ContainerContentItem,
    DeviceObserverIdentifyingAttributes,
    GraphicTypeValues,
    ImageRegion,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code as DicomCode

from dicom_node.results._shared import (
    DISCLAIMER,
    processing_equipment,
    series_description,
    source_header,
)
from dicom_node.results.content import Algorithm, Code, FindingResult, ImageResult
from dicom_node.results.heatmap import hot_region_box
from dicom_node.results.uids import derive_uid

#: SNOMED CT 399208008 "Plain chest X-ray": any number of views (LOINC 36643-5 means
#: exactly two views, which a single frontal image is not).
PROCEDURE_CHEST_XRAY = DicomCode("399208008", "SCT", "Plain chest X-ray")
#: NUM concept for the model's output score.
PROBABILITY = DicomCode("122157", "DCM", "Probability")
#: UCUM unity with an annotation: a dimensionless value in [0, 1].
UNIT_PROBABILITY = DicomCode("{probability}", "UCUM", "probability")
#: CID 241 "Present-Absent Only".
PRESENT = codes.SCT.Present
ABSENT = codes.SCT.Absent
#: TID 1500 row "Qualitative Evaluations" container and the free-text item inside it.
QUALITATIVE_EVALUATIONS = DicomCode("C0034375", "UMLS", "Qualitative Evaluations")
COMMENT = codes.DCM.Comment
#: CID 219: the finding lies within the region.
BOUNDED_BY = codes.SCT.BoundedBy

_DISCLAIMER_TEXT = (
    f"{DISCLAIMER}. Produced automatically by an AI model, not verified by a physician; "
    "probabilities and regions are decision support only."
)


def build_sr(
    results: Sequence[ImageResult],
    algorithm: Algorithm,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
    predecessor: Dataset | None = None,
    study_summary: FindingResult | None = None,
) -> Comprehensive3DSR:
    """One SR for the processed images of one study (patient and study copied from them).

    ``predecessor`` (the SR this one supersedes) goes into the Predecessor Documents
    Sequence; ``study_summary`` (e.g. an any-abnormality triage score) becomes a
    study-level measurement group.
    """
    if not results:
        raise ValueError("build_sr needs at least one ImageResult")
    sources = [source_header(result.source) for result in results]
    if len({source.StudyInstanceUID for source in sources}) != 1:
        raise ValueError("all source images of one SR must belong to the same study")
    groups = [
        _finding_group(finding, source, index, algorithm)
        for index, (result, source) in enumerate(zip(results, sources, strict=True), start=1)
        for finding in result.findings
    ]
    if study_summary is not None:
        groups.append(_summary_group(study_summary, sources, algorithm))
    if not groups:
        raise ValueError("build_sr needs at least one finding or a study summary")
    report = MeasurementReport(
        observation_context=_observation_context(algorithm),
        procedure_reported=PROCEDURE_CHEST_XRAY,
        imaging_measurements=groups,
        referenced_images=_library_images(sources) or None,
    )
    report[0].ContentSequence.append(_disclaimer_container())
    return Comprehensive3DSR(
        evidence=sources,
        content=report[0],
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=algorithm.manufacturer,
        manufacturer_model_name=algorithm.name[:64],
        software_versions=algorithm.software_version[:64],
        series_description=series_description("findings", algorithm),
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=[predecessor] if predecessor is not None else None,
        contributing_equipment=[processing_equipment(algorithm)],
    )


def _library_images(sources: Sequence[Dataset]) -> list[Dataset]:
    """Sources that can be described in the Image Library (TID 1601/1603).

    highdicom describes a projection radiograph by its Patient Orientation and Imager
    Pixel Spacing; Pixel Spacing stands in for the latter, and an image with neither (or
    with a zero spacing) is left out of the library, though still referenced by its groups.
    """
    library = []
    for source in sources:
        view = Dataset()
        view.update(source)
        spacing = source.get("ImagerPixelSpacing") or source.get("PixelSpacing")
        if spacing is None or len(spacing) != 2 or min(float(v) for v in spacing) <= 0:
            continue
        if len(source.get("PatientOrientation") or []) != 2:
            continue
        view.ImagerPixelSpacing = spacing
        library.append(view)
    return library


def _observation_context(algorithm: Algorithm) -> ObservationContext:
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


def _algorithm_id(algorithm: Algorithm, threshold: float) -> AlgorithmIdentification:
    parameters = [f"{key}={value}" for key, value in sorted(algorithm.parameters.items())]
    parameters.append(f"operating_threshold={threshold:.6g}")
    return AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=parameters,
        manufacturer=algorithm.manufacturer,
    )


def _concept(code: Code) -> CodedConcept:
    return CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _evaluation_and_probability(
    finding: FindingResult,
) -> tuple[list[QualitativeEvaluation], list[Measurement]]:
    evaluation = QualitativeEvaluation(
        name=_concept(finding.code), value=PRESENT if finding.positive else ABSENT
    )
    probability = Measurement(
        name=PROBABILITY, value=float(finding.probability), unit=UNIT_PROBABILITY
    )
    return [evaluation], [probability]


def _finding_group(
    finding: FindingResult, source: Dataset, index: int, algorithm: Algorithm
) -> MeasurementsAndQualitativeEvaluations | PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 with a region for a positive localized finding, else TID 1501."""
    tracking = TrackingIdentifier(
        uid=derive_uid("tracking", source.SOPInstanceUID, finding.code.scheme,
                       finding.code.value, algorithm.name),
        identifier=f"{finding.name}, image {index}",
    )
    evaluations, measurements = _evaluation_and_probability(finding)
    common = {
        "tracking_identifier": tracking,
        "finding_type": _concept(finding.code),
        "algorithm_id": _algorithm_id(algorithm, finding.threshold),
        "qualitative_evaluations": evaluations,
        "measurements": measurements,
    }
    region = _region(finding, source) if finding.positive else None
    if region is not None:
        return PlanarROIMeasurementsAndQualitativeEvaluations(
            referenced_region=region, geometric_purpose=BOUNDED_BY, **common
        )
    return MeasurementsAndQualitativeEvaluations(
        source_images=[SourceImageForMeasurementGroup(
            referenced_sop_class_uid=source.SOPClassUID,
            referenced_sop_instance_uid=source.SOPInstanceUID,
        )],
        **common,
    )


def _region(finding: FindingResult, source: Dataset) -> ImageRegion | None:
    if finding.heatmap is None:
        return None
    box = hot_region_box(finding.heatmap, rows=int(source.Rows), columns=int(source.Columns))
    if box is None:
        return None
    return ImageRegion(
        graphic_type=GraphicTypeValues.POLYLINE,
        graphic_data=box,
        source_image=SourceImageForRegion(
            referenced_sop_class_uid=source.SOPClassUID,
            referenced_sop_instance_uid=source.SOPInstanceUID,
        ),
    )


def _summary_group(
    summary: FindingResult, sources: Sequence[Dataset], algorithm: Algorithm
) -> MeasurementsAndQualitativeEvaluations:
    """Study-level group (e.g. the triage score) referencing every source image."""
    evaluations, measurements = _evaluation_and_probability(summary)
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=derive_uid("tracking", sources[0].StudyInstanceUID, summary.code.scheme,
                           summary.code.value, algorithm.name),
            identifier=f"{summary.name}, study",
        ),
        finding_type=_concept(summary.code),
        algorithm_id=_algorithm_id(algorithm, summary.threshold),
        qualitative_evaluations=evaluations,
        measurements=measurements,
        source_images=[
            SourceImageForMeasurementGroup(
                referenced_sop_class_uid=source.SOPClassUID,
                referenced_sop_instance_uid=source.SOPInstanceUID,
            )
            for source in sources
        ],
    )


def _disclaimer_container() -> ContainerContentItem:
    container = ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = hd.sr.ContentSequence([
        TextContentItem(
            name=COMMENT, value=_DISCLAIMER_TEXT,
            relationship_type=RelationshipTypeValues.CONTAINS,
        )
    ])
    return container
