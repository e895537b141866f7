"""The listener's two changes to pynetdicom's transport: bulk PDU reads and shared-UID context copies."""

from __future__ import annotations

import copy
import socket
import threading
import time

from pynetdicom import AllStoragePresentationContexts

from dicom_node.scp import _BulkReadSocket, _Contexts


def _reader(sock: socket.socket) -> _BulkReadSocket:
    reader = _BulkReadSocket.__new__(_BulkReadSocket)  # recv needs nothing but the socket
    reader.socket = sock
    return reader


def test_bulk_read_waits_for_every_byte_across_segments() -> None:
    ours, peer = socket.socketpair()
    payload = bytes(range(256)) * 4096  # 1 MiB, sent in three pieces with pauses between them

    def send() -> None:
        for piece in (payload[:1000], payload[1000:500_000], payload[500_000:]):
            peer.sendall(piece)
            time.sleep(0.05)

    sender = threading.Thread(target=send)
    sender.start()
    data = _reader(ours).recv(len(payload))
    sender.join()
    assert isinstance(data, bytearray) and data == payload
    ours.close(), peer.close()


def test_bulk_read_returns_what_came_before_the_peer_closed() -> None:
    ours, peer = socket.socketpair()
    peer.sendall(b"x" * 1000)
    peer.close()
    assert _reader(ours).recv(5000) == b"x" * 1000
    ours.close()


def test_context_copies_are_independent_but_share_their_uids() -> None:
    contexts = _Contexts(copy.deepcopy([cx for cx in AllStoragePresentationContexts]))
    copied = copy.deepcopy(contexts)
    assert len(copied) == len(contexts)
    for original, twin in zip(contexts, copied, strict=True):
        assert twin is not original and twin._transfer_syntax is not original._transfer_syntax
        assert twin._abstract_syntax is original._abstract_syntax  # the same immutable UID object
        assert all(a is b for a, b in zip(twin._transfer_syntax, original._transfer_syntax, strict=True))
    before = list(contexts[0].transfer_syntax)
    copied[0].transfer_syntax = ["1.2.840.10008.1.2.4.90"]
    assert contexts[0].transfer_syntax == before != copied[0].transfer_syntax
