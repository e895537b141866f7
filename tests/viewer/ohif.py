"""A real OHIF viewer for tests: Orthanc's DICOMweb behind nginx, the pinned OHIF build, headless Chromium.

What a radiologist would open, on 127.0.0.1 only:

- Orthanc (Debian) with its DICOMweb plugin: DICOM and HTTP on free ports. Tests C-STORE the source
  images into it and Pleura delivers its SR and SC into it, as into a PACS.
- nginx serving the OHIF build pinned in ``tests/viewer/package.json`` (installed by ``bash .ci/setup``
  into ``build/viewer/``) at the root of one origin, with ``docker/ohif/app-config.js`` (the file the
  compose stack mounts) as its configuration and ``/dicom-web/`` forwarded to Orthanc.
- One headless Chromium (Debian's, driven by ``tests/viewer/drive.mjs`` through puppeteer-core),
  kept open across studies; each :meth:`Viewer.view` opens a fresh tab on
  ``/viewer?StudyInstanceUIDs=...``, double-clicks the thumbnail of the series to show (the newest SR
  by default), waits until the viewport has settled and returns what is on screen.

:func:`viewer_stack` starts all three and stops them; :func:`missing` says why it cannot run here.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import Dataset

from dicom_node.scu import send_datasets
from tests.e2e.harness import Proc, wait_port
from tests.support import ROOT, free_port

HERE = Path(__file__).resolve().parent
#: The OHIF build this test opens: compose.yaml's ``ohif/app`` image carries the same version.
OHIF_PIN: dict[str, str] = json.loads((HERE / "package.json").read_text())["pleura"]["ohif"]
OHIF_VERSION = OHIF_PIN["version"]
VIEWER_DIR = Path(os.environ.get("PLEURA_VIEWER_DIR", ROOT / "build" / "viewer"))
OHIF_DIST = VIEWER_DIR / f"ohif-{OHIF_VERSION}" / "dist"
#: One configuration for the compose stack and this test.
APP_CONFIG = ROOT / "docker" / "ohif" / "app-config.js"
NGINX_TEMPLATE = HERE / "nginx.conf.template"
DRIVER = HERE / "drive.mjs"
_PLUGIN_CANDIDATES = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so*")
_SETUP = "bash .ci/setup installs it"


def dicomweb_plugin() -> Path | None:
    """Orthanc's DICOMweb plugin from Debian's ``orthanc-dicomweb``, if installed."""
    for pattern in _PLUGIN_CANDIDATES:
        found = sorted(Path("/").glob(pattern.lstrip("/")))
        if found:
            return found[0]
    return None


def _tool_missing(*tools: str) -> str | None:
    for tool in tools:
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is not installed ({_SETUP} with apt-get)"
    return None


def orthanc_missing() -> str | None:
    """Why :class:`DicomWebOrthanc` cannot start on this machine (a skip reason), or None."""
    if absent := _tool_missing("Orthanc"):
        return absent
    if dicomweb_plugin() is None:
        return f"Orthanc's DICOMweb plugin is not installed (orthanc-dicomweb; {_SETUP})"
    return None


def missing() -> str | None:
    """Why the viewer stack cannot start on this machine (a skip reason), or None."""
    if absent := orthanc_missing() or _tool_missing("nginx", "node", "chromium"):
        return absent
    if not (OHIF_DIST / "index.html").is_file():
        return f"OHIF {OHIF_VERSION} is not installed in {OHIF_DIST.parent} ({_SETUP} with npm)"
    if not (VIEWER_DIR / "node_modules" / "puppeteer-core").is_dir():
        return f"puppeteer-core is not installed in {VIEWER_DIR} ({_SETUP} with npm ci)"
    return None


class DicomWebOrthanc:
    """Orthanc as the PACS the viewer reads: DICOM in, DICOMweb out, loopback only, no authentication
    unless ``lua`` asks for it.

    ``lua``: Lua scripts for Orthanc (an ``IncomingHttpRequestFilter`` that demands a bearer token, since
    Orthanc has no bearer authentication of its own; a ``ReceivedInstanceFilter``); ``token``: the
    bearer token :meth:`rest` then sends; ``config``: more of Orthanc's configuration (``SslEnabled``...); its
    ``"DicomWeb"`` section is merged into the plugin's settings here (e.g. ``"Servers"``, the DICOMweb
    servers this Orthanc's own client sends to), the rest of this configuration wins over it."""

    AE_TITLE = "ORTHANC"

    def __init__(self, workdir: Path, lua: str = "", token: str | None = None,
                 config: dict[str, Any] | None = None) -> None:
        self.token = token
        binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        self.http_port, self.dicom_port = free_port(), free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        config = dict(config or {})
        dicomweb = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado", "Ssl": False,
                    "StudiesMetadata": "Full", "SeriesMetadata": "Full"} | config.get("DicomWeb", {})
        config |= {
            "Name": "pleura-viewer-test", "StorageDirectory": str(workdir / "db"),
            "IndexDirectory": str(workdir / "db"), "HttpPort": self.http_port, "DicomPort": self.dicom_port,
            "DicomAet": self.AE_TITLE, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "HttpServerEnabled": True, "DicomServerEnabled": True, "StorageCompression": False,
            "Plugins": [str(dicomweb_plugin())], "LuaScripts": [str(workdir / "filters.lua")] if lua else [],
            "DicomWeb": dicomweb,
        }
        (workdir / "orthanc.json").write_text(json.dumps(config, indent=1))
        (workdir / "filters.lua").write_text(lua)
        self.proc = Proc([binary, str(workdir / "orthanc.json")], workdir / "orthanc.log")
        wait_port(self.http_port, self.proc)
        wait_port(self.dicom_port, self.proc)

    def rest(self, path: str, data: bytes | None = None) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data,
                                         method="POST" if data is not None else "GET",
                                         headers={"Authorization": f"Bearer {self.token}"} if self.token else {})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def store(self, datasets: Sequence[Dataset], calling_ae: str = "MODALITY") -> None:
        """C-STORE ``datasets`` into Orthanc (one association); every one must be accepted."""
        results = send_datasets("127.0.0.1", self.dicom_port, [(str(ds.SOPInstanceUID), ds) for ds in datasets],
                                called_ae=self.AE_TITLE, calling_ae=calling_ae)
        refused = [r for r in results if not r.ok]
        assert not refused, f"Orthanc refused {refused}"

    def instances(self, study_uid: str) -> list[dict[str, str]]:
        """Main tags of every instance Orthanc holds in the study (SOPInstanceUID, Modality, ...)."""
        found = self.rest("/tools/find", json.dumps({
            "Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True,
            "RequestedTags": ["SOPClassUID", "Modality", "SeriesInstanceUID", "InstanceNumber"]}).encode())
        return [{**item["MainDicomTags"], **item.get("RequestedTags", {})} for item in found]

    def stop(self) -> None:
        self.proc.stop()


