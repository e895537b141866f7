"""Clean copies of the source attributes that Pleura's SR and SC carry (issue 14).

Pleura copies the Patient, Clinical Trial Subject, General Study, Patient Study and Clinical
Trial Study modules of a source image into its outputs (highdicom's
``copy_patient_and_study_information``), the source's equipment into the Contributing
Equipment Sequence, and a few image attributes (orientation, spacing, body part, laterality,
lossy compression). A value that is invalid for its VR would make Pleura's own object invalid,
so :func:`clean_header` reads each of those values from the *undecoded bytes* and

- keeps it when it is valid;
- corrects it where the correction is exact: Patient's Age ``62Y`` -> ``062Y`` (but ``62``,
  without a unit, is not corrected), a date ``2023-05-01`` or ``2023.05.01`` -> ``20230501``, a
  time ``12:30:00`` -> ``123000``, trailing empty name components (``^^^^^^`` -> empty), a
  lower-case code string upper-cased, a decimal of more than 16 characters re-formatted;
- truncates descriptive text (SH, LO, ST, LT: institution, station, descriptions,
  manufacturer) to its VR's maximum length, control characters becoming spaces. Identifiers
  (keywords ending in ID, IDs, Number, UID; code values) and person names are never truncated
  or altered: a shortened Patient ID or Accession Number could be another patient's;
- otherwise empties it (Type 2 in the output, e.g. Patient's Name, Study Date) or leaves it
  out (Type 3, e.g. Patient's Age); a sequence item with an invalid value is left out whole;
- raises :class:`InvalidSource` for an invalid Study, Series, SOP Instance or SOP Class UID:
  the output must reference those unchanged, so no valid output exists.

Text is decoded with the source's Specific Character Set; when the bytes do not match it (e.g.
Latin-1 bytes declared ISO_IR 192, or UTF-8 bytes without a character set) they are decoded as
UTF-8, else as Windows-1252 / Latin-1, and the header (hence the outputs) is declared
``ISO_IR 192``, in which pydicom then encodes every value. An unknown character set term with
only ASCII values is dropped (the default repertoire).

Nothing here logs or raises with a value: only keywords (patient data never goes to logs).
"""

from __future__ import annotations

import copy
import datetime
import math
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache

from highdicom._standard_utils import get_module_attribute_map
from pydicom import Dataset
from pydicom.charset import decode_bytes, python_encoding
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.valuerep import format_number_as_ds

#: The output character set when the source's bytes do not match its own (or declare none).
UTF8 = "ISO_IR 192"

#: Type 1 in every output and referenced verbatim by it: invalid means no output can be made.
REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")

#: Modules (highdicom keys, usage in image IODs) whose root attributes reach both outputs.
_MODULES = {
    "patient": "M",
    "clinical-trial-subject": "U",
    "general-study": "M",
    "patient-study": "U",
    "clinical-trial-study": "U",
}
#: Other source attributes that reach an output (Contributing Equipment, SC image, SR Image
#: Library): Type 3 there, or handled by the builders when absent.
_EXTRA = (
    "Manufacturer", "ManufacturerModelName", "SoftwareVersions", "DeviceSerialNumber",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName",
    "AcquisitionDate", "AcquisitionTime", "AcquisitionDateTime",
    "PatientOrientation", "PixelSpacing", "ImagerPixelSpacing", "BodyPartExamined",
    "Laterality", "LossyImageCompression", "LossyImageCompressionRatio",
    "LossyImageCompressionMethod", "FrameOfReferenceUID",
)
#: Enumerated values (PS3.3) of copied CS attributes; anything else is invalid.
ENUMERATED = {
    "PatientSex": {"M", "F", "O"},
    "Laterality": {"R", "L"},
    "LossyImageCompression": {"00", "01"},
    "PatientIdentityRemoved": {"YES", "NO"},
    "QualityControlSubject": {"YES", "NO"},
    "SmokingStatus": {"YES", "NO", "UNKNOWN"},
    "PatientSexNeutered": {"ALTERED", "UNALTERED"},
}
#: Per-value patterns of copied CS attributes. Patient Orientation: one biped letter per axis
#: (PS3.3 C.7.6.1.1.1 allows oblique pairs such as ``FL``, but highdicom's SCImage takes single
#: letters only and would refuse the source; an oblique value is left out instead).
PATTERNS = {"PatientOrientation": re.compile(r"[APRLHF]")}
#: Value multiplicity the builders rely on.
_VM = {"PatientOrientation": 2, "PixelSpacing": 2, "ImagerPixelSpacing": 2,
       **dict.fromkeys(REQUIRED_UIDS, 1)}
