"""Error responses: FHIR and CDS Hooks routes answer OperationOutcome; none echoes values.

FastAPI's default validation error repeats the offending input, which may be a
patient's data, so every handler here names the problem and its location only.
Unhandled exceptions become a 500 with an opaque error id; the traceback's frames
(not the exception message, which may quote input) go to the application log.
"""

from __future__ import annotations

import logging
import traceback
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fhir_adapters.errors import Issue, IssueCode, operation_outcome
from services.auth.tokens import AuthError

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
#: Paths whose errors are FHIR OperationOutcomes.
OUTCOME_PREFIXES = ("/fhir", "/cds-services")

_STATUS_CODE: dict[int, IssueCode] = {
    400: "invalid", 401: "exception", 403: "exception", 404: "not-found",
    405: "not-supported", 406: "not-supported", 409: "processing", 410: "not-found",
    413: "too-long", 415: "not-supported", 422: "invalid",
}
_SECURITY_CODE = {401: "login", 403: "forbidden"}


def wants_outcome(request: Request) -> bool:
    return request.url.path.startswith(OUTCOME_PREFIXES)


def error_response(request: Request, status: int, message: str, *,
                   issues: list[Issue] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The error in the route family's own form."""
    if wants_outcome(request):
        if issues is None:
            code: Any = _SECURITY_CODE.get(status) or _STATUS_CODE.get(
                status, "exception" if status >= 500 else "processing")
            issues = [Issue(code=code, diagnostics=message,
                            severity="fatal" if status >= 500 else "error")]
        return JSONResponse(operation_outcome(issues), status_code=status,
                            media_type=FHIR_JSON, headers=headers)
    body: dict[str, Any] = {"detail": message}
    if issues:
        body["issues"] = [{"location": i.where(), "problem": i.diagnostics} for i in issues]
    return JSONResponse(body, status_code=status, headers=headers)


def _location(loc: Any) -> str:
    parts = [str(p) for p in loc if p not in ("body",)] if isinstance(loc, list | tuple) else []
    return ".".join(parts) or "request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AuthError)
    async def _auth(request: Request, exc: AuthError) -> JSONResponse:
        challenge = f'Bearer error="{exc.error}"'
        return error_response(request, exc.status, exc.message,
                              headers={"WWW-Authenticate": challenge})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return error_response(request, exc.status_code, message,
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        issues = [Issue(code="invalid" if e.get("type") != "missing" else "required",
                        diagnostics=str(e.get("msg", "invalid value")),
                        expression=_location(e.get("loc")))
                  for e in exc.errors()]
        summary = "; ".join(f"{i.expression}: {i.diagnostics}" for i in issues[:5])
        return error_response(request, 422, f"invalid request: {summary}", issues=issues)

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        error_id = uuid.uuid4().hex[:12]
        # The traceback is logged, not returned; exception messages are not trusted to be
        # free of patient values, so only the type goes to the response.
        frames = "".join(traceback.format_tb(exc.__traceback__))
        log.error("unhandled %s on %s %s (error id %s)\n%s", type(exc).__name__,
                  request.method, request.url.path, error_id, frames)
        return error_response(request, 500, f"internal error (error id {error_id}); "
                                            "the server log has the details")
