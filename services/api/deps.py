"""Request dependencies: settings, database session, the caller, the access log."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from services.access_log import AccessLog
from services.auth.principal import Principal, Role
from services.auth.tokens import AuthError, TokenVerifier
from services.core.config import Settings
from services.db import session_scope
from services.dicom_store import DicomStore


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_dicom_store(request: Request) -> DicomStore:
    store: DicomStore = request.app.state.dicom_store
    return store


def get_session(request: Request) -> Iterator[Session]:
    """One transaction per request: committed when the route returns, else rolled back."""
    with session_scope(request.app.state.sessions) as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
DicomStoreDep = Annotated[DicomStore, Depends(get_dicom_store)]
# scope="function": the transaction commits before the response is sent, so a client
# never gets a 2xx for a commit that then fails, and the access-log middleware (which
# writes after the route) never waits on the route's open transaction.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]

#: The largest offset a list accepts: beyond any real table, and within the databases'
#: 64-bit OFFSET (a larger one overflows in the driver).
MAX_OFFSET = 2**31 - 1

_bearer = HTTPBearer(auto_error=False, description="A JWT from the hospital's identity "
                     "provider or the built-in issuer (POST /auth/token).")


def get_principal(request: Request,
                  credentials: Annotated[HTTPAuthorizationCredentials | None,
                                         Depends(_bearer)]) -> Principal:
    """The verified caller; 401 without a valid bearer token."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise AuthError(401, "a bearer token is required", error="invalid_request")
    verifier: TokenVerifier = request.app.state.token_verifier
    principal = verifier.verify(credentials.credentials)
    request.state.principal = principal
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require(*roles: Role) -> Any:
    """A dependency admitting ``roles`` (and admin, who may do everything); 403 otherwise."""
    allowed = frozenset(roles) | {Role.admin}

    def check(principal: PrincipalDep) -> Principal:
        if principal.role not in allowed:
            raise AuthError(403, f"the {principal.role.value} role may not use this route",
                            error="insufficient_scope")
        return principal

    check.__name__ = "require_" + "_".join(sorted(r.value for r in allowed))
    return Depends(check)


def get_access_log(request: Request) -> AccessLog:
    log: AccessLog = request.app.state.access_log
    return log


AccessLogDep = Annotated[AccessLog, Depends(get_access_log)]


def purpose_of_use(request: Request) -> str | None:
    """The caller's stated purpose of use (HL7 PurposeOfUse code), if any."""
    value = request.headers.get("x-purpose-of-use")
    return value[:128] if value else None


async def read_limited_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 as soon as it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body of {declared} bytes exceeds the limit of "
                                 f"{limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def base_url(request: Request, settings: Settings, prefix: str) -> str:
    root = settings.public_base_url or str(request.base_url).rstrip("/")
    return f"{root.rstrip('/')}{prefix}"