#: Coded-entry attributes that are identifiers although their keyword does not say so.
_CODES = {"CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion", "LongCodeValue",
          "URNCodeValue", "ContextIdentifier", "MappingResource"}

_TEXT_MAX = {"SH": 16, "LO": 64, "ST": 1024, "LT": 10240, "UC": None, "UT": None}
_TEXT_VRS = frozenset({*_TEXT_MAX, "PN"})
_STRING_VRS = frozenset({*_TEXT_VRS, "AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", "UR"})
_SINGLE_VALUED = frozenset({"ST", "LT", "UT", "UR"})  # backslash is text, not a delimiter
_PN_DELIMITERS = {0x5E, 0x3D}  # ^ =
_CS = re.compile(r"[A-Z0-9 _]{0,16}")
_AS = re.compile(r"(\d{1,3}) ?([DWMY])")
_DA_SEPARATED = re.compile(r"(\d{4})[-./](\d{2})[-./](\d{2})")
_TM = re.compile(r"([01]\d|2[0-3])(?:[0-5]\d(?:(?:[0-5]\d|60)(?:\.\d{1,6})?)?)?")
_TM_COLONS = re.compile(r"(\d{2}):(\d{2})(?::(\d{2})(\.\d{1,6})?)?")
_DT = re.compile(r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.\d{1,6})?)?)?)?)?)?"
                 r"(?:[+-](?:[01]\d|2[0-3])[0-5]\d)?")
_DS = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_IS = re.compile(r"[+-]?\d{1,11}")
_UI = re.compile(r"(?:0|[1-9]\d*)(?:\.(?:0|[1-9]\d*))*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")  # ST/LT/UT allow TAB LF FF CR

class InvalidSource(ValueError):
    """A source image whose values make every output invalid (an invalid Type 1 UID).

    The message names the attribute and the rule, never the value.
    """


@dataclass(frozen=True)
class Change:
    """One attribute that was not copied verbatim: its keyword and what was done.

    ``action`` is ``corrected``, ``truncated``, ``emptied``, ``dropped`` or ``re-encoded``
    (decoded with a fallback, so the outputs are declared ISO_IR 192).
    """

    keyword: str
    action: str


class _Invalid(Exception):
    """A value that no rule can correct."""


@dataclass(frozen=True)
class _Scope:
    """Where a copied attribute lives: its type in the output and its module's usage."""

    type: str
    module: str | None
    usage: str


@cache
def copied_attributes() -> dict[str, _Scope]:
    """Keyword -> type/module of every source attribute that reaches the SR or the SC."""
    scope: dict[str, _Scope] = {}
    module_map = get_module_attribute_map()
    for module, usage in _MODULES.items():
        for item in module_map[module]:
            if not item["path"]:
                scope.setdefault(str(item["keyword"]), _Scope(str(item["type"]), module, usage))
    for keyword in _EXTRA:
        scope.setdefault(keyword, _Scope("3", None, "U"))
    for keyword in REQUIRED_UIDS:
        scope[keyword] = _Scope("1", None, "M")
    return scope


