"""Imaging reads are logged per patient (issue 19, finding 9).

A QIDO-RS search that returns two patients' studies appends one access-log entry per
patient; a WADO-RS retrieve or metadata read names its patient. A patient stored in
clinfuse is named by its opaque id; one known only from the images by a keyed label.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import select

from services.access_log import pseudonym_secret
from services.app import create_app
from services.auth.principal import Role
from services.core.config import Settings
from services.dicomweb import build_multipart
from services.imaging_access import imaging_patient_label
from services.tables import AccessLogRow, PatientRow
from tests.services.service_support import bearer

CT = Path(str(get_testdata_file("CT_small.dcm")))
ISSUER = "urn:oid:1.2.3.4"
DOCTOR = "dr-imaging"


def _instance(patient_id: str) -> tuple[bytes, str]:
    ds = pydicom.dcmread(CT)
    ds.PatientID, ds.IssuerOfPatientID = patient_id, ISSUER
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue(), str(ds.StudyInstanceUID)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    """Two patients' studies stored; MRN-A is a stored patient, MRN-B only in the images."""
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                        data_dir=tmp_path / "data")
    app = create_app(settings)
    with TestClient(app, headers=bearer(app, Role.clinician, DOCTOR)) as client:
        with app.state.sessions.begin() as session:
            patient = PatientRow(identifier_system=ISSUER, identifier_value="MRN-A",
                                 record={})
            session.add(patient)
            session.flush()
            opaque_a = patient.id
        (a, study_a), (b, study_b) = _instance("MRN-A"), _instance("MRN-B")
        content_type, chunks = build_multipart([a, b])
        stored = client.post("/dicomweb/studies", content=b"".join(chunks),
                             headers={"Content-Type": content_type,
                                      **bearer(app, Role.integration)})
        assert stored.status_code == 200, stored.text
        label_b = imaging_patient_label(ISSUER, "MRN-B", pseudonym_secret(settings))
        yield client, {"A": opaque_a, "B": label_b, "study A": study_a, "study B": study_b}


def _logged(client: TestClient, resource: str) -> list[str | None]:
    sessions = client.app.state.sessions  # type: ignore[attr-defined]
    with sessions() as session:
        return list(session.scalars(
            select(AccessLogRow.patient_id).where(AccessLogRow.subject == DOCTOR,
                                                  AccessLogRow.resource == resource)
            .order_by(AccessLogRow.seq)))


def test_a_search_across_two_patients_logs_both(
        setup: tuple[TestClient, dict[str, str]]) -> None:
    client, ids = setup
    assert len(client.get("/dicomweb/studies").json()) == 2
    assert sorted(_logged(client, "GET /dicomweb/studies")) == sorted([ids["A"], ids["B"]])
    # A page of the answer logs the patients on that page only.
    assert len(client.get("/dicomweb/instances", params={"limit": 1}).json()) == 1
    assert len(_logged(client, "GET /dicomweb/instances")) == 1


def test_a_search_with_no_match_logs_one_entry_without_a_patient(
        setup: tuple[TestClient, dict[str, str]]) -> None:
    client, _ = setup
    assert client.get("/dicomweb/studies", params={"PatientID": "nobody"}).json() == []
    assert _logged(client, "GET /dicomweb/studies") == [None]


def test_a_retrieve_names_its_patient(setup: tuple[TestClient, dict[str, str]]) -> None:
    client, ids = setup
    assert client.get(f"/dicomweb/studies/{ids['study A']}").status_code == 200
    assert _logged(client, "GET /dicomweb/studies/{study}") == [ids["A"]]
    assert client.get(f"/dicomweb/studies/{ids['study B']}/metadata").status_code == 200
    assert _logged(client, "GET /dicomweb/studies/{study}/metadata") == [ids["B"]]


def test_the_label_of_an_unstored_patient_carries_no_identifier(
        setup: tuple[TestClient, dict[str, str]]) -> None:
    _, ids = setup
    assert ids["B"].startswith("dicom-") and len(ids["B"]) == 32
    assert "MRN" not in ids["B"]
