"""The identity provider's JWKS (issue 19, finding 12h).

Before: the JWKS URL was fetched with a plain ``httpx.get`` and cached 5 minutes; a
token signed with a freshly rotated key failed until the cache expired, an IdP
outage after expiry turned every request into an error, the body had no size cap,
and an http URL was fetched like any other. The verifier is built here the way the
app builds it (``build_token_verifier`` from Settings), against a scripted IdP.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from services.app import build_token_verifier
from services.auth import jwks as jwks_module
from services.auth.principal import Role
from services.auth.tokens import AuthError, TokenVerifier
from services.core.config import Settings
from tests.security.outbound_support import ScriptedServer, send, send_json

ISSUER = "https://idp.hospital.example"


@dataclass
class IdP:
    """The scripted identity provider: its signing keys, its JWKS, whether it is up."""

    keys: dict[str, ec.EllipticCurvePrivateKey] = field(default_factory=dict)
    published: list[str] = field(default_factory=list)
    up: bool = True
    padding: int = 0

    def add_key(self, kid: str, publish: bool = True) -> None:
        self.keys[kid] = ec.generate_private_key(ec.SECP384R1())
        if publish:
            self.published.append(kid)

    def jwks(self) -> dict[str, Any]:
        keys = []
        for kid in self.published:
            public = jwt.algorithms.ECAlgorithm.to_jwk(self.keys[kid].public_key(),
                                                       as_dict=True)
            keys.append({**public, "kid": kid, "alg": "ES384", "use": "sig"})
        out: dict[str, Any] = {"keys": keys}
        if self.padding:
            out["padding"] = "x" * self.padding
        return out

    def token(self, kid: str) -> str:
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": "clinfuse", "sub": "dr-who", "iat": now,
                  "exp": now + 300, "clinfuse_role": Role.clinician.value}
        return jwt.encode(claims, self.keys[kid], algorithm="ES384", headers={"kid": kid})

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        if not self.up:
            send(handler, 503, b"maintenance", "text/plain")
        else:
            send_json(handler, self.jwks())


@pytest.fixture
def idp() -> Iterator[tuple[IdP, ScriptedServer]]:
    provider = IdP()
    provider.add_key("key-1")
    with ScriptedServer(provider.answer) as server:
        yield provider, server


def verifier(server: ScriptedServer, tmp_path: Path, *, listed: bool = True) -> TokenVerifier:
    """The app's verifier for the IdP; its loopback http origin listed (a test server)."""
    settings = Settings(auth_issuer=ISSUER, auth_jwks_url=f"{server.origin}/jwks.json",
                        auth_builtin_issuer=False, data_dir=tmp_path,
                        outbound_allowed_origins=[server.origin] if listed else [])
    return build_token_verifier(settings, None)


class FakeClock:
    """``time`` for the JWKS cache: ``monotonic`` advances only when the test says so."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(jwks_module, "time", fake)
    return fake


def test_unknown_kid_triggers_one_refetch(idp: tuple[IdP, ScriptedServer],
                                          tmp_path: Path) -> None:
    provider, server = idp
    check = verifier(server, tmp_path)
    assert check.verify(provider.token("key-1")).subject == "dr-who"
    assert len(server.requests) == 1
    # The IdP rotates: a token with the new kid arrives while the cache is fresh.
    provider.add_key("key-2")
    assert check.verify(provider.token("key-2")).subject == "dr-who"
    assert len(server.requests) == 2
    # Made-up kids cannot make the service hammer the IdP: at most one refetch a minute.
    provider.add_key("key-3", publish=False)
    for _ in range(5):
        with pytest.raises(AuthError) as caught:
            check.verify(provider.token("key-3"))
        assert caught.value.status == 401
    assert len(server.requests) == 2


def test_idp_down_the_last_good_keys_still_verify(idp: tuple[IdP, ScriptedServer],
                                                  tmp_path: Path, clock: FakeClock) -> None:
    provider, server = idp
    check = verifier(server, tmp_path)
    token = provider.token("key-1")
    assert check.verify(token).subject == "dr-who"
    provider.up = False
    clock.now += jwks_module.JWKS_TTL_S + 1  # the cache has expired
    assert check.verify(token).subject == "dr-who"  # refetch failed: stale keys used
    assert len(server.requests) == 2
    assert check.verify(token).subject == "dr-who"  # no new try for a minute
    assert len(server.requests) == 2
    clock.now += jwks_module.JWKS_MIN_REFETCH_S + 1
    assert check.verify(token).subject == "dr-who"
    assert len(server.requests) == 3
    # A day later the keys may have been revoked: no more stand-in.
    clock.now += jwks_module.JWKS_MAX_STALE_S
    with pytest.raises(AuthError) as caught:
        check.verify(token)
    assert caught.value.status == 401 and "503" not in caught.value.message
    provider.up = True
    clock.now += jwks_module.JWKS_MIN_REFETCH_S + 1
    assert check.verify(token).subject == "dr-who"  # back: fresh keys


def test_idp_down_from_the_start_is_a_401_not_a_crash(idp: tuple[IdP, ScriptedServer],
                                                     tmp_path: Path) -> None:
    provider, server = idp
    provider.up = False
    with pytest.raises(AuthError) as caught:
        verifier(server, tmp_path).verify(provider.token("key-1"))
    assert caught.value.status == 401 and "503" not in caught.value.message


def test_http_jwks_url_is_refused_unless_listed(idp: tuple[IdP, ScriptedServer],
                                                tmp_path: Path) -> None:
    provider, server = idp
    with pytest.raises(ValueError, match="CLINFUSE_AUTH_JWKS_URL"):
        verifier(server, tmp_path, listed=False).verify(provider.token("key-1"))
    assert server.requests == []


def test_oversized_jwks_is_refused(idp: tuple[IdP, ScriptedServer], tmp_path: Path) -> None:
    provider, server = idp
    provider.padding = 100 * 1024  # a valid JWKS with its key, over the 64 KiB cap
    assert len(json.dumps(provider.jwks())) > jwks_module.JWKS_MAX_BYTES
    with pytest.raises(AuthError) as caught:
        verifier(server, tmp_path).verify(provider.token("key-1"))
    assert caught.value.status == 401 and server.requests
