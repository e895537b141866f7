"""Pleura engines: run chest X-ray models and nothing else (pixels in, numbers out).

>>> from engines import load_bundle, load
>>> engine = load(load_bundle("demo"))            # parity gate runs here
>>> result = engine.infer([image])                 # 2-D float32 MONOCHROME2 in [0, 1]

Knows no DICOM, database or queue.
"""

from engines.backends import BackendUnavailable
from engines.bundle import Bundle, BundleError, FindingSpec, load_bundle
from engines.parity import ParityError, ParityReport
from engines.runtime import Engine, InferenceResult, load

__all__ = [
    "BackendUnavailable",
    "Bundle",
    "BundleError",
    "Engine",
    "FindingSpec",
    "InferenceResult",
    "ParityError",
    "ParityReport",
    "load",
    "load_bundle",
]