def clean_header(source: Dataset, skip: Iterable[int] = ()) -> tuple[Dataset, list[Change]]:
    """A copy of ``source`` (less the tags in ``skip``) whose copied attributes are valid.

    Attributes that do not reach an output are copied as they are (undecoded).
    Raises :class:`InvalidSource` when a :data:`REQUIRED_UIDS` value is invalid or absent.
    """
    skipped = set(skip)
    charset = _Charset(source)
    scope = copied_attributes()
    header = Dataset()
    changes: list[Change] = []
    dropped_modules: set[str] = set()
    for tag in source.keys():
        if tag in skipped or tag == 0x00080005:
            continue
        element = source.get_item(tag)
        keyword = keyword_for_tag(tag)
        where = scope.get(keyword)
        if where is None or tag.is_private:
            header[tag] = copy.deepcopy(element)
            continue
        try:
            cleaned, action = _clean_element(source, tag, keyword, charset)
        except _Invalid:
            cleaned, action = _when_invalid(tag, keyword, where, dropped_modules)
        if cleaned is not None:
            header.add(cleaned)
        if action:
            changes.append(Change(keyword, action))
    for keyword in REQUIRED_UIDS:
        if not header.get(keyword):
            raise InvalidSource(f"source image has no {keyword}: Pleura's results cannot "
                                "reference it; the sender must supply it")
    for module in dropped_modules:  # an optional module with an invalid Type 1 value: left out
        for keyword, where in scope.items():
            if where.module == module and keyword in header:
                del header[keyword]
                changes.append(Change(keyword, "dropped"))
    output_charset = charset.output()
    if output_charset is not None:
        header.SpecificCharacterSet = output_charset
    if charset.fell_back:
        changes.append(Change("SpecificCharacterSet", "re-encoded"))
    return header, changes


def _when_invalid(
    tag: int, keyword: str, where: _Scope, dropped_modules: set[str]
) -> tuple[DataElement | None, str]:
    """Type 2 -> empty; 3, 1C, 2C -> dropped (a conditional attribute whose value is invalid is
    treated as absent); a required UID -> :class:`InvalidSource`; another Type 1 -> its optional
    (U) module is dropped whole (in a mandatory module: the value is)."""
    if keyword in REQUIRED_UIDS:
        raise InvalidSource(
            f"source image {keyword} is not a valid UID (PS3.5 9.1: digits and dots, no leading "
            "zero, at most 64 characters); Pleura's results must reference it unchanged, so none "
            "can be made: correct the UID at the modality or gateway and resend the study")
    if where.type == "2":
        return DataElement(tag, dictionary_VR(tag), None), "emptied"
    if where.type == "1" and where.module is not None and where.usage == "U":
        dropped_modules.add(where.module)
    return None, "dropped"


def _clean_element(parent: Dataset, tag: int, keyword: str, charset: _Charset
                   ) -> tuple[DataElement, str]:
    """The element ``tag`` of ``parent`` made valid, and what was done ('' = nothing)."""
    element = parent.get_item(tag)
    vr = _vr(tag, element)
    if vr == "SQ":
        return _clean_sequence(parent, tag, keyword, charset)
    if vr not in _STRING_VRS:
        try:
            return copy.deepcopy(parent[tag]), ""  # binary: pydicom's own conversion
        except Exception as exc:  # e.g. a US of three bytes
            raise _Invalid(keyword) from exc
    values: list[str] = []
    action = ""
    for value in _strings(element, vr, charset):
        cleaned, done = _clean_value(value, vr, keyword)
        values.append(cleaned)
        action = action or done
    if any(values):  # an empty value is valid for any VM, enumeration or pattern
        if keyword in _VM and len(values) != _VM[keyword]:
            raise _Invalid(keyword)
        if keyword in ENUMERATED and any(v and v not in ENUMERATED[keyword] for v in values):
            raise _Invalid(keyword)
        if keyword in PATTERNS and not all(PATTERNS[keyword].fullmatch(v) for v in values):
            raise _Invalid(keyword)
    return DataElement(tag, vr, values[0] if len(values) == 1 else values), action


def _clean_sequence(parent: Dataset, tag: int, keyword: str, charset: _Charset
                    ) -> tuple[DataElement, str]:
    """Items with an invalid value anywhere inside are left out; an emptied Type 3 sequence is
    then dropped by the caller (raises :class:`_Invalid`)."""
    try:
        items = parent[tag].value
    except Exception as exc:
        raise _Invalid(keyword) from exc
    kept: list[Dataset] = []
    action = ""
    for item in items:
        cleaned = Dataset()
        try:
            for item_tag in item.keys():
                if item_tag.is_private:
                    continue
                element, done = _clean_element(item, item_tag, keyword_for_tag(item_tag), charset)
                cleaned.add(element)
                action = action or done
        except _Invalid:
            action = "corrected"
            continue
        kept.append(cleaned)
    if items and not kept:
        raise _Invalid(keyword)
    return DataElement(tag, "SQ", DicomSequence(kept)), action


