"""The default report labeler, ``pleura-rules/1``: NegEx/ConText-style rules in pure Python (``re``).

How a report becomes one label per finding:

1. **Sections.** Headings such as ``FINDINGS:`` split the text. HISTORY, INDICATION, CLINICAL
   HISTORY / INFORMATION / INDICATION / DETAILS, REASON FOR EXAM / STUDY, COMPARISON, TECHNIQUE,
   PROCEDURE and EXAM(INATION) are ignored (a "history of cardiomegaly" there says nothing about
   this image); FINDINGS, IMPRESSION, CONCLUSION, SUMMARY, OPINION and text before any heading are
   used. Text with no headings is used whole.
2. **Sentences.** Each section is cut at ``.`` (not a decimal point), ``;`` and line breaks, so
   "no right effusion; small left effusion" is two sentences.
3. **Mentions.** Each finding has synonyms and lexical variants (Effusion: "pleural effusion",
   "effusions", "pleural fluid", "hydropneumothorax"; Cardiomegaly: "cardiomegaly", "enlarged
   cardiac silhouette", "the heart is enlarged"; Atelectasis: "atelectasis", "atelectatic", "volume
   loss", "lobar collapse" ...). Near-misses are not mentions: "pericardial effusion" is no pleural
   Effusion, "mass effect" no Mass, "subcutaneous emphysema" no Emphysema, "soft tissue edema" no
   Edema, "vertebral body collapse" no Atelectasis, and "pneumomediastinum" never matches
   Pneumothorax. Some terms are *signs* ("blunting of the costophrenic angle" for Effusion,
   "nodular opacity" for Nodule): they count only when the sentence does not name the finding
   itself, so "blunting ..., which may represent a small effusion" is uncertain, not present. A
   few terms hedge by themselves ("mass-like" is an uncertain Mass), and some state absence
   ("heart size is normal", "the costophrenic angles are sharp").
4. **Triggers and scope.** Before a mention (forward scope, up to 12 words): negation ("no",
   "not", "without", "negative for", "free of", "clear of", "no evidence of", "absence of",
   "resolution of"), uncertainty ("possible", "probable", "likely", "may represent", "cannot
   exclude", "questionable", "suspicious for", "concerning for", "suggestive of", "borderline",
   "?" ...) and history ("history of": the mention is ignored). After a mention (backward scope,
   up to 8 words, not across a comma): negation ("is not seen", "has resolved", "is no longer
   seen", "is absent") and uncertainty ("cannot be excluded", "is not excluded", "is suspected",
   "is possible"). Either way: "resolved" and "cleared" (within 4 words) negate, "suspected"
   (within 8) hedges, and "versus", "vs", "or", "and/or" (within 5 words, the nearest mention on
   each side) make both alternatives uncertain. A scope ends at the sentence or at a termination
   term ("but", "however", "although", "which", "except", "otherwise", "there is" ...), and a
   forward scope also at a comma followed by a new size or change word
   ("no pneumothorax, small left effusion"). Pseudo-triggers ("no change", "no interval change",
   "without change", "no increase", "not resolved") negate nothing. When negation and
   uncertainty both reach a mention, negation wins ("no suspicious nodule", "no consolidation to
   suggest pneumonia" are absent).
5. **Combining mentions.** Within a section: present beats uncertain beats absent (so "no right
   effusion; small left effusion" is present). Across sections the IMPRESSION (or CONCLUSION,
   SUMMARY, OPINION) wins for every finding it mentions, as the radiologist's conclusion;
   findings it does not mention keep the label of the rest of the report.
6. **Abnormal** (the study is abnormal): present if any of the 14 ChestX-ray14 findings is
   present or an abnormality without its own finding is mentioned and not negated (opacity,
   haziness, pericardial effusion, pneumomediastinum, pneumoperitoneum, subcutaneous emphysema,
   fracture, lesion, scarring, lymphadenopathy, abnormality ...); otherwise uncertain if any of
   those is uncertain; otherwise absent if the report states normality ("normal chest", "lungs
   are clear", "no acute cardiopulmonary process / abnormality / findings", "unremarkable
   radiograph") or negates any finding; otherwise None. Devices, postoperative and degenerative
   changes are not abnormalities here.

Finding names are matched ignoring case, spaces and underscores (``Pleural_Thickening``), and a
head's finding ``NAME (head)`` gets the label of NAME; a name the rules do not know gets None.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from worker.reports.labeler import Label

Role = Literal["negation", "uncertain", "history", "pseudo", "terminate"]
Direction = Literal["pre", "post", "both"]
Kind = Literal["mention", "sign", "hedged", "normal"]
Span = tuple[int, int]

#: label precedence within a section: the higher wins
_RANK: dict[Label, int] = {"absent": 0, "uncertain": 1, "present": 2}
_GENERAL = "_general"  # abnormalities without a finding of their own, and statements of normality


# --- sections -------------------------------------------------------------------------------------------

_HEADING = re.compile(
    r"\b(?P<name>clinical (?:history|information|indications?|details)|history|indications?"
    r"|reason for (?:exam(?:ination)?|study|request)|comparisons?|technique|procedure|examination|exam"
    r"|findings|impressions?|conclusions?|summary|opinion)\s*:",
    re.IGNORECASE,
)
_IGNORED = re.compile(r"clinical|history|indication|reason|comparison|technique|procedure|exam", re.IGNORECASE)
_CONCLUDING = re.compile(r"impression|conclusion|summary|opinion", re.IGNORECASE)


def sections(text: str) -> list[tuple[str, str]]:
    """The used parts of ``text`` as (``findings`` or ``impression``, text), in order."""
    parts, kind, start = [], "findings", 0
    for heading in _HEADING.finditer(text):
        parts.append((kind, text[start:heading.start()]))
        name = heading["name"]
        kind = "ignored" if _IGNORED.match(name) else "impression" if _CONCLUDING.match(name) else "findings"
        start = heading.end()
    parts.append((kind, text[start:]))
    return [(k, t) for k, t in parts if k != "ignored" and t.strip()]


_SENTENCE_END = re.compile(r"(?<!\d)\.|\.(?!\d)|[;\n]")


def sentences(text: str) -> list[str]:
    """Lower-case sentences of ``text``; "vs." does not end one."""
    text = re.sub(r"\bvs\.", "vs", text.lower())
    return [s for s in _SENTENCE_END.split(text) if s.strip()]


# --- vocabulary -----------------------------------------------------------------------------------------

_ADVERB = r"(?:\s+(?:mildly|moderately|markedly|severely|slightly|significantly|minimally|again|still|now|stably))*"
_HEART = r"(?:heart|cardiac (?:silhouette|shadow|size|contours?)|heart size|cardiomediastinal (?:silhouette|contours?))"
_NORMAL = r"(?:normal|within normal limits|unremarkable|not enlarged|upper limits? of normal)"


@dataclass(frozen=True)
class _Term:
    pattern: re.Pattern[str]
    kind: Kind = "mention"


def _terms(kind: Kind, *patterns: str) -> list[_Term]:
    return [_Term(re.compile(rf"\b(?:{p})\b"), kind) for p in patterns]


@dataclass(frozen=True)
class _Finding:
    terms: list[_Term]
    #: near-misses: a mention inside one of these is not this finding
    exclude: re.Pattern[str] | None = None


def _finding(terms: list[_Term], exclude: str | None = None) -> _Finding:
    return _Finding(terms, re.compile(rf"\b(?:{exclude})\b") if exclude else None)


VOCABULARY: dict[str, _Finding] = {
    "Atelectasis": _finding(
        _terms("mention", r"atelecta(?:sis|ses|tic)", r"volume loss",
               r"(?:lobar|segmental|subsegmental|lobe|lung) collapse",
               r"collapse of the(?: \w+){0,3} (?:lobes?|lungs?)", r"collapsed(?: \w+){0,2} (?:lobes?|lungs?)")),
    "Cardiomegaly": _finding(
        _terms("mention", r"cardiomegaly", r"cardiac enlargement",
               r"enlargement of the (?:cardiac (?:silhouette|shadow)|heart)",
               rf"enlarged{_ADVERB} (?:cardiac (?:silhouette|shadow|size)|heart(?: size)?)",
               rf"{_HEART}{_ADVERB}\s+(?:is|are|appears|remains|was|seems){_ADVERB}\s+(?:enlarged|increased)")
        + _terms("normal", rf"{_HEART}(?:\s+[a-z]+){{0,4}}?\s+{_NORMAL}",
                 rf"normal(?:[- ]sized?)? {_HEART}", rf"{_HEART} (?:is )?top[- ]normal")),
    "Effusion": _finding(
        _terms("mention", r"effusions?", r"pleural fluid", r"hydro(?:pneumo)?thora(?:x|ces)", r"layering fluid")
        + _terms("sign", r"fluid (?:in|within|at) the(?: \w+)? costophrenic (?:angles?|sulc(?:us|i))",
                 r"(?:blunting|blunted|obliteration) of the(?: \w+){0,2} costophrenic (?:angles?|sulc(?:us|i))",
                 r"costophrenic (?:angle |sulcus )?blunting",
                 r"blunted(?: \w+){0,2} costophrenic (?:angles?|sulc(?:us|i))")
        + _terms("normal", r"costophrenic (?:angles?|sulc(?:us|i)) (?:are |is |remain )?(?:sharp|clear|preserved)"),
        exclude=r"pericardial (?:effusions?|fluid)"),
    "Infiltration": _finding(_terms("mention", r"infiltrat(?:e|es|ion|ions|ive)")),
    "Mass": _finding(
        _terms("mention", r"mass(?:es)?(?![- ]?like)", r"tumou?rs?", r"neoplasms?")
        + _terms("hedged", r"mass[- ]?like"),
        exclude=r"mass effect|(?:body|muscle|bone) mass"),
    "Nodule": _finding(
        _terms("mention", r"nodules?")
        + _terms("sign", r"nodular (?:opacit(?:y|ies)|densit(?:y|ies)|lesions?)"),
        exclude=r"thyroid nodules?"),
    "Pneumonia": _finding(_terms("mention", r"(?:broncho)?pneumonias?", r"pneumonic", r"infectious process")),
    "Pneumothorax": _finding(_terms("mention", r"(?:hydro)?pneumothora(?:x|ces)", r"ptx")),
    "Consolidation": _finding(_terms("mention", r"consolidat(?:ion|ions|ive|ed)")),
    "Edema": _finding(
        _terms("mention", r"o?edema"),
        exclude=r"(?:soft[- ]tissue|subcutaneous|chest wall|scalp|facial|extremity|peripheral|pedal) o?edema"),
    "Emphysema": _finding(
        _terms("mention", r"emphysema(?:tous)?"),
        exclude=r"(?:subcutaneous|surgical|soft[- ]tissue|chest wall|mediastinal) emphysema"),
    "Fibrosis": _finding(_terms("mention", r"fibros(?:is|es)", r"fibrotic", r"honeycomb(?:ing)?")),
    "Pleural_Thickening": _finding(
        _terms("mention", r"pleural thickening", r"thickening of the pleura", r"thickened pleura",
               r"pleural plaques?")),
    "Hernia": _finding(_terms("mention", r"hernias?", r"herniation of the (?:stomach|bowel)")),
    _GENERAL: _finding(
        _terms("mention", r"opacit(?:y|ies)", r"opacification", r"haziness", r"abnormalit(?:y|ies)", r"lesions?",
               r"fractures?", r"pneumomediastinum", r"pneumoperitoneum", r"free (?:air|gas)",
               r"pericardial (?:effusions?|fluid)", r"subcutaneous emphysema", r"widened mediastinum",
               r"mediastinal widening", r"lymphadenopathy", r"bronchiectasis", r"scarring", r"cavitary",
               r"cavitation", r"airspace disease", r"vascular congestion", r"(?:vertebral|vertebral body|compression)"
               r" (?:collapse|deformity|fracture)", r"(?:acute|cardiopulmonary|intrathoracic)(?: \w+)? "
               r"(?:process|disease|findings?)")
        + _terms("normal", r"normal (?:chest|study|exam(?:ination)?|(?:chest )?radiograph|chest x-?ray)",
                 r"unremarkable (?:chest|study|exam(?:ination)?|(?:chest )?radiograph)",
                 r"(?:chest|study|radiograph) (?:is )?(?:normal|unremarkable)", r"lungs? (?:are |is )?clear",
                 r"clear lungs")),
}


# --- triggers -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Trigger:
    pattern: re.Pattern[str]
    role: Role
    direction: Direction = "pre"
    window: int = 12
    #: reaches only the nearest mention on each side ("atelectasis versus consolidation")
    adjacent: bool = False


# whole words: not inside a word (nor a hyphenated one) where the trigger begins or ends with a letter
_START, _END = r"(?:(?<![\w-])|(?!\w))", r"(?:(?![\w-])|(?<!\w))"


def _triggers(role: Role, direction: Direction, window: int, *patterns: str, adjacent: bool = False) -> list[_Trigger]:
    return [_Trigger(re.compile(rf"{_START}(?:{p}){_END}"), role, direction, window, adjacent) for p in patterns]


_SIZE = (r"small|moderate|large|mild|trace|tiny|minimal|new|increas\w*|decreas\w*|persistent|stable|unchanged"
         r"|moderately|markedly|severe|massive")
_BE = r"(?:is|are|was|were|has been|have been|remains?)"

TRIGGERS: list[_Trigger] = [
    *_triggers("pseudo", "pre", 0, r"no (?:significant |substantial |appreciable )?(?:interval )?change",
               r"without (?:significant |interval )?change", r"no (?:significant )?(?:increase|decrease|worsening)",
               r"no improvement", r"not (?:yet )?(?:fully |completely |entirely )?(?:resolved|cleared)",
               r"not (?:significantly )?changed", r"not only"),
    *_triggers("negation", "pre", 12, r"no", r"not", r"without", r"negative for", r"free of", r"clear of",
               r"no (?:radiographic |definite |convincing )?(?:evidence|signs?) of", r"absence of",
               r"(?:interval )?(?:resolution|clearing) of", r"nor", r"neither", r"no longer"),
    *_triggers("negation", "both", 4, r"resolved", r"cleared"),
    *_triggers("negation", "both", 8, rf"(?:{_BE} )?absent"),
    *_triggers("negation", "post", 8, rf"(?:{_BE} )?not (?:seen|identified|visualized|present|appreciated|evident"
                                      r"|demonstrated|detected)",
               r"(?:has|have) (?:resolved|cleared)",
               rf"(?:{_BE} )?no longer (?:seen|visualized|present|evident|identified|appreciated|demonstrated)"),
    *_triggers("uncertain", "pre", 12, r"possible", r"possibly", r"probable", r"probably", r"(?:most )?likely",
               r"may (?:represent|reflect|be)", r"might (?:represent|be)", r"could (?:represent|reflect|be)",
               r"can ?not (?:exclude|rule out)", r"question of", r"questionabl[ey]",
               r"suspicious for", r"suspect", r"concern(?:ing)? for", r"worrisome for",
               r"suggest(?:s|ing|ive of|ion of)?", r"borderline", r"equivocal", r"indeterminate", r"presumed",
               r"differential (?:diagnosis )?includes", r"rule out", r"r/o", r"\?"),
    *_triggers("uncertain", "post", 8, r"can ?not be (?:entirely |completely |totally )?(?:excluded|ruled out)",
               rf"(?:{_BE} )?not (?:entirely |completely )?(?:excluded|ruled out)", rf"{_BE} suspected",
               rf"{_BE} (?:possible|questioned|a consideration|likely)", r"may be present"),
    *_triggers("uncertain", "both", 8, r"suspected"),
    *_triggers("uncertain", "both", 5, r"versus", r"vs", r"or", r"and/or", adjacent=True),
    *_triggers("history", "pre", 12, r"(?:known )?history of", r"h/o", r"hx of"),
    *_triggers("terminate", "pre", 0, r"but", r"however", r"although", r"though", r"except", r"aside from",
               r"apart from", r"other than", r"with the exception of", r"which", r"whereas", r"while",
               r"otherwise", r"there (?:is|are|has been|have been)", r"and(?= there\b| the\b)",
               rf", (?:with |and )?(?:an? |the )?(?:{_SIZE})"),
]


@dataclass(frozen=True)
class _Hit:
    start: int
    end: int
    trigger: _Trigger


def _trigger_hits(sentence: str, taken: list[Span]) -> list[_Hit]:
    """Trigger matches, the longest first where they overlap, none inside a mention."""
    hits = [_Hit(m.start(), m.end(), t) for t in TRIGGERS for m in t.pattern.finditer(sentence)]
    chosen: list[_Hit] = []
    for hit in sorted(hits, key=lambda h: (h.start - h.end, h.start)):
        spans = taken + [(c.start, c.end) for c in chosen]
        if not any(_overlap((hit.start, hit.end), s) for s in spans):
            chosen.append(hit)
    return sorted(chosen, key=lambda h: h.start)


def _overlap(a: Span, b: Span) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def _words(text: str) -> int:
    return len(re.findall(r"\w+", text))


def _reaches(hit: _Hit, mention: Span, sentence: str, stops: list[Span], others: list[Span]) -> bool:
    """Whether ``hit``'s scope covers ``mention``: in its direction, within its window, not past a stop (nor,
    for an ``adjacent`` trigger, past another mention)."""
    t = hit.trigger
    if hit.end <= mention[0] and t.direction in ("pre", "both"):
        gap = (hit.end, mention[0])
    elif hit.start >= mention[1] and t.direction in ("post", "both"):
        gap = (mention[1], hit.start)
        if "," in sentence[gap[0]:gap[1]]:
            return False
    else:
        return False
    blocks = stops + others if t.adjacent else stops
    return not any(gap[0] <= b[0] < gap[1] for b in blocks) and _words(sentence[gap[0]:gap[1]]) <= t.window


# --- labelling ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Mention:
    finding: str
    span: Span
    kind: Kind


def _mentions(sentence: str) -> list[_Mention]:
    found = []
    for name, finding in VOCABULARY.items():
        excluded = [m.span() for m in finding.exclude.finditer(sentence)] if finding.exclude else []
        own = [_Mention(name, m.span(), term.kind) for term in finding.terms for m in term.pattern.finditer(sentence)
               if not any(_overlap(m.span(), e) for e in excluded)]
        if any(m.kind != "sign" for m in own):
            own = [m for m in own if m.kind != "sign"]
        found += own
    return found


def _status(mention: _Mention, sentence: str, hits: list[_Hit], others: list[Span]) -> Label | None:
    """The mention's label, or None when it is historical."""
    if mention.kind == "normal":
        return "absent"
    stops = [(h.start, h.end) for h in hits if h.trigger.role == "terminate"]
    roles = {h.trigger.role for h in hits
             if h.trigger.role != "terminate" and _reaches(h, mention.span, sentence, stops, others)}
    if "history" in roles:
        return None
    if "negation" in roles:
        return "absent"
    return "uncertain" if "uncertain" in roles or mention.kind == "hedged" else "present"


