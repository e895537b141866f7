"""Malformed DICOM: byte-level tools for the fuzz harness and the committed corpus.

``python tests/security/make_corpus.py`` rewrites ``tests/security/corpus/`` (one ``.dcm``
per entry of :data:`CORPUS`, a ``manifest.json`` with what the listener and the gate must
answer, and a README line per file). Everything is synthetic and deterministic: no real
patient data, no clock, no random UIDs, so the test can check that the committed files are
exactly what this script writes.
"""

from __future__ import annotations

import json
import struct
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
)

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from dicom_node.results.uids import derive_uid  # noqa: E402

CORPUS_DIR = Path(__file__).with_name("corpus")
MAX_FILE_BYTES = 64 * 1024
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
UNDEFINED = 0xFFFFFFFF
HUGE = 0xFFFFFFF0


# --- building blocks --------------------------------------------------------------------------


def base_dataset(name: str, rows: int = 64, columns: int = 64) -> Dataset:
    """A small, valid, synthetic 12-bit MONOCHROME2 CR chest image; UIDs derived from ``name``."""
    ds = Dataset()
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = derive_uid("malformed-sop", name)
    ds.StudyInstanceUID = derive_uid("malformed-study", name)
    ds.SeriesInstanceUID = derive_uid("malformed-series", name)
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientName = "CORPUS^SYNTHETIC"
    ds.PatientID = "CORPUS-0001"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ramp = np.add.outer(np.arange(rows), np.arange(columns)) * (4095 // max(rows + columns - 2, 1))
    noise = np.random.default_rng(7).integers(0, 64, size=(rows, columns))
    ds.PixelData = np.clip(ramp + noise, 0, 4095).astype("<u2").tobytes()
    return ds


def encode_body(ds: Dataset, little_endian: bool = True, implicit_vr: bool = False) -> bytes:
    """The data set without preamble or meta, as it travels in P-DATA."""
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = little_endian, implicit_vr
    write_dataset(buf, ds)
    return buf.getvalue()


def part10(sop_class: str, sop_uid: str, syntax: str, body: bytes) -> bytes:
    """Preamble, file meta naming ``syntax``, then ``body`` unchanged (however broken)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + buf.getvalue() + body


@dataclass(frozen=True)
class Element:
    """One top-level element of an explicit VR little endian body."""

    offset: int
    tag: int
    vr: bytes
    length_at: int
    length_size: int
    length: int
    value_at: int

    @property
    def end(self) -> int:
        return self.value_at + self.length


def elements(body: bytes) -> list[Element]:
    """Top-level elements up to the first undefined length (explicit VR little endian)."""
    found, pos = [], 0
    while pos + 8 <= len(body):
        group, elem = struct.unpack_from("<HH", body, pos)
        vr = body[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            length_at, size = pos + 8, 4
        else:
            length_at, size = pos + 6, 2
        if length_at + size > len(body):
            break
        length = struct.unpack_from("<I" if size == 4 else "<H", body, length_at)[0]
        found.append(Element(pos, (group << 16) | elem, vr, length_at, size, length, length_at + size))
        if length == UNDEFINED:
            break
        pos = length_at + size + length
    return found


def find(body: bytes, tag: int) -> Element:
    return next(e for e in elements(body) if e.tag == tag)


def set_length(body: bytes, element: Element, length: int) -> bytes:
    fmt = "<I" if element.length_size == 4 else "<H"
    length &= 0xFFFFFFFF if element.length_size == 4 else 0xFFFF
    return body[:element.length_at] + struct.pack(fmt, length) + body[element.length_at + element.length_size:]


def set_value(body: bytes, element: Element, value: bytes) -> bytes:
    """Replace an element's value (its length field follows, clipped to what the field holds)."""
    header = body[element.offset:element.length_at]
    fmt, limit = ("<I", 0xFFFFFFFF) if element.length_size == 4 else ("<H", 0xFFFF)
    value = value[:limit]
    return body[:element.offset] + header + struct.pack(fmt, len(value)) + value + body[element.end:]


def insert_before(body: bytes, tag: int, raw: bytes) -> bytes:
    """Insert raw element bytes before the first top-level element whose tag is above ``tag``."""
    at = next((e.offset for e in elements(body) if e.tag > tag), len(body))
    return body[:at] + raw + body[at:]


def nested_sequence(depth: int, defined: bool, tag: int = 0x00081140) -> bytes:
    """A sequence nested ``depth`` levels deep (each item holds the next sequence)."""
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + b"SQ\0\0"
    if not defined:
        opening = (head + struct.pack("<I", UNDEFINED) + struct.pack("<HHI", 0xFFFE, 0xE000, UNDEFINED)) * depth
        closing = (struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)) * depth
        return opening + closing
    inner = b""
    for _ in range(depth):
        item = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner
        inner = head + struct.pack("<I", len(item)) + item
    return inner


