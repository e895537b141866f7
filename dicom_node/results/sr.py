"""The TID 1500 Measurement Report (Comprehensive 3D SR) holding a model's findings.

Content tree (codes are listed in the constants below)::

    Imaging Measurement Report (TID 1500)
      Language, Observation Context (device observer = the model),
      Procedure Reported = (363679005, SCT, "Imaging procedure") (CID 100)
      Image Library (TID 1600): every source image
      Imaging Measurements (only when at least one finding is marked on an image)
        per source image, per positive finding with a localization map, one TID 1410 group
        (when none is positive: one group for the triage score, see below):
          Tracking Identifier + UID, Finding = the finding code, Algorithm Identification
          (TID 4019, operating threshold as a parameter), Image Region = a closed POLYLINE
          around the map's hot area, or a POINT where the map peaks when that area covers
          most of the image, NUM <finding> in % (with its Equivalent Meaning, "Probability of
          <finding> (AI model output)"), qualitative evaluation <finding> = Present
      Qualitative Evaluations
        per source image, per finding not marked (negatives; positives without a map):
          CODE <finding> = Present | Absent, with Algorithm Identification (TID 4019, with
          the threshold), HAS PROPERTIES NUM <finding> in %, INFERRED FROM IMAGE the source
        optionally the study summary (triage score) the same way, inferred from every image
        TEXT Comment = "AI result - not for primary diagnosis ..."

Why this shape: OHIF draws every Measurement Group under Imaging Measurements on its image and
fails on a group without a SCOORD, and it labels a region with its NUMs' concept meaning,
value and unit ("Pleural effusion: 81.00 %"). Findings that cannot be shown on an image live
in the Qualitative Evaluations container, which viewers leave alone and archives still read.
OHIF also fails on an SR without any group, so when no positive finding can be marked, the
triage finding (the study summary's, where it is highest; else the most probable one) is
marked where its map peaks, with its evaluation Absent: the reader sees the model's score.

Tracking UIDs are derived from (source instance, finding code, model name), so the same
finding on the same image keeps its tracking UID across SR revisions.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    CodedConcept,
    Comprehensive3DSR,
    ContainerContentItem,
    GraphicTypeValues,
    ImageContentItem,
    ImageLibrary,
    ImageRegion,
    LanguageOfContentItemAndDescendants,
    Measurement,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from highdicom.sr.templates import DEFAULT_LANGUAGE
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code as DicomCode

from dicom_node.results._shared import (
    DISCLAIMER,
    ResultHeader,
    observation_context,
    source_header,
)
from dicom_node.results.content import Algorithm, Code, FindingResult, ImageResult
from dicom_node.results.heatmap import finding_mark
from dicom_node.results.uids import derive_uid

#: SNOMED CT 363679005 "Imaging procedure", the CID 100 concept that covers a chest X-ray
#: (CID 100 has no projection radiography entry; the study's own procedure stays in its header).
PROCEDURE_REPORTED = DicomCode("363679005", "SCT", "Imaging procedure")
#: The model's output as a percentage: UCUM "%", shown by viewers as e.g. "81.00 %".
UNIT_PERCENT = codes.UCUM.Percent
#: TID 1419 row 18: says what a NUM named by its finding code measures.
EQUIVALENT_MEANING = DicomCode("121050", "DCM", "Equivalent Meaning of Concept Name")
#: The image a qualitative evaluation was inferred from (the concept TID 1600 uses).
SOURCE = DicomCode("260753009", "SCT", "Source")
#: CID 241 "Present-Absent Only".
PRESENT = codes.SCT.Present
ABSENT = codes.SCT.Absent
#: TID 1500 row 12 "Qualitative Evaluations" container and the free-text item inside it.
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
    Sequence; ``study_summary`` (e.g. an any-abnormality triage score) becomes a study-level
    qualitative evaluation.
    """
    if not results:
        raise ValueError("build_sr needs at least one ImageResult")
    sources = [source_header(result.source) for result in results]
    if len({source.StudyInstanceUID for source in sources}) != 1:
        raise ValueError("all source images of one SR must belong to the same study")
    shown = _score_shown_when_nothing_is_marked(results, sources, study_summary)
    groups: list[PlanarROIMeasurementsAndQualitativeEvaluations] = []
    evaluations: list[CodeContentItem] = []
    for index, (result, source) in enumerate(zip(results, sources, strict=True), start=1):
        for finding in result.findings:
            group = _finding_group(finding, source, index, algorithm, mark=finding is shown)
            if group is not None:
                groups.append(group)
            else:
                evaluations.append(_evaluation(finding, [source], algorithm))
    if study_summary is not None:
        evaluations.append(_evaluation(study_summary, sources, algorithm))
    if not groups and not evaluations:
        raise ValueError("build_sr needs at least one finding or a study summary")
    content = _report(algorithm, groups, _library_images(sources))
    content.ContentSequence.append(_qualitative_evaluations(evaluations))
    header = ResultHeader(algorithm, "findings", series_instance_uid=series_instance_uid,
                          sop_instance_uid=sop_instance_uid, series_number=series_number,
                          instance_number=instance_number)
    return Comprehensive3DSR(evidence=sources, content=content, **header.sr_kwargs(predecessor))


