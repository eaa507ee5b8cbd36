"""Request dependencies: settings, database session, the caller, the access log."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from services.access_log import AccessLog
from services.auth.principal import Principal, Role
from services.auth.scopes import BODY_TYPES, Grants, Need
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


def require(*roles: Role, scope: Need) -> Any:
    """A dependency admitting ``roles`` (and admin) whose token grants ``scope``; else 403.

    Both are needed: the role says who the caller is, the token's SMART scopes what
    this token may do (services.auth.scopes). When only the token's ``patient/``
    scopes grant ``scope``, the caller is bound to its launch patient: checked here
    against the path parameter ``scope.patient`` names, or by the route through
    :func:`check_patient` (``Need.ROUTE``). The requirement is kept on the dependency
    (``requirement``) for the route table in docs/security.md and its test.
    """
    allowed = frozenset(roles) | {Role.admin}

    in_path = scope.patient not in (None, Need.ROUTE)

    def check(request: Request, principal: PrincipalDep) -> Principal:
        patient_id = str(request.path_params.get(str(scope.patient), ""))[:32] or None
        if in_path:
            # Set first, so that a refused attempt is logged against the patient too.
            request.state.patient_id = patient_id
        if principal.role not in allowed:
            raise AuthError(403, f"the {principal.role.value} role may not use this route",
                            error="insufficient_scope")
        bound = authorize(principal, scope)
        request.state.bound_patient = bound
        if bound is not None and in_path:
            check_patient(request, patient_id)
        return principal

    check.__name__ = "require_" + "_".join(sorted(r.value for r in allowed))
    check.requirement = Requirement(allowed, scope)  # type: ignore[attr-defined]
    return Depends(check)


@dataclass(frozen=True)
class Requirement:
    """What a route declared through :func:`require`: roles (admin included) and scope."""

    roles: frozenset[Role]
    scope: Need


def authorize(principal: Principal, need: Need) -> str | None:
    """Check ``need`` against the token's scopes; the launch patient it is bound to, if any.

    Raises AuthError 403 (``insufficient_scope``) naming the missing scopes, never a
    patient.
    """
    grants = Grants.of(principal.scopes)
    missing = need.missing(grants)
    if not missing:
        return None
    if need.patient is not None and principal.patient and not need.missing(grants,
                                                                            patient=True):
        return principal.patient
    context = "system" if principal.is_system else "user"
    named = ", ".join(f"{context}/{m}" if "." in m else m for m in missing[:12])
    if any(m.startswith(BODY_TYPES) for m in missing):
        named += f" ({BODY_TYPES}: each resource type sent, or *)"
    launch_scoped = any(s.context == "patient" for s in grants.resources)
    hint = " (patient/ scopes do not reach this route: it is not about one patient)" \
        if launch_scoped and need.patient is None else ""
    raise AuthError(403, f"the token's scopes do not allow this route; it needs {named}"
                         f"{hint}", error="insufficient_scope")


def check_patient(request: Request, patient_id: str | None) -> None:
    """403 when the caller is bound to a launch patient (``patient/`` scopes) and
    ``patient_id`` is another (or unknown) patient."""
    bound: str | None = getattr(request.state, "bound_patient", None)
    if bound is not None and patient_id != bound:
        raise AuthError(403, "the token's patient/ scopes reach only its launch patient, "
                             "not this one", error="insufficient_scope")


def check_scopes(principal: Principal, need: Need) -> None:
    """``need`` (user/ or system/ scopes only) once the route knows it, e.g. the
    resource types of a posted Bundle; 403 naming what is missing."""
    authorize(principal, Need(need.resources, need.custom, need.body))


def body_need(types: Iterable[str], letters: str) -> Need:
    """``letters`` on each resource type a request body carries."""
    return Need(tuple((t, letters) for t in sorted(set(types))))


def get_access_log(request: Request) -> AccessLog:
    log: AccessLog = request.app.state.access_log
    return log


AccessLogDep = Annotated[AccessLog, Depends(get_access_log)]


def purpose_of_use(request: Request) -> str | None:
    """The caller's stated purpose of use (HL7 PurposeOfUse code), if any."""
    from services.api.access import stated_purpose

    return stated_purpose(request)


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
