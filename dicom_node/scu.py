"""C-STORE SCU: send files or datasets to a peer over one association, optionally over DICOM TLS."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.presentation import build_context

#: Success and the general warning statuses of PS3.7 C.4.2 (attribute list / value out of range).
_WARNINGS = {0x0000, 0x0107, 0x0116}
#: pynetdicom's limit on presentation contexts in one association request.
_MAX_CONTEXTS = 128


@dataclass(frozen=True)
class SendResult:
    """Outcome for one object: ``status`` is the peer's DIMSE status, None if never sent."""

    name: str
    sop_instance_uid: str
    status: int | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Success, or a warning (0xBxxx, 0x0107, 0x0116): the peer stored the object."""
        return self.status is not None and (self.status in _WARNINGS or self.status & 0xF000 == 0xB000)

    @property
    def permanent(self) -> bool:
        """A refusal that a retry cannot change (0xA9xx: not this SOP class, 0xCxxx: cannot understand)."""
        return self.status is not None and (self.status & 0xFF00 == 0xA900 or self.status & 0xF000 == 0xC000)


class AssociationRejected(ConnectionError):
    """The peer could not be reached or refused the association."""


def collect_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand folders recursively; keep files in a stable order."""
    files: list[Path] = []
    for item in map(Path, paths):
        if item.is_dir():
            files.extend(sorted(p for p in item.rglob("*") if p.is_file()))
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"{item} does not exist")
    return files


def send_datasets(
    host: str,
    port: int,
    items: Sequence[tuple[str, Dataset]],
    *,
    called_ae: str,
    calling_ae: str = "PLEURA",
    timeout: float = 30.0,
    tls: ssl.SSLContext | None = None,
) -> list[SendResult]:
    """C-STORE each (name, dataset) in one association; raise if none could be opened.

    With ``tls`` (see :func:`dicom_node.tls.client_context`) the association runs over TLS and
    the peer's certificate must match ``host``.
    """
    pairs = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for _, ds in items}
    loaders = ((name, lambda ds=ds: ds) for name, ds in items)
    return list(_send(host, port, pairs, loaders, called_ae=called_ae, calling_ae=calling_ae, timeout=timeout,
                      tls=tls))


def send_files(host: str, port: int, paths: Sequence[Path], **kwargs: object) -> list[SendResult]:
    """:func:`iter_send_files`, as a list."""
    return list(iter_send_files(host, port, paths, **kwargs))


def iter_send_files(
    host: str,
    port: int,
    paths: Sequence[Path],
    *,
    called_ae: str,
    calling_ae: str = "PLEURA",
    timeout: float = 30.0,
    tls: ssl.SSLContext | None = None,
) -> Iterator[SendResult]:
    """C-STORE files over one association, one result per file as it is sent.

    The presentation contexts come from each file's header (read up to the pixels, then
    dropped); each file is then read whole just before its C-STORE and dropped after it, so
    memory holds one data set at a time. A file that cannot be read (not DICOM, no File Meta
    header, gone) is a result with status None and the reason, and the others still go.
    """
    pairs = {pair for pair in map(_header_pair, paths) if pair is not None}
    loaders = ((str(p), partial(dcmread, p)) for p in paths)
    return _send(host, port, pairs, loaders, called_ae=called_ae, calling_ae=calling_ae, timeout=timeout, tls=tls)


def _send(
    host: str,
    port: int,
    pairs: set[tuple[str, str]],
    loaders: Iterable[tuple[str, Callable[[], Dataset]]],
    *,
    called_ae: str,
    calling_ae: str,
    timeout: float,
    tls: ssl.SSLContext | None,
) -> Iterator[SendResult]:
    """Associate (at the first data set that loads) and C-STORE each; ValueError if the contexts do not fit."""
    requested = _contexts(pairs)
    if len(requested) > _MAX_CONTEXTS:
        raise ValueError(f"{len(requested)} presentation contexts needed; send fewer SOP classes at once")
    return _stream(host, port, requested, loaders, called_ae, calling_ae, timeout, tls)


def _stream(host: str, port: int, requested: list, loaders: Iterable[tuple[str, Callable[[], Dataset]]],
            called_ae: str, calling_ae: str, timeout: float, tls: ssl.SSLContext | None) -> Iterator[SendResult]:
    assoc = None
    try:
        for name, load in loaders:
            if assoc is not None and not assoc.is_established:
                yield SendResult(name, "", None, "association lost")
                continue
            try:
                ds = load()
            except Exception as exc:
                yield SendResult(name, "", None, f"unreadable: {_why(exc)}")
                continue
            if assoc is None:
                assoc = _associate(host, port, requested, called_ae, calling_ae, timeout, tls)
            try:
                status = assoc.send_c_store(ds)
                code = int(status.Status) if "Status" in status else None
                error = None if code is not None else "no response from peer"
            except Exception as exc:
                code, error = None, str(exc)
            uid = str(ds.get("SOPInstanceUID", ""))
            del ds  # before the next file is read
            yield SendResult(name, uid, code, error)
    finally:
        if assoc is not None and assoc.is_established:
            assoc.release()


def _associate(host: str, port: int, requested: list, called_ae: str, calling_ae: str, timeout: float,
               tls: ssl.SSLContext | None) -> Association:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    assoc = ae.associate(host, port, contexts=requested, ae_title=called_ae,
                         tls_args=(tls, host) if tls is not None else None)
    if not assoc.is_established:
        via = " over TLS" if tls is not None else ""
        raise AssociationRejected(f"association with {called_ae}@{host}:{port}{via} failed")
    return assoc


def _header_pair(path: Path) -> tuple[str, str] | None:
    """(SOP Class UID, transfer syntax) from the header only; None if the file cannot be read."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        return str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)
    except Exception:  # reported when its turn comes
        return None


def _why(exc: Exception) -> str:
    """Why a file could not be read, in a user's words."""
    if isinstance(exc, InvalidDicomError):
        return "not a DICOM file with a File Meta header"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


def _contexts(pairs: set[tuple[str, str]]) -> list:
    """One context per (SOP class, syntax); uncompressed syntaxes offered as a fallback."""
    by_class: dict[str, set[str]] = {}
    for sop_class, syntax in pairs:
        by_class.setdefault(sop_class, set()).update({syntax, ExplicitVRLittleEndian})
    contexts = []
    for sop_class, syntaxes in sorted(by_class.items()):
        for syntax in sorted(syntaxes):
            contexts.append(build_context(sop_class, [syntax]))
        if ImplicitVRLittleEndian not in syntaxes:
            contexts.append(build_context(sop_class, [ImplicitVRLittleEndian]))
    return contexts
