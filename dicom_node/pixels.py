"""Pixel decoding: any supported transfer syntax to a float32 MONOCHROME2 image in [0, 1].

Steps: decode (pydicom + pylibjpeg: JPEG, JPEG-LS, JPEG 2000, RLE, deflate), Modality LUT,
MONOCHROME1 inversion, then a robust window (0.5th-99.5th percentile) onto [0, 1].
"""

from __future__ import annotations

import numpy as np
from pydicom import Dataset
from pydicom.pixels import apply_modality_lut

_SUPPORTED_PHOTOMETRIC = {"MONOCHROME1", "MONOCHROME2"}


class UndecodableImage(ValueError):
    """The image cannot be turned into a grayscale array; the message says why."""


def decode(ds: Dataset) -> np.ndarray:
    """Return the single-frame grayscale image of ``ds`` as float32 MONOCHROME2 in [0, 1]."""
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in _SUPPORTED_PHOTOMETRIC:
        raise UndecodableImage(f"photometric interpretation {photometric or 'missing'} unsupported")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise UndecodableImage("more than one sample per pixel")
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise UndecodableImage("multi-frame images are not supported")
    try:
        raw = ds.pixel_array
    except Exception as exc:  # decoders raise many types; all mean "cannot decode"
        raise UndecodableImage(f"pixel data could not be decoded: {exc}") from exc
    values = np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)
    if photometric == "MONOCHROME1":
        values = -values
    lo, hi = np.percentile(values, (0.5, 99.5))
    if hi <= lo:
        raise UndecodableImage("image has no contrast (constant pixel values)")
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
