"""The heatmap Secondary Capture: the source image, coloured localization maps, a legend.

Layout (RGB, 8 bit): a yellow banner across the top saying "AI result - not for primary
diagnosis"; below it the source image scaled down so that its longest side is at most 1024
pixels (smaller images keep their size: enlarging adds no information), with the maps of
the (at most three) most probable positive findings blended in, each in its own colour
with a rectangle around its hot area, or a ring where the map peaks when that area covers
most of the image (the same mark the SR carries); to the right a legend
panel with the model name and version and, per finding, the probability, the operating
threshold and POSITIVE/negative.

:func:`display_image` is that scaled-down image: a caller may keep it instead of the full
decoded image (the worker caches it), and :func:`render` of it gives the same pixels.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.results._shared import DISCLAIMER, ResultHeader, source_header
from dicom_node.results.content import Algorithm, FindingResult, ImageResult
from dicom_node.results.heatmap import finding_mark, upsample

IMAGE_SIDE = 1024
PANEL_WIDTH = 440
BANNER_HEIGHT = 44
MAX_OVERLAYS = 3
OVERLAY_COLOURS = ((255, 48, 48), (64, 224, 64), (0, 184, 255))
BANNER_COLOUR = (255, 214, 0)
PANEL_COLOUR = (16, 16, 16)
TEXT_COLOUR = (235, 235, 235)
MUTED_COLOUR = (150, 150, 150)
_MAX_ALPHA = 0.55
_ALPHA_FLOOR = 0.2
_ROW_HEIGHT = 48
_MIN_BODY_HEIGHT = 480  # room for the legend below very wide images
_PEAK_RING_RADIUS = 14

_Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def build_sc(
    result: ImageResult,
    algorithm: Algorithm,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
) -> hd.sc.SCImage:
    """One RGB Secondary Capture for one processed image, in the source's study."""
    header = ResultHeader(algorithm, "heatmaps", series_instance_uid=series_instance_uid,
                          sop_instance_uid=sop_instance_uid, series_number=series_number,
                          instance_number=instance_number)
    source = source_header(result.source)
    pixels = render(result, algorithm)
    orientation = source.get("PatientOrientation")
    known_orientation = orientation is not None and len(orientation) == 2
    with warnings.catch_warnings():
        # highdicom echoes person names it finds odd; names never go to logs.
        warnings.filterwarnings("ignore", message="The string .* person name", category=UserWarning)
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=pixels,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            patient_orientation=tuple(orientation) if known_orientation else ("L", "F"),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            **header.kwargs(),
        )
    sc.copy_patient_and_study_information(source)
    if not known_orientation:
        sc.PatientOrientation = None
    for keyword in ("BodyPartExamined", "Laterality"):  # lets validators see a chest
        if source.get(keyword):
            setattr(sc, keyword, source[keyword].value)
    if "BodyPartExamined" not in sc and "Laterality" not in sc:
        sc.Laterality = None  # 2C: whether the (unknown) body part is paired is unknown
    _describe_derivation(sc, source, algorithm)
    return sc


def render(result: ImageResult, algorithm: Algorithm) -> np.ndarray:
    """The SC's pixels: uint8 RGB, banner + image rows (at least 480) x image columns + panel."""
    overlays = _overlay_findings(result.findings)
    image = _draw_image(result.pixels, overlays)
    body_height = max(image.height, _MIN_BODY_HEIGHT)
    canvas = Image.new("RGB", (image.width + PANEL_WIDTH, body_height + BANNER_HEIGHT),
                       PANEL_COLOUR)
    canvas.paste(image, (0, BANNER_HEIGHT))
    draw = ImageDraw.Draw(canvas)
    _draw_banner(draw, canvas.width)
    _draw_legend(draw, (image.width, canvas.height), result.findings, overlays, algorithm)
    return np.asarray(canvas, dtype=np.uint8)


def _overlay_findings(findings: Sequence[FindingResult]) -> list[FindingResult]:
    """The most probable positive findings that have a map, at most ``MAX_OVERLAYS``."""
    mapped = [f for f in findings if f.positive and f.heatmap is not None]
    return sorted(mapped, key=lambda f: f.probability, reverse=True)[:MAX_OVERLAYS]


def display_size(rows: int, columns: int) -> tuple[int, int]:
    """(width, height) of the SC's image area for a ``rows`` x ``columns`` image: longest side at
    most ``IMAGE_SIDE``, never enlarged. An image already that size keeps it."""
    scale = min(1.0, IMAGE_SIDE / max(rows, columns))
    return max(1, round(columns * scale)), max(1, round(rows * scale))


def display_image(pixels: np.ndarray) -> np.ndarray:
    """``pixels`` (2-D) resized (LANCZOS) to :func:`display_size`, as float32.

    An image already at its display size comes back unchanged, so the SC drawn from a
    display image equals the SC drawn from the full image it came from, byte for byte.
    """
    rows, columns = pixels.shape
    size = display_size(rows, columns)
    if size == (columns, rows):
        return np.asarray(pixels, dtype=np.float32)
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32))
    return np.asarray(image.resize(size, Image.Resampling.LANCZOS), dtype=np.float32)


