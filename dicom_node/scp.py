"""The Storage SCP: C-ECHO and C-STORE for every storage SOP class.

The C-STORE handler never decodes pixels. It reads the header, writes the encoded bytes to
the spool durably, tells the application through a :class:`Receiver`, and answers Success
only when both returned. The application passes the Receiver in; this module knows no
database and no queue.

Several processes may serve one port: :func:`bind` the socket once, then hand it to each
process's :class:`StorageSCP` (``listen_socket``); the kernel gives each new connection to one of
them.

Before any of that an :class:`AssociationPolicy` decides who may associate (called AE, calling-AE
allow-list bound to hosts, a limit on concurrent associations) and how long a peer may stay
silent; with an ``ssl.SSLContext`` the listener speaks DICOM TLS only. Every refusal goes to the
Receiver with a reason.

A Deflated Explicit VR Little Endian data set is inflated once, piece by piece and keeping nothing
(:mod:`dicom_node.deflate`), before its header is read: one that inflates beyond
``max_inflated_bytes`` (a deflate bomb) is refused, never inflated whole in memory.
"""

from __future__ import annotations

import copy
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import structlog
from pydicom import uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dicom_node.filing import (
    ACCEPTED_TRANSFER_SYNTAXES,
    DOES_NOT_MATCH_SOP_CLASS,
    RELEASED,
    SOP_CLASS_NOT_SUPPORTED,
    SUCCESS,
    NotUnderstood,
    Peer,
    Receiver,
    file_instance,
    read_header,
    record_instance,
    refusal,
)
from dicom_node.spool import Incoming, Spool

log = structlog.get_logger(__name__)

#: Largest P-DATA PDU we ask peers to send (PS3.8 D.1). pynetdicom handles each PDU in Python: with
#: its default 16 KiB, 32 x 12 MB over 4 associations took 3.0 s; with 1 MiB 2.0 s (bench.ingest).
MAXIMUM_PDU_SIZE = 1048576

#: With a port shared by several processes, each waits this long per connection it serves before
#: it takes a new connection, so that connections go to the least busy process (its effect alone was not measured).
SHARED_ACCEPT_DELAY = 0.003

#: A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service user, calling AE title not recognized
REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # permanent, service user, called AE title not recognized
REJECT_LIMIT = (0x02, 0x03, 0x02)  # transient, service provider (presentation), local limit exceeded

#: Largest inflated size of a Deflated Explicit VR Little Endian data set, by default (bytes).
DEFAULT_MAX_INFLATED_BYTES = 512 * 2**20

@dataclass(frozen=True)
class AssociationPolicy:
    """Who may associate, how many at once, and how long a peer may stay silent (seconds).

    ``allowed_calling_aes`` holds ``"AET"`` (from any host) or ``"AET@host"`` (from that address
    only; a host name is resolved when the listener starts); empty means any calling AE.
    ``acse_timeout`` also bounds the time from TCP accept to a complete A-ASSOCIATE-RQ, TLS
    handshake included.
    """

    allowed_calling_aes: tuple[str, ...] = ()
    max_associations: int = 10
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0

    def allowed(self) -> dict[str, set[str] | None]:
        """Calling AE -> addresses it may come from (None: any host)."""
        rules: dict[str, set[str] | None] = {}
        for entry in self.allowed_calling_aes:
            aet, _, host = entry.partition("@")
            aet = aet.strip()
            if not host.strip():
                rules[aet] = None
            elif rules.get(aet, set()) is not None:
                rules[aet] = (rules.get(aet) or set()) | _addresses(host.strip())
        return rules


def _addresses(host: str) -> set[str]:
    try:
        return {str(ipaddress.ip_address(host))}
    except ValueError:
        return {info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}


