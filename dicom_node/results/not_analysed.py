"""The not-analysed notice: an Enhanced SR (TID 2000) telling the reader that the model did
not analyse a study, and why.

Sent instead of the findings SR when a chest X-ray study has no image the model may read
(e.g. lateral views only, a child). Viewers that draw TID 1500 reports (OHIF) show any other
SR as text, concept names and values as a tree, so the sentence below is what the radiologist
reads; its Series Description says it too (``AI not analysed (demo 0.1.0) - not for primary
diagnosis``), for the study browser.

Content tree (TID 2000 "Basic Diagnostic Imaging Report")::

    CONTAINER Diagnostic Imaging Report (18748-4, LN)               template 2000
      HAS CONCEPT MOD  CODE Language of Content Item and Descendants = English (United States)
      HAS OBS CONTEXT  Observer Type = Device, Device Observer UID / Name / Manufacturer /
                       Model Name (TID 1001/1004: the model, as in the findings SR)
      CONTAINS  CONTAINER Findings (59776-5, LN)                   TID 2000 section, CID 7001
        CONTAINS  TEXT Finding (121071, DCM)                        TID 2002, CID 7002
                  = "Not analysed by AI model <name> <version>: <reason>."
        CONTAINS  TEXT Finding (121071, DCM)
                  = "AI result - not for primary diagnosis. The images were not analysed
                     by the AI model: this report holds no AI findings."

The images it is about are the document's Current Requested Procedure Evidence; the content
tree names none (the sentence is the whole message). The document is COMPLETE, PRELIMINARY
and UNVERIFIED, like the findings SR.

The codes are the current PS3.16's: CID 7001 lists LOINC section headings. pixelmed's
DicomSRValidator (2022) carries the 2005 CID 7001 with DCM codes (121070 "Findings"), so it
warns that the section and the two sentences are "not in template"; with the old heading the
same tree validates without warnings (tests/dicom_node/test_results_not_analysed.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from highdicom.sr import (
    ContainerContentItem,
    EnhancedSR,
    LanguageOfContentItemAndDescendants,
    RelationshipTypeValues,
    TextContentItem,
)
from highdicom.sr.templates import DEFAULT_LANGUAGE
from pydicom import Dataset
from pydicom.sr.coding import Code as DicomCode

from dicom_node.results._shared import (
    DISCLAIMER,
    ResultHeader,
    observation_context,
    source_header,
)
from dicom_node.results.content import Algorithm

#: CID 7000: the document title.
DIAGNOSTIC_IMAGING_REPORT = DicomCode("18748-4", "LN", "Diagnostic Imaging Report")
#: CID 7001: the section heading.
FINDINGS = DicomCode("59776-5", "LN", "Findings")
#: CID 7002: the concept name of each sentence.
FINDING = DicomCode("121071", "DCM", "Finding")
#: Template of the root container (Content Template Sequence, DCMR).
TEMPLATE = "2000"

#: Words of the second sentence, after the reason.
DISCLAIMER_TEXT = (
    f"{DISCLAIMER}. The images were not analysed by the AI model: this report holds no AI findings."
)


def not_analysed_text(algorithm: Algorithm, reason: str) -> str:
    """E.g. ``Not analysed by AI model demo 0.1.0: patient age below the intended minimum of
    18 years.``"""
    reason = " ".join(reason.split()).rstrip(".")
    if not reason:
        raise ValueError("a not-analysed notice needs a reason")
    return f"Not analysed by AI model {algorithm.name} {algorithm.version}: {reason}."


def build_not_analysed(
    sources: Sequence[Dataset],
    algorithm: Algorithm,
    reason: str,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
    predecessor: Dataset | None = None,
) -> EnhancedSR:
    """The notice for the images ``sources`` (headers suffice; patient and study are copied from
    the first) that ``algorithm`` did not analyse, for ``reason`` (plain words for a
    radiologist, e.g. ``lateral view only; the model reads frontal (PA or AP) views``: no
    patient identifiers, no age value).

    ``predecessor`` (an earlier notice for the same study that this one replaces) goes into the
    Predecessor Documents Sequence.
    """
    if not sources:
        raise ValueError("build_not_analysed needs at least one source image")
    headers = [source_header(source) for source in sources]
    if len({header.StudyInstanceUID for header in headers}) != 1:
        raise ValueError("all source images of one notice must belong to the same study")
    header = ResultHeader(algorithm, "not analysed", series_instance_uid=series_instance_uid,
                          sop_instance_uid=sop_instance_uid, series_number=series_number,
                          instance_number=instance_number)
    content = _report(algorithm, not_analysed_text(algorithm, reason))
    return EnhancedSR(evidence=headers, content=content, **header.sr_kwargs(predecessor))


def _report(algorithm: Algorithm, text: str) -> ContainerContentItem:
    root = ContainerContentItem(name=DIAGNOSTIC_IMAGING_REPORT, template_id=TEMPLATE)
    section = ContainerContentItem(name=FINDINGS, relationship_type=RelationshipTypeValues.CONTAINS)
    section.ContentSequence = hd.sr.ContentSequence([
        TextContentItem(name=FINDING, value=text, relationship_type=RelationshipTypeValues.CONTAINS),
        TextContentItem(name=FINDING, value=DISCLAIMER_TEXT,
                        relationship_type=RelationshipTypeValues.CONTAINS),
    ])
    root.ContentSequence = hd.sr.ContentSequence([
        *LanguageOfContentItemAndDescendants(DEFAULT_LANGUAGE),
        *observation_context(algorithm),
        section,
    ])
    return root
