"""Issue 19, finding 6: scopes are enforced, not only roles.

A token's role says who the caller is; its SMART scopes say what this token may do.
A client granted ``system/*.read`` must not write, a granular token only reaches its
resource types, and a ``patient/`` token only its launch patient.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fhir_adapters import hl7v2_to_fhir
from services.api.routes.hl7 import WRITES
from services.auth.principal import Role
from services.db import session_scope
from services.tables import PredictionRow
from tests.security.scope_support import (
    FHIR,
    app_of,
    bundle,
    challenge,
    counts,
    scope_client,
    store,
    token,
)

ING, CLIN = Role.integration, Role.clinician


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with scope_client(tmp_path_factory.mktemp("scopes")) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def patients(client: TestClient) -> tuple[str, str]:
    return store(client, "MRN-SCOPE-A"), store(client, "MRN-SCOPE-B")


def _refused(response: object, *names: str) -> None:
    status = getattr(response, "status_code", None)
    text = getattr(response, "text", "")
    assert status == 403, text
    assert 'error="insufficient_scope"' in challenge(response)
    for name in names:
        assert name in text, f"the refusal should name {name!r}: {text}"


def test_a_read_scope_cannot_write(client: TestClient) -> None:
    before = counts(client)
    answer = client.post("/fhir", json=bundle("MRN-READ-ONLY"),
                         headers={**FHIR, **token(client, ING, "system/*.read")})
    # Refused before the body is even read: the token cannot create or update anything.
    _refused(answer, "<Type>.cu")
    assert counts(client) == before, "a refused write stored something"
    # v1 write (= cud) is enough for an upsert of any type.
    ok = client.post("/fhir", json=bundle("MRN-READ-ONLY"),
                     headers={**FHIR, **token(client, ING, "system/*.write")})
    assert ok.status_code == 200, ok.text


def test_write_scopes_are_per_resource_type(client: TestClient) -> None:
    before = counts(client)
    only_patients = token(client, ING, "system/Patient.cu")
    answer = client.post("/fhir", json=bundle("MRN-GRANULAR"),
                         headers={**FHIR, **only_patients})
    _refused(answer, "Observation.c", "Observation.u")
    assert counts(client) == before
    both = token(client, ING, "system/Patient.cu system/Observation.cu")
    assert client.post("/fhir", json=bundle("MRN-GRANULAR"),
                       headers={**FHIR, **both}).status_code == 200


def test_no_scope_or_unusable_scopes_are_403(client: TestClient,
                                             patients: tuple[str, str]) -> None:
    a, _ = patients
    for scope in ("", "openid fhirUser", "user/Patient.sr",  # v2 letters out of order
                  "user/Patient.rs?identifier=x",  # a restriction clinfuse cannot honour
                  "user/Observation.rs", "system/Patient.c"):
        _refused(client.get(f"/fhir/Patient/{a}", headers=token(client, CLIN, scope)),
                 "Patient.r")
    for scope in ("user/Patient.read", "user/Patient.rs", "user/*.r", "system/*.*"):
        answer = client.get(f"/fhir/Patient/{a}", headers=token(client, CLIN, scope))
        assert answer.status_code == 200, (scope, answer.text)


def test_imaging_reads_need_imaging_scopes(client: TestClient) -> None:
    _refused(client.get("/dicomweb/studies", headers=token(client, CLIN, "user/Patient.rs")),
             "ImagingStudy.s")
    assert client.get("/dicomweb/studies", headers=token(
        client, CLIN, "user/ImagingStudy.s")).status_code == 200


def test_audits_and_admin_need_clinfuse_scopes(client: TestClient) -> None:
    comp = Role.compliance
    _refused(client.get("/audits", headers=token(client, comp, "system/*.cruds")),
             "clinfuse/audit")
    assert client.get("/audits", headers=token(client, comp, "clinfuse/audit")
                      ).status_code == 200
    _refused(client.get("/access-log", headers=token(client, comp, "clinfuse/audit")),
             "clinfuse/access-log")
    _refused(client.get("/admin/models", headers=token(client, Role.admin, "user/*.cruds")),
             "clinfuse/admin")


def test_patient_scopes_reach_only_the_launch_patient(client: TestClient,
                                                      patients: tuple[str, str]) -> None:
    a, b = patients
    launched = token(client, CLIN, "patient/*.rs patient/RiskAssessment.c", patient=a)
    assert client.get(f"/fhir/Patient/{a}", headers=launched).status_code == 200
    _refused(client.get(f"/fhir/Patient/{b}", headers=launched))
    assert client.get("/fhir/RiskAssessment", params={"subject": f"Patient/{a}"},
                      headers=launched).status_code == 200
    _refused(client.get("/fhir/RiskAssessment", params={"subject": f"Patient/{b}"},
                        headers=launched))
    # $predict for the launch patient reaches the model (none here: 503); another: 403.
    assert client.post(f"/fhir/Patient/{a}/$predict", headers=launched).status_code == 503
    _refused(client.post(f"/fhir/Patient/{b}/$predict", headers=launched))
    # A route over many patients is not for a patient/ token.
    _refused(client.get("/dicomweb/studies", headers=token(
        client, CLIN, "patient/*.rs", patient=a)), "ImagingStudy.s")
    # patient/ scopes without a launch patient grant nothing.
    _refused(client.get(f"/fhir/Patient/{a}", headers=token(client, CLIN, "patient/*.rs")))
    # The refusal names no patient.
    refusal = client.get(f"/fhir/Patient/{b}", headers=launched).text
    assert a not in refusal and b not in refusal


def test_a_prediction_is_read_only_for_its_patients_launch(client: TestClient,
                                                           patients: tuple[str, str]) -> None:
    a, b = patients
    with session_scope(app_of(client).state.sessions) as session:
        row = PredictionRow(patient_id=b, index_time=datetime(2026, 1, 3, tzinfo=UTC),
                            model_name="m", model_version="1", probability=0.2,
                            modalities="ehr", source="fhir")
        session.add(row)
        session.flush()
        prediction = row.id
    url = f"/predictions/{prediction}"
    assert client.get(url, headers=token(client, CLIN, "patient/*.rs", patient=b)
                      ).status_code == 200
    _refused(client.get(url, headers=token(client, CLIN, "patient/*.rs", patient=a)))
    assert client.get(url, headers=token(client, CLIN, "user/RiskAssessment.r")
                      ).status_code == 200


def test_the_hl7_scopes_cover_every_type_hl7_writes() -> None:
    """POST /hl7v2 declares the types fhir_adapters.hl7v2_to_fhir produces."""
    source = Path(hl7v2_to_fhir.__file__).read_text()
    produced = set(re.findall(r'"resourceType": "([A-Za-z]+)"', source))
    assert produced and produced <= {t for t, _ in WRITES.resources}, produced
