"""Real series moved both ways between a real Orthanc and clinfuse; pixels must match.

Orthanc comes from Debian (installed by the fixture when missing, as root) and
runs with a private config on loopback ports.
"""

from __future__ import annotations

import io
import json
import socket
import struct
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import uvicorn
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from scripts.orthanc import OrthancServer, ensure_installed, running_orthanc
from scripts.pg_cluster import free_port
from services.app import create_app
from services.auth.principal import Role
from services.core.config import Settings
from services.db import make_engine, migrate, session_factory
from services.dicom_store import DicomStore
from services.dimse import (
    DimseError,
    Peer,
    StoreSCP,
    fetch_dicomweb,
    find_studies,
    get_study,
    move_study,
    send_instances,
)
from tests.conftest import require_service
from tests.services.service_support import bearer
from tests.shared_data import shared_data_dir

pytestmark = pytest.mark.integration

SCP_AET = "CLINFUSE"


def sources() -> list[Path]:
    """A real multi-slice MR series (dicom2nifti) and pydicom's CT and RLE MR samples."""
    series = sorted((shared_data_dir("dicom") / "dicom2nifti_testdata" / "generic" /
                     "anatomical" / "001").glob("*.dcm"))
    return [*series, Path(get_testdata_file("CT_small.dcm")),  # type: ignore[arg-type]
            Path(get_testdata_file("MR_small_RLE.dcm"))]  # type: ignore[arg-type]


def pixels(data: bytes | Path) -> np.ndarray:
    raw = data.read_bytes() if isinstance(data, Path) else data
    return pydicom.dcmread(io.BytesIO(raw)).pixel_array


class Clinfuse:
    """clinfuse's HTTP app (uvicorn) and C-STORE SCP on loopback ports."""

    def __init__(self, root: Path) -> None:
        self.http_port, self.dicom_port = free_port(), free_port()
        self.settings = Settings(database_url=f"sqlite:///{root / 'db.sqlite'}",
                                 data_dir=root / "data", dicom_port=self.dicom_port,
                                 dicom_allowed_aets=["ORTHANC", "TESTSCU"])
        self.app = create_app(self.settings)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.http_port,
                                log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def store(self) -> DicomStore:
        store: DicomStore = self.app.state.dicom_store
        return store

    def __enter__(self) -> Clinfuse:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("clinfuse did not start")
            time.sleep(0.05)
        self.scp = StoreSCP(self.store, ae_title=SCP_AET, port=self.dicom_port,
                            allowed_calling_aets=self.settings.dicom_allowed_aets)
        self.scp.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.scp.stop()
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Clinfuse, OrthancServer]]:
    try:
        ensure_installed()
    except Exception as exc:
        require_service("Orthanc", str(exc))
    with Clinfuse(tmp_path_factory.mktemp("clinfuse")) as clinfuse:
        peers = {"clinfuse": (SCP_AET, "127.0.0.1", clinfuse.dicom_port)}
        try:
            orthanc_cm = running_orthanc(modalities=peers,
                                         dicomweb_servers={"clinfuse": {
                                             "Url": clinfuse.url + "/dicomweb/",
                                             "HttpHeaders": bearer(clinfuse.app,
                                                                   Role.integration)}})
            orthanc = orthanc_cm.__enter__()
        except RuntimeError as exc:
            require_service("Orthanc", str(exc))
        try:
            yield clinfuse, orthanc
        finally:
            orthanc_cm.__exit__(None, None, None)


def orthanc_call(orthanc: OrthancServer, path: str, body: Any = None,
                 raw: bytes | None = None) -> Any:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(orthanc.http_url + path, data=data,
                                     method="POST" if data is not None else "GET")
    with urllib.request.urlopen(request, timeout=60) as response:
        payload = response.read()
    return json.loads(payload) if payload[:1] in (b"{", b"[") else payload


def upload_to_orthanc(orthanc: OrthancServer, files: list[Path]) -> list[str]:
    return [orthanc_call(orthanc, "/instances", raw=f.read_bytes())["ID"] for f in files]


def orthanc_pixels(orthanc: OrthancServer, sop_uid: str) -> np.ndarray:
    found = orthanc_call(orthanc, "/tools/lookup", raw=sop_uid.encode())
    instance = next(f for f in found if f["Type"] == "Instance")
    return pixels(orthanc_call(orthanc, f"/instances/{instance['ID']}/file"))


def assert_same_pixels(store: DicomStore, files: list[Path]) -> None:
    for path in files:
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        rows = store.find(SOPInstanceUID=uid)
        assert rows, f"{path.name} did not arrive in clinfuse"
        assert np.array_equal(pixels(store.read_bytes(rows[0])), pixels(path))


def assert_same_pixels_in_clinfuse(clinfuse: Clinfuse, files: list[Path]) -> None:
    assert_same_pixels(clinfuse.store, files)


def empty_store(root: Path) -> DicomStore:
    """A separate store, so a fetch test sees only what it fetched."""
    engine = make_engine(f"sqlite:///{root / 'index.db'}")
    migrate(engine)
    return DicomStore(root / "instances", session_factory(engine))


def test_orthanc_to_clinfuse_by_c_store(pacs: tuple[Clinfuse, OrthancServer]) -> None:
    clinfuse, orthanc = pacs
    files = sources()[:2]
    ids = upload_to_orthanc(orthanc, files)
    orthanc_call(orthanc, "/modalities/clinfuse/store", {"Resources": ids, "Synchronous": True})
    assert_same_pixels_in_clinfuse(clinfuse, files)


