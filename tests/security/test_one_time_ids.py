"""Issue 19, finding 12d: one-time ids are remembered by the database, not by a process.

A SMART Backend Services assertion's ``jti`` and an authorization code may each be
used once. Held in process memory, both could be replayed against another replica
or after a restart; here the replay runs in a second Python process on the same
database and must be refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import select

from services.auth import backend_services, smart_launch
from services.auth.principal import Role
from services.auth.tokens import AuthError, LocalIssuer
from services.db import make_engine, migrate, session_factory, session_scope
from services.tables import OneTimeIdRow
from tests.security.sign_in_support import cheap_argon2  # noqa: F401  (a fixture)

REPO = Path(__file__).resolve().parents[2]
ORIGIN = "http://127.0.0.1:8000"
TOKEN_URL = f"{ORIGIN}/auth/token"

#: Redeems the code and the assertion again, in a fresh process (a replica, a restart).
REPLAY = textwrap.dedent("""
    import json, sys
    from services.auth import backend_services, smart_launch
    from services.auth.tokens import AuthError, LocalIssuer
    from services.db import make_engine, session_factory, session_scope
    args = json.loads(sys.argv[1])
    issuer = LocalIssuer(__import__("pathlib").Path(args["key"]), "urn:test:issuer",
                         "clinfuse")
    sessions = session_factory(make_engine(args["db"]))
    out = {}
    for what in ("code", "assertion"):
        try:
            with session_scope(sessions) as session:
                if what == "code":
                    smart_launch.exchange_code(session, issuer, ttl_s=60, **args["code"])
                else:
                    backend_services.client_credentials_grant(
                        session, issuer, args["assertion"], token_endpoint=args["aud"],
                        scope="", ttl_s=60)
            out[what] = "accepted"
        except AuthError as exc:
            out[what] = exc.message
    print(json.dumps(out))
""")


@pytest.fixture
def store(tmp_path: Path, cheap_argon2: None) -> dict[str, Any]:  # noqa: F811
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    engine = make_engine(db)
    migrate(engine)
    issuer = LocalIssuer(tmp_path / "issuer.pem", "urn:test:issuer", "clinfuse")
    key = ec.generate_private_key(ec.SECP384R1())
    jwk = {**jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "k1"}
    sessions = session_factory(engine)
    with session_scope(sessions) as session:
        backend_services.add_user(session, "dr.lee", "clinician-pw", Role.clinician)
        backend_services.register_client(session, "lab", {"keys": [jwk]}, Role.integration)
    return {"db": db, "key_path": tmp_path / "issuer.pem", "issuer": issuer,
            "client_key": key, "sessions": sessions}


def _code(store: dict[str, Any]) -> dict[str, str]:
    verifier = smart_launch.new_code_verifier()
    params = {"response_type": "code", "client_id": smart_launch.DASHBOARD_CLIENT_ID,
              "redirect_uri": f"{ORIGIN}/dashboard/callback", "state": "s",
              "scope": "openid user/*.read", "code_challenge_method": "S256",
              "code_challenge": smart_launch.code_challenge(verifier), "aud": f"{ORIGIN}/fhir"}
    request = smart_launch.parse_authorization_request(
        params, issuer=store["issuer"], origin=ORIGIN, fhir_base=f"{ORIGIN}/fhir")
    with session_scope(store["sessions"]) as session:
        from services.tables import UserRow

        user = session.get(UserRow, "dr.lee")
        assert user is not None
        code = smart_launch.issue_code(store["issuer"], request, user)
    return {"code": code, "redirect_uri": params["redirect_uri"],
            "client_id": smart_launch.DASHBOARD_CLIENT_ID, "code_verifier": verifier}


def _assertion(store: dict[str, Any]) -> str:
    now = int(time.time())
    return jwt.encode({"iss": "lab", "sub": "lab", "aud": TOKEN_URL, "exp": now + 120,
                       "jti": uuid.uuid4().hex}, store["client_key"], algorithm="ES384",
                      headers={"kid": "k1"})


def test_replay_in_another_process_is_refused(store: dict[str, Any]) -> None:
    code, assertion = _code(store), _assertion(store)
    with session_scope(store["sessions"]) as session:
        smart_launch.exchange_code(session, store["issuer"], ttl_s=60, **code)
        backend_services.client_credentials_grant(session, store["issuer"], assertion,
                                                  token_endpoint=TOKEN_URL, scope="",
                                                  ttl_s=60)
    args = {"db": store["db"], "key": str(store["key_path"]), "code": code,
            "assertion": assertion, "aud": TOKEN_URL}
    done = subprocess.run([sys.executable, "-c", REPLAY, json.dumps(args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out == {"code": "the authorization code was already used",
                   "assertion": "client_assertion jti was already used"}


def test_used_ids_are_stored_hashed_with_expiry_and_purged(store: dict[str, Any]) -> None:
    code, assertion = _code(store), _assertion(store)
    stale = datetime.now(UTC) - timedelta(minutes=5)
    with session_scope(store["sessions"]) as session:
        session.add(OneTimeIdRow(id_hash="0" * 64, kind="assertion-jti", expires_at=stale))
    with session_scope(store["sessions"]) as session:
        smart_launch.exchange_code(session, store["issuer"], ttl_s=60, **code)
        backend_services.client_credentials_grant(session, store["issuer"], assertion,
                                                  token_endpoint=TOKEN_URL, scope="",
                                                  ttl_s=60)
    with session_scope(store["sessions"]) as session:
        rows = session.scalars(select(OneTimeIdRow)).all()
        assert sorted(r.kind for r in rows) == ["assertion-jti", "authorization-code"]
        jti = jwt.decode(assertion, options={"verify_signature": False})["jti"]
        assert all(jti not in r.id_hash and len(r.id_hash) == 64 for r in rows)
        # A replay in the same transaction as other work fails alone: the work survives.
        with pytest.raises(AuthError, match="already used"):
            smart_launch.exchange_code(session, store["issuer"], ttl_s=60, **code)
        assert len(session.scalars(select(OneTimeIdRow)).all()) == 2
