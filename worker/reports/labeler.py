"""Report text -> a label per finding: ``present``, ``absent``, ``uncertain``, or None (not mentioned).

The default is :class:`worker.reports.rules.RuleLabeler` (NegEx/ConText-style, no downloaded
weights). A site replaces it with its own through ``PLEURA_REPORT_LABELER=module:attribute``,
naming a class (or a factory) whose instances have a ``name`` and a :meth:`Labeler.label`.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Literal, Protocol

Label = Literal["present", "absent", "uncertain"]
LABELS: tuple[Label, ...] = ("present", "absent", "uncertain")
#: the rule-based default, named as a site names its own
DEFAULT = "worker.reports.rules:RuleLabeler"


class Labeler(Protocol):
    """What turns a report's text into labels."""

    #: name and version, stored with every label it gives (e.g. ``pleura-rules/1``)
    name: str

    def label(self, text: str, findings: Sequence[str]) -> dict[str, Label | None]:
        """One label per name of ``findings``; None where the report does not mention it."""
        ...


def load(spec: str | None = None) -> Labeler:
    """The labeler ``spec`` names (``module:attribute``), or the rule-based default (:data:`DEFAULT`)."""
    spec = spec or DEFAULT
    module, _, attribute = spec.partition(":")
    if not module or not attribute:
        raise ValueError(f"PLEURA_REPORT_LABELER={spec!r}: expected module:attribute")
    try:
        factory = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"PLEURA_REPORT_LABELER={spec!r}: cannot import it ({exc})") from exc
    labeler = factory()
    if not isinstance(getattr(labeler, "name", None), str) or not callable(getattr(labeler, "label", None)):
        raise ValueError(f"PLEURA_REPORT_LABELER={spec!r}: its instances need a name and a label(text, findings)")
    return labeler
