"""An admin switches the served model and rolls it back; a bad artifact changes nothing."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from services.app import create_app
from services.auth.principal import Role
from services.core.config import Settings
from tests.service_model import SynthModel
from tests.services.service_support import bearer


@pytest.fixture
def client(db_engine: Engine, service_model: SynthModel, tmp_path: Path
           ) -> Iterator[TestClient]:
    settings = Settings(database_url=db_engine.url.render_as_string(hide_password=False),
                        data_dir=tmp_path / "data", model_path=service_model.model,
                        model_trusted_keys=[service_model.key],
                        cache_dir=service_model.root / "service-cache")
    app = create_app(settings)
    with TestClient(app, headers=bearer(app, Role.admin)) as test_client:
        yield test_client


def test_switch_rollback_and_refusal(client: TestClient, service_model: SynthModel,
                                     tmp_path: Path) -> None:
    start = client.get("/admin/models").json()
    assert start["serving"]["model_version"]
    assert start["history"] == []

    second = tmp_path / "model-copy"
    shutil.copytree(service_model.model, second)
    switched = client.post("/admin/models/activate",
                           json={"path": str(second), "reason": "site validation done"})
    assert switched.status_code == 200, switched.text
    assert switched.json()["model_path"] == str(second)
    served = client.app.state.predictions  # type: ignore[attr-defined]
    assert served.model.artifact.path == second

    # A tampered artifact is refused and the current model keeps serving.
    tampered = tmp_path / "model-tampered"
    shutil.copytree(service_model.model, tampered)
    weights = next(tampered.rglob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    refused = client.post("/admin/models/activate", json={"path": str(tampered)})
    assert refused.status_code == 422
    assert "not switched" in refused.json()["detail"]
    assert client.app.state.predictions is served  # type: ignore[attr-defined]

    rolled = client.post("/admin/models/rollback", json={"reason": "drift"})
    assert rolled.status_code == 200, rolled.text
    assert rolled.json()["action"] == "rollback"
    assert rolled.json()["model_path"] == str(service_model.model)
    history = client.get("/admin/models").json()["history"]
    assert [h["action"] for h in history] == ["rollback", "switch"]
    assert history[1]["activated_by"] == "test-admin"


def test_rollback_without_history_is_409(client: TestClient) -> None:
    assert client.post("/admin/models/rollback", json={}).status_code == 409


def test_the_switch_survives_a_restart(db_engine: Engine, service_model: SynthModel,
                                       tmp_path: Path) -> None:
    second = tmp_path / "model-copy"
    shutil.copytree(service_model.model, second)
    settings = Settings(database_url=db_engine.url.render_as_string(hide_password=False),
                        data_dir=tmp_path / "data", model_path=service_model.model,
                        model_trusted_keys=[service_model.key],
                        cache_dir=service_model.root / "service-cache")
    app = create_app(settings)
    with TestClient(app, headers=bearer(app, Role.admin)) as c:
        assert c.post("/admin/models/activate", json={"path": str(second)}).status_code == 200
    again = create_app(settings)
    with TestClient(again):
        assert again.state.predictions.model.artifact.path == second
