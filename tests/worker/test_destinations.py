"""PLEURA_DESTINATIONS entries (worker.destinations): DICOM peers and DICOMweb base URLs, round-tripping."""

from __future__ import annotations

import pytest

from worker.destinations import Destination, DicomWebDestination, parse_destination
from worker.settings import Settings


@pytest.mark.parametrize("text", ["PACS@10.0.0.5:104", "PACS@pacs.example:2762+tls", "http://127.0.0.1:8042/dicom-web",
                                  "https://pacs.example/dicom-web", "https://pacs.example:8443/orthanc/dicom-web"])
def test_each_kind_round_trips(text: str) -> None:
    destination = parse_destination(text)
    assert str(destination) == text and parse_destination(str(destination)) == destination


def test_a_dicomweb_url_is_told_apart_and_normalised() -> None:
    assert parse_destination(" https://pacs.example/dicom-web/ ") == DicomWebDestination("https://pacs.example/dicom-web")
    assert parse_destination("https://pacs.example/dicom-web").tls
    assert not parse_destination("http://pacs.example/dicom-web").tls
    assert parse_destination("PACS@host:104") == Destination("PACS", "host", 104)


@pytest.mark.parametrize(("text", "message"), [
    ("ftp://pacs.example/dicom-web", "not an http:// or https:// base URL"),
    ("https://pacs.example/dicom-web?x=1", "not an http:// or https:// base URL"),
    ("http://pacs.example:99999/dicom-web", "not an http:// or https:// base URL"),
    ("https:///dicom-web", "not an http:// or https:// base URL"),
    ("PACS-without-port", "AET@host:port"),
])
def test_bad_entries_say_what_is_expected(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_destination(text)


def test_credentials_in_the_url_are_refused_without_repeating_them() -> None:
    with pytest.raises(ValueError, match="PLEURA_DESTINATION_TOKEN_FILE") as refused:
        parse_destination("https://admin:s3cret@pacs.example/dicom-web")
    assert "s3cret" not in str(refused.value)


def test_settings_mix_both_kinds_and_keep_their_strings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLEURA_DESTINATIONS", "PACS@10.0.0.5:104, https://pacs.example/dicom-web")
    monkeypatch.setenv("PLEURA_DESTINATION_TOKEN_FILE", "/run/secrets/pacs_token")
    s = Settings()
    assert s.destinations == [Destination("PACS", "10.0.0.5", 104), DicomWebDestination("https://pacs.example/dicom-web")]
    assert [str(d) for d in s.destinations] == ["PACS@10.0.0.5:104", "https://pacs.example/dicom-web"]
    assert str(s.destination_token_file) == "/run/secrets/pacs_token"
