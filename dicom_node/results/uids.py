"""Deterministic DICOM UIDs for the objects Pleura creates.

UIDs are built under the ``2.25`` root (PS3.5 B.2, ISO/IEC 9834-8): ``2.25.`` followed by
the decimal value of a name-based (SHA-1, version 5) UUID computed from the given parts.
No organisational root has to be registered, the result is at most 44 characters long,
and the same parts always give the same UID, so re-running a study with the same model
version re-creates the same SR/SC instances instead of duplicating them.
"""

from __future__ import annotations

import json
import uuid

from pydicom.uid import UID

#: Namespace for Pleura's name-based UUIDs (a fixed, random UUID; never change it).
PLEURA_UID_NAMESPACE = uuid.UUID("4f1c7a0e-5b9d-4e64-9a51-2f6d0c8e3b17")

UID_ROOT = "2.25."


def derive_uid(*parts: str) -> UID:
    """Return the UID for ``parts``, e.g. ``derive_uid("sr", study_uid, bundle, version)``.

    The parts are encoded unambiguously (``("a", "bc")`` and ``("ab", "c")`` differ).
    """
    if not parts:
        raise ValueError("derive_uid needs at least one part")
    if not all(isinstance(part, str) for part in parts):
        raise TypeError("derive_uid parts must all be str")
    name = json.dumps(parts, ensure_ascii=False, separators=(",", ":"))
    return UID(f"{UID_ROOT}{uuid.uuid5(PLEURA_UID_NAMESPACE, name).int}")
