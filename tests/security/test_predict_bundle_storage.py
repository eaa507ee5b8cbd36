"""Issue 19, finding 5: a read role does not write through ``POST /fhir/$predict``.

Before, a clinician's Bundle was ingested and committed before the prediction ran.
Now only a writing role (integration, admin) with write scopes stores it; a
clinician's Bundle is scored in memory and the database is left as it was.

The model is a stub: what is tested is what gets stored, not the score.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fhir_adapters.record import PatientRecord
from services.auth.principal import Role
from services.prediction import Prediction, PredictionError
from tests.security.scope_support import FHIR, app_of, bundle, counts, scope_client, token


class StubScorer:
    """Stands in for PredictionService: scores any record 0.25, stores nothing itself."""

    def __init__(self, artifacts_dir: Path) -> None:
        self.artifacts_dir = artifacts_dir
        self.scored: list[PatientRecord] = []

    def clock(self) -> datetime:
        return datetime(2026, 1, 3, tzinfo=UTC)

    def evaluate(self, record: PatientRecord, index_time: datetime, imaging: Any, *,
                 patient_id: str, prediction_id: str | None = None) -> Prediction:
        self.scored.append(record)
        pid = prediction_id or "0" * 32
        (self.artifacts_dir / pid).mkdir(parents=True, exist_ok=True)
        risk = {"resourceType": "RiskAssessment", "id": pid, "status": "preliminary",
                "subject": {"reference": f"Patient/{patient_id}"},
                "prediction": [{"probabilityDecimal": 0.25}]}
        return Prediction(pid, patient_id, index_time, 0.25, None, {}, "ehr",
                          {"probability": 0.25}, risk, {})

    def predict_patient(self, *args: Any, **kwargs: Any) -> Any:
        raise PredictionError("the stub scores posted Bundles only")


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("predict-bundle")
    with scope_client(root) as test_client:
        app_of(test_client).state.predictions = StubScorer(root / "artifacts")
        yield test_client


def _stub(client: TestClient) -> StubScorer:
    stub: StubScorer = app_of(client).state.predictions
    return stub


def test_a_clinicians_bundle_is_scored_and_not_stored(client: TestClient) -> None:
    before = counts(client)
    clinician = token(client, Role.clinician, "user/*.rs user/RiskAssessment.c")
    answer = client.post("/fhir/$predict", json=bundle("MRN-WHAT-IF"),
                         headers={**FHIR, **clinician})
    assert counts(client) == before, "a clinician's $predict stored data"
    assert answer.status_code == 200, answer.text
    params = {p["name"]: p for p in answer.json()["parameter"]}
    assert params["stored"]["valueBoolean"] is False
    assert "prediction" not in params  # no id: nothing to fetch later
    assert params["riskAssessment"]["resource"]["prediction"][0]["probabilityDecimal"] == 0.25
    scored = _stub(client).scored[-1]
    assert scored.key is not None and scored.key.value == "MRN-WHAT-IF"
    # Nothing of the unsaved prediction is left on disk either.
    assert not any(_stub(client).artifacts_dir.iterdir())


def test_storing_needs_write_scopes_for_the_bundles_types(client: TestClient) -> None:
    before = counts(client)
    reader = token(client, Role.integration, "system/*.rs")
    answer = client.post("/fhir/$predict", json=bundle("MRN-ENGINE"),
                         headers={**FHIR, **reader})
    assert counts(client) == before, "a read scope stored data"
    assert answer.status_code == 403, answer.text
    assert "Patient.c" in answer.text and "RiskAssessment.c" in answer.text
    writer = token(client, Role.integration, "system/*.crus")
    client.post("/fhir/$predict", json=bundle("MRN-ENGINE"), headers={**FHIR, **writer})
    patients, resources, _ = counts(client)
    assert (patients, resources) == (before[0] + 1, before[1] + 2), \
        "the integration role's Bundle is stored"


def test_a_launch_token_cannot_predict_from_a_bundle(client: TestClient) -> None:
    launched = token(client, Role.clinician, "patient/*.rs", patient="0" * 32)
    answer = client.post("/fhir/$predict", json=bundle("MRN-LAUNCH"),
                         headers={**FHIR, **launched})
    assert answer.status_code == 403, answer.text