@dataclass
class ViewResult:
    """What one study looked like in OHIF.

    ``errors``: error texts on screen ("Something went wrong", TypeErrors, with OHIF's error details
    when it offers them), the error and warning notifications OHIF showed, and the driver's own
    failures (a series that would not open, a screen that never settled). ``texts``: every visible
    line of text, DOM and SVG. ``annotations``: the SVG text lines drawn over the image (measurement
    labels). ``console``: the page's console errors and uncaught exceptions (for diagnosis; not all of
    them reach the screen). ``shown``: the study's display sets, the one double-clicked (``target``)
    and what each viewport shows. ``viewport``: brightness of the viewport's canvas (``mean``/``max``
    0-255, ``lit``: the fraction of pixels brighter than 16), None without a cornerstone viewport.
    """

    errors: list[str]
    texts: list[str]
    annotations: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    shown: dict[str, Any] = field(default_factory=dict)
    viewport: dict[str, float] | None = None
    screenshot: Path | None = None
    seconds: float = 0.0

    @property
    def image_shown(self) -> bool:
        """The viewport shows an image (not a black or empty canvas)."""
        return bool(self.viewport) and self.viewport["lit"] > 0.05 and self.viewport["max"] > 64

    @property
    def shows_target(self) -> bool:
        """The series that was double-clicked is in a viewport."""
        target = self.shown.get("target", {}).get("uid")
        return bool(target) and any(target in v["displaySets"] for v in self.shown.get("viewports", []))


@dataclass(frozen=True)
class Target:
    """A series to show: the one holding ``sop_instance_uid`` or else the newest ``modality`` one
    (highest Series Number, then Instance Number); its screenshot goes to ``screenshot`` (findings
    on further images of an SR to ``<stem>-image2.png`` ...)."""

    screenshot: Path
    sop_instance_uid: str | None = None
    modality: str = "SR"
    #: the image in its viewport must be drawn before the screen counts as settled (false where the
    #: image is known not to render, so that the driver does not wait for it until the timeout)
    drawn: bool = True


