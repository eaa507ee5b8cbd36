"""SMART App Launch pieces of the built-in issuer: PKCE, codes, launch contexts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from services.auth import smart_launch
from services.auth.backend_services import add_user
from services.auth.principal import Role
from services.auth.sign_in import check_password
from services.auth.tokens import AuthError, LocalIssuer, TokenVerifier
from services.db import session_factory
from services.tables import PatientRow

ORIGIN = "http://127.0.0.1:8000"
REDIRECT = f"{ORIGIN}/dashboard/callback"


@pytest.fixture
def issuer(tmp_path: Path) -> LocalIssuer:
    return LocalIssuer(tmp_path / "issuer.pem", "urn:test:issuer", "clinfuse")


@pytest.fixture
def session(db_engine: Engine) -> Iterator[Session]:
    with session_factory(db_engine)() as s:
        add_user(s, "dr.lee", "clinician-pw", Role.clinician)
        s.add(PatientRow(id="a" * 32, identifier_system="urn:mrn", identifier_value="M1",
                         record={}))
        s.flush()
        yield s
        s.rollback()


def _request(issuer: LocalIssuer, verifier: str, **overrides: str
             ) -> smart_launch.AuthorizationRequest:
    params = {"response_type": "code", "client_id": smart_launch.DASHBOARD_CLIENT_ID,
              "redirect_uri": REDIRECT, "state": "s1", "scope": "launch openid patient/*.read",
              "code_challenge": smart_launch.code_challenge(verifier),
              "code_challenge_method": "S256", "aud": f"{ORIGIN}/fhir",
              "launch": smart_launch.issue_launch(issuer, "a" * 32), **overrides}
    return smart_launch.parse_authorization_request(params, issuer=issuer, origin=ORIGIN,
                                                    fhir_base=f"{ORIGIN}/fhir")


def test_pkce_s256_matches_rfc7636_appendix_b() -> None:
    assert smart_launch.code_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk") == \
        "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_code_exchange_carries_patient_and_is_single_use(issuer: LocalIssuer,
                                                         session: Session) -> None:
    verifier = smart_launch.new_code_verifier()
    auth = _request(issuer, verifier)
    assert auth.patient == "a" * 32
    code = smart_launch.issue_code(issuer, auth, check_password(session, "dr.lee",
                                                                "clinician-pw"))
    kwargs = {"code": code, "redirect_uri": REDIRECT,
              "client_id": smart_launch.DASHBOARD_CLIENT_ID, "ttl_s": 600}
    with pytest.raises(AuthError, match="code_verifier does not match"):
        smart_launch.exchange_code(session, issuer, code_verifier="x" * 43, **kwargs)
    with pytest.raises(AuthError, match="redirect_uri"):
        smart_launch.exchange_code(session, issuer, code_verifier=verifier,
                                   **{**kwargs, "redirect_uri": f"{ORIGIN}/elsewhere"})
    answer = smart_launch.exchange_code(session, issuer, code_verifier=verifier, **kwargs)
    assert answer["patient"] == "a" * 32 and answer["token_type"] == "Bearer"
    principal = TokenVerifier([issuer.trusted()], audience="clinfuse").verify(
        answer["access_token"])
    assert principal.subject == "dr.lee" and principal.role is Role.clinician
    with pytest.raises(AuthError, match="already used"):
        smart_launch.exchange_code(session, issuer, code_verifier=verifier, **kwargs)


def test_a_code_is_not_an_access_token(issuer: LocalIssuer, session: Session) -> None:
    verifier = smart_launch.new_code_verifier()
    code = smart_launch.issue_code(issuer, _request(issuer, verifier),
                                   check_password(session, "dr.lee", "clinician-pw"))
    with pytest.raises(AuthError):
        TokenVerifier([issuer.trusted()], audience="clinfuse").verify(code)


@pytest.mark.parametrize(("override", "message"), [
    ({"redirect_uri": "https://evil.example/dashboard/callback"}, "redirect_uri"),
    ({"client_id": "someone-else"}, "client_id"),
    ({"state": ""}, "state"),
])
def test_bad_clients_are_shown_an_error_not_redirected(issuer: LocalIssuer,
                                                       override: dict[str, str],
                                                       message: str) -> None:
    with pytest.raises(AuthError, match=message):
        _request(issuer, smart_launch.new_code_verifier(), **override)


@pytest.mark.parametrize(("override", "error"), [
    ({"code_challenge_method": "plain"}, "PKCE"),
    ({"aud": "https://other.example/fhir"}, "aud"),
    ({"scope": "openid"}, "launch scope"),
    ({"launch": "not-a-launch"}, "launch context"),
])
def test_bad_requests_are_redirected_with_an_error(issuer: LocalIssuer,
                                                   override: dict[str, str],
                                                   error: str) -> None:
    with pytest.raises(smart_launch.RedirectableError) as caught:
        _request(issuer, smart_launch.new_code_verifier(), **override)
    assert caught.value.location.startswith(REDIRECT + "?error=")
    assert "state=s1" in caught.value.location and error in str(caught.value)


def test_a_forged_launch_context_is_refused(issuer: LocalIssuer, tmp_path: Path) -> None:
    other = LocalIssuer(tmp_path / "other.pem", issuer.issuer, "clinfuse")
    with pytest.raises(AuthError):
        smart_launch.read_launch(issuer, smart_launch.issue_launch(other, "a" * 32))
    unsigned = jwt.encode({"patient": "a" * 32}, "k" * 32, algorithm="HS256")
    with pytest.raises(AuthError):
        smart_launch.read_launch(issuer, unsigned)