class StorageSCP:
    """A running listener; ``start()`` returns at once, ``stop()`` shuts it down."""

    def __init__(
        self,
        ae_title: str,
        host: str,
        port: int,
        spool: Spool,
        receiver: Receiver,
        policy: AssociationPolicy | None = None,
        tls: ssl.SSLContext | None = None,
        listen_socket: socket.socket | None = None,
        max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES,
    ) -> None:
        self.address = (host, port)
        self.listen_socket = listen_socket
        self.spool = spool
        self.receiver = receiver
        self.policy = policy or AssociationPolicy()
        self.tls = tls
        self.max_inflated_bytes = max_inflated_bytes
        self._allowed = self.policy.allowed()
        self._keys: dict[int, object] = {}
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self.ae = AE(ae_title=ae_title)
        self.ae.require_called_aet = True  # pynetdicom's own checks stay as a backstop behind _on_requested
        self.ae.maximum_associations = self.policy.max_associations
        self.ae.acse_timeout = self.policy.acse_timeout
        self.ae.dimse_timeout = self.policy.dimse_timeout
        self.ae.network_timeout = self.policy.network_timeout
        self.ae.maximum_pdu_size = MAXIMUM_PDU_SIZE
        self.ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            self.ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)

    def start(self) -> None:
        handlers = [
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_RELEASED, lambda event: self._on_closed(event, RELEASED)),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_connection_closed),
        ]
        server = self.ae.make_server(self.address, evt_handlers=handlers, server_class=_Server,
                                     listen_socket=self.listen_socket)
        server.scp = self
        self.ae._servers.append(server)  # as AE.start_server does, so that server.shutdown() can unregister it
        threading.Thread(target=server.serve_forever, name=f"listener:{self.address[1]}", daemon=True).start()
        self._server = server
        log.info("listening", ae_title=self.ae.ae_title, address=f"{self.address[0]}:{self.address[1]}",
                 tls=self.tls is not None)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _reject(self, peer: Peer, reason: str) -> None:
        log.warning("association rejected", calling_ae=peer.calling_ae, called_ae=peer.called_ae,
                    peer_host=peer.host, reason=reason)
        try:
            self.receiver.association_rejected(peer, reason)
        except Exception:
            log.exception("rejection could not be recorded")

    def _refusal(self, peer: Peer) -> tuple[tuple[int, int, int], str] | None:
        """Why this association request must be rejected, or None to let it through."""
        if peer.called_ae != self.ae.ae_title.strip():
            return REJECT_CALLED_AE, f"called AE title {peer.called_ae!r} is not {self.ae.ae_title!r}"
        if self._allowed:
            if peer.calling_ae not in self._allowed:
                return REJECT_CALLING_AE, f"calling AE title {peer.calling_ae!r} is not in the allow-list"
            hosts = self._allowed[peer.calling_ae]
            if hosts is not None and peer.host not in hosts:
                return REJECT_CALLING_AE, f"calling AE title {peer.calling_ae!r} is not allowed from {peer.host}"
        active = sum(1 for a in self.ae.active_associations if a.is_acceptor)  # this one included
        if active > self.policy.max_associations:
            return REJECT_LIMIT, f"association limit reached ({active - 1} of {self.policy.max_associations} open)"
        return None

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        if self._server is not None:
            self._server.disarm((assoc.requestor.address, assoc.requestor.port))
        request = assoc.requestor.primitive
        peer = Peer(
            calling_ae=str(request.calling_ae_title).strip(),
            called_ae=str(request.called_ae_title).strip(),
            host=assoc.requestor.address,
            port=assoc.requestor.port,
        )
        refusal = self._refusal(peer)
        if refusal is not None:
            (result, source, diagnostic), reason = refusal
            assoc.acse.send_reject(result, source, diagnostic)
            self._reject(peer, reason)
            assoc.kill()  # as pynetdicom does after its own rejections: waits until the A-ASSOCIATE-RJ is out

    def _on_aborted(self, event: evt.Event) -> None:
        idle = event.assoc.dul.idle_timer_expired()
        self._on_closed(event, "aborted: network timeout" if idle else "aborted")

    def _on_connection_closed(self, event: evt.Event) -> None:
        if isinstance(event.assoc.dimse, _StreamingDIMSE):
            event.assoc.dimse.discard_all()
        if self._server is not None:
            self._server.disarm(tuple(event.address)[:2])

    def _on_accepted(self, event: evt.Event) -> None:
        assoc = event.assoc
        peer = Peer(
            calling_ae=assoc.requestor.ae_title,
            called_ae=assoc.acceptor.ae_title,
            host=assoc.requestor.address,
            port=assoc.requestor.port,
        )
        try:
            key = self.receiver.association_opened(peer)
        except Exception:
            log.exception("association could not be recorded; aborting it")
            assoc.abort()
            return
        with self._lock:
            self._keys[id(assoc)] = key

    def _on_closed(self, event: evt.Event, reason: str) -> None:
        with self._lock:
            key = self._keys.pop(id(event.assoc), None)
        if key is not None:
            try:
                self.receiver.association_closed(key, reason)
            except Exception:
                log.exception("association end could not be recorded")

    def _refused(self, assoc: Association, sop_uid: str, status: int, reason: str) -> None:
        """Log and record a C-STORE answered with a failure status."""
        with self._lock:
            key = self._keys.get(id(assoc))
        log.warning("C-STORE refused", status=f"0x{status:04X}", reason=reason)
        try:
            self.receiver.instance_refused(key, sop_uid, status, reason)
        except Exception:
            log.exception("refusal could not be recorded")

    def _on_store(self, event: evt.Event) -> int:
        with self._lock:
            key = self._keys.get(id(event.assoc))
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        status, reason = self._store(event, key, sop_uid)
        if status != SUCCESS:
            self._refused(event.assoc, sop_uid, status, reason)
        return status

    def _store(self, event: evt.Event, key: object, sop_uid: str) -> tuple[int, str]:
        """File and record one instance (its bytes already in the spool's temporary file, see
        :class:`_StreamingDIMSE`); return the DIMSE status and, on failure, why."""
        received = event.assoc.dimse.take(event.request.MessageID)
        syntax = str(event.context.transfer_syntax)
        try:
            incoming = received.complete()
            header = read_header(incoming, syntax, self.max_inflated_bytes)
            stored = file_instance(self.spool, incoming, header, key, syntax, str(event.request.AffectedSOPClassUID),
                                   sop_uid)
        except Exception as exc:
            refused = refusal(exc)
            return refused.status, refused.reason
        finally:
            received.discard()
        return record_instance(self.receiver, stored)


