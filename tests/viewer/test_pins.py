"""The viewer test opens what the compose stack runs: one OHIF version, one app-config.js."""

from __future__ import annotations

import json

import yaml

from tests.support import ROOT
from tests.viewer.ohif import APP_CONFIG, HERE, OHIF_VERSION


def test_compose_runs_the_ohif_the_viewer_test_opens() -> None:
    ohif = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["ohif"]
    assert ohif["image"] == f"ohif/app:v{OHIF_VERSION}"
    mounts = dict(v.split(":")[1::-1] for v in ohif["volumes"])
    assert (ROOT / mounts["/usr/share/nginx/html/app-config.js"]).resolve() == APP_CONFIG.resolve()
    assert "qidoRoot: '/dicom-web'" in APP_CONFIG.read_text()


def test_browser_driver_is_pinned_exactly() -> None:
    package = json.loads((HERE / "package.json").read_text())
    lock = json.loads((HERE / "package-lock.json").read_text())
    for name, version in package["dependencies"].items():
        assert version[0].isdigit(), f"{name} {version}: pin an exact version"
        assert lock["packages"][f"node_modules/{name}"]["version"] == version
    ohif = package["pleura"]["ohif"]
    assert ohif["package"] == "@ohif/app" and ohif["integrity"].startswith("sha512-")