def _report(
    algorithm: Algorithm,
    groups: list[PlanarROIMeasurementsAndQualitativeEvaluations],
    library: list[Dataset],
) -> ContainerContentItem:
    """The TID 1500 root container, rows 1-9: Imaging Measurements only when there are groups.

    Built here rather than by highdicom's MeasurementReport, which insists on at least one
    measurement group; TID 1500 needs Imaging Measurements only when there is no Qualitative
    Evaluations container, and every Pleura SR has one.
    """
    root = ContainerContentItem(name=codes.cid7021.ImagingMeasurementReport, template_id="1500")
    items = [
        *LanguageOfContentItemAndDescendants(DEFAULT_LANGUAGE),
        *observation_context(algorithm),
        CodeContentItem(name=codes.DCM.ProcedureReported, value=PROCEDURE_REPORTED,
                        relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD),
    ]
    if library:
        items.extend(ImageLibrary(library))
    if groups:
        measurements = ContainerContentItem(name=codes.DCM.ImagingMeasurements,
                                            relationship_type=RelationshipTypeValues.CONTAINS)
        measurements.ContentSequence = hd.sr.ContentSequence(
            [item for group in groups for item in group])
        items.append(measurements)
    root.ContentSequence = hd.sr.ContentSequence(items)
    return root

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


def _probability(finding: FindingResult) -> Measurement:
    """NUM <finding> = probability in %, with its Equivalent Meaning (TID 1419 rows 5, 18)."""
    measurement = Measurement(name=_concept(finding.code),
                              value=round(100.0 * float(finding.probability), 4),
                              unit=UNIT_PERCENT)
    measurement[0].ContentSequence = hd.sr.ContentSequence([TextContentItem(
        name=EQUIVALENT_MEANING,
        value=f"Probability of {finding.code.meaning} (AI model output)"[:1024],
        relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD,
    )])
    return measurement


def _score_shown_when_nothing_is_marked(
    results: Sequence[ImageResult], sources: Sequence[Dataset],
    study_summary: FindingResult | None,
) -> FindingResult | None:
    """The negative finding to mark when no positive one can be: OHIF 3.13 fails on an SR
    without a single Measurement Group. The summary (triage) finding where it is highest, else
    the most probable finding, among those with a usable map; None when something positive is
    marked anyway, or when no map can be marked."""
    candidates = [(finding, source) for result, source in zip(results, sources, strict=True)
                  for finding in result.findings if _region(finding, source) is not None]
    if any(finding.positive for finding, _ in candidates) or not candidates:
        return None
    summary_code = study_summary.code if study_summary is not None else None
    return max(candidates, key=lambda c: (c[0].code == summary_code, c[0].probability))[0]


