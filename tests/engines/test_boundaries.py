"""Package boundaries of DESIGN.md: engines knows no DICOM, database or queue; dicom_node
knows no model, database or queue. Dependencies point worker -> dicom_node / engines only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import dicom_node
import engines

FORBIDDEN = {
    engines: {"worker", "dicom_node", "pydicom", "pynetdicom", "highdicom", "sqlalchemy", "celery"},
    dicom_node: {"worker", "engines", "torch", "onnxruntime", "sqlalchemy", "celery"},
}


@pytest.mark.parametrize("package", list(FORBIDDEN), ids=lambda p: p.__name__)
def test_package_imports_nothing_outside_its_role(package) -> None:  # type: ignore[no-untyped-def]
    offenders = []
    for path in Path(package.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN[package]]
    assert offenders == []
