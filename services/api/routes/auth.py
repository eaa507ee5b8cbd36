"""OAuth endpoints of the built-in issuer and the SMART configuration.

``POST /auth/token`` serves three grants: ``password`` for the demo's local users,
``client_credentials`` with a signed JWT assertion for SMART Backend Services
clients (``private_key_jwt``, RS384 or ES384, as SMART asks), and
``authorization_code`` with PKCE for the dashboard's SMART App Launch
(:mod:`services.auth.smart_launch`), whose login and consent step is
``/auth/authorize``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import JSONResponse, Response

from services.api.deps import SessionDep, SettingsDep, base_url
from services.auth import backend_services, sign_in, smart_launch
from services.auth.endpoints import TOKEN_ENDPOINT_UNCONFIGURED, configured_token_endpoint
from services.auth.scopes import CLINFUSE_SCOPES
from services.auth.tokens import AuthError

router = APIRouter(tags=["Authorization"])

_OAUTH_ERROR = {"application/json": {"schema": {
    "type": "object", "required": ["error", "error_description"],
    "properties": {"error": {"type": "string"}, "error_description": {"type": "string"}}}}}
_TOKEN_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "invalid_request / unsupported_grant_type / invalid_scope",
          "content": _OAUTH_ERROR},
    401: {"description": "invalid_client or invalid_grant", "content": _OAUTH_ERROR},
    429: {"description": "too_many_attempts: too many failed sign-ins for the user name or "
                         "the client address (see Retry-After)", "content": _OAUTH_ERROR},
    500: {"description": "server_error: the token endpoint's address is not configured",
          "content": _OAUTH_ERROR},
}
_GRANTS = ["password", "client_credentials", "authorization_code"]


def _oauth_error(status: int, error: str, description: str) -> JSONResponse:
    return JSONResponse({"error": error, "error_description": description}, status_code=status,
                        headers={"Cache-Control": "no-store"})


@router.post("/auth/token", summary="OAuth 2.0 token endpoint of the built-in issuer",
             responses=_TOKEN_ERRORS)
def token(request: Request, session: SessionDep, settings: SettingsDep,
          grant_type: Annotated[str, Form(examples=["client_credentials"],
                                          json_schema_extra={"enum": _GRANTS})],
          username: Annotated[str | None, Form()] = None,
          password: Annotated[str | None, Form()] = None,
          scope: Annotated[str | None, Form(examples=["system/*.read"])] = None,
          client_assertion_type: Annotated[str | None, Form()] = None,
          client_assertion: Annotated[str | None, Form()] = None,
          code: Annotated[str | None, Form(max_length=4000)] = None,
          redirect_uri: Annotated[str | None, Form(max_length=2000)] = None,
          client_id: Annotated[str | None, Form(max_length=128)] = None,
          code_verifier: Annotated[str | None, Form(max_length=128)] = None) -> JSONResponse:
    issuer = getattr(request.app.state, "local_issuer", None)
    if issuer is None:
        return _oauth_error(400, "unsupported_grant_type",
                            "the built-in issuer is disabled; get tokens from the hospital's "
                            "authorization server")
    try:
        if grant_type == "password":
            sign_in.require_local_sign_in(settings)
            if not username or not password:
                return _oauth_error(400, "invalid_request", "username and password are required")
            user = sign_in.sign_in_local_user(request.app.state.sessions, settings, username,
                                              password, address=sign_in.client_address(request))
            access = backend_services.password_grant(session, issuer, user,
                                                     ttl_s=settings.auth_token_ttl_s)
        elif grant_type == "client_credentials":
            if client_assertion_type != backend_services.JWT_BEARER or not client_assertion:
                return _oauth_error(400, "invalid_request",
                                    f"client_assertion_type must be {backend_services.JWT_BEARER}"
                                    " with a client_assertion")
            endpoint = configured_token_endpoint(settings)
            if endpoint is None:
                return _oauth_error(500, "server_error", TOKEN_ENDPOINT_UNCONFIGURED)
            access = backend_services.client_credentials_grant(
                session, issuer, client_assertion, token_endpoint=endpoint, scope=scope or "",
                ttl_s=min(settings.auth_token_ttl_s, 3600))
        elif grant_type == "authorization_code":
            if not code or not redirect_uri or not client_id or not code_verifier:
                return _oauth_error(400, "invalid_request", "code, redirect_uri, client_id "
                                    "and code_verifier (PKCE) are required")
            # Codes name local users: redeemed under the same rule as they sign in.
            sign_in.require_local_sign_in(settings)
            access = smart_launch.exchange_code(session, issuer, code=code,
                                                redirect_uri=redirect_uri, client_id=client_id,
                                                code_verifier=code_verifier,
                                                ttl_s=settings.auth_token_ttl_s)
        else:
            return _oauth_error(400, "unsupported_grant_type",
                                f"grant_type {grant_type[:40]!r} is not supported")
    except sign_in.TooManySignInFailures as exc:
        response = _oauth_error(429, exc.error, exc.message)
        response.headers["Retry-After"] = str(exc.retry_after_s)
        return response
    except AuthError as exc:
        status = 400 if exc.error in ("invalid_scope", "unsupported_grant_type") else 401
        return _oauth_error(status, exc.error, exc.message)
    return JSONResponse(access, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


# The two /auth/authorize routes are the browser's sign-in and consent pages of the OAuth
# authorization-code flow (HTML forms with a CSRF token, found through
# /.well-known/smart-configuration), not API operations: like the dashboard's pages they
# are left out of the OpenAPI document.
@router.get("/auth/authorize", summary="SMART App Launch authorization (demo login and consent)",
            response_class=Response, include_in_schema=False,
            responses={200: {"content": {"text/html": {}}},
                       302: {"description": "back to the client with an error"}})
def authorize(request: Request) -> Response:
    from services.dashboard.consent import authorize_get

    return authorize_get(request)


@router.post("/auth/authorize", summary="Sign in and consent; redirects back with a code",
             response_class=Response, include_in_schema=False,
             responses={303: {"description": "back to the client with a code or error"}})
async def authorize_submit(request: Request) -> Response:
    from starlette.concurrency import run_in_threadpool

    from services.dashboard.consent import authorize_post

    form = await request.form(max_files=0, max_fields=32)
    fields = {k: v[:4000] for k, v in form.items() if isinstance(v, str)}
    # Password hashing is CPU-bound: off the event loop.
    return await run_in_threadpool(authorize_post, request, fields)


@router.get("/auth/jwks.json", summary="The built-in issuer's public keys (JWKS)")
def jwks(request: Request) -> dict[str, Any]:
    issuer = getattr(request.app.state, "local_issuer", None)
    return issuer.jwks() if issuer is not None else {"keys": []}


@router.get("/.well-known/smart-configuration",
            summary="SMART App Launch / Backend Services configuration")
def smart_configuration(request: Request, settings: SettingsDep) -> dict[str, Any]:
    # The endpoint whose URL a client assertion's aud must name: never the Host header's.
    token_endpoint = (configured_token_endpoint(settings)
                      or base_url(request, settings, "/auth/token"))
    config: dict[str, Any] = {
        "issuer": settings.auth_issuer or settings.auth_builtin_issuer_id,
        "jwks_uri": settings.auth_jwks_url or base_url(request, settings, "/auth/jwks.json"),
        "token_endpoint": token_endpoint,
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "grant_types_supported": ["client_credentials", "authorization_code"],
        # SMART v2 (and v1) resource scopes and clinfuse's own; docs/security.md has
        # which route needs which (services.auth.scopes).
        "scopes_supported": ["system/*.crus", "system/*.rs", "user/*.crus", "user/*.rs",
                             "patient/*.rs", "system/*.read", "system/*.write",
                             "user/*.read", "patient/*.read", *CLINFUSE_SCOPES, "launch",
                             "launch/patient", "openid", "fhirUser"],
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "capabilities": ["client-confidential-asymmetric", "permission-v2",
                         "launch-ehr", "launch-standalone", "context-ehr-patient"],
    }
    if settings.auth_authorize_endpoint or getattr(request.app.state, "local_issuer", None):
        config["authorization_endpoint"] = (settings.auth_authorize_endpoint
                                            or base_url(request, settings, "/auth/authorize"))
    return config
