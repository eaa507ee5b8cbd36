"""Decompression bombs in DICOM (issue 19, finding 8 and "beyond the list").

A Deflated Explicit VR Little Endian instance is a few KiB on the wire and inflates
about 1000:1; a JPEG 2000 instance may declare Rows x Columns x frames far beyond what
its codestream holds. Each is refused with a located reason before it is inflated past
the cap or decoded: STOW-RS lists it in the FailedSOPSequence, C-STORE answers a failure
status, a read of an instance stored before the caps existed is refused, and the model's
imaging pipeline refuses to decode it.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from pynetdicom import AE

from pipelines.imaging.decode import decode_pixels
from pipelines.imaging.dicom_limits import DicomLimitError, DicomLimits, read_part10
from pipelines.imaging.discovery import read_dicom
from pipelines.imaging.volume import ImageError
from services.app import create_app
from services.auth.principal import Role
from services.core.config import Settings
from services.db import make_engine, migrate, session_factory
from services.dicom_store import FAILURE_OUT_OF_RESOURCES, DicomStore
from services.dicomweb import build_multipart
from services.dimse import StoreSCP
from tests.security.dicom_bombs import MiB, deflate_bomb, j2k_instance
from tests.services.service_support import bearer

#: Small caps keep the tests fast; the bombs exceed them four times over.
SMALL = DicomLimits(max_dataset_bytes=8 * MiB, max_pixel_bytes=64 * MiB)
#: Caps the bombs fit under, the inflation ratio off: an instance an older version stored.
ROOMY = DicomLimits(max_dataset_bytes=64 * MiB, max_pixel_bytes=64 * MiB,
                    max_inflation_ratio=0)


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return deflate_bomb(32 * MiB)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                        data_dir=tmp_path / "data",
                        dicom_max_dataset_bytes=SMALL.max_dataset_bytes,
                        dicom_max_pixel_bytes=SMALL.max_pixel_bytes)
    app = create_app(settings)
    with TestClient(app, headers=bearer(app, Role.integration)) as test_client:
        yield test_client


def _stow(client: TestClient, *payloads: bytes):  # type: ignore[no-untyped-def]
    content_type, chunks = build_multipart(payloads)
    return client.post("/dicomweb/studies", content=b"".join(chunks),
                       headers={"Content-Type": content_type})


def _failures(response) -> list[tuple[int, str]]:  # type: ignore[no-untyped-def]
    items = response.json().get("00081198", {}).get("Value", [])
    return [(f["00081197"]["Value"][0], f["00000902"]["Value"][0]) for f in items]


def test_the_bomb_is_small_on_the_wire(bomb: bytes) -> None:
    assert len(bomb) < 64 * 1024  # 32 MiB of pixels inflate from about 33 KiB


def test_stow_refuses_a_deflate_bomb_with_a_located_reason(client: TestClient,
                                                           bomb: bytes) -> None:
    response = _stow(client, bomb)
    assert response.status_code == 409, response.text
    [(code, reason)] = _failures(response)
    assert code == FAILURE_OUT_OF_RESOURCES
    assert reason.startswith("part 1: ") and "inflates to more than 8 MiB" in reason
    assert client.get("/dicomweb/instances").json() == []


def test_cstore_refuses_a_deflate_bomb_with_a_failure_status(tmp_path: Path,
                                                             bomb: bytes) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine)
    store = DicomStore(tmp_path / "dicom", session_factory(engine), limits=SMALL)
    scp = StoreSCP(store, port=0, allowed_calling_aets=["BOMBER"])
    scp.start()
    try:
        ds = pydicom.dcmread(io.BytesIO(bomb))  # the sender inflates; that is its problem
        ae = AE(ae_title="BOMBER")
        ae.add_requested_context(str(ds.SOPClassUID), [str(ds.file_meta.TransferSyntaxUID)])
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="CLINFUSE")
        assert assoc.is_established
        try:
            status = assoc.send_c_store(ds)
        finally:
            assoc.release()
        assert int(status.Status) == FAILURE_OUT_OF_RESOURCES
        assert store.find() == []
    finally:
        scp.stop()
        engine.dispose()


def test_an_instance_stored_before_the_caps_is_not_inflated_on_read(
        client: TestClient, bomb: bytes, tmp_path: Path) -> None:
    # Stored through a store without the small caps, as an older version would have.
    app_store: DicomStore = client.app.state.dicom_store  # type: ignore[attr-defined]
    roomy = DicomStore(app_store.root, app_store.sessions, limits=ROOMY)
    assert roomy.store(bomb).ok
    ds = pydicom.dcmread(io.BytesIO(bomb), stop_before_pixels=True)
    url = (f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
           f"/instances/{ds.SOPInstanceUID}/metadata")
    response = client.get(url)
    assert response.status_code == 422
    assert "inflates to more than 8 MiB" in response.json()["detail"]
    assert ds.SOPInstanceUID not in response.text


def test_bounded_reader_stops_at_the_cap(bomb: bytes) -> None:
    with pytest.raises(DicomLimitError, match="inflates to more than 8 MiB"):
        read_part10(bomb, limits=SMALL, stop_before_pixels=True)
    # Under a roomier cap the same bytes read, and the pixel data are all there.
    ds = read_part10(bomb, limits=ROOMY)
    assert len(ds.PixelData) >= 32 * MiB
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1.99"


def test_the_default_caps_refuse_a_bomb_by_its_inflation_ratio(bomb: bytes) -> None:
    # 32 MiB is far below the 512 MiB dataset cap, but 1000 times the bomb's size: it is
    # refused once it passes the 16 MiB every instance may inflate to.
    assert DicomLimits().max_dataset_bytes > 32 * MiB
    with pytest.raises(DicomLimitError, match=r"more than 16 MiB \(100 times its deflated"):
        read_part10(bomb, stop_before_pixels=True)


def test_stow_refuses_jpeg2000_with_huge_declared_dimensions(client: TestClient) -> None:
    # 424 bytes of codestream a frame; the header claims 60000 x 60000 x 10 frames (67 GiB).
    huge = j2k_instance(rows=60000, cols=60000, frames=10)
    assert len(huge) < 16 * 1024
    response = _stow(client, huge)
    assert response.status_code == 409, response.text
    [(code, reason)] = _failures(response)
    assert code == FAILURE_OUT_OF_RESOURCES
    assert "decoded pixel data" in reason and "64 MiB" in reason


def test_stow_refuses_a_codestream_larger_than_its_header(client: TestClient) -> None:
    liar = j2k_instance(codestream_size=(50000, 50000))  # Rows x Columns stay 64 x 64
    response = _stow(client, liar)
    assert response.status_code == 409, response.text
    [(code, reason)] = _failures(response)
    assert code == FAILURE_OUT_OF_RESOURCES
    assert "50000 x 50000" in reason and "64 x 64" in reason


def test_an_honest_jpeg2000_instance_is_stored(client: TestClient) -> None:
    assert _stow(client, j2k_instance()).status_code == 200


def test_pipeline_refuses_to_decode_huge_declared_dimensions() -> None:
    ds = pydicom.dcmread(io.BytesIO(j2k_instance(rows=60000, cols=60000, frames=10)))
    with pytest.raises(ImageError, match="decoded pixel data"):
        decode_pixels(ds, "huge.dcm", limits=SMALL)


def test_pipeline_refuses_a_deflate_bomb_file(tmp_path: Path, bomb: bytes) -> None:
    path = tmp_path / "bomb.dcm"
    path.write_bytes(bomb)
    with pytest.raises(ImageError, match="inflates to more than 8 MiB"):
        read_dicom(path, limits=SMALL)
