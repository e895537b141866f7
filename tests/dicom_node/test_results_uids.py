"""Deterministic UIDs."""

from __future__ import annotations

import pytest

from dicom_node.results.uids import derive_uid


def test_same_parts_same_uid() -> None:
    assert derive_uid("sr", "1.2.3", "demo", "0.1.0", "1") == derive_uid(
        "sr", "1.2.3", "demo", "0.1.0", "1"
    )


@pytest.mark.parametrize(
    "other",
    [("sr", "1.2.3", "demo", "0.1.1", "1"), ("sc", "1.2.3", "demo", "0.1.0", "1"),
     ("sr", "1.2.3", "demo", "0.1.0", "2")],
)
def test_different_parts_different_uid(other: tuple[str, ...]) -> None:
    assert derive_uid("sr", "1.2.3", "demo", "0.1.0", "1") != derive_uid(*other)


def test_parts_are_not_simply_concatenated() -> None:
    assert derive_uid("a", "bc") != derive_uid("ab", "c")


def test_uid_is_valid_under_2_25() -> None:
    uid = derive_uid("anything")
    assert uid.is_valid
    assert uid.startswith("2.25.")
    assert len(uid) <= 64


def test_no_parts_is_an_error() -> None:
    with pytest.raises(ValueError):
        derive_uid()