def _stretch(gray: np.ndarray) -> np.ndarray:
    """``gray`` stretched between its 0.5 and 99.5 percentiles to [0, 255], float32."""
    low, high = (np.float32(v) for v in np.percentile(gray, (0.5, 99.5)))
    out = np.subtract(gray, low, dtype=np.float32)
    out *= np.float32(255.0) / max(high - low, np.float32(1e-6))
    return np.clip(out, 0.0, 255.0, out=out)


def _draw_image(pixels: np.ndarray, overlays: Sequence[FindingResult]) -> Image.Image:
    """The grey image (float32 throughout) with each overlay's map blended in its colour."""
    gray = _stretch(display_image(pixels))
    size = (gray.shape[1], gray.shape[0])
    channels = [gray, gray.copy(), gray.copy()]
    for finding, colour in zip(overlays, OVERLAY_COLOURS, strict=False):
        heat = upsample(finding.heatmap, size[1], size[0])
        peak = float(heat.max())
        if peak <= 0:
            continue
        alpha = heat  # upsample's own array, reused in place
        alpha *= np.float32(1 / (peak * (1 - _ALPHA_FLOOR)))
        alpha -= np.float32(_ALPHA_FLOOR / (1 - _ALPHA_FLOOR))
        np.clip(alpha, 0, 1, out=alpha)
        alpha *= np.float32(_MAX_ALPHA)
        for channel, value in zip(channels, colour, strict=True):  # c + (value - c) * alpha
            channel += (np.float32(value) - channel) * alpha
    rgb = np.stack(channels, axis=2)
    image = Image.fromarray(np.clip(np.rint(rgb, out=rgb), 0, 255, out=rgb).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for finding, colour in zip(overlays, OVERLAY_COLOURS, strict=False):
        mark = finding_mark(finding.heatmap, rows=size[1], columns=size[0])
        if mark is None:
            continue
        if len(mark) > 1:
            draw.line([tuple(point) for point in mark.tolist()], fill=colour, width=3)
        else:  # the map does not localize: a ring where it peaks, as in the SR
            (x, y), r = mark[0].tolist(), _PEAK_RING_RADIUS
            draw.ellipse((x - r, y - r, x + r, y + r), outline=colour, width=3)
    return image


def _font(size: int) -> _Font:
    return ImageFont.load_default(size=size)


def _draw_banner(draw: ImageDraw.ImageDraw, width: int) -> None:
    draw.rectangle((0, 0, width, BANNER_HEIGHT - 1), fill=BANNER_COLOUR)
    draw.text((12, BANNER_HEIGHT // 2), DISCLAIMER, fill=(0, 0, 0), font=_font(28), anchor="lm")


def _draw_legend(
    draw: ImageDraw.ImageDraw,
    corner: tuple[int, int],
    findings: Sequence[FindingResult],
    overlays: Sequence[FindingResult],
    algorithm: Algorithm,
) -> None:
    """Model, then one entry per finding (positives first); ``corner`` = (left, bottom)."""
    left, bottom = corner
    x, y = left + 16, BANNER_HEIGHT + 14
    width = PANEL_WIDTH - 32
    title, body, small = _font(24), _font(21), _font(17)
    draw.text((x, y), _fit(draw, algorithm.name, title, width), fill=TEXT_COLOUR, font=title)
    draw.text((x, y + 30), _fit(draw, f"version {algorithm.version}", body, width),
              fill=TEXT_COLOUR, font=body)
    draw.text((x, y + 58), "AI output, unverified. Colour = localization map.",
              fill=MUTED_COLOUR, font=small)
    y += 96
    colours = {id(f): c for f, c in zip(overlays, OVERLAY_COLOURS, strict=False)}
    ordered = sorted(findings, key=lambda f: (not f.positive, -f.probability))
    room = (bottom - 8 - y) // _ROW_HEIGHT
    if len(ordered) > room:
        room -= 1  # keep a line for the "+N more" note
    for finding in ordered[:room]:
        colour = colours.get(id(finding))
        if colour is not None:
            draw.rectangle((x, y + 4, x + 16, y + 20), fill=colour)
        state = "POSITIVE" if finding.positive else "negative"
        fill = TEXT_COLOUR if finding.positive else MUTED_COLOUR
        draw.text((x + 26, y), _fit(draw, finding.name, body, width - 26), fill=fill, font=body)
        draw.text((x + 26, y + 24),
                  f"p={finding.probability:.2f}  threshold={finding.threshold:.2f}  {state}",
                  fill=fill, font=small)
        y += _ROW_HEIGHT
    if len(ordered) > room:
        draw.text((x, y + 4), f"+{len(ordered) - room} more findings in the SR",
                  fill=MUTED_COLOUR, font=small)


def _fit(draw: ImageDraw.ImageDraw, text: str, font: _Font, width: int) -> str:
    """``text``, shortened with "..." until it is at most ``width`` pixels wide."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _describe_derivation(sc: Dataset, source: Dataset, algorithm: Algorithm) -> None:
    """Source Image Sequence, Burned In Annotation, lossy history, derivation wording."""
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    sc.DerivationDescription = (
        f"{DISCLAIMER}. Source image with localization maps and findings of AI model "
        f"{algorithm.name} {algorithm.version} burned in."
    )
    sc.ImageComments = DISCLAIMER
    if source.get("LossyImageCompression") == "01":
        sc.LossyImageCompression = "01"
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in source:
                setattr(sc, keyword, source[keyword].value)
