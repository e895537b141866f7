"""Pixel decoding: any supported transfer syntax to a float32 MONOCHROME2 image in [0, 1].

Steps: decode (pydicom with the fastest installed decoder of each transfer syntax: CharLS
(pyjpegls) for JPEG-LS, pylibjpeg for JPEG and JPEG 2000; bench.decode), Modality LUT,
MONOCHROME1 inversion, then a robust window (0.5th-99.5th percentile) onto [0, 1].

Input is the peer's and may be hostile: the declared matrix is bounded before any decoder
allocates, and every failure (including RecursionError) becomes :class:`UndecodableImage`
with a reason that names no attribute values. MemoryError is not the image's fault within
that bound: it propagates, so the job is retried and quarantined after its attempts.
"""

from __future__ import annotations

import numpy as np
from pydicom import Dataset, uid
from pydicom.pixels import apply_modality_lut
from pydicom.pixels.decoders.base import get_decoder

_SUPPORTED_PHOTOMETRIC = {"MONOCHROME1", "MONOCHROME2"}
#: pydicom decoding plugin per transfer syntax, where the one it picks first is not the fastest:
#: a 2991 x 2482 12-bit JPEG-LS image takes 0.10 s with CharLS, 0.35 s with libjpeg (bench.decode).
FASTEST_PLUGIN = {uid.JPEGLSLossless: "pyjpegls", uid.JPEGLSNearLossless: "pyjpegls"}
#: Largest matrix decoded (rows x columns); the largest detectors are about 4,300 x 4,300.
MAX_PIXELS = 10_000 * 10_000


class UndecodableImage(ValueError):
    """The image cannot be turned into a grayscale array; the message says why."""


def decode(ds: Dataset) -> np.ndarray:
    """Return the single-frame grayscale image of ``ds`` as float32 MONOCHROME2 in [0, 1]."""
    try:
        return _decode(ds)
    except (UndecodableImage, MemoryError):
        raise
    except Exception as exc:  # hostile attribute values raise anything, from ValueError to RecursionError
        raise UndecodableImage(f"invalid image attributes: {type(exc).__name__}") from exc


def _decode(ds: Dataset) -> np.ndarray:
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in _SUPPORTED_PHOTOMETRIC:
        raise UndecodableImage(f"photometric interpretation {photometric[:16] or 'missing'} unsupported")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise UndecodableImage("more than one sample per pixel")
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise UndecodableImage("multi-frame images are not supported")
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows < 2 or columns < 2 or rows * columns > MAX_PIXELS:
        raise UndecodableImage(f"matrix {rows} x {columns} outside 2 x 2 .. {MAX_PIXELS} pixels")
    try:
        raw = _pixel_data(ds)
    except Exception as exc:  # decoders raise many types; all mean "cannot decode"
        raise UndecodableImage(f"pixel data could not be decoded: {type(exc).__name__}: {str(exc)[:200]}") from exc
    if raw.shape != (rows, columns):
        raise UndecodableImage(f"decoded shape {raw.shape} differs from the declared {rows} x {columns}")
    values = _modality_values(raw, ds)
    if not np.isfinite(values).all():
        raise UndecodableImage("modality LUT produced non-finite values")
    if photometric == "MONOCHROME1":
        np.negative(values, out=values)
    lo, hi = (np.float32(v) for v in np.percentile(values, (0.5, 99.5)))
    if hi <= lo:
        raise UndecodableImage("image has no contrast (constant pixel values)")
    values -= lo  # in place and in float32 throughout: a 3000 x 2500 image is 30 MB per copy
    values *= np.float32(1.0) / (hi - lo)
    return np.clip(values, 0.0, 1.0, out=values)


def _pixel_data(ds: Dataset) -> np.ndarray:
    """The stored pixel values, through :data:`FASTEST_PLUGIN` when it is installed."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    plugin = FASTEST_PLUGIN.get(syntax)
    if plugin is not None and plugin in get_decoder(syntax).available_plugins:
        ds.pixel_array_options(decoding_plugin=plugin)  # else pydicom's own choice among those installed
    return ds.pixel_array


def _modality_values(raw: np.ndarray, ds: Dataset) -> np.ndarray:
    """The Modality LUT applied, as a new float32 array: the linear rescale is done here in
    float32 (pydicom's goes through float64, several times slower on a radiograph); a Modality
    LUT Sequence goes through pydicom."""
    if "ModalityLUTSequence" in ds:
        return np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)
    values = raw.astype(np.float32)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and float(slope) != 1.0:
        values *= np.float32(slope)
    if intercept is not None and float(intercept) != 0.0:
        values += np.float32(intercept)
    return values
