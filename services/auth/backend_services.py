"""The built-in issuer's grants: demo local logins and SMART Backend Services clients."""

from __future__ import annotations

import time
from typing import Any

import jwt
from sqlalchemy.orm import Session

from services.auth.one_time_ids import claim_once
from services.auth.passwords import hash_password
from services.auth.principal import Role
from services.auth.scopes import default_scopes, narrow
from services.auth.tokens import AuthError, LocalIssuer
from services.tables import ClientRow, UserRow

__all__ = ["JWT_BEARER", "add_user", "client_credentials_grant", "password_grant",
           "register_client"]

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: SMART Backend Services: the client signs its assertion with RS384 or ES384.
ASSERTION_ALGORITHMS = ("RS384", "ES384")
MAX_ASSERTION_LIFETIME_S = 300


def add_user(session: Session, username: str, password: str, role: Role,
             display_name: str | None = None) -> UserRow:
    """Create or reset a local (demo) user."""
    if len(password) < 8:
        raise ValueError("a password needs at least 8 characters")
    row = session.get(UserRow, username)
    if row is None:
        row = UserRow(username=username)
        session.add(row)
    row.password_hash = hash_password(password)
    row.role = role.value
    row.display_name = display_name
    session.flush()
    return row


def register_client(session: Session, client_id: str, jwks: dict[str, Any], role: Role,
                    scope: str | None = None) -> ClientRow:
    """Register (or update) a backend client and the public keys that authenticate it.

    ``scope``: what it may ask for; default its role's (services.auth.scopes.ROLE_SCOPES).
    """
    keys = jwks.get("keys") if isinstance(jwks, dict) else None
    if not isinstance(keys, list) or not keys:
        raise ValueError("the client's JWKS needs a non-empty 'keys' list")
    for key in keys:
        if not isinstance(key, dict) or key.get("kty") not in ("RSA", "EC") or "d" in key:
            raise ValueError("JWKS keys must be public RSA or EC keys (no private parts)")
    row = session.get(ClientRow, client_id)
    if row is None:
        row = ClientRow(client_id=client_id)
        session.add(row)
    row.jwks, row.role = {"keys": keys}, role.value
    row.scope = scope if scope is not None else default_scopes(role, system=True)
    session.flush()
    return row


def _token_response(token: str, ttl_s: int, scope: str) -> dict[str, Any]:
    return {"access_token": token, "token_type": "Bearer", "expires_in": ttl_s, "scope": scope}


def password_grant(session: Session, issuer: LocalIssuer, user: UserRow, *,
                   ttl_s: int) -> dict[str, Any]:
    """The token response for a local user already signed in by
    :func:`services.auth.sign_in.sign_in_local_user` (environment rule, throttle, password)."""
    username = user.username
    scope = f"openid fhirUser {default_scopes(Role(user.role), system=False)}"
    token = issuer.issue(username, Role(user.role), scope=scope, ttl_s=ttl_s,
                         extra={"name": user.display_name or username})
    return _token_response(token, ttl_s, scope)


def client_credentials_grant(session: Session, issuer: LocalIssuer, assertion: str, *,
                             token_endpoint: str, scope: str, ttl_s: int) -> dict[str, Any]:
    """Verify a SMART Backend Services client assertion and issue an access token."""
    try:
        header = jwt.get_unverified_header(assertion)
        unverified = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise AuthError(401, "client_assertion is not a well-formed JWT",
                        error="invalid_client") from None
    alg = header.get("alg")
    if alg not in ASSERTION_ALGORITHMS:
        raise AuthError(401, f"client_assertion must be signed with RS384 or ES384, not {alg!r}",
                        error="invalid_client")
    client_id = unverified.get("iss")
    client = session.get(ClientRow, str(client_id)) if isinstance(client_id, str) else None
    if client is None:
        raise AuthError(401, "unknown client", error="invalid_client")
    keys = [k for k in client.jwks.get("keys", [])
            if header.get("kid") is None or k.get("kid") == header.get("kid")]
    claims: dict[str, Any] | None = None
    for key in keys:
        try:
            public = jwt.PyJWK.from_dict(key, algorithm=alg).key
            claims = jwt.decode(assertion, public, algorithms=[alg], audience=token_endpoint,
                                issuer=client.client_id,
                                options={"require": ["exp", "iss", "sub", "aud", "jti"]})
            break
        except jwt.ExpiredSignatureError:
            raise AuthError(401, "client_assertion has expired", error="invalid_client") from None
        except jwt.InvalidAudienceError:
            raise AuthError(401, f"client_assertion aud must be this token endpoint "
                                 f"({token_endpoint})", error="invalid_client") from None
        except jwt.PyJWTError:
            continue
    if claims is None:
        raise AuthError(401, "client_assertion signature did not verify with the client's keys",
                        error="invalid_client")
    if claims["sub"] != client.client_id:
        raise AuthError(401, "client_assertion sub must equal iss (the client id)",
                        error="invalid_client")
    if float(claims["exp"]) - time.time() > MAX_ASSERTION_LIFETIME_S:
        raise AuthError(401, "client_assertion exp is more than five minutes ahead",
                        error="invalid_client")
    if not claim_once(session, "assertion-jti", f"{client.client_id}:{claims['jti']}",
                      float(claims["exp"])):
        raise AuthError(401, "client_assertion jti was already used", error="invalid_client")
    # What it asks for, as far as its registration covers it (system/Observation.rs is
    # covered by system/*.crus); nothing asked: all it may have.
    allowed = client.scope.split()
    granted = narrow(scope.split() if scope else allowed, allowed)
    if not granted:
        raise AuthError(400, "none of the requested scopes is allowed for this client",
                        error="invalid_scope")
    scope_text = " ".join(granted)
    token = issuer.issue(client.client_id, Role(client.role), scope=scope_text,
                         client_id=client.client_id, ttl_s=ttl_s)
    return _token_response(token, ttl_s, scope_text)
