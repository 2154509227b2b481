"""A real Orthanc PACS (Debian's orthanc + orthanc-dicomweb + orthanc-gdcm) on loopback, for tests.

Runs in the foreground with its own configuration and storage in a temporary folder; no DICOM port, no remote
access, no authentication. Stopped by its PID.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from mlserver import free_port

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGINS = Path("/usr/share/orthanc/plugins")


def available() -> str | None:
    """None when Orthanc and its DICOMweb plugin are installed, else why not."""
    if not Path(ORTHANC).exists():
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb orthanc-gdcm)"
    if not (PLUGINS / "libOrthancDicomWeb.so").exists():
        return "the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
    return None


@dataclass
class Orthanc:
    url: str
    process: subprocess.Popen
    log_path: Path

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def upload(self, path: Path) -> dict:
        request = urllib.request.Request(f"{self.url}/instances", data=path.read_bytes(), method="POST",
                                         headers={"Content-Type": "application/dicom"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def get(self, path: str):
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as response:
            return json.loads(response.read())


def start_orthanc(work: Path, timeout: float = 60.0) -> Orthanc:
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    plugins = [str(PLUGINS / name) for name in ("libOrthancDicomWeb.so", "libOrthancGdcm.so")
               if (PLUGINS / name).exists()]
    config = {
        "Name": "adl-test-pacs", "StorageDirectory": str(work / "storage"), "IndexDirectory": str(work / "index"),
        "HttpServerEnabled": True, "HttpPort": port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "SaveJobs": False, "Plugins": plugins,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    config_path = work / "orthanc.json"
    config_path.write_text(json.dumps(config))
    log_path = work / "orthanc.log"
    process = subprocess.Popen([ORTHANC, str(config_path)], stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    server = Orthanc(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {process.returncode}: {log_path.read_text()[-2000:]}")
        try:
            server.get("/system")
            return server
        except OSError:
            time.sleep(0.3)
    stop_orthanc(server)
    raise RuntimeError(f"Orthanc did not answer within {timeout} s")


def stop_orthanc(server: Orthanc) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(10)
