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
from collections.abc import Iterable, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

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
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request))}
        return error_response(request, exc.status_code, message, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        issues = [Issue(code="invalid" if e.get("type") != "missing" else "required",
                        diagnostics=str(e.get("msg", "invalid value")),
                        expression=_location(e.get("loc")))
                  for e in exc.errors()]
        summary = "; ".join(f"{i.expression}: {i.diagnostics}" for i in issues[:5])
        return error_response(request, 422, f"invalid request: {summary}", issues=issues)

    @app.exception_handler(SQLAlchemyTimeoutError)
    async def _busy(request: Request, exc: SQLAlchemyTimeoutError) -> JSONResponse:
        # Every database connection is in use: shed load with a retryable answer rather
        # than queueing without bound.
        from services.api.access import route_template  # access imports this module

        log.warning("database connection pool exhausted on %s %s; answered 503",
                    request.method, route_template(request))
        return error_response(request, 503, "the server is busy; retry shortly",
                              headers={"Retry-After": "1"})

    @app.exception_handler(RecursionError)
    async def _too_deep(request: Request, exc: RecursionError) -> JSONResponse:
        # Python's JSON parser (and what walks its result) recurses once per level, so a
        # small body of nested brackets exhausts the stack: the input is at fault, not the
        # server. Without a body there is no such input, and it is the server's bug.
        if request.method not in ("POST", "PUT", "PATCH"):
            return internal_error(request, exc)
        from services.api.access import route_template  # access imports this module

        log.warning("request body nested too deeply on %s %s; answered 400",
                    request.method, route_template(request))
        return error_response(request, 400, "the request body is nested too deeply to be "
                                            "processed (JSON arrays and objects within "
                                            "each other, hundreds of levels deep)")

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        return internal_error(request, exc)


def internal_error(request: Request, exc: BaseException) -> JSONResponse:
    """500 with an opaque error id; the traceback's frames go to the log."""
    from services.api.access import route_template  # access imports this module
    from services.observability import method_label

    error_id = uuid.uuid4().hex[:12]
    # The traceback is logged, not returned; exception messages are not trusted to be
    # free of patient values, so only the type goes to the response. The route template,
    # not the URL: paths carry UIDs and patient ids.
    frames = "".join(traceback.format_tb(exc.__traceback__))
    log.error("unhandled %s on %s %s (error id %s)\n%s", type(exc).__name__,
              method_label(request.method), route_template(request), error_id, frames)
    return error_response(request, 500, f"internal error (error id {error_id}); "
                                        "the server log has the details")


def _leaf_routes(routes: Iterable[Any]) -> Iterator[Any]:
    """The routes themselves, inside the routers that FastAPI includes as one entry."""
    for route in routes:
        candidates = getattr(route, "effective_candidates", None)
        if callable(candidates):
            yield from _leaf_routes(candidates())
        else:
            yield route


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path.

    Each FastAPI route serves one method, so Starlette's 405 names only the first route
    whose path matched; ``Allow`` must list the methods of all of them.
    """
    methods: set[str] = set()
    path = request.scope.get("path", request.url.path)
    for route in _leaf_routes(request.app.router.routes):
        template, route_methods = getattr(route, "path", None), getattr(route, "methods", None)
        if isinstance(template, str) and route_methods and compile_path(template)[0].match(path):
            methods |= set(route_methods)
    return sorted(methods)


#: The body of every non-FHIR error: a message, and for invalid requests where the
#: problems are (never the offending values).
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "title": "Error", "required": ["detail"],
    "properties": {
        "detail": {"type": "string"},
        "issues": {"type": "array", "items": {
            "type": "object", "required": ["location", "problem"],
            "properties": {"location": {"type": "string"}, "problem": {"type": "string"}}}}},
}
#: The errors of the FHIR and CDS Hooks routes (FHIR R4 OperationOutcome, in short).
OUTCOME_SCHEMA: dict[str, Any] = {
    "type": "object", "title": "OperationOutcome", "required": ["resourceType", "issue"],
    "properties": {
        "resourceType": {"const": "OperationOutcome"},
        "issue": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["severity", "code"],
            "properties": {"severity": {"enum": ["fatal", "error", "warning", "information"]},
                           "code": {"type": "string"}, "diagnostics": {"type": "string"},
                           "expression": {"type": "array", "items": {"type": "string"}}}}}},
}
_DEFAULT_DESCRIPTIONS = {
    400: "the body could not be parsed", 401: "no valid bearer token",
    403: "the role may not use this route", 413: "the body exceeds the upload limit",
    415: "the Content-Type is not accepted here",
    422: "invalid request: the problems and where they are, never the values",
    503: "the access log (or a dependency of the route) is unavailable",
}


def _error_content(path: str) -> dict[str, Any]:
    if path.startswith(OUTCOME_PREFIXES):
        return {FHIR_JSON: {"schema": {"$ref": "#/components/schemas/OperationOutcome"}}}
    return {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}


def _document_errors(schema: dict[str, Any]) -> dict[str, Any]:
    """Every error a route can answer, with the body the handlers above really send.

    FastAPI documents its own 422 body (``HTTPValidationError``), which these handlers
    replace; and statuses common to whole families of routes (401, 403 and 503 wherever
    a token is needed: the access log fails closed; 422 wherever there is input; 400
    wherever a body is parsed) are added here rather than on every decorator.
    """
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses: dict[str, Any] = operation["responses"]
            wanted: set[int] = set()
            if operation.get("security"):
                wanted |= {401, 403, 503}
            if operation.get("parameters") or operation.get("requestBody"):
                wanted.add(422)
            if operation.get("requestBody"):
                wanted.add(400)
            for code in sorted(wanted):
                responses.setdefault(str(code), {"description": _DEFAULT_DESCRIPTIONS[code]})
            for status, response in responses.items():
                if not status.isdigit() or int(status) < 400:
                    continue
                content = response.get("content") or {}
                default = _error_content(path)
                refs = {str(c.get("schema", {}).get("$ref", "")) for c in content.values()}
                if not content or any(r.endswith("/HTTPValidationError") for r in refs):
                    response["content"] = default
                    continue
                for spec in content.values():
                    spec.setdefault("schema", next(iter(default.values()))["schema"])
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    components["Error"] = ERROR_SCHEMA
    components["OperationOutcome"] = OUTCOME_SCHEMA
    return schema


def install_openapi(app: FastAPI) -> None:
    """The app's OpenAPI document, with the errors it really answers documented."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _document_errors(get_openapi(
                title=app.title, version=app.version, openapi_version=app.openapi_version,
                description=app.description, routes=app.routes))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