def _strongest(labels: Iterable[Label]) -> Label | None:
    return max(labels, key=_RANK.__getitem__, default=None)


def _label_section(text: str) -> dict[str, Label]:
    """Finding (and ``_general``) -> its strongest label in this section."""
    found: dict[str, list[Label]] = {}
    for sentence in sentences(text):
        mentions = _mentions(sentence)
        hits = _trigger_hits(sentence, [m.span for m in mentions])
        for mention in mentions:
            others = [m.span for m in mentions if not _overlap(m.span, mention.span)]
            status = _status(mention, sentence, hits, others)
            if status is not None:
                found.setdefault(mention.finding, []).append(status)
    return {finding: _strongest(labels) for finding, labels in found.items()}  # type: ignore[misc]


def _abnormal(labels: dict[str, Label]) -> Label | None:
    for label in ("present", "uncertain"):
        if label in labels.values():
            return label  # type: ignore[return-value]
    return "absent" if labels else None


def label_report(text: str) -> dict[str, Label | None]:
    """Every finding the rules know, and ``Abnormal``, labelled from ``text``."""
    body: dict[str, list[Label]] = {}
    concluded: dict[str, list[Label]] = {}
    for kind, part in sections(text):
        target = concluded if kind == "impression" else body
        for finding, label in _label_section(part).items():
            target.setdefault(finding, []).append(label)
    labels = {f: _strongest(concluded.get(f) or body[f]) for f in {*body, *concluded}}
    result: dict[str, Label | None] = {name: labels.get(name) for name in VOCABULARY if name != _GENERAL}
    result["Abnormal"] = _abnormal({f: v for f, v in labels.items() if v is not None})
    return result


def _key(name: str) -> str:
    return re.sub(r"[\s_-]+", " ", name.removesuffix(" (head)")).strip().lower()


_NAMES = {_key(name): name for name in [*VOCABULARY, "Abnormal"] if name != _GENERAL}


class RuleLabeler:
    """Negation- and uncertainty-aware rules over the ChestX-ray14 findings and ``Abnormal``."""

    name = "pleura-rules/1"

    def label(self, text: str, findings: Sequence[str]) -> dict[str, Label | None]:
        """One label per name of ``findings``; None where the report does not mention it."""
        labels = label_report(text)
        return {finding: labels.get(_NAMES.get(_key(finding), ""), None) for finding in findings}
