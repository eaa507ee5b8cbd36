"""Bearer tokens: verifying the hospital's JWTs, and the demo's built-in issuer.

clinfuse is an OAuth 2.0 resource server. It accepts JWTs signed with RS256 or
ES384 by a trusted issuer, whose public keys come from a JWKS (a URL or a file).
The built-in issuer exists for the embedded demo and for SMART Backend Services
clients where the site has no authorization server of its own; it signs ES384
with a P-384 key kept in the data directory.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from services.auth.principal import Principal, Role

if TYPE_CHECKING:
    from services.auth.jwks import RemoteJwks
    from services.outbound import Outbound

__all__ = ["ACCEPTED_ALGORITHMS", "AuthError", "LocalIssuer", "TokenVerifier",
           "TrustedIssuer"]

#: The algorithms a hospital IdP may sign with (the issue's RS256/ES384); nothing weaker.
ACCEPTED_ALGORITHMS = ("RS256", "ES384")


class AuthError(Exception):
    """Authentication or authorization failed; ``status`` is 401 or 403."""

    def __init__(self, status: int, message: str, *, error: str = "invalid_token") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error = error


@dataclass
class TrustedIssuer:
    """An issuer whose tokens are accepted, with a way to get its current JWKS."""

    issuer: str
    jwks: Callable[[], dict[str, Any]]
    #: Fetch the keys again now (a token names an unknown kid: the IdP rotated); None
    #: when the keys cannot change underneath (a file, the built-in issuer).
    refresh: Callable[[], dict[str, Any]] | None = None


def jwks_from_file(path: Path) -> Callable[[], dict[str, Any]]:
    def load() -> dict[str, Any]:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    return load


def jwks_from_url(url: str, *, outbound: Outbound, ttl_s: float = 300.0) -> RemoteJwks:
    """A JWKS fetched under the outbound policy: https, capped, cached for ``ttl_s``,
    refetched on an unknown kid, kept while the IdP is down (:mod:`services.auth.jwks`)."""
    from services.auth.jwks import RemoteJwks

    return RemoteJwks(url, outbound=outbound, ttl_s=ttl_s)


class TokenVerifier:
    """Turns a bearer token into a :class:`Principal`, or raises :class:`AuthError`."""

    def __init__(self, issuers: list[TrustedIssuer], *, audience: str,
                 role_claim: str = "clinfuse_role", leeway_s: float = 30.0) -> None:
        self.issuers = {i.issuer: i for i in issuers}
        self.audience = audience
        self.role_claim = role_claim
        self.leeway_s = leeway_s

    def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise AuthError(401, "the bearer token is not a well-formed JWT") from None
        alg = header.get("alg")
        if alg not in ACCEPTED_ALGORITHMS:
            raise AuthError(401, f"token algorithm {alg!r} is not accepted; use one of "
                                 f"{', '.join(ACCEPTED_ALGORITHMS)}")
        trusted = self.issuers.get(str(unverified.get("iss")))
        if trusted is None:
            raise AuthError(401, "the token's issuer is not trusted here")
        key = _key_for(trusted.jwks(), header.get("kid"), alg, trusted.refresh)
        try:
            claims = jwt.decode(token, key=key, algorithms=[alg], audience=self.audience,
                                issuer=trusted.issuer, leeway=self.leeway_s,
                                options={"require": ["exp", "iat", "sub", "iss", "aud"]})
        except jwt.ExpiredSignatureError:
            raise AuthError(401, "the token has expired") from None
        except jwt.InvalidAudienceError:
            raise AuthError(401, f"the token's audience is not {self.audience!r}") from None
        except jwt.PyJWTError as exc:
            raise AuthError(401, f"the token did not verify ({type(exc).__name__})") from None
        return Principal(subject=str(claims["sub"]), role=self._role(claims),
                         client_id=claims.get("client_id"),
                         scopes=frozenset(str(claims.get("scope", "")).split()),
                         issuer=trusted.issuer, patient=_launch_patient(claims))

    def _role(self, claims: dict[str, Any]) -> Role:
        value = claims.get(self.role_claim)
        candidates = value if isinstance(value, list) else [value]
        known = [Role(v) for v in candidates if isinstance(v, str) and v in Role.__members__]
        if not known:
            raise AuthError(403, f"the token carries no clinfuse role in claim "
                                 f"{self.role_claim!r}", error="insufficient_scope")
        # Several roles: the token holder acts with the broadest one it was granted.
        order = [Role.admin, Role.integration, Role.clinician, Role.compliance]
        return min(known, key=order.index)


def _launch_patient(claims: dict[str, Any]) -> str | None:
    """The SMART launch context's ``patient`` (what ``patient/`` scopes reach), if any."""
    patient = claims.get("patient")
    return patient if isinstance(patient, str) and patient else None


def _key_for(jwks: dict[str, Any], kid: str | None, alg: str,
             refresh: Callable[[], dict[str, Any]] | None = None) -> Any:
    keys = [k for k in jwks.get("keys", []) if isinstance(k, dict)]
    if kid is not None:
        keys = [k for k in keys if k.get("kid") == kid]
        if not keys and refresh is not None:
            # An unknown kid: the IdP may have rotated since the cache was filled.
            keys = [k for k in refresh().get("keys", [])
                    if isinstance(k, dict) and k.get("kid") == kid]
    keys = [k for k in keys if k.get("alg") in (None, alg) and k.get("use") in (None, "sig")]
    if not keys:
        raise AuthError(401, "no key in the issuer's JWKS matches the token's kid/alg")
    try:
        return jwt.PyJWK.from_dict(keys[0], algorithm=alg).key
    except jwt.PyJWTError:
        raise AuthError(401, "the issuer's JWKS key cannot be used") from None


class LocalIssuer:
    """The built-in ES384 issuer: the demo's local logins and registered system clients."""

    def __init__(self, key_path: Path, issuer: str, audience: str) -> None:
        self.issuer = issuer
        self.audience = audience
        self._key = _load_or_create_ec_key(key_path)
        public = jwt.algorithms.ECAlgorithm.to_jwk(self._key.public_key(), as_dict=True)
        thumb = jwt.PyJWK.from_dict({**public, "alg": "ES384"})
        self.kid = thumb.key_id or _thumbprint(public)
        self._public_jwk = {**public, "kid": self.kid, "alg": "ES384", "use": "sig"}

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self._public_jwk]}

    def trusted(self) -> TrustedIssuer:
        return TrustedIssuer(self.issuer, self.jwks)

    def issue(self, subject: str, role: Role, *, scope: str = "", client_id: str | None = None,
              ttl_s: int = 3600, extra: dict[str, Any] | None = None) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {"iss": self.issuer, "aud": self.audience, "sub": subject,
                                  "iat": now, "exp": now + ttl_s, "jti": uuid.uuid4().hex,
                                  "clinfuse_role": role.value, "scope": scope}
        if client_id is not None:
            claims["client_id"] = client_id
        claims.update(extra or {})
        return jwt.encode(claims, self._key, algorithm="ES384", headers={"kid": self.kid})


def _thumbprint(jwk: dict[str, Any]) -> str:
    import base64
    import hashlib

    members = {k: jwk[k] for k in ("crv", "kty", "x", "y")}
    digest = hashlib.sha256(json.dumps(members, separators=(",", ":"),
                                       sort_keys=True).encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _load_or_create_ec_key(path: Path) -> ec.EllipticCurvePrivateKey:
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp384r1":
            raise ValueError(f"{path}: the issuer key must be an EC P-384 private key")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    # Created 0600 from the start: the signing key is never readable by others.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    return key