class _Server(ThreadedAssociationServer):
    """pynetdicom's server, but the TLS handshake runs in the connection's own thread (never in the
    accept loop) and a watchdog closes any connection that has not sent a complete A-ASSOCIATE-RQ
    within the ACSE timeout of being accepted (a silent or trickling peer)."""

    scp: StorageSCP

    def __init__(self, *args: object, listen_socket: socket.socket | None = None, **kwargs: object) -> None:
        self._shared = listen_socket
        super().__init__(*args, request_handler=_RequestHandler, **kwargs)  # type: ignore[arg-type]
        self.contexts = _Contexts(self.contexts)
        self._watchdogs: dict[tuple, tuple[threading.Timer, socket.socket]] = {}
        self._watch_lock = threading.Lock()
        self._connections = 0  # accepted and not yet closed

    def server_bind(self) -> None:
        if self._shared is None:
            super().server_bind()
            return
        self.socket.close()  # the one TCPServer made: serve the bound, listening one handed in instead
        self.socket = self._shared
        self.server_address = self._shared.getsockname()

    def server_activate(self) -> None:
        if self._shared is None:
            super().server_activate()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        if self._shared is not None:  # every process wakes for a new connection: the least busy tries first
            time.sleep(SHARED_ACCEPT_DELAY * self._connections)
        accepted = self.socket.accept()  # type: ignore[union-attr]
        with self._watch_lock:
            self._connections += 1
        return accepted

    def process_request_thread(self, request: socket.socket, client_address: tuple) -> None:  # type: ignore[override]
        try:
            self._serve(request, client_address)
        finally:
            with self._watch_lock:
                self._connections -= 1

    def _serve(self, request: socket.socket, client_address: tuple) -> None:
        key = tuple(client_address)[:2]
        self._arm(request, key)
        tls = self.scp.tls
        if tls is not None:
            try:
                request = tls.wrap_socket(request, server_side=True)
            except (OSError, ValueError) as exc:
                expired = not self.disarm(key)
                request.close()
                reason = (f"not completed within the ACSE timeout ({self.scp.policy.acse_timeout:g} s)" if expired
                          else getattr(exc, "reason", None) or type(exc).__name__)
                self.scp._reject(Peer("", "", *key), f"TLS handshake failed: {reason}"[:300])
                return
        super().process_request_thread(request, client_address)

    def _arm(self, request: socket.socket, key: tuple) -> None:
        guard = request.dup()  # survives the TLS wrap, which detaches ``request``
        timer = threading.Timer(self.scp.policy.acse_timeout, self._expire, (key,))
        timer.daemon = True
        with self._watch_lock:
            self._watchdogs[key] = (timer, guard)
        timer.start()

    def _expire(self, key: tuple) -> None:
        with self._watch_lock:
            entry = self._watchdogs.pop(key, None)
        if entry is not None:
            log.warning("no association request within the ACSE timeout; closing", peer_host=key[0],
                        timeout=self.scp.policy.acse_timeout)
            _close(entry[1], shutdown=True)

    def disarm(self, key: tuple) -> bool:
        """The peer's request arrived (or the connection ended): stop the watchdog; False if it had fired."""
        with self._watch_lock:
            entry = self._watchdogs.pop(key, None)
        if entry is None:
            return False
        entry[0].cancel()
        _close(entry[1], shutdown=False)
        return True


