"""C-STORE SCU: send files or datasets to a peer over one association, optionally over DICOM TLS."""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
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
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    contexts: set[tuple[str, str]] = set()
    for _, ds in items:
        syntax = str(ds.file_meta.TransferSyntaxUID)
        contexts.add((str(ds.SOPClassUID), syntax))
    requested = _contexts(contexts)
    if len(requested) > _MAX_CONTEXTS:
        raise ValueError(f"{len(requested)} presentation contexts needed; send fewer SOP classes at once")
    assoc = ae.associate(host, port, contexts=requested, ae_title=called_ae,
                         tls_args=(tls, host) if tls is not None else None)
    if not assoc.is_established:
        via = " over TLS" if tls is not None else ""
        raise AssociationRejected(f"association with {called_ae}@{host}:{port}{via} failed")
    results: list[SendResult] = []
    try:
        for name, ds in items:
            try:
                status = assoc.send_c_store(ds)
                code = int(status.Status) if "Status" in status else None
                error = None if code is not None else "no response from peer"
            except Exception as exc:
                code, error = None, str(exc)
            results.append(SendResult(name, str(ds.SOPInstanceUID), code, error))
            if not assoc.is_established:
                error = "association lost"
                results.extend(SendResult(n, str(d.SOPInstanceUID), None, error) for n, d in items[len(results):])
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return results


def send_files(host: str, port: int, paths: Sequence[Path], **kwargs: object) -> list[SendResult]:
    """Read each file (pixels stay encoded) and send them over one association."""
    items = [(str(p), dcmread(p)) for p in paths]
    return send_datasets(host, port, items, **kwargs)  # type: ignore[arg-type]


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
