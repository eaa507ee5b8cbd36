"""Access logging for every authenticated request, in one place.

Routes that touch one patient's data set ``request.state.patient_id`` (the opaque
id); routes that return several patients' data (an imaging search) set
``request.state.patient_ids``, and get one entry per patient. The middleware appends
who, role, what (method and route template), the patient, the purpose of use and the
status to the hash-chained access log.
"""

from __future__ import annotations

import logging
import re

from starlette.concurrency import run_in_threadpool
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import Response

from services.access_log import AccessLog
from services.api.errors import error_response
from services.auth.principal import Principal

log = logging.getLogger(__name__)

_ACTIONS = {"GET": "read", "HEAD": "read", "POST": "write", "PUT": "write", "PATCH": "write",
            "DELETE": "delete"}


#: Anything but printable ASCII (HL7 codes, "system|code"): CR/LF, terminal escapes.
_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]")


def stated_purpose(request: Request) -> str | None:
    """The caller's purpose of use (``X-Purpose-Of-Use``), as the access log keeps it.

    At most 128 characters, each printable ASCII (others become ``?``): the value is
    the client's own, and it is shown again in access-log exports and pages.
    """
    value = request.headers.get("x-purpose-of-use")
    cleaned = _NOT_PRINTABLE.sub("?", value[:128]).strip() if value else ""
    return cleaned or None


def route_template(request: Request) -> str:
    """The matched route's path template: what was accessed, without the ids in it."""
    route = request.scope.get("route")  # set by the router on the shared scope once matched
    path = getattr(route, "path", None)
    # Never the raw path: an unmatched URL may carry an identifier.
    return str(path) if path else "<unmatched>"


class AccessLogMiddleware(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        response = await call_next(request)
        principal: Principal | None = getattr(request.state, "principal", None)
        if principal is None:
            return response
        access_log: AccessLog = request.app.state.access_log
        action = getattr(request.state, "access_action", None) or _ACTIONS.get(
            request.method, request.method.lower())
        resource = f"{request.method} {route_template(request)}"
        purpose = stated_purpose(request)
        patients = getattr(request.state, "patient_ids", None) or [
            getattr(request.state, "patient_id", None)]
        try:
            await run_in_threadpool(access_log.record_many, principal, action=action,
                                    resource=resource, patient_ids=list(patients),
                                    purpose=purpose,
                                    status=response.status_code)
        except Exception as exc:
            # An access that cannot be logged must not be served: fail closed.
            log.error("access log append failed (%s); refusing the response",
                      type(exc).__name__)
            return error_response(request, 503, "the access log is unavailable")
        return response