def private_ob(length_field: int, value: bytes) -> bytes:
    """A private OB element (0009,1001) whose declared length need not match its value."""
    return struct.pack("<HH", 0x0009, 0x0010) + b"LO" + struct.pack("<H", 6) + b"FUZZ  " + \
        struct.pack("<HH", 0x0009, 0x1001) + b"OB\0\0" + struct.pack("<I", length_field) + value


# --- the corpus ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    name: str
    what: str
    build: Callable[[str], bytes]
    status: int  # what the listener answers
    gate: str | None  # start of the gate's reason: spooled copy, or the file if refused (None: eligible)


def _file(name: str, body: bytes, syntax: str = ExplicitVRLittleEndian) -> bytes:
    ds = base_dataset(name)
    return part10(ds.SOPClassUID, ds.SOPInstanceUID, syntax, body)


def _body(name: str, **changes: object) -> bytes:
    ds = base_dataset(name)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return encode_body(ds)


def _edit(name: str, tag: int, edit: Callable[[bytes, Element], bytes]) -> bytes:
    body = _body(name)
    return _file(name, edit(body, find(body, tag)))


def _valid(name: str) -> bytes:
    return _file(name, _body(name))


def _truncated_header(name: str) -> bytes:
    body = _body(name)
    sop = find(body, 0x00080018)
    return _file(name, body[:sop.value_at + 3])


def _truncated_pixels(name: str) -> bytes:
    body = _body(name)
    return _file(name, body[:find(body, 0x7FE00010).value_at + 1000])


def _uid_garbage(value: bytes) -> Callable[[str], bytes]:
    return lambda name: _edit(name, 0x0020000D, lambda b, e: set_value(b, e, value))


def _bad_vr(name: str) -> bytes:
    body = _body(name)
    e = find(body, 0x00080060)
    return _file(name, body[:e.offset + 4] + b"\x00\xff" + body[e.offset + 6:])


def _deep(defined: bool) -> Callable[[str], bytes]:
    return lambda name: _file(name, insert_before(_body(name), 0x00081140, nested_sequence(1500, defined)))


def _wrong_syntax(syntax: str) -> Callable[[str], bytes]:
    return lambda name: _file(name, _body(name), syntax)


def _deflated_garbage(name: str) -> bytes:
    return _file(name, zlib.compress(_body(name))[:200] + b"\xff" * 64, DeflatedExplicitVRLittleEndian)


