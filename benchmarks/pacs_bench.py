"""PACS ingest: STOW-RS and C-STORE into clinfuse, and C-STORE into Orthanc, same sender.

Instances are 512x512 16-bit CT slices (uncompressed, 512 kB each) made from
pydicom's CT_small sample with fresh UIDs.
"""

from __future__ import annotations

import io
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import uvicorn
from pydicom.data import get_testdata_file

from scripts.orthanc import ensure_installed, running_orthanc
from scripts.pg_cluster import free_port
from services.app import create_app
from services.auth.principal import Role
from services.auth.scopes import default_scopes
from services.core.config import Settings
from services.dicomweb import build_multipart
from services.dimse import Peer, StoreSCP, send_instances


def ct_instances(n: int) -> list[bytes]:
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    base = template.pixel_array.astype(np.int16)
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    out = []
    rng = np.random.default_rng(0)
    for i in range(n):
        ds = template.copy()
        pixels = np.kron(base, np.ones((4, 4), dtype=np.int16))
        pixels = pixels + rng.integers(0, 8, size=pixels.shape, dtype=np.int16)
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = pixels.tobytes()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.InstanceNumber = i + 1
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


def _serve(app: Any, port: int) -> tuple[uvicorn.Server, threading.Thread]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread


def run(quick: bool = False) -> dict[str, Any]:
    n, batch = (60, 20) if quick else (600, 50)
    instances = ct_instances(n)
    root = Path(tempfile.mkdtemp(prefix="clinfuse-bench-"))
    results: dict[str, Any] = {"instances": n, "instance_bytes": len(instances[0]),
                               "stow_batch": batch}

    port = free_port()
    settings = Settings(database_url=f"sqlite:///{root / 'stow.db'}", data_dir=root / "stow",
                        max_upload_bytes=1 << 30)
    app = create_app(settings)
    token = app.state.local_issuer.issue("bench", Role.integration,
                                         scope=default_scopes(Role.integration, system=True))
    server, thread = _serve(app, port)
    try:
        with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {token}"}) as client:
            started = time.perf_counter()
            for i in range(0, n, batch):
                content_type, chunks = build_multipart(instances[i:i + batch])
                response = client.post(f"http://127.0.0.1:{port}/dicomweb/studies",
                                       content=b"".join(chunks),
                                       headers={"Content-Type": content_type})
                response.raise_for_status()
            results["stow_instances_per_s"] = round(n / (time.perf_counter() - started), 1)
    finally:
        server.should_exit = True
        thread.join()

    settings = Settings(database_url=f"sqlite:///{root / 'scp.db'}", data_dir=root / "scp")
    app = create_app(settings)
    server, thread = _serve(app, free_port())
    scp = StoreSCP(app.state.dicom_store, port=free_port(), allowed_calling_aets=["BENCH"])
    scp.start()
    try:
        started = time.perf_counter()
        statuses = send_instances(Peer("127.0.0.1", scp.port, "CLINFUSE"), instances,
                                  calling_aet="BENCH")
        results["cstore_clinfuse_instances_per_s"] = round(n / (time.perf_counter() - started),
                                                           1)
        assert set(statuses) == {0}
    finally:
        scp.stop()
        server.should_exit = True
        thread.join()

    ensure_installed()
    with running_orthanc() as orthanc:
        started = time.perf_counter()
        statuses = send_instances(Peer("127.0.0.1", orthanc.dicom_port, orthanc.ae_title),
                                  instances, calling_aet="BENCH")
        results["cstore_orthanc_instances_per_s"] = round(n / (time.perf_counter() - started),
                                                          1)
        assert set(statuses) == {0}
    results["cstore_ratio_clinfuse_to_orthanc"] = round(
        results["cstore_clinfuse_instances_per_s"] / results["cstore_orthanc_instances_per_s"],
        2)
    results["summary"] = (
        f"STOW-RS {results['stow_instances_per_s']}/s (goal >= 200/s); C-STORE clinfuse "
        f"{results['cstore_clinfuse_instances_per_s']}/s vs Orthanc "
        f"{results['cstore_orthanc_instances_per_s']}/s "
        f"(x{results['cstore_ratio_clinfuse_to_orthanc']}); 512x512 CT, {n} instances")
    return results
