"""MLLP framing (worker.mllp): what the RIS notifications send and the final reports take in share."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tests.ris import RawPeer
from worker import mllp

_OPEN: list[socket.socket] = []  # the far ends that stay open while the tests run


def _pair(*chunks: bytes, close: bool = True) -> socket.socket:
    """Our end of a socket pair whose other end sends ``chunks`` (then closes, or stays open)."""
    ours, theirs = socket.socketpair()
    _OPEN.append(theirs)

    def send() -> None:
        for chunk in chunks:
            theirs.sendall(chunk)
            time.sleep(0.01)
        if close:
            theirs.close()

    threading.Thread(target=send, daemon=True).start()
    return ours


def test_frames_are_read_whole_one_at_a_time_across_chunks() -> None:
    sock = _pair(mllp.frame(b"MSH|first")[:4], mllp.frame(b"MSH|first")[4:] + mllp.frame(b"MSH|second"))
    buffer = bytearray(mllp.recv(sock, 5) or b"")
    deadline = time.monotonic() + 5
    assert mllp.read_frame(sock, buffer, deadline, 1024) == b"MSH|first"
    assert buffer.startswith(mllp.START)
    assert mllp.read_frame(sock, buffer, deadline, 1024) == b"MSH|second"
    assert buffer == bytearray()


def test_a_frame_over_the_limit_gives_its_head() -> None:
    sock = _pair(mllp.START + b"MSH|" + b"x" * 200, close=False)
    buffer = bytearray(mllp.recv(sock, 5) or b"")
    with pytest.raises(mllp.TooLarge) as over:
        mllp.read_frame(sock, buffer, time.monotonic() + 5, 100)
    assert over.value.head.startswith(b"MSH|")


def test_an_unfinished_frame_says_whether_the_peer_closed_or_time_ran_out() -> None:
    closed = _pair(mllp.START + b"MSH|half")
    buffer = bytearray(mllp.recv(closed, 5) or b"")
    with pytest.raises(mllp.Incomplete) as ended:
        mllp.read_frame(closed, buffer, time.monotonic() + 5, 1024)
    assert ended.value.closed
    silent = _pair(mllp.START + b"MSH|half", close=False)
    buffer = bytearray(mllp.recv(silent, 5) or b"")
    with pytest.raises(mllp.Incomplete) as late:
        mllp.read_frame(silent, buffer, time.monotonic() + 0.2, 1024)
    assert not late.value.closed


@pytest.mark.parametrize(("reply", "hold", "message"), [
    (b"HTTP/1.1 400 Bad Request\r\n\r\n", 0.0, "not an MLLP frame"),
    (b"\x0bMSH|^~\\&|RIS|||||ACK|1|P|2.5.1\rMSA|AA|", 0.0, "closed the connection mid-frame"),
    (b"\x0bMSH|^~\\&|RIS|||||ACK|1|P|2.5.1\rMSA|AA|", 30.0, "no complete acknowledgment within 1 s"),
    (b"", 0.0, "closed the connection without an acknowledgment"),
])
def test_the_client_ends_cleanly_on_a_bad_answer(reply: bytes, hold: float, message: str) -> None:
    peer = RawPeer(reply, hold)
    try:
        start = time.monotonic()
        with pytest.raises(mllp.MllpError, match=message):
            mllp.exchange("127.0.0.1", peer.port, b"MSH|^~\\&|PLEURA\r", timeout=1.0)
        # the silent peer holds its half answer for 30 s: the sender gave up long before (its timeout is 1 s)
        assert time.monotonic() - start < 15.0, "a bad peer must not hold the sender past its timeout"
    finally:
        peer.stop()
