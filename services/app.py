"""The FastAPI application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.api.routes import dicomweb
from services.core.config import Settings, get_settings
from services.db import make_engine, migrate, session_factory
from services.dicom_store import DicomStore


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; the database is migrated and the stores opened at start-up."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.database_url)
        migrate(engine)
        app.state.engine = engine
        app.state.sessions = session_factory(engine)
        app.state.dicom_store = DicomStore(settings.dicom_storage_dir, app.state.sessions)
        yield
        engine.dispose()

    app = FastAPI(title="clinfuse", version="0.1.0", lifespan=lifespan,
                  description="Clinical multimodal decision support. Not validated for "
                              "clinical use.")
    app.state.settings = settings
    app.include_router(dicomweb.router)
    return app
