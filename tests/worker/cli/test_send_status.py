"""How a peer's C-STORE status decides between delivered, retry and failed for good."""

import pytest

from dicom_node.scu import SendResult


@pytest.mark.parametrize(
    ("status", "ok", "permanent"),
    [
        (0x0000, True, False),
        (0xB000, True, False),  # coercion of data elements: stored
        (0x0107, True, False),  # attribute list error (warning): stored
        (0xA700, False, False),  # out of resources: try again later
        (0xA900, False, True),  # dataset does not match SOP class
        (0xC000, False, True),  # cannot understand
        (0x0110, False, False),  # processing failure: may be transient
        (None, False, False),  # never answered
    ],
)
def test_status_classes(status: int | None, ok: bool, permanent: bool) -> None:
    result = SendResult("x.dcm", "1.2.3", status)
    assert (result.ok, result.permanent) == (ok, permanent)
