"""A private Orthanc PACS on loopback ports, for integration tests.

Orthanc binds every address and has no bind-address option, so remote access
stays off (RemoteAccessAllowed false) and authentication stays on for DICOM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.pg_cluster import free_port

ORTHANC_BIN = Path("/usr/sbin/Orthanc")
PLUGINS_DIR = Path("/usr/share/orthanc/plugins")


@dataclass(frozen=True)
class OrthancServer:
    http_url: str
    dicomweb_url: str
    dicom_port: int
    ae_title: str
    workdir: Path


def ensure_installed() -> None:
    """Install Orthanc and its DICOMweb plugin from Debian when missing (needs root)."""
    if ORTHANC_BIN.exists() and any(PLUGINS_DIR.glob("libOrthancDicomWeb*")):
        return
    if os.geteuid() != 0:
        raise RuntimeError("Orthanc is missing; install it: apt-get install orthanc "
                           "orthanc-dicomweb")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "orthanc",
                    "orthanc-dicomweb"], check=True, env=env, stdout=subprocess.DEVNULL)


@contextmanager
def running_orthanc(modalities: dict[str, tuple[str, str, int]] | None = None,
                    dicomweb_servers: dict[str, str | dict[str, Any]] | None = None,
                    ae_title: str = "ORTHANC") -> Iterator[OrthancServer]:
    """Start Orthanc with a private config and storage; yield where to reach it.

    ``modalities`` maps a name to (AE title, host, port): the peers Orthanc may
    C-STORE and C-MOVE to. ``dicomweb_servers`` maps a name to a DICOMweb root URL
    Orthanc may STOW to, or to the plugin's object form (``Url``, ``HttpHeaders``...).
    """
    if not ORTHANC_BIN.exists():
        raise RuntimeError(f"{ORTHANC_BIN} not found; install orthanc and orthanc-dicomweb")
    workdir = Path(tempfile.mkdtemp(prefix="clinfuse-orthanc-"))
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "clinfuse-test-orthanc",
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": ae_title,
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowMove": True,
        "DicomAlwaysAllowGet": True,
        "DicomModalities": {name: list(peer) for name, peer in (modalities or {}).items()},
        "Plugins": [str(PLUGINS_DIR)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True,
                     "Host": f"127.0.0.1:{http_port}", "Ssl": False,
                     "Servers": {name: url if isinstance(url, dict) else [url]
                                 for name, url in (dicomweb_servers or {}).items()}},
        "HttpTimeout": 60,
        "StableAge": 1,
    }
    confdir = workdir / "config"
    confdir.mkdir()
    (confdir / "orthanc.json").write_text(json.dumps(config, indent=2))
    logdir = workdir / "logs"
    logdir.mkdir()
    process = subprocess.Popen([str(ORTHANC_BIN), f"--logdir={logdir}", str(confdir)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    http_url = f"http://127.0.0.1:{http_port}"
    try:
        _wait_ready(http_url, process, logdir)
        yield OrthancServer(http_url, f"{http_url}/dicom-web", dicom_port, ae_title, workdir)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_ready(http_url: str, process: subprocess.Popen[bytes], logdir: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            logs = "".join(p.read_text(errors="replace")[-2000:] for p in logdir.glob("*"))
            raise RuntimeError(f"Orthanc exited with {process.returncode}: {logs}")
        try:
            with urllib.request.urlopen(f"{http_url}/system", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("Orthanc did not answer /system within 30 s")
