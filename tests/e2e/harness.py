"""Processes for end-to-end tests: Pleura's CLI, DCMTK storescp, Orthanc; all on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support import free_port, reachable, require_tool, wait_for

PLEURA = str(Path(sys.executable).with_name("pleura"))


class Proc:
    """A background process whose output goes to a log file (shown when a test fails)."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self._fh = open(log, "ab")
        self.popen = subprocess.Popen(args, stdout=self._fh, stderr=subprocess.STDOUT,
                                      env={**os.environ, **(env or {})}, start_new_session=True)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill9(self) -> None:
        os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.kill9()
        self._fh.close()

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


@contextmanager
def running(*procs: Proc) -> Iterator[None]:
    """Stop ``procs`` when the block ends; when it fails, print the tail of their logs first."""
    try:
        yield
    except BaseException:
        for proc in procs:
            print(f"--- {proc.log.name}\n{proc.tail()}")
        raise
    finally:
        for proc in procs:
            proc.stop()


def embedded_env(tmp_path: Path, port: int, dest_port: int, quiet: float) -> dict[str, str]:
    """Settings for `pleura serve` on embedded defaults, delivering to DEST@127.0.0.1:dest_port."""
    return {
        "PLEURA_DATA_DIR": str(tmp_path / "var"),
        "PLEURA_DICOM_PORT": str(port),
        "PLEURA_DESTINATIONS": f"DEST@127.0.0.1:{dest_port}",
        "PLEURA_STUDY_QUIET_SECONDS": str(quiet),
        "PLEURA_MIN_FREE_DISK_MB": "20",  # CI disks can be nearly full; the watermark has its own test
    }


def pleura(command: str, env: dict[str, str], log: Path, *args: str) -> Proc:
    return Proc([PLEURA, command, *args], log, env)


def pleura_run(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([PLEURA, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def wait_port(port: int, proc: Proc, timeout: float = 90) -> None:
    def up() -> bool:
        if not proc.alive():
            raise RuntimeError(f"process exited early:\n{proc.tail()}")
        return reachable("127.0.0.1", port)

    wait_for(up, timeout, f"port {port}")


def storescp(out: Path, log: Path, ae_title: str = "DEST") -> tuple[Proc, int]:
    """A DCMTK storescp that keeps every received object under a unique file name."""
    port = free_port()
    out.mkdir(parents=True, exist_ok=True)
    proc = Proc([require_tool("storescp"), "-aet", ae_title, "-od", str(out), "-uf", "+xa", str(port)], log)
    wait_port(port, proc)
    return proc, port


class Orthanc:
    """Orthanc from Debian as the PACS: its own ports, storage and Lua auto-forwarding."""

    def __init__(self, workdir: Path, pleura_port: int) -> None:
        binary = require_tool("Orthanc")
        self.http_port, self.dicom_port = free_port(), free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        lua = workdir / "autoforward.lua"
        lua.write_text(
            "function OnStoredInstance(instanceId, tags, metadata, origin)\n"
            "  if origin['RemoteAet'] ~= 'PLEURA' and (tags['Modality'] == 'CR' or tags['Modality'] == 'DX') then\n"
            "    SendToModality(instanceId, 'pleura')\n"
            "  end\n"
            "end\n"
        )
        config = {
            "Name": "pleura-test-pacs", "StorageDirectory": str(workdir / "db"),
            "IndexDirectory": str(workdir / "db"), "HttpPort": self.http_port,
            "DicomPort": self.dicom_port, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "HttpServerEnabled": True, "DicomServerEnabled": True,
            "DicomModalities": {"pleura": ["PLEURA", "127.0.0.1", pleura_port]},
            "LuaScripts": [str(lua)], "Plugins": [],
        }
        (workdir / "orthanc.json").write_text(json.dumps(config))
        self.proc = Proc([binary, str(workdir / "orthanc.json")], workdir / "orthanc.log")
        wait_port(self.http_port, self.proc)

    def rest(self, path: str, data: bytes | None = None) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data,
                                         method="POST" if data is not None else "GET")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        self.proc.stop()