class _Contexts(list):
    """The listener's presentation contexts, whose deep copy shares their UIDs (immutable strings).

    pynetdicom deep-copies the acceptor's contexts for every association; copying each of the ~2,000
    UIDs re-validates it with a regular expression (a client's association with one C-ECHO took 40 ms
    with that copy, 20 ms without).
    """

    def __deepcopy__(self, memo: dict[int, object]) -> list:
        for context in self:
            for value in vars(context).values():
                for item in value if isinstance(value, list) else (value,):
                    if isinstance(item, str):
                        memo[id(item)] = item
        return [copy.deepcopy(context, memo) for context in self]


class _BulkReadSocket(AssociationSocket):
    """pynetdicom's socket, but a PDU is read with as few system calls as the kernel allows.

    pynetdicom reads in 4 KiB pieces, each a system call that releases and retakes the GIL: 32 x
    12 MB over 4 associations cost 3.0-3.3 s of listener CPU; read into one buffer, 1.9-2.2 s (bench.ingest's files).
    """

    def recv(self, nr_bytes: int) -> bytearray:
        """``nr_bytes`` bytes, or fewer if the peer closed the connection first (as pynetdicom's)."""
        data = bytearray(nr_bytes)
        read = 0
        with memoryview(data) as view:
            while read < nr_bytes:
                count = self.socket.recv_into(view[read:], nr_bytes - read)  # type: ignore[union-attr]
                if not count:
                    break
                read += count
        del data[read:]
        return data


class _RequestHandler(RequestHandler):
    """Gives each association a :class:`_BulkReadSocket` and makes it a :class:`_SOPClassCheckedAssociation`."""

    def _create_association(self):  # type: ignore[no-untyped-def]
        assoc = super()._create_association()
        assoc.dul.socket.__class__ = _BulkReadSocket  # same state, faster recv
        assoc.__class__ = _SOPClassCheckedAssociation
        assoc.scp = self.server.scp
        assoc.dimse.__class__ = _StreamingDIMSE
        assoc.dimse.spool, assoc.dimse.received, assoc.dimse.receiving = self.server.scp.spool, {}, None
        return assoc


class _Received:
    """A C-STORE data set received into the spool's temporary file, or what went wrong on the way
    (the spool full, a failed write, a command set whose file meta cannot be made); once something
    went wrong the rest is dropped as it arrives, and :meth:`complete` raises it."""

    def __init__(self, spool: Spool | None, meta: Callable[[], bytes]) -> None:
        self.incoming: Incoming | None = None
        self.error: Exception | None = None
        if spool is None:  # a C-STORE that sent no data set
            self.error = NotUnderstood("the C-STORE request has no data set")
            return
        try:
            self.incoming = spool.incoming()
            self.incoming.write(meta())
        except Exception as exc:
            self._fail(exc)

    def write(self, data: memoryview) -> None:
        if self.incoming is not None:
            try:
                self.incoming.write(data)
            except Exception as exc:
                self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        self.error = exc
        self.discard()

    def complete(self) -> Incoming:
        """The whole data set, its file closed for writing; the error met on the way, if any."""
        if self.error is not None or self.incoming is None:
            raise self.error or NotUnderstood("no data set")
        self.incoming.close(fsync=False)
        return self.incoming

    def discard(self) -> None:
        if self.incoming is not None:
            self.incoming.discard()
            self.incoming = None