class Viewer:
    """nginx with the OHIF build in front of ``orthanc``, and one headless Chromium driving it."""

    def __init__(self, workdir: Path, orthanc_http_port: int) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (workdir / "nginx" / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        conf = NGINX_TEMPLATE.read_text()
        values = {"@USER@": "user root;" if os.geteuid() == 0 else "", "@WORK@": str(workdir / "nginx"),
                  "@PORT@": str(self.port), "@DIST@": str(OHIF_DIST), "@APP_CONFIG@": str(APP_CONFIG),
                  "@ORTHANC_HTTP@": str(orthanc_http_port)}
        for key, value in values.items():
            conf = conf.replace(key, value)
        (workdir / "nginx" / "nginx.conf").write_text(conf)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.nginx = Proc([nginx, "-p", str(workdir / "nginx"), "-e", str(workdir / "nginx" / "error.log"),
                           "-c", str(workdir / "nginx" / "nginx.conf")], workdir / "nginx.log")
        wait_port(self.port, self.nginx)
        self._driver_log = open(workdir / "drive.log", "ab")
        self.driver = subprocess.Popen(
            ["node", str(DRIVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._driver_log,
            text=True, bufsize=1, start_new_session=True,
            env={**os.environ, "PLEURA_VIEWER_DIR": str(VIEWER_DIR), "CHROMIUM": _chromium(),
                 "PROFILE_DIR": str(workdir / "chromium-profile")})
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        ready = self._reply(90)
        assert ready.get("ready"), ready

    def _read(self) -> None:
        assert self.driver.stdout is not None
        for line in self.driver.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _reply(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"the browser driver did not answer in {timeout:.0f} s") from None
        if line is None:
            raise RuntimeError(f"the browser driver exited ({self.driver.poll()}); see {self._driver_log.name}")
        return json.loads(line)

    def view(self, study_uid: str, targets: Sequence[Target], *, timeout: float = 60) -> list[ViewResult]:
        """Open the study once and show each target series in turn (double-click on its thumbnail),
        waiting each time for the screen to settle; one :class:`ViewResult` per target."""
        for target in targets:
            target.screenshot.parent.mkdir(parents=True, exist_ok=True)
        request = {"cmd": "view", "url": f"{self.base_url}/viewer?StudyInstanceUIDs={study_uid}",
                   "timeout_ms": int(timeout * 1000),
                   "targets": [{"sop": t.sop_instance_uid, "modality": t.modality, "screenshot": str(t.screenshot),
                                "drawn": t.drawn} for t in targets]}
        assert self.driver.stdin is not None
        self.driver.stdin.write(json.dumps(request) + "\n")
        self.driver.stdin.flush()
        reply = self._reply(timeout + 30)
        if "fatal" in reply:
            raise RuntimeError(f"the browser driver failed: {reply['fatal']}")
        return [ViewResult(errors=r["errors"], texts=r["texts"], annotations=r["annotations"], console=r["console"],
                           shown=r["shown"], viewport=r["viewport"], screenshot=t.screenshot, seconds=r["seconds"])
                for r, t in zip(reply["results"], targets, strict=True)]

    def view_study(self, study_uid: str, screenshot: Path, sop_instance_uid: str | None = None) -> ViewResult:
        """Open the study and show its newest SR (or the SR ``sop_instance_uid``)."""
        return self.view(study_uid, [Target(screenshot, sop_instance_uid)])[0]

    def stop(self) -> None:
        if self.driver.poll() is None:
            try:
                assert self.driver.stdin is not None
                self.driver.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.driver.stdin.close()
                self.driver.wait(20)
            except (OSError, subprocess.TimeoutExpired):
                os.killpg(self.driver.pid, 9)
                self.driver.wait(10)
        self._driver_log.close()
        self.nginx.stop()


def _chromium() -> str:
    return shutil.which("chromium") or "/usr/bin/chromium"


@dataclass
class ViewerStack:
    orthanc: DicomWebOrthanc
    viewer: Viewer


@contextmanager
def viewer_stack(workdir: Path) -> Iterator[ViewerStack]:
    """Orthanc + nginx/OHIF + Chromium under ``workdir``; logs are printed when the block fails."""
    orthanc = DicomWebOrthanc(workdir / "orthanc")
    try:
        viewer = Viewer(workdir / "viewer", orthanc.http_port)
    except BaseException:
        print(f"--- orthanc.log\n{orthanc.proc.tail()}")
        orthanc.stop()
        raise
    try:
        yield ViewerStack(orthanc, viewer)
    except BaseException:
        for log in (orthanc.proc.log, workdir / "viewer" / "drive.log", workdir / "viewer" / "nginx" / "error.log"):
            if log.is_file():
                print(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-40:]))
        raise
    finally:
        viewer.stop()
        orthanc.stop()
