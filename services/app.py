"""The FastAPI application factory."""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services import model_registry
from services.access_log import AccessLog
from services.api.access import AccessLogMiddleware
from services.api.body_limit import BodyLimitMiddleware
from services.api.errors import install_error_handlers, install_openapi
from services.api.routes import access_log as access_log_routes
from services.api.routes import admin as admin_routes
from services.api.routes import audits as audit_routes
from services.api.routes import auth, dicomweb, fhir_ingest, health, hl7
from services.api.routes import cds_hooks as cds_hooks_routes
from services.api.routes import predict as predict_routes
from services.api.trusted_host import HostCheckMiddleware
from services.auth.tokens import (
    LocalIssuer,
    TokenVerifier,
    TrustedIssuer,
    jwks_from_file,
    jwks_from_url,
)
from services.core.config import Settings, get_settings
from services.dashboard import routes as dashboard_routes
from services.db import make_engine, migrate, session_factory, session_scope
from services.dicom_store import DicomStore
from services.dimse import StoreSCP
from services.jobs import JobWorker, register_builtin_handlers
from services.mllp import MllpServer, hl7_handler
from services.observability import Metrics, RequestContextMiddleware
from services.outbound import Outbound
from services.peer_access import check_listener_settings
from services.prediction import PredictionService

log = logging.getLogger(__name__)


def build_token_verifier(settings: Settings, local: LocalIssuer | None) -> TokenVerifier:
    """Trust the hospital's issuer (if configured) and the built-in one (if enabled)."""
    issuers: list[TrustedIssuer] = []
    if settings.auth_issuer:
        if settings.auth_jwks_url:
            jwks = jwks_from_url(settings.auth_jwks_url, outbound=Outbound.from_settings(settings))
            issuers.append(TrustedIssuer(settings.auth_issuer, jwks, refresh=jwks.refresh))
        elif settings.auth_jwks_file:
            issuers.append(TrustedIssuer(settings.auth_issuer,
                                         jwks_from_file(settings.auth_jwks_file)))
        else:
            raise ValueError("CLINFUSE_AUTH_ISSUER is set but neither CLINFUSE_AUTH_JWKS_URL "
                             "nor CLINFUSE_AUTH_JWKS_FILE says where its keys are")
    if local is not None:
        issuers.append(local.trusted())
    if not issuers:
        raise ValueError("no token issuer is trusted: set CLINFUSE_AUTH_ISSUER and its JWKS, "
                         "or enable the built-in issuer (CLINFUSE_AUTH_BUILTIN_ISSUER=true)")
    return TokenVerifier(issuers, audience=settings.auth_audience,
                         role_claim=settings.auth_role_claim)


