"""Shared fixtures: databases on both backends."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from services.db import make_engine, migrate
from tests.service_model import SynthModel, build_synth_model

IN_CI = os.environ.get("CI") == "true"
# The suite builds hundreds of apps in one process: a frozen heap would keep them all.
os.environ.setdefault("CLINFUSE_GC_FREEZE_AFTER_WARM_UP", "false")
# Starlette's TestClient sends "Host: testserver", which no deployment answers to.
os.environ.setdefault("CLINFUSE_ALLOWED_HOSTS", '["testserver"]')


def require_service(name: str, reason: str) -> None:
    """Skip when a real service is missing; under CI=true that is a failure."""
    message = f"{name} unavailable: {reason}"
    if IN_CI:
        pytest.fail(message + " (CI=true: a missing service fails)")
    pytest.skip(message)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Engine]:
    """A migrated, empty database on each backend."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("db") / "clinfuse.db"
        engine = make_engine(f"sqlite:///{path}")
        migrate(engine)
        yield engine
        engine.dispose()
        return
    base_url = os.environ.get("CLINFUSE_TEST_DATABASE_URL")
    if not base_url:
        require_service("PostgreSQL", "CLINFUSE_TEST_DATABASE_URL is not set "
                        "(run the suite with `make test`, which starts a throwaway cluster)")
        return
    name = f"clinfuse_test_{uuid.uuid4().hex[:12]}"
    admin: Engine = create_engine(base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine = make_engine(make_url(base_url).set(database=name).render_as_string(False))
    migrate(engine)
    yield engine
    engine.dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def service_model(tmp_path_factory: pytest.TempPathFactory) -> SynthModel:
    """The small synth cohort and the model trained on it, built once per test session."""
    return build_synth_model(tmp_path_factory.mktemp("service-model"))
