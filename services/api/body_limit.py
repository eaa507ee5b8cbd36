"""Request body limits, applied before routing and authentication.

FastAPI reads and parses a JSON or form body before it runs a route's dependencies,
the token check included, so without a cap anyone could make the process hold a
body of any size: a 200 MiB body sent without a token to ``POST /audits`` grew the
process by 1.2 GiB before the 401. This middleware caps every body as it streams in:

* a ``Content-Length`` above the limit is answered 413 before the app sees the request;
* a body without one (chunked transfer) is counted chunk by chunk, and reading stops
  with 413 at the first byte over the limit, so at most the limit is ever held;
* a body not complete within its deadline is answered 408 (slow "slowloris" clients
  would otherwise hold a connection and a worker slot for as long as they like).

The limit is ``max_request_bytes`` (1 MiB) everywhere except :data:`UPLOAD_ROUTES`,
which take ``max_upload_bytes``. The routes decide nothing here: the limit must hold
before any route code runs. The routes' own ``read_limited_body`` stays as a second
guard.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from fastapi import HTTPException
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.api.errors import error_response
from services.core.config import Settings

__all__ = ["UPLOAD_ROUTES", "BodyLimit", "BodyLimitMiddleware", "RequestBodyError",
           "limit_for"]

#: The routes that take whole documents (a Bundle, an NDJSON file, an HL7 batch, DICOM
#: instances): ``max_upload_bytes``. Exact paths, plus every POST under ``/dicomweb``
#: (STOW-RS to ``/dicomweb/studies`` and ``/dicomweb/studies/{study}``).
UPLOAD_ROUTES: frozenset[tuple[str, str]] = frozenset({
    ("POST", "/fhir"), ("POST", "/fhir/$import"), ("POST", "/fhir/$predict"),
    ("POST", "/hl7v2")})
UPLOAD_PREFIXES: tuple[tuple[str, str], ...] = (("POST", "/dicomweb/"),)


@dataclass(frozen=True)
class BodyLimit:
    """What one request may send: at most ``max_bytes``, within ``timeout_s`` seconds."""

    max_bytes: int
    timeout_s: float
    setting: str  # the environment variable that sets max_bytes, for the error message


def limit_for(method: str, path: str, settings: Settings) -> BodyLimit:
    """The body limit of a request, from its method and path alone (before routing)."""
    upload = (method, path) in UPLOAD_ROUTES or any(
        method == m and path.startswith(prefix) for m, prefix in UPLOAD_PREFIXES)
    if upload:
        return BodyLimit(settings.max_upload_bytes, settings.upload_body_timeout_s,
                         "CLINFUSE_MAX_UPLOAD_BYTES")
    return BodyLimit(settings.max_request_bytes, settings.request_body_timeout_s,
                     "CLINFUSE_MAX_REQUEST_BYTES")


class RequestBodyError(HTTPException):
    """413 or 408: raised from ``receive`` into whatever is reading the body.

    A FastAPI HTTPException, so FastAPI's body parsing re-raises it as it is (any other
    exception there becomes a generic 400) and the app's handler answers it in the
    route family's form (an OperationOutcome under /fhir).
    """

    def __init__(self, status: int, message: str) -> None:
        # The rest of the body is never read, so the connection cannot carry another
        # request.
        super().__init__(status, message, headers={"Connection": "close"})


def _too_large(limit: BodyLimit) -> RequestBodyError:
    return RequestBodyError(413, f"the request body exceeds the limit of {limit.max_bytes} "
                                 f"bytes for this route ({limit.setting})")


def _too_slow(limit: BodyLimit) -> RequestBodyError:
    return RequestBodyError(408, f"the request body did not arrive within "
                                 f"{limit.timeout_s:g} seconds; send it again")


class BodyLimitMiddleware:
    """Pure ASGI (no body buffering of its own): caps and times every request body."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        limit = limit_for(scope["method"], path, self.settings)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit.max_bytes:
            await self._answer(scope, receive, send, _too_large(limit))
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit.timeout_s
        received = 0
        complete = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, complete
            if complete:  # after the body: only http.disconnect is left, no deadline
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise _too_slow(limit) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit.max_bytes:
                    raise _too_large(limit)
                complete = not message.get("more_body", False)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except RequestBodyError as exc:
            # Raised outside the app's exception handlers (a middleware read the body):
            # answer here, unless a response is already under way.
            if started:
                raise
            await self._answer(scope, receive, send, exc)

    @staticmethod
    async def _answer(scope: Scope, receive: Receive, send: Send,
                      exc: RequestBodyError) -> None:
        response = error_response(Request(scope), exc.status_code, str(exc.detail),
                                  headers=dict(exc.headers or {}))
        await response(scope, receive, send)
