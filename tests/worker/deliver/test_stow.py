"""STOW-RS answers (worker.deliver.stow): the Store Instances Response read per instance, and what each
answer means for the delivery; the multipart body streamed from the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker.deliver.stow import StoreResponse, _lists, _parts, _server_text, judge, parse_response

UID, OTHER = "1.2.826.0.1.3680043.10.1.1", "1.2.826.0.1.3680043.10.1.2"


def _item(uid: str | None, **extra: int) -> dict:
    item = {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.7"]}}
    if uid is not None:
        item["00081155"] = {"vr": "UI", "Value": [uid]}
    for tag, value in extra.items():
        item[{"failure": "00081197", "warning": "00081196"}[tag]] = {"vr": "US", "Value": [value]}
    return item


def _answer(referenced: list[dict] = (), failed: list[dict] = ()) -> bytes:
    """A Store Instances Response as Orthanc writes it (empty sequences carry no Value)."""
    doc = {"00080005": {"vr": "CS", "Value": ["ISO_IR 100"]},
           "00081198": {"vr": "SQ", **({"Value": list(failed)} if failed else {})},
           "00081199": {"vr": "SQ", **({"Value": list(referenced)} if referenced else {})}}
    return json.dumps(doc, indent="\t").encode()


def test_the_instance_referenced_is_stored() -> None:
    said = parse_response(_answer([_item(OTHER), _item(UID)]), UID)
    assert said == StoreResponse(True)
    answer = judge(200, "OK", said, b"")
    assert (answer.ok, answer.status, answer.error) == (True, 200, None)


def test_a_warning_is_kept_and_the_instance_still_stored() -> None:
    said = parse_response(_answer([_item(UID, warning=0xB000)]), UID)
    assert said == StoreResponse(True, warning=0xB000) and judge(202, "Accepted", said, b"").ok


@pytest.mark.parametrize(("status", "reason", "permanent", "words"), [
    (409, 0xC000, True, "FailureReason 0xC000 (cannot understand)"),
    (409, 0xA900, True, "FailureReason 0xA900 (data set does not match SOP class)"),
    (200, 0x0110, True, "FailureReason 0x0110 (processing failure)"),
    (202, 0xC122, True, "FailureReason 0xC122 (transfer syntax not supported)"),
    (409, 0xA700, False, "FailureReason 0xA700 (out of resources)"),  # as C-STORE: retried
    (409, 0xA7FF, False, "FailureReason 0xA7FF (out of resources)"),
])
def test_a_failed_sop_item_ends_it_with_its_reason(status: int, reason: int, permanent: bool, words: str) -> None:
    said = parse_response(_answer(failed=[_item(UID, failure=reason)]), UID)
    assert said == StoreResponse(False, failure=reason)
    answer = judge(status, "", said, b"")
    assert not answer.ok and answer.permanent is permanent and answer.error == f"HTTP {status}: {words}"


def test_a_failed_item_without_a_uid_is_this_instance_and_another_instances_is_not() -> None:
    assert parse_response(_answer(failed=[_item(None, failure=0xC000)]), UID).failure == 0xC000
    assert parse_response(_answer(failed=[_item(OTHER, failure=0xC000)]), UID) == StoreResponse(False)
    assert parse_response(_answer([_item(OTHER)]), UID) == StoreResponse(False)


def test_a_success_that_does_not_reference_the_instance_is_retried() -> None:
    # Orthanc 1.10 with the DICOMweb plugin 1.7 answers this when its storage is full
    answer = judge(200, "OK", parse_response(_answer(), UID), _answer())
    assert (answer.ok, answer.permanent) == (False, False)
    assert answer.error == "HTTP 200 but the answer does not reference the instance"


@pytest.mark.parametrize(("status", "permanent"), [
    (400, True), (401, True), (403, True), (404, True), (413, True), (415, True),
    (408, False), (429, False), (500, False), (502, False), (503, False), (302, False)])
def test_status_without_a_failed_item(status: int, permanent: bool) -> None:
    answer = judge(status, "Reason", parse_response(b"", UID), b"")
    assert not answer.ok and answer.permanent is permanent and answer.error == f"HTTP {status} Reason"


def test_bodies_that_are_not_a_response_say_nothing() -> None:
    for body in (b"", b"<html>502 Bad Gateway</html>", b"[]", b'{"00081199": {"vr": "SQ", "Value": "x"}}'):
        assert parse_response(body, UID) == StoreResponse(False)


def test_the_servers_words_go_with_the_answer() -> None:
    orthanc = json.dumps({"HttpError": "Not Found", "HttpStatus": 404, "Message": "Unknown resource",
                          "OrthancStatus": 17, "Uri": "/wrong/studies"}).encode()
    assert _server_text(orthanc) == "Unknown resource"
    assert judge(404, "Not Found", StoreResponse(False), orthanc).text == "Unknown resource"
    assert _server_text(b"<h1>Bad\n  Gateway</h1>") == "<h1>Bad Gateway</h1>"
    assert _server_text(b"") is None


def test_qido_lists_the_instance() -> None:
    listed = json.dumps([{"00080018": {"vr": "UI", "Value": [OTHER]}}, {"00080018": {"vr": "UI", "Value": [UID]}}])
    assert _lists(listed.encode(), UID)
    assert not _lists(b"[]", UID) and not _lists(b"", UID) and not _lists(b"{}", UID)


def test_the_body_is_streamed_from_the_file_in_pieces(tmp_path: Path) -> None:
    path = tmp_path / "object.dcm"
    path.write_bytes(bytes(range(256)) * 1024)  # 256 KiB
    pieces = list(_parts(b"HEAD", path, b"TAIL"))
    assert pieces[0] == b"HEAD" and pieces[-1] == b"TAIL" and len(pieces) == 2 + 4
    assert max(len(p) for p in pieces) == 1 << 16
    assert b"".join(pieces) == b"HEAD" + path.read_bytes() + b"TAIL"
