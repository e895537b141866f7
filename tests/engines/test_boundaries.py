"""engines knows no DICOM, database or queue: it imports none of them."""

from __future__ import annotations

import ast
from pathlib import Path

import engines

FORBIDDEN = {"worker", "dicom_node", "pydicom", "pynetdicom", "highdicom", "sqlalchemy", "celery"}


def test_engines_imports_nothing_outside_its_role() -> None:
    offenders = []
    for path in Path(engines.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []
