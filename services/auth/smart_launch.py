"""SMART App Launch for the built-in issuer: launch contexts, authorization codes, PKCE.

The demo has no EHR and no hospital authorization server, so the built-in issuer
plays the authorization server's part of SMART App Launch 2.0 (EHR launch and
standalone launch) for the dashboard, a public client:

1. the EHR opens ``/dashboard/launch?iss=...&launch=...``; ``launch`` is an opaque
   launch context that names the patient in context (:func:`issue_launch`);
2. the dashboard redirects to ``/auth/authorize`` with PKCE (S256), ``state`` and
   the launch context; the issuer shows a login and consent step;
3. on consent the issuer redirects back with a one-time ``code``
   (:func:`issue_code`), bound to the client, the redirect URI and the PKCE
   challenge;
4. the dashboard redeems it at ``/auth/token`` (``grant_type=authorization_code``,
   :func:`exchange_code`), and the token response carries ``patient``.

Launch contexts and codes are short-lived JWTs signed by the built-in issuer, so
any process of the service can verify them. Codes are single-use: a redeemed
code's id is kept in the database until it expires (:mod:`services.auth.one_time_ids`),
so no replica and no restart redeems it twice.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import jwt
from sqlalchemy.orm import Session

from services.auth.one_time_ids import claim_once
from services.auth.principal import Role
from services.auth.scopes import (
    CLINFUSE_SCOPES,
    IDENTITY_SCOPES,
    default_scopes,
    narrow,
    parse_scope,
)
from services.auth.tokens import AuthError, LocalIssuer
from services.tables import PatientRow, UserRow

__all__ = ["CODE_TTL_S", "DASHBOARD_CLIENT_ID", "LAUNCH_TTL_S", "AuthorizationRequest",
           "code_challenge", "exchange_code", "issue_code", "issue_launch",
           "new_code_verifier", "parse_authorization_request", "read_launch",
           "redirect_with"]

#: The dashboard's client id: a public client (no secret), so PKCE is mandatory.
DASHBOARD_CLIENT_ID = "clinfuse-dashboard"
#: The path every redirect_uri of the dashboard client must have (on this service's origin).
DASHBOARD_REDIRECT_PATH = "/dashboard/callback"
CODE_TTL_S = 60
LAUNCH_TTL_S = 300
_CODE_AUD = "urn:clinfuse:smart:authorization-code"
_LAUNCH_AUD = "urn:clinfuse:smart:launch"
#: RFC 7636: 43-128 characters from the unreserved set.
_VERIFIER_RE = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")
_SCOPES = {"launch", "launch/patient", "openid", "fhirUser", "patient/*.read",
           "patient/*.rs", "user/*.read", "user/*.rs", "offline_access", "online_access"}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def new_code_verifier() -> str:
    """A fresh PKCE code verifier (64 URL-safe characters, 384 bits of randomness)."""
    return secrets.token_urlsafe(48)


def code_challenge(verifier: str) -> str:
    """The S256 challenge of ``verifier``: base64url(sha256(verifier)) without padding."""
    return _b64url(hashlib.sha256(verifier.encode("ascii")).digest())


def _sign(issuer: LocalIssuer, claims: dict[str, Any], audience: str, ttl_s: int) -> str:
    now = int(time.time())
    body = {**claims, "iss": issuer.issuer, "aud": audience, "iat": now, "exp": now + ttl_s,
            "jti": secrets.token_hex(16)}
    return jwt.encode(body, issuer._key, algorithm="ES384", headers={"kid": issuer.kid})


def _verify(issuer: LocalIssuer, token: str, audience: str, what: str) -> dict[str, Any]:
    key = jwt.PyJWK.from_dict(issuer.jwks()["keys"][0], algorithm="ES384").key
    try:
        claims: dict[str, Any] = jwt.decode(
            token, key, algorithms=["ES384"], audience=audience, issuer=issuer.issuer,
            options={"require": ["exp", "iat", "jti", "aud", "iss"]})
    except jwt.ExpiredSignatureError:
        raise AuthError(400, f"the {what} has expired", error="invalid_grant") from None
    except jwt.PyJWTError:
        raise AuthError(400, f"the {what} is not valid here", error="invalid_grant") from None
    return claims


# -- launch contexts ---------------------------------------------------------------


def issue_launch(issuer: LocalIssuer, patient_id: str, *, ttl_s: int = LAUNCH_TTL_S) -> str:
    """An opaque launch context naming ``patient_id`` (the opaque id), as an EHR would mint.

    The demo's stand-in for the EHR side of an EHR launch; a real EHR and its
    authorization server share the context between themselves.
    """
    return _sign(issuer, {"patient": patient_id}, _LAUNCH_AUD, ttl_s)


def read_launch(issuer: LocalIssuer, launch: str) -> str:
    """The patient id of a launch context; AuthError when forged or expired."""
    claims = _verify(issuer, launch, _LAUNCH_AUD, "launch context")
    patient = claims.get("patient")
    if not isinstance(patient, str) or not patient:
        raise AuthError(400, "the launch context names no patient", error="invalid_request")
    return patient


# -- the authorization request -----------------------------------------------------


@dataclass(frozen=True)
class AuthorizationRequest:
    """A checked ``/auth/authorize`` request of the dashboard client."""

    client_id: str
    redirect_uri: str
    state: str
    scope: str
    code_challenge: str
    aud: str
    launch: str | None
    #: The patient of the launch context, when there is one.
    patient: str | None

    def hidden_fields(self) -> dict[str, str]:
        """The parameters the consent form posts back unchanged."""
        fields = {"response_type": "code", "client_id": self.client_id,
                  "redirect_uri": self.redirect_uri, "state": self.state, "scope": self.scope,
                  "code_challenge": self.code_challenge, "code_challenge_method": "S256",
                  "aud": self.aud}
        if self.launch:
            fields["launch"] = self.launch
        return fields


class RedirectableError(Exception):
    """An authorization error reported to the client by redirect (RFC 6749 4.1.2.1)."""

    def __init__(self, redirect_uri: str, state: str, error: str, description: str) -> None:
        super().__init__(description)
        self.location = redirect_with(redirect_uri, error=error, error_description=description,
                                      state=state)


def redirect_with(uri: str, **params: str) -> str:
    """``uri`` with ``params`` appended to its query."""
    return f"{uri}{'&' if urlsplit(uri).query else '?'}{urlencode(params)}"


def _same_origin(uri: str, origin: str) -> bool:
    a, b = urlsplit(uri), urlsplit(origin)
    return (a.scheme, a.netloc) == (b.scheme, b.netloc)


def parse_authorization_request(params: dict[str, str], *, issuer: LocalIssuer, origin: str,
                                fhir_base: str) -> AuthorizationRequest:
    """Check an authorization request; AuthError (shown to the user) or RedirectableError.

    Errors about the client or its redirect URI are shown, never redirected: an
    attacker must not be able to bounce the browser to a URI of their choosing.
    """
    client_id = params.get("client_id", "")
    redirect_uri = params.get("redirect_uri", "")
    if client_id != DASHBOARD_CLIENT_ID:
        raise AuthError(400, "unknown client_id", error="invalid_client")
    # The dashboard is served by this service, so its redirect URI is on this origin.
    if not _same_origin(redirect_uri, origin) or urlsplit(redirect_uri).path != \
            DASHBOARD_REDIRECT_PATH:
        raise AuthError(400, "redirect_uri is not registered for this client",
                        error="invalid_request")
    state = params.get("state", "")
    if not state or len(state) > 256:
        raise AuthError(400, "state is required (at most 256 characters)",
                        error="invalid_request")
    if params.get("response_type") != "code":
        raise RedirectableError(redirect_uri, state, "unsupported_response_type",
                                "response_type must be code")
    if params.get("code_challenge_method") != "S256" or not params.get("code_challenge"):
        raise RedirectableError(redirect_uri, state, "invalid_request",
                                "PKCE with code_challenge_method S256 is required")
    challenge = params["code_challenge"]
    if not re.fullmatch(r"[A-Za-z0-9_-]{43}", challenge):
        raise RedirectableError(redirect_uri, state, "invalid_request",
                                "code_challenge must be a base64url SHA-256 digest")
    aud = params.get("aud", "")
    if aud.rstrip("/") != fhir_base.rstrip("/"):
        raise RedirectableError(redirect_uri, state, "invalid_request",
                                "aud must be this service's FHIR base URL")
    requested = params.get("scope", "").split()
    unknown = [s for s in requested if s not in _SCOPES and s not in CLINFUSE_SCOPES and (
        (p := parse_scope(s)) is None or p.context == "system")]
    if unknown or not requested:
        raise RedirectableError(redirect_uri, state, "invalid_scope",
                                f"unsupported scope(s) {unknown[:3]}" if unknown
                                else "scope is required")
    launch = params.get("launch") or None
    patient = None
    if launch is not None:
        if "launch" not in requested:
            raise RedirectableError(redirect_uri, state, "invalid_scope",
                                    "an EHR launch must request the launch scope")
        try:
            patient = read_launch(issuer, launch)
        except AuthError as exc:
            raise RedirectableError(redirect_uri, state, "invalid_request",
                                    exc.message) from None
    return AuthorizationRequest(client_id=client_id, redirect_uri=redirect_uri, state=state,
                                scope=" ".join(requested), code_challenge=challenge, aud=aud,
                                launch=launch, patient=patient)


def issue_code(issuer: LocalIssuer, request: AuthorizationRequest, user: UserRow) -> str:
    """A one-time authorization code for ``user``, bound to the request's PKCE challenge."""
    claims = {"sub": user.username, "role": user.role, "name": user.display_name or
              user.username, "client_id": request.client_id,
              "redirect_uri": request.redirect_uri, "scope": request.scope,
              "code_challenge": request.code_challenge, "patient": request.patient}
    return _sign(issuer, claims, _CODE_AUD, CODE_TTL_S)


