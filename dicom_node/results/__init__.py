"""Result objects Pleura sends back: the TID 1500 SR and the heatmap Secondary Capture, or
the not-analysed notice (a TID 2000 SR) for a study the model did not read.

Like highdicom's subpackages: ``content`` holds the plain inputs, ``sr``, ``sc`` and
``not_analysed`` build the objects, ``uids`` derives their deterministic UIDs, ``heatmap``
turns localization maps into overlays and regions.
"""

from dicom_node.results.content import Algorithm, Code, FindingResult, ImageResult
from dicom_node.results.not_analysed import build_not_analysed
from dicom_node.results.sc import build_sc
from dicom_node.results.sr import build_sr
from dicom_node.results.uids import derive_uid

__all__ = [
    "Algorithm",
    "Code",
    "FindingResult",
    "ImageResult",
    "build_not_analysed",
    "build_sc",
    "build_sr",
    "derive_uid",
]