def _vr(tag: int, element: DataElement | RawDataElement) -> str:
    vr = element.VR
    if vr in (None, "UN") or " or " in str(vr):
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            return "UN"
    return str(vr)


def _strings(element: DataElement | RawDataElement, vr: str, charset: _Charset) -> list[str]:
    """The element's values as strings, decoded from its bytes when it has not been yet."""
    value = element.value
    if value is None:
        return [""]
    if isinstance(value, bytes):
        text = charset.decode(value, vr) if vr in _TEXT_VRS else value.decode("latin-1")
        text = text.rstrip("\x00 ")  # padding; trailing spaces are insignificant in every VR here
        if vr in _SINGLE_VALUED:
            return [text]
        return text.split("\\")
    if isinstance(value, MultiValue | list | tuple):
        return [str(v) for v in value]
    text = str(value)
    if vr in _TEXT_VRS and text:
        charset.note_decoded(text)
    return [text]


def _identifier(keyword: str) -> bool:
    """IDs, numbers and codes: never truncated (a prefix may identify something else)."""
    return keyword.endswith(("ID", "IDs", "Number", "UID", "UIDs")) or keyword in _CODES


def _clean_value(value: str, vr: str, keyword: str) -> tuple[str, str]:
    """One value made valid for ``vr``, and what was done; raises :class:`_Invalid`."""
    if vr in ("ST", "LT", "UT"):
        value = value.rstrip(" ")
    elif vr not in ("UC",):
        value = value.strip(" ")
    if value == "":
        return "", ""
    checker = _CHECKERS.get(vr)
    if checker is None:
        return value, ""
    cleaned = checker(value, keyword)
    return cleaned, "" if cleaned == value else _action(vr, value, cleaned)


def _action(vr: str, value: str, cleaned: str) -> str:
    if vr in _TEXT_MAX and len(cleaned) < len(value):
        return "truncated"
    return "corrected"


def _check_text(value: str, keyword: str, vr: str) -> str:
    control = _TEXT_CONTROL if vr in ("ST", "LT", "UT") else _CONTROL
    if control.search(value):
        if _identifier(keyword):
            raise _Invalid(keyword)
        value = control.sub(" ", value)
    limit = _TEXT_MAX[vr]
    if limit is not None and len(value) > limit:
        if _identifier(keyword):
            raise _Invalid(keyword)
        value = value[:limit].rstrip(" ")
    return value


def _check_pn(value: str, keyword: str) -> str:
    groups = [group.rstrip("^ ") for group in value.split("=")]
    while groups and groups[-1] == "":
        groups.pop()
    if len(groups) > 3 or _CONTROL.search(value):
        raise _Invalid(keyword)
    for group in groups:
        if group.count("^") > 4 or len(group) > 64:
            raise _Invalid(keyword)
    return "=".join(groups)


def _check_cs(value: str, keyword: str) -> str:
    value = value.upper()
    if not _CS.fullmatch(value):
        raise _Invalid(keyword)
    return value


def _check_as(value: str, keyword: str) -> str:
    match = _AS.fullmatch(value.upper())
    if match is None:
        raise _Invalid(keyword)
    return f"{int(match[1]):03d}{match[2]}"


def _check_da(value: str, keyword: str) -> str:
    match = _DA_SEPARATED.fullmatch(value)
    digits = "".join(match.groups()) if match else value
    if len(digits) != 8 or not digits.isdigit():
        raise _Invalid(keyword)
    try:
        datetime.date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        raise _Invalid(keyword) from None
    return digits


def _check_tm(value: str, keyword: str) -> str:
    match = _TM_COLONS.fullmatch(value)
    if match:
        value = "".join(part or "" for part in match.groups())
    if not _TM.fullmatch(value):
        raise _Invalid(keyword)
    return value