def exchange_code(session: Session, issuer: LocalIssuer, *, code: str, redirect_uri: str,
                  client_id: str, code_verifier: str, ttl_s: int) -> dict[str, Any]:
    """The token response for a valid code (``grant_type=authorization_code``).

    Checks the code's signature, expiry and single use, the client and redirect
    URI it was issued to, and the PKCE verifier against its S256 challenge. The
    response carries ``patient`` when the launch had a patient in context.
    """
    claims = _verify(issuer, code, _CODE_AUD, "authorization code")
    if claims.get("client_id") != client_id:
        raise AuthError(401, "the code was issued to another client", error="invalid_grant")
    if claims.get("redirect_uri") != redirect_uri:
        raise AuthError(400, "redirect_uri differs from the authorization request's",
                        error="invalid_grant")
    if not _VERIFIER_RE.fullmatch(code_verifier or ""):
        raise AuthError(400, "code_verifier must be 43-128 unreserved characters",
                        error="invalid_request")
    if not secrets.compare_digest(code_challenge(code_verifier),
                                  str(claims.get("code_challenge", ""))):
        raise AuthError(400, "code_verifier does not match the code_challenge",
                        error="invalid_grant")
    if not claim_once(session, "authorization-code", str(claims["jti"]),
                      float(claims["exp"])):
        raise AuthError(400, "the authorization code was already used", error="invalid_grant")
    user = session.get(UserRow, str(claims.get("sub")))
    if user is None:
        raise AuthError(400, "the code's user no longer exists", error="invalid_grant")
    patient = claims.get("patient")
    if patient is not None and session.get(PatientRow, str(patient)) is None:
        raise AuthError(400, "the launch's patient is not known here", error="invalid_grant")
    # What was consented to, as far as the user's role may have it (services.auth.scopes).
    scope = " ".join(narrow(str(claims.get("scope", "")).split(), [
        *IDENTITY_SCOPES, *default_scopes(Role(user.role), system=False).split()]))
    extra: dict[str, Any] = {"name": user.display_name or user.username}
    if patient is not None:
        extra["patient"] = patient
    token = issuer.issue(user.username, Role(user.role), scope=scope, client_id=None,
                         ttl_s=ttl_s, extra=extra)
    response: dict[str, Any] = {"access_token": token, "token_type": "Bearer",
                                "expires_in": ttl_s, "scope": scope}
    if patient is not None:
        # SMART: launch context rides on the token response.
        response["patient"] = patient
        response["need_patient_banner"] = True
    return response
