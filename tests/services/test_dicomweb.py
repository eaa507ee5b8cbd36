"""DICOMweb on a minimal app: STOW-RS, QIDO-RS, WADO-RS and their bad input."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file

from services.app import create_app
from services.auth.principal import Role
from services.core.config import Settings
from services.dicomweb import build_multipart, split_multipart
from tests.services.service_support import bearer

CT = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
MR_RLE = Path(get_testdata_file("MR_small_RLE.dcm"))  # type: ignore[arg-type]


def multipart(*payloads: bytes) -> tuple[dict[str, str], bytes]:
    content_type, chunks = build_multipart(payloads)
    return {"Content-Type": content_type}, b"".join(chunks)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                        data_dir=tmp_path / "data", max_upload_bytes=200_000)
    app = create_app(settings)
    with TestClient(app, headers=bearer(app, Role.integration)) as test_client:
        yield test_client


def stow(client: TestClient, *payloads: bytes, url: str = "/dicomweb/studies"):  # type: ignore[no-untyped-def]
    headers, body = multipart(*payloads)
    return client.post(url, content=body, headers=headers)


def test_stow_then_qido_then_wado_round_trip(client: TestClient) -> None:
    response = stow(client, CT.read_bytes(), MR_RLE.read_bytes())
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    referenced = response.json()["00081199"]["Value"]
    assert len(referenced) == 2 and "00081198" not in response.json()
    ct = pydicom.dcmread(CT)

    studies = client.get("/dicomweb/studies", params={"PatientID": ct.PatientID}).json()
    assert [s["0020000D"]["Value"][0] for s in studies] == [ct.StudyInstanceUID]
    assert studies[0]["00201208"]["Value"] == [1]
    assert client.get("/dicomweb/studies", params={"Modality": "MR"}).json()[0][
        "00080061"]["Value"] == ["MR"]
    assert client.get("/dicomweb/studies", params={"StudyDate": "19000101-19000102"}).json() == []
    since = client.get("/dicomweb/studies", params={"StudyDate": f"{ct.StudyDate}-"}).json()
    assert len(since) == 2  # CT_small 20040119, MR_small 20040826
    on_day = client.get("/dicomweb/studies", params={"StudyDate": ct.StudyDate}).json()
    assert [s["0020000D"]["Value"][0] for s in on_day] == [ct.StudyInstanceUID]

    url = (f"/dicomweb/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}"
           f"/instances/{ct.SOPInstanceUID}")
    wado = client.get(url)
    assert wado.status_code == 200
    parts = split_multipart(wado.content, wado.headers["content-type"].split("boundary=")[1])
    back = pydicom.dcmread(io.BytesIO(parts[0].body))
    assert np.array_equal(back.pixel_array, ct.pixel_array)

    metadata = client.get(url + "/metadata").json()[0]
    assert metadata["00080018"]["Value"] == [ct.SOPInstanceUID]
    assert "BulkDataURI" in metadata["7FE00010"]


def test_same_instance_twice_is_kept_once(client: TestClient) -> None:
    assert stow(client, CT.read_bytes()).status_code == 200
    again = stow(client, CT.read_bytes())
    assert again.status_code == 200
    assert len(client.get("/dicomweb/instances").json()) == 1


def test_same_uid_other_bytes_keeps_first_and_warns(client: TestClient) -> None:
    original = CT.read_bytes()
    stow(client, original)
    ds = pydicom.dcmread(CT)
    ds.PatientName = "Other^Bytes"
    buffer = io.BytesIO()
    ds.save_as(buffer)
    response = stow(client, buffer.getvalue())
    assert response.status_code == 202
    item = response.json()["00081199"]["Value"][0]
    assert item["00081196"]["Value"] == [0xB000]
    url = (f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
           f"/instances/{ds.SOPInstanceUID}")
    wado = client.get(url)
    parts = split_multipart(wado.content, wado.headers["content-type"].split("boundary=")[1])
    assert parts[0].body == original


def test_truncated_and_non_dicom_parts_fail_per_instance(client: TestClient) -> None:
    data = CT.read_bytes()
    response = stow(client, data, data[:-2000], b"this is not DICOM at all")
    assert response.status_code == 202
    failed = response.json()["00081198"]["Value"]
    assert [f["00081197"]["Value"][0] for f in failed] == [0xC000, 0xC000]
    comments = [f["00000902"]["Value"][0] for f in failed]
    assert "truncated PixelData" in comments[0] and "part 2" in comments[0]
    assert "not a DICOM Part-10 file" in comments[1] and "part 3" in comments[1]
    assert len(client.get("/dicomweb/instances").json()) == 1


def test_all_failed_is_409(client: TestClient) -> None:
    assert stow(client, b"junk").status_code == 409


def test_malformed_multipart_is_400(client: TestClient) -> None:
    headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=abc'}
    response = client.post("/dicomweb/studies", content=b"--abc\r\nContent-Type: "
                           b"application/dicom\r\n\r\nDICM...", headers=headers)
    assert response.status_code == 400
    assert "closing delimiter" in response.json()["detail"]
    no_boundary = client.post("/dicomweb/studies", content=b"x",
                              headers={"Content-Type": "multipart/related"})
    assert no_boundary.status_code == 400


def test_wrong_media_type_is_415(client: TestClient) -> None:
    response = client.post("/dicomweb/studies", content=CT.read_bytes(),
                           headers={"Content-Type": "application/dicom"})
    assert response.status_code == 415


def test_oversized_upload_is_413_and_nothing_is_stored(client: TestClient) -> None:
    big = CT.read_bytes() * 8  # > 200 kB limit
    response = stow(client, big)
    assert response.status_code == 413
    assert client.get("/dicomweb/instances").json() == []


def test_instance_for_another_study_is_refused(client: TestClient) -> None:
    response = stow(client, CT.read_bytes(), url="/dicomweb/studies/1.2.3.4")
    assert response.status_code == 409
    assert response.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]


def test_bad_query_is_400(client: TestClient) -> None:
    assert client.get("/dicomweb/studies", params={"StudyDate": "yesterday"}).status_code == 400
    assert client.get("/dicomweb/studies", params={"Bogus": "1"}).status_code == 400
    assert client.get("/dicomweb/studies/1.2.3").status_code == 404