def _check_dt(value: str, keyword: str) -> str:
    match = _DT.fullmatch(value)
    if match is None:
        raise _Invalid(keyword)
    defaults = (1, 1, 1, 0, 0, 0)
    year, month, day, hour, minute, second = (
        int(part) if part is not None else default
        for part, default in zip(match.groups(), defaults, strict=True))
    try:
        datetime.datetime(year, month, day, hour, minute, min(second, 59))  # 60: leap second
    except ValueError:
        raise _Invalid(keyword) from None
    return value


def _check_ds(value: str, keyword: str) -> str:
    if not _DS.fullmatch(value):
        raise _Invalid(keyword)
    number = float(value)
    if not math.isfinite(number):
        raise _Invalid(keyword)
    return value if len(value) <= 16 else format_number_as_ds(number)


def _check_is(value: str, keyword: str) -> str:
    if not _IS.fullmatch(value) or not -(2**31) <= int(value) < 2**31:
        raise _Invalid(keyword)
    return value


def _check_ui(value: str, keyword: str) -> str:
    if len(value) > 64 or not _UI.fullmatch(value):
        raise _Invalid(keyword)
    return value


def _check_ae(value: str, keyword: str) -> str:
    if len(value) > 16 or _CONTROL.search(value):
        raise _Invalid(keyword)
    return value


_CHECKERS = {
    "AE": _check_ae,
    "AS": _check_as,
    "CS": _check_cs,
    "DA": _check_da,
    "DS": _check_ds,
    "DT": _check_dt,
    "IS": _check_is,
    "PN": _check_pn,
    "TM": _check_tm,
    "UI": _check_ui,
    **{vr: (lambda value, keyword, vr=vr: _check_text(value, keyword, vr)) for vr in _TEXT_MAX},
}


class _Charset:
    """Decodes a source's text and decides the outputs' Specific Character Set."""

    def __init__(self, source: Dataset) -> None:
        raw = source.get_item(0x00080005)
        value = raw.value if raw is not None else None
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        terms = value.split("\\") if isinstance(value, str) else list(value or [])
        self.declared: list[str] = [str(term).strip(" \x00") for term in terms]
        self.known = all(term in python_encoding for term in self.declared)
        self.encodings = [python_encoding[term] for term in self.declared] if self.known else []
        if self.encodings and self.declared[0] in ("", "ISO_IR 6", "ISO 2022 IR 6"):
            self.encodings[0] = "ascii"  # pydicom reads the default repertoire as Latin-1
        self.fell_back = False

    def decode(self, value: bytes, vr: str) -> str:
        """``value`` decoded strictly with the declared set, else UTF-8, else cp1252/Latin-1."""
        if value.isascii() and 0x1B not in value:
            return value.decode("ascii")
        text = self._declared(value, vr)
        if text is not None:
            return text
        self.fell_back = True
        for encoding in ("utf-8", "cp1252"):
            try:
                return value.decode(encoding)
            except UnicodeDecodeError:
                continue
        return value.decode("latin-1")

    def note_decoded(self, text: str) -> None:
        """A value already decoded by pydicom: replacement characters mean it failed."""
        if not text.isascii() and ("\ufffd" in text or not self._encodable(text)):
            self.fell_back = True

    def _encodable(self, text: str) -> bool:
        if not self.encodings or self.encodings[0] == "ascii":
            return False
        if len(self.encodings) > 1:
            return True  # ISO 2022: pydicom picks the code element per character
        try:
            text.encode(self.encodings[0])
        except (UnicodeEncodeError, LookupError):
            return False
        return True

    def _declared(self, value: bytes, vr: str) -> str | None:
        if not self.encodings:
            return None
        if len(self.encodings) == 1 and 0x1B not in value:
            try:
                return value.decode(self.encodings[0])
            except (UnicodeDecodeError, LookupError):
                return None
        with warnings.catch_warnings(record=True) as caught:  # ISO 2022 code extensions
            warnings.simplefilter("always")
            try:
                text = decode_bytes(value, self.encodings, _PN_DELIMITERS if vr == "PN" else set())
            except Exception:
                return None
        return None if caught or "\ufffd" in text else text

    def output(self) -> str | Sequence[str] | None:
        """ISO_IR 192 after a fallback; the source's set when it is known; else none."""
        if self.fell_back:
            return UTF8
        if self.declared and self.known:
            return self.declared[0] if len(self.declared) == 1 else self.declared
        return None
