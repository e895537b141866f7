"""Bounded inflation of Deflated Explicit VR Little Endian data sets (PS3.5 A.5).

pydicom inflates a deflated body whole, in memory: a few megabytes that inflate to gigabytes (a
deflate bomb) would take the listener's memory. :func:`inflated_size` inflates the body piece by
piece, keeping nothing, and stops as soon as it grows beyond a limit; memory stays about one
output chunk whatever the ratio.
"""

from __future__ import annotations

import zlib
from io import BytesIO

from pydicom.filereader import read_dataset, read_preamble
from pydicom.uid import DeflatedExplicitVRLittleEndian

#: Inflated bytes produced (and dropped) per step.
OUTPUT_CHUNK = 1 << 20
#: Deflated bytes fed per step (zlib copies what it has not consumed yet).
INPUT_CHUNK = 64 << 10


class InflateError(ValueError):
    """A deflated body that is corrupt, truncated or too large; the message quotes no peer values."""


def inflated_size(part10: bytes, limit: int) -> int | None:
    """The inflated size of a Part-10 data set's deflated body; None if its transfer syntax is another.

    Raises :class:`InflateError` once the body inflates beyond ``limit`` bytes, or if it is corrupt
    or truncated.
    """
    syntax, offset = _body_offset(part10)
    if syntax != DeflatedExplicitVRLittleEndian:
        return None
    return _inflate(memoryview(part10)[offset:], limit)


def _body_offset(part10: bytes) -> tuple[str, int]:
    """The file meta group's Transfer Syntax UID and the offset of the data set after the group."""
    fp = BytesIO(part10)
    read_preamble(fp, False)
    meta = read_dataset(fp, is_implicit_VR=False, is_little_endian=True,
                        stop_when=lambda tag, vr, length: tag.group != 2)
    return str(meta.get("TransferSyntaxUID", "")), fp.tell()


def _inflate(body: memoryview, limit: int) -> int:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        for start in range(0, len(body), INPUT_CHUNK):
            pending: bytes | memoryview = body[start:start + INPUT_CHUNK]
            while not inflater.eof:
                out = len(inflater.decompress(pending, OUTPUT_CHUNK))
                total += out
                if total > limit:
                    raise InflateError(f"deflated data set inflates beyond the limit of {limit / 2**20:g} MiB")
                pending = inflater.unconsumed_tail
                if not pending and out < OUTPUT_CHUNK:  # this input is spent and its output drained
                    break
            if inflater.eof:  # what follows the stream (PS3.5 A.5 allows one pad byte) is ignored
                break
    except zlib.error:
        raise InflateError("deflated data set is corrupt") from None
    if not inflater.eof:
        raise InflateError("deflated data set is truncated")
    return total