class _StreamingDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, but the data set of a C-STORE request goes into the spool's
    temporary file fragment by fragment as the P-DATA PDUs arrive, hashed on the way: never whole
    in memory, and written while the peer is still sending. pynetdicom assembles everything else
    (command sets, other services) as before, and completes the C-STORE request as usual on its
    last fragment; :meth:`take` then gives ``_store`` the data set by the request's Message ID.

    Before it (pynetdicom's data set in memory, joined to its file meta and then written whole),
    24 x 12 MB took 1.87 s over 1 association and 1.41 s over 4; after, 1.16 s and 0.93 s
    (bench.ingest, medians of 3, run back to back: docs/performance.md, issue 26).
    """

    spool: Spool
    received: dict[int, _Received]
    receiving: _Received | None

    def receive_primitive(self, primitive: P_DATA) -> None:
        for context_id, pdv in primitive.presentation_data_value_list:
            message = self.message
            if not isinstance(message, C_STORE_RQ) or pdv[0] & 0x01:  # not a C-STORE's data set fragment
                super().receive_primitive(_p_data(context_id, pdv))
                continue
            if self.receiving is None:
                self.receiving = _Received(self.spool, partial(_file_meta, self.assoc, message, context_id))
            self.receiving.write(memoryview(pdv)[1:])
            if pdv[0] & 0x02:  # the last fragment: pynetdicom completes the request, with no data set of its own
                self.received[message.command_set.MessageID] = self.receiving
                self.receiving = None
                super().receive_primitive(_p_data(context_id, bytes(pdv[:1])))

    def take(self, message_id: int) -> _Received:
        """The data set received for the C-STORE request ``message_id`` (the caller discards it)."""
        return self.received.pop(message_id, None) or _Received(None, bytes)

    def discard_all(self) -> None:
        """Drop every data set not taken (an association that ended mid-transfer)."""
        for received in [self.receiving, *self.received.values()]:
            if received is not None:
                received.discard()
        self.received.clear()
        self.receiving = None


def _p_data(context_id: int, pdv: bytes | memoryview) -> P_DATA:
    primitive = P_DATA()
    primitive.presentation_data_value_list = [[context_id, pdv]]
    return primitive


def _file_meta(assoc: Association, message: C_STORE_RQ, context_id: int) -> bytes:
    """Preamble, prefix and File Meta Information of a received C-STORE data set, as pynetdicom writes them."""
    command = message.command_set
    meta = create_file_meta(sop_class_uid=command.AffectedSOPClassUID,
                            sop_instance_uid=command.AffectedSOPInstanceUID,
                            transfer_syntax=assoc._accepted_cx[context_id].transfer_syntax[0])
    return b"\x00" * 128 + b"DICM" + encode_file_meta(meta)


#: The SOP classes the listener takes, each on its own presentation context.
_STORAGE_CLASSES = frozenset(str(c.abstract_syntax) for c in AllStoragePresentationContexts)


class _SOPClassCheckedAssociation(Association):
    """pynetdicom's association, but a C-STORE whose SOP class is not its presentation context's, or
    is no storage class, is answered with a failure status and recorded, and the association goes on.

    pynetdicom picks the service class by the request's SOP class: for a class it has no service
    for it aborts the association (``Association._serve_request``: "No supported service class
    available"), losing every instance the peer has queued behind it; a storage class on another
    class's context would reach ``_on_store`` as if it had been negotiated.
    """

    scp: StorageSCP

    def _serve_request(self, msg, context_id: int) -> None:  # type: ignore[no-untyped-def]
        context = self._accepted_cx.get(context_id)
        refusal = None
        if isinstance(msg, C_STORE) and context is not None and msg.is_valid_request:
            refusal = _sop_class_refusal(str(msg.AffectedSOPClassUID), str(context.abstract_syntax))
        if refusal is None:
            super()._serve_request(msg, context_id)
            return
        status, reason = refusal
        self.dimse.take(msg.MessageID).discard()
        self.scp._refused(self, str(msg.AffectedSOPInstanceUID), status, reason)
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = msg.MessageID
        rsp.AffectedSOPClassUID = msg.AffectedSOPClassUID
        rsp.AffectedSOPInstanceUID = msg.AffectedSOPInstanceUID
        rsp.Status = status
        self.dimse.send_msg(rsp, context_id)


def _sop_class_refusal(requested: str, negotiated: str) -> tuple[int, str] | None:
    """The status and reason for a C-STORE of SOP class ``requested`` on a context for ``negotiated``;
    None when it is a storage class on its own context."""
    if requested not in _STORAGE_CLASSES:
        shown = requested if uid.UID(requested).is_valid else "an invalid UID"
        return SOP_CLASS_NOT_SUPPORTED, f"SOP class not supported: {shown} is not a storage SOP class taken here"
    if requested != negotiated:
        return DOES_NOT_MATCH_SOP_CLASS, (f"data set does not match SOP class: {requested} sent on the "
                                          f"presentation context for {negotiated}")
    return None


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket for several listener processes; non-blocking, so that a process that
    loses the race for a connection goes back to waiting instead of blocking in ``accept``."""
    sock = socket.create_server((host, port), backlog=128)
    sock.setblocking(False)
    return sock


def _close(sock: socket.socket, shutdown: bool) -> None:
    if shutdown:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    sock.close()