def _finding_group(
    finding: FindingResult, source: Dataset, index: int, algorithm: Algorithm,
    mark: bool = False,
) -> PlanarROIMeasurementsAndQualitativeEvaluations | None:
    """TID 1410 for a positive finding (or one to ``mark`` anyway) that can be marked on its
    image, else None."""
    region = _region(finding, source) if finding.positive or mark else None
    if region is None:
        return None
    localized = region.value.shape[0] > 1
    group = PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=derive_uid("tracking", source.SOPInstanceUID, finding.code.scheme,
                           finding.code.value, algorithm.name),
            identifier=f"{finding.name}, image {index}",
        ),
        referenced_region=region,
        finding_type=_concept(finding.code),
        algorithm_id=_algorithm_id(algorithm, finding.threshold),
        geometric_purpose=BOUNDED_BY if localized else None,
        measurements=[_probability(finding)],
        qualitative_evaluations=[QualitativeEvaluation(
            name=_concept(finding.code), value=PRESENT if finding.positive else ABSENT)],
    )
    _purpose_after_finding(group[0])
    return group


def _purpose_after_finding(group: ContainerContentItem) -> None:
    """Move Geometric Purpose right after Finding, where TID 1410 (rows 3b, 3c) puts it."""
    items = list(group.ContentSequence)
    purposes = [item for item in items if item.name == codes.DCM.GeometricPurposeOfRegion]
    if not purposes:
        return
    rest = [item for item in items if item not in purposes]
    at = next(i for i, item in enumerate(rest) if item.name == codes.DCM.Finding) + 1
    group.ContentSequence = hd.sr.ContentSequence(rest[:at] + purposes + rest[at:])


def _region(finding: FindingResult, source: Dataset) -> ImageRegion | None:
    """The hot-area rectangle (POLYLINE) or the map's peak (POINT); None without a map."""
    if finding.heatmap is None:
        return None
    mark = finding_mark(finding.heatmap, rows=int(source.Rows), columns=int(source.Columns))
    if mark is None:
        return None
    return ImageRegion(
        graphic_type=GraphicTypeValues.POLYLINE if len(mark) > 1 else GraphicTypeValues.POINT,
        graphic_data=mark,
        source_image=SourceImageForRegion(
            referenced_sop_class_uid=source.SOPClassUID,
            referenced_sop_instance_uid=source.SOPInstanceUID,
        ),
    )


def _evaluation(
    finding: FindingResult, sources: Sequence[Dataset], algorithm: Algorithm
) -> CodeContentItem:
    """CODE <finding> = Present | Absent with the algorithm and its threshold (TID 4019), the
    probability, and the images it was inferred from."""
    item = CodeContentItem(name=_concept(finding.code),
                           value=PRESENT if finding.positive else ABSENT,
                           relationship_type=RelationshipTypeValues.CONTAINS)
    probability = _probability(finding)[0]
    probability.RelationshipType = RelationshipTypeValues.HAS_PROPERTIES.value
    images = [ImageContentItem(name=SOURCE,
                               referenced_sop_class_uid=source.SOPClassUID,
                               referenced_sop_instance_uid=source.SOPInstanceUID,
                               relationship_type=RelationshipTypeValues.INFERRED_FROM)
              for source in sources]
    item.ContentSequence = hd.sr.ContentSequence(
        [*_algorithm_id(algorithm, finding.threshold), probability, *images])
    return item


def _qualitative_evaluations(evaluations: Sequence[CodeContentItem]) -> ContainerContentItem:
    """TID 1500 row 12: the findings not marked on an image, then the AI disclaimer."""
    container = ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = hd.sr.ContentSequence([
        *evaluations,
        TextContentItem(
            name=COMMENT, value=_DISCLAIMER_TEXT,
            relationship_type=RelationshipTypeValues.CONTAINS,
        ),
    ])
    return container
