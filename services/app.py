"""The FastAPI application factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.api.routes import dicomweb
from services.core.config import Settings, get_settings
from services.db import make_engine, migrate, session_factory
from services.dicom_store import DicomStore
from services.dimse import StoreSCP

log = logging.getLogger(__name__)


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
        scp = None
        if settings.dicom_scp_enabled:
            scp = StoreSCP(app.state.dicom_store, ae_title=settings.dicom_ae_title,
                           host=settings.host, port=settings.dicom_port,
                           allowed_calling_aets=settings.dicom_allowed_aets)
            scp.start()
            log.info("C-STORE SCP %s listening on %s:%d", settings.dicom_ae_title,
                     settings.host, scp.port)
        yield
        if scp is not None:
            scp.stop()
        engine.dispose()

    app = FastAPI(title="clinfuse", version="0.1.0", lifespan=lifespan,
                  description="Clinical multimodal decision support. Not validated for "
                              "clinical use.")
    app.state.settings = settings
    app.include_router(dicomweb.router)
    return app
