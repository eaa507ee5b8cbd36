"""Operations: JSON logs with request ids, Prometheus metrics, health and readiness.

Logs carry the route template, never the raw URL or a body, so no identifier in a
path or query string reaches them. Counts that live in the database (predictions
by model version, ingested resources, queued jobs) are read at scrape time, so
every server process reports the same truth.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import Response

from services.api.access import route_template
from services.tables import DicomInstanceRow, FhirResourceRow, JobRow, PredictionRow

__all__ = ["JsonFormatter", "Metrics", "RequestContextMiddleware", "configure_logging",
           "request_id_var"]

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id",
                                                                           default=None)
#: An incoming X-Request-ID is echoed and logged only if it is this (whole: ``$`` would
#: let a trailing newline through); else the request gets an id of its own.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: The methods that get a label of their own; any other string a client sends is
#: "other", so made-up methods cannot grow the metrics (one series per label set).
METRIC_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
log = logging.getLogger("clinfuse.http")


def method_label(method: str) -> str:
    """The request method as a metric and log label: a fixed set, else ``other``."""
    return method if method in METRIC_METHODS else "other"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, extras."""

    _EXTRAS = ("method", "route", "status", "duration_ms")

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = request_id_var.get()
        if rid:
            entry["request_id"] = rid
        for key in self._EXTRAS:
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str = "INFO") -> None:
    """JSON logs on stderr for clinfuse and uvicorn; uvicorn's raw-URL access log is off."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # uvicorn's access log prints the full path and query, which can carry identifiers.
    logging.getLogger("uvicorn.access").disabled = True


class _DatabaseCollector(Collector):
    """Gauges read from the database at scrape time."""

    def __init__(self, sessions: Callable[[], sessionmaker[Session] | None]) -> None:
        self._sessions = sessions

    def collect(self) -> Iterable[GaugeMetricFamily]:
        factory = self._sessions()
        if factory is None:
            return
        with factory() as session:
            predictions = GaugeMetricFamily(
                "clinfuse_predictions", "Stored predictions by model version",
                labels=["model_version"])
            for version, n in session.execute(select(PredictionRow.model_version, func.count())
                                              .group_by(PredictionRow.model_version)):
                predictions.add_metric([str(version)], float(n))
            yield predictions
            ingested = GaugeMetricFamily("clinfuse_ingested_resources",
                                         "Stored FHIR resources by ingest channel",
                                         labels=["source"])
            for source, n in session.execute(select(FhirResourceRow.source, func.count())
                                             .group_by(FhirResourceRow.source)):
                ingested.add_metric([str(source)], float(n))
            n_dicom = session.scalar(select(func.count()).select_from(DicomInstanceRow)) or 0
            ingested.add_metric(["dicom"], float(n_dicom))
            yield ingested
            jobs = GaugeMetricFamily("clinfuse_jobs", "Background jobs by status",
                                     labels=["status"])
            for status, n in session.execute(select(JobRow.status, func.count())
                                             .group_by(JobRow.status)):
                jobs.add_metric([str(status)], float(n))
            yield jobs


class Metrics:
    """A per-app registry, so several apps in one process (tests) never collide."""

    def __init__(self, sessions: Callable[[], sessionmaker[Session] | None]) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "clinfuse_http_request_duration_seconds", "HTTP request latency by route",
            ["method", "route", "status"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
        self.registry.register(_DatabaseCollector(sessions))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RequestContextMiddleware(BaseHTTPMiddleware):
    """Request id (echoed as X-Request-ID), a latency observation and one log line."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        incoming = request.headers.get("x-request-id", "")
        rid = incoming if _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        token = request_id_var.set(rid)
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            response.headers["X-Request-ID"] = rid
            return response
        finally:
            elapsed = time.perf_counter() - started
            # Labels from fixed sets only: the route template (never the raw path) and
            # the method label; anyone can send any method, and each would be a series.
            route = route_template(request)
            method = method_label(request.method)
            metrics: Metrics | None = getattr(request.app.state, "metrics", None)
            if metrics is not None and route != "/metrics":
                metrics.latency.labels(method, route, str(status)).observe(elapsed)
            log.info("%s %s %d", method, route, status,
                     extra={"method": method, "route": route, "status": status,
                            "duration_ms": round(1000 * elapsed, 2)})
            request_id_var.reset(token)
