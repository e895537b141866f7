from pydicom import Dataset
from pydicom.uid import ComputedRadiographyImageStorage, SecondaryCaptureImageStorage

from worker.process.eligibility import age_in_years, check

USE = {"modalities": ["CR", "DX"], "body_parts": ["CHEST"], "views": ["PA", "AP"], "min_age_years": 18}


def _image(**attrs: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = "1.2.3.4"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.PatientAge, ds.PhotometricInterpretation = "061Y", "MONOCHROME1"
    ds.Rows = ds.Columns = 2048
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def test_frontal_adult_chest_cr_is_eligible() -> None:
    assert check(_image(), USE) is None


def test_reasons() -> None:
    assert check(_image(BodyPartExamined="KNEE"), USE) == "body part KNEE not in intended use ['CHEST']"
    assert check(_image(BodyPartExamined="THORAX"), USE) is None  # a synonym of CHEST
    assert check(_image(BodyPartExamined="KNEE"), {**USE, "body_parts": ["KNEE"]}) is None
    assert check(_image(ViewPosition="LL"), USE) == "view LL not in intended use ['AP', 'PA']"
    assert check(_image(PatientAge="010Y"), USE) == "patient age below the intended minimum of 18 years"
    assert check(_image(Modality="CT"), USE).startswith("modality CT not in intended use")
    assert check(_image(PhotometricInterpretation="RGB"), USE) == "photometric interpretation RGB unsupported"


def test_cr_stored_as_secondary_capture_is_still_a_chest_xray() -> None:
    sc = _image(SOPClassUID=SecondaryCaptureImageStorage, Modality="OT", BodyPartExamined="CHEST")
    assert check(sc, USE) is None
    assert check(_image(SOPClassUID=SecondaryCaptureImageStorage, Modality="OT", BodyPartExamined=""), USE)


def test_pleura_results_are_never_processed() -> None:
    assert check(_image(Manufacturer="Pleura", BurnedInAnnotation="YES"), USE) == "produced by Pleura"


def test_missing_attributes_do_not_exclude() -> None:
    ds = _image()
    del ds.BodyPartExamined, ds.ViewPosition, ds.PatientAge
    assert check(ds, USE) is None


def test_age_parsing() -> None:
    assert age_in_years("061Y") == 61 and age_in_years("006M") == 0.5 and age_in_years("") is None
    assert age_in_years("8Y") == 8 and age_in_years("62 y") == 62  # dirty but unambiguous
    assert age_in_years("62") is None  # no unit: unknown


def test_child_without_a_usable_age_is_refused_by_birth_date() -> None:
    """A dirty or missing Patient's Age fails closed when the dates tell the age."""
    for age in ("8", None):
        ds = _image(PatientBirthDate="20150301", StudyDate="20230415")
        if age is None:
            del ds.PatientAge
        else:
            ds.PatientAge = age
        assert check(ds, USE) == "patient age below the intended minimum of 18 years"
    adult = _image(PatientAge="62", PatientBirthDate="19610301", StudyDate="20230415")
    assert check(adult, USE) is None
    assert check(_image(PatientAge="8Y"), USE) == "patient age below the intended minimum of 18 years"