def freeze_heap_after(warm_up: threading.Thread | None) -> None:
    """Once start-up and the model's warm-up are done, move the heap out of the collector.

    The libraries and the model leave about 800,000 objects, and on the 2-core
    reference VM a full collection over them paused every request for about half a
    second every few seconds under load. Frozen objects are never collected again;
    they live as long as the process anyway.
    """
    def freeze() -> None:
        if warm_up is not None:
            warm_up.join()
        gc.collect()
        gc.freeze()
        log.info("start-up heap frozen (%d objects)", gc.get_freeze_count())

    threading.Thread(target=freeze, name="clinfuse-gc-freeze", daemon=True).start()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; the database is migrated and the stores opened at start-up."""
    settings = settings or get_settings()
    # HL7 v2 and DICOM carry no credentials: refuse exposed listeners before anything starts.
    check_listener_settings(settings)
    local = (LocalIssuer(settings.keys_dir / "builtin-issuer-es384.pem",
                         settings.auth_builtin_issuer_id, settings.auth_audience)
             if settings.builtin_issuer_enabled else None)
    verifier = build_token_verifier(settings, local)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.database_url)
        migrate(engine)
        app.state.engine = engine
        app.state.sessions = session_factory(engine)
        app.state.dicom_store = DicomStore(settings.dicom_storage_dir, app.state.sessions,
                                           limits=settings.dicom_limits())
        app.state.access_log = AccessLog(
            app.state.sessions, settings.keys_dir / "access-log-ed25519.pem",
            checkpoint_every=settings.access_log_checkpoint_every,
            checkpoint_interval_s=settings.access_log_checkpoint_interval_s,
            checkpoint_file=settings.access_log_checkpoint_file)
        # The served model, verified now: a missing or corrupt artifact stops start-up.
        # An admin's switch or rollback (model_activations) outlives a restart.
        with session_scope(app.state.sessions) as session:
            served = model_registry.active_model_path(session, settings)
        app.state.predictions = PredictionService.from_settings(
            settings.model_copy(update={"model_path": served}), app.state.dicom_store)
        warm_up = None
        if app.state.predictions is not None:
            warm_up = app.state.predictions.start_warm_up()
        if settings.gc_freeze_after_warm_up:
            freeze_heap_after(warm_up)
        # Durable background jobs (embeddings, predictions after new data); jobs left
        # running by a killed process are picked up again once their lease expires.
        app.state.jobs = JobWorker(app.state.sessions, lease_s=settings.job_lease_s)
        register_builtin_handlers(app.state.jobs, app.state)
        app.state.jobs.start()
        scp = None
        if settings.dicom_scp_enabled:
            scp = StoreSCP(app.state.dicom_store, ae_title=settings.dicom_ae_title,
                           host=settings.host, port=settings.dicom_port,
                           allowed_calling_aets=settings.dicom_allowed_aets,
                           allowed_peers=settings.dicom_allowed_peers,
                           ssl_context=settings.tls_context() if settings.dicom_tls else None)
            scp.start()
            log.info("C-STORE SCP %s listening on %s:%d", settings.dicom_ae_title,
                     settings.host, scp.port)
        mllp = None
        if settings.mllp_enabled:
            # HL7 v2 over MLLP: the same ingest as POST /hl7v2, one transaction per frame.
            mllp = MllpServer(hl7_handler(app.state.sessions, after_commit=app.state.jobs.wake),
                              host=settings.host, port=settings.mllp_port,
                              max_frame_bytes=settings.mllp_max_frame_bytes,
                              max_connections=settings.mllp_max_connections,
                              idle_timeout_s=settings.mllp_idle_timeout_s,
                              allowed_peers=settings.mllp_allowed_peers,
                              ssl_context=settings.tls_context() if settings.mllp_tls else None)
            mllp.start()
            app.state.mllp = mllp
            log.info("MLLP listener on %s:%d", settings.host, mllp.port)
        yield
        if mllp is not None:
            mllp.stop()
        if scp is not None:
            scp.stop()
        app.state.jobs.stop()
        app.state.access_log.checkpoint()
        engine.dispose()

    app = FastAPI(title="clinfuse", version="0.1.0", lifespan=lifespan,
                  description="Clinical multimodal decision support. Not validated for "
                              "clinical use.")
    app.state.settings = settings
    app.state.local_issuer = local
    app.state.token_verifier = verifier
    install_error_handlers(app)
    install_openapi(app)
    # Every body capped and timed before routing and authentication (CLINFUSE_MAX_*_BYTES).
    # Innermost, so the routes' own reads raise its 413/408 directly: a BaseHTTPMiddleware
    # in between would wrap them in an ExceptionGroup, which FastAPI answers with a 400.
    app.add_middleware(BodyLimitMiddleware, settings=settings)
    app.add_middleware(AccessLogMiddleware)
    # Only the names this service is reached by (CLINFUSE_ALLOWED_HOSTS): URLs built from
    # the Host header, and DNS rebinding, cannot point elsewhere.
    app.add_middleware(HostCheckMiddleware, allowed_hosts=settings.trusted_hosts())
    # Added last, so it runs first: every response, errors included, gets an id and a timing.
    app.add_middleware(RequestContextMiddleware)
    app.state.metrics = Metrics(lambda: getattr(app.state, "sessions", None))
    app.include_router(health.router)
    app.include_router(auth.router)
    app.include_router(dicomweb.router)
    app.include_router(fhir_ingest.router)
    app.include_router(hl7.router)
    app.include_router(predict_routes.router)
    app.include_router(predict_routes.json_router)
    app.include_router(cds_hooks_routes.router)
    app.include_router(audit_routes.router)
    app.include_router(access_log_routes.router)
    app.include_router(admin_routes.router)
    # The dashboard (server-rendered pages under /dashboard, session cookie auth).
    for router in dashboard_routes.routers:
        app.include_router(router)
    return app