CORPUS: list[Entry] = [
    Entry("valid_control", "nothing: the well-formed base every other entry breaks (must be accepted and eligible)",
          _valid, 0x0000, None),
    Entry("truncated_in_header", "cut 3 bytes into the SOP Instance UID value: the header ends mid-element",
          _truncated_header, 0xC000, "not an image"),
    Entry("truncated_pixel_data", "Pixel Data declares 8,192 bytes but the file ends after 1,000",
          _truncated_pixels, 0x0000, "pixel data could not be decoded"),
    Entry("bad_vr_modality", "Modality's VR bytes are 0x00 0xFF (no such VR)",
          _bad_vr, 0xC000, "not an image"),
    Entry("huge_length_private", "a private OB element declares 0xFFFFFFF0 bytes and holds 16",
          lambda n: _file(n, insert_before(_body(n), 0x00090000, private_ob(HUGE, b"\xab" * 16))),
          0xC000, "not an image"),
    Entry("huge_length_study_uid", "Study Instance UID's 2-byte length is 0xFFFF (past the end of the data set)",
          lambda n: _edit(n, 0x0020000D, lambda b, e: set_length(b, e, 0xFFFF)), 0xC000, "not an image"),
    Entry("odd_length_modality", "Modality's length is odd (3) and swallows a byte of the next element",
          lambda n: _edit(n, 0x00080060, lambda b, e: set_length(b, e, 3)), 0xC000, "not an image"),
    Entry("deep_sequence_undefined", "1,500 nested sequences of undefined length in Referenced Image Sequence",
          _deep(False), 0xC000, "unreadable: RecursionError"),
    Entry("deep_sequence_defined", "1,500 nested sequences of defined length in Referenced Image Sequence",
          _deep(True), 0x0000, "sequences nested deeper than"),
    Entry("pixels_too_short", "Rows x Columns 128 x 128 but pixel data for 64 x 64",
          lambda n: _file(n, _body(n, Rows=128, Columns=128)), 0x0000, "pixel data could not be decoded"),
    Entry("huge_matrix", "Rows x Columns 65535 x 65535 (8.6 GB decoded) with 8 KB of pixel data",
          lambda n: _file(n, _body(n, Rows=65535, Columns=65535)), 0x0000, "matrix 65535 x 65535 outside"),
    Entry("zero_rows", "Rows 0", lambda n: _file(n, _body(n, Rows=0)), 0x0000, "matrix 0 x 64 outside"),
    Entry("bits_allocated_3", "Bits Allocated 3 (no decoder supports it)",
          lambda n: _file(n, _body(n, BitsAllocated=3, BitsStored=3, HighBit=2)), 0x0000,
          "pixel data could not be decoded"),
    Entry("rescale_slope_text", "Rescale Slope is 'abc' (not a decimal string)",
          lambda n: _file(n, insert_before(_body(n), 0x00281051, b"\x28\x00\x52\x10DS\x02\x000 "
                                           b"\x28\x00\x53\x10DS\x04\x00abc ")), 0x0000, "invalid"),
    Entry("wrong_syntax_j2k", "native pixel data in a file that declares JPEG 2000 Lossless",
          _wrong_syntax(JPEG2000Lossless), 0x0000, "pixel data could not be decoded"),
    Entry("wrong_syntax_implicit",
          "explicit VR body in a file that declares Implicit VR Little Endian (read leniently: accepted)",
          _wrong_syntax(ImplicitVRLittleEndian), 0x0000, None),
    Entry("wrong_syntax_big_endian", "little endian body in a file that declares Explicit VR Big Endian",
          _wrong_syntax(ExplicitVRBigEndian), 0xC000, "not an image"),
    Entry("deflated_garbage", "declares Deflated Explicit VR Little Endian; the deflate stream is cut and padded",
          _deflated_garbage, 0xC000, "unreadable"),
    Entry("study_uid_traversal", "Study Instance UID is '1.2.3/../../x' (a path, not a UID)",
          _uid_garbage(b"1.2.3/../../x\0"), 0xC000, None),
    Entry("study_uid_nul", "Study Instance UID holds a NUL in the middle: '1.2\\x003.4'",
          _uid_garbage(b"1.2\x003.4"), 0xC000, None),
    Entry("study_uid_unicode_dots", "Study Instance UID uses fullwidth full stops (U+FF0E) and Arabic digits",
          _uid_garbage("1\uff0e2\uff0e\u0663".encode()), 0xC000, None),
    Entry("study_uid_overlong", "Study Instance UID of 200 characters",
          _uid_garbage(b"1." * 100), 0xC000, None),
    Entry("sop_uid_mismatch", "the data set's SOP Instance UID differs from the one the C-STORE request names",
          lambda n: _edit(n, 0x00080018, lambda b, e: set_value(b, e, b"1.2.3.4.5.6\0")), 0xC000, None),
    Entry("empty_data_set", "file meta only: no data set at all", lambda n: _file(n, b""), 0xC000, "not an image"),
]


def write(folder: Path = CORPUS_DIR) -> list[Path]:
    """Write every corpus entry, the manifest and the README into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    written, manifest = [], {}
    lines = ["# Malformed DICOM corpus", "",
             "Written by `python tests/security/make_corpus.py`; replayed by `tests/security/test_malformed.py`",
             "through a real C-STORE and the pipeline's gate. Synthetic data only.", "",
             "| file | what is wrong | C-STORE status | gate reason starts with |", "|---|---|---|---|"]
    for entry in CORPUS:
        data = entry.build(entry.name)
        if len(data) >= MAX_FILE_BYTES:
            raise ValueError(f"{entry.name}: {len(data)} bytes, over {MAX_FILE_BYTES}")
        path = folder / f"{entry.name}.dcm"
        path.write_bytes(data)
        written.append(path)
        manifest[path.name] = {"what": entry.what, "status": entry.status, "gate": entry.gate}
        lines.append(f"| `{path.name}` | {entry.what} | 0x{entry.status:04X} | {entry.gate or '(eligible)'} |")
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (folder / "README.md").write_text("\n".join(lines) + "\n")
    return written


if __name__ == "__main__":
    for p in write(Path(sys.argv[1]) if len(sys.argv) > 1 else CORPUS_DIR):
        print(p)