def test_clinfuse_to_orthanc_by_c_store(pacs: tuple[Clinfuse, OrthancServer]) -> None:
    _, orthanc = pacs
    files = [Path(get_testdata_file("MR_small.dcm"))]  # type: ignore[arg-type]
    statuses = send_instances(Peer("127.0.0.1", orthanc.dicom_port, orthanc.ae_title),
                              [f.read_bytes() for f in files], calling_aet="TESTSCU")
    assert statuses == [0]
    uid = str(pydicom.dcmread(files[0]).SOPInstanceUID)
    assert np.array_equal(orthanc_pixels(orthanc, uid), pixels(files[0]))


def test_orthanc_to_clinfuse_by_stow(pacs: tuple[Clinfuse, OrthancServer]) -> None:
    clinfuse, orthanc = pacs
    files = sources()[2:4]
    ids = upload_to_orthanc(orthanc, files)
    answer = orthanc_call(orthanc, "/dicom-web/servers/clinfuse/stow",
                          {"Resources": ids, "Synchronous": True})
    assert answer is not None
    assert_same_pixels_in_clinfuse(clinfuse, files)


def test_clinfuse_to_orthanc_by_stow(pacs: tuple[Clinfuse, OrthancServer]) -> None:
    _, orthanc = pacs
    from dicomweb_client.api import DICOMwebClient

    path = Path(get_testdata_file("JPEG2000.dcm"))  # type: ignore[arg-type]
    client = DICOMwebClient(url=orthanc.dicomweb_url)
    client.store_instances([pydicom.dcmread(path)])
    uid = str(pydicom.dcmread(path).SOPInstanceUID)
    assert np.array_equal(orthanc_pixels(orthanc, uid), pixels(path))


def test_c_find_then_c_move_into_clinfuse(pacs: tuple[Clinfuse, OrthancServer]) -> None:
    clinfuse, orthanc = pacs
    files = sources()
    upload_to_orthanc(orthanc, files)
    patient_id = str(pydicom.dcmread(files[-1]).PatientID)
    peer = Peer("127.0.0.1", orthanc.dicom_port, orthanc.ae_title)
    studies = find_studies(peer, patient_id, calling_aet="TESTSCU")
    assert str(pydicom.dcmread(files[-1]).StudyInstanceUID) in studies
    for study in studies:
        assert move_study(peer, study, SCP_AET, calling_aet="TESTSCU") >= 1
    assert_same_pixels_in_clinfuse(clinfuse, [files[-1]])


def test_c_get_into_clinfuse(pacs: tuple[Clinfuse, OrthancServer], tmp_path: Path) -> None:
    _, orthanc = pacs
    files = sources()[:1]
    upload_to_orthanc(orthanc, files)
    store = empty_store(tmp_path)
    study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    results = get_study(Peer("127.0.0.1", orthanc.dicom_port, orthanc.ae_title), study, store,
                        calling_aet="TESTSCU")
    assert results and all(r.ok for r in results)
    assert_same_pixels(store, files)


def test_wado_from_orthanc_into_clinfuse(pacs: tuple[Clinfuse, OrthancServer],
                                         tmp_path: Path) -> None:
    _, orthanc = pacs
    files = sources()[:4]
    upload_to_orthanc(orthanc, files)
    store = empty_store(tmp_path)
    patient_id = str(pydicom.dcmread(files[0]).PatientID)
    results = fetch_dicomweb(orthanc.dicomweb_url, patient_id, store)
    assert len(results) >= 4 and all(r.ok for r in results)
    assert_same_pixels(store, files)


def test_unknown_calling_ae_is_rejected(pacs: tuple[Clinfuse, OrthancServer]) -> None:
    clinfuse, _ = pacs
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", clinfuse.dicom_port, ae_title=SCP_AET)
    assert assoc.is_rejected
    with pytest.raises(DimseError, match="rejected"):
        send_instances(Peer("127.0.0.1", clinfuse.dicom_port, SCP_AET),
                       [sources()[0].read_bytes()], calling_aet="INTRUDER")


def test_c_store_of_truncated_instance_fails_and_store_is_intact(
        pacs: tuple[Clinfuse, OrthancServer]) -> None:
    clinfuse, _ = pacs
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.PixelData = ds.PixelData[:-4000]  # shorter than Rows x Columns x BitsAllocated
    buffer = io.BytesIO()
    ds.save_as(buffer)
    before = len(clinfuse.store.find())
    statuses = send_instances(Peer("127.0.0.1", clinfuse.dicom_port, SCP_AET),
                              [buffer.getvalue()], calling_aet="TESTSCU")
    assert statuses == [0xC000]
    assert len(clinfuse.store.find()) == before


def test_association_dropped_mid_transfer(pacs: tuple[Clinfuse, OrthancServer]) -> None:
    clinfuse, _ = pacs
    before = len(clinfuse.store.find())
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2")
    assoc = ae.associate("127.0.0.1", clinfuse.dicom_port, ae_title=SCP_AET)
    assert assoc.is_established
    raw: socket.socket = assoc.dul.socket.socket
    # A P-DATA-TF PDU that announces 64 kB and delivers 100 bytes, then the peer vanishes.
    raw.sendall(struct.pack(">BBI", 0x04, 0x00, 65536) + b"\x00" * 100)
    raw.shutdown(socket.SHUT_RDWR)
    raw.close()
    time.sleep(0.5)
    assert len(clinfuse.store.find()) == before
    echo_ae = AE(ae_title="TESTSCU")
    echo_ae.add_requested_context(Verification)
    again = echo_ae.associate("127.0.0.1", clinfuse.dicom_port, ae_title=SCP_AET)
    assert again.is_established and again.send_c_echo().Status == 0
    again.release()
