"""The dashboard's pages: clinician worklist and patient page, compliance audits and log.

Server-rendered (Jinja2) with a little local JavaScript for the image viewer; no
asset comes from outside this service, since hospital networks are closed.
Every route verifies the session cookie (:func:`web.current_user`), so the
access-log middleware records who opened what; patient pages also set
``request.state.patient_id``.
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode, urlsplit

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import RedirectResponse, Response

from services.api.deps import SessionDep, SettingsDep, base_url
from services.auth import backend_services, sign_in, smart_launch
from services.auth.principal import Principal, Role
from services.auth.tokens import AuthError
from services.core.config import Settings
from services.dashboard import charts, compliance, imaging, queries
from services.dashboard.sessions import open_session, revoke_session
from services.dashboard.web import (
    SESSION_COOKIE,
    DashboardError,
    DashboardRoute,
    UserDep,
    check_csrf,
    render,
    require_roles,
    secure_cookies,
    set_session,
)
from services.outbound import Outbound, OutboundError
from services.tables import PredictionRow

router = APIRouter(prefix="/dashboard", route_class=DashboardRoute, include_in_schema=False)
#: Everything the app includes: the clinician pages here, the compliance pages beside them.
routers = (router, compliance.router)

STATIC_DIR = Path(__file__).parent / "static"
_STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".svg": "image/svg+xml", ".png": "image/png", ".ico": "image/x-icon"}
LAUNCH_COOKIE = "clinfuse_launch"
#: What the dashboard asks for in a SMART launch: patient context, read access to that
#: patient, and feedback on its predictions (services.dashboard.access).
LAUNCH_SCOPE = "launch openid fhirUser patient/*.rs clinfuse/feedback"


def _home_for(principal: Principal) -> str:
    return "/dashboard/audits" if principal.role == Role.compliance else "/dashboard/worklist"


def _safe_next(target: str | None) -> str | None:
    """Only a path inside the dashboard: a login link must not redirect off-site."""
    if not target:
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not parts.path.startswith("/dashboard/"):
        return None
    return target


# -- static assets ------------------------------------------------------------------


@router.get("/static/{name}")
def static(name: str) -> Response:
    path = STATIC_DIR / name
    if "/" in name or name.startswith(".") or path.suffix not in _STATIC_TYPES or \
            not path.is_file():
        raise DashboardError(404, "Not found", "There is no such file.")
    return Response(path.read_bytes(), media_type=_STATIC_TYPES[path.suffix],
                    headers={"Cache-Control": "public, max-age=3600"})


# -- session ------------------------------------------------------------------------


@router.get("")
@router.get("/")
def home(user: UserDep) -> Response:
    return RedirectResponse(_home_for(user), status_code=303)


@router.get("/login")
def login_page(request: Request, next: str | None = None) -> Response:
    return render(request, "login.html", {"next": _safe_next(next), "error": None})


@router.post("/login")
def login(request: Request, session: SessionDep, settings: SettingsDep,
          username: Annotated[str, Form(max_length=128)],
          password: Annotated[str, Form(max_length=256)],
          csrf: Annotated[str, Form(max_length=128)] = "",
          next: Annotated[str | None, Form(max_length=2000)] = None) -> Response:
    """The demo's local login: sign in, then a server-side session (the cookie holds its id)."""
    check_csrf(request, csrf)
    issuer = getattr(request.app.state, "local_issuer", None)
    if issuer is None or not sign_in.local_sign_in_allowed(settings):
        raise DashboardError(400, "Local login is off",
                             "This deployment signs in through the hospital's identity "
                             "provider; open the dashboard from the EHR.")
    try:
        user = sign_in.sign_in_local_user(request.app.state.sessions, settings, username,
                                          password, address=sign_in.client_address(request))
    except sign_in.TooManySignInFailures as exc:
        response = render(request, "login.html", {
            "next": _safe_next(next),
            "error": f"Too many failed sign-ins. Try again in {exc.retry_after_s} seconds."},
            status_code=429)
        response.headers["Retry-After"] = str(exc.retry_after_s)
        return response
    except AuthError:
        return render(request, "login.html", {"next": _safe_next(next),
                                              "error": "Unknown user or wrong password."},
                      status_code=401)
    # The session grants what the password grant's token would (its scopes come from one
    # table); the token is verified once and dropped.
    access = backend_services.password_grant(session, issuer, user,
                                             ttl_s=settings.auth_token_ttl_s)
    principal = request.app.state.token_verifier.verify(access["access_token"])
    target = _safe_next(next) or _home_for(principal)
    response = RedirectResponse(target, status_code=303)
    expires_in = int(access["expires_in"])
    set_session(response, request, open_session(session, principal, expires_in_s=expires_in),
                expires_in)
    return response


@router.post("/logout")
def logout(request: Request, session: SessionDep,
           csrf: Annotated[str, Form(max_length=128)] = "") -> Response:
    """Revoke the server-side session (a copy of the cookie stops working too)."""
    check_csrf(request, csrf)
    revoke_session(session, request.cookies.get(SESSION_COOKIE, ""))
    response = RedirectResponse("/dashboard/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


# -- clinician views ----------------------------------------------------------------


@router.get("/worklist")
def worklist_page(request: Request, user: UserDep, session: SessionDep,
                  unit: Annotated[str | None, Query(max_length=200)] = None,
                  window: Annotated[str, Query(pattern="^(24h|72h|7d|all)$")] = "all",
                  band: Annotated[str | None, Query(pattern="^(high|moderate|low|none)?$")]
                  = None,
                  sort: Annotated[str, Query(pattern="^(risk|time|patient|unit)$")] = "risk",
                  order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc") -> Response:
    require_roles(user, Role.clinician, what="the worklist")
    data = queries.worklist(session, unit=unit or None, window=window, band=band or None,
                            sort=sort, descending=order == "desc")  # type: ignore[arg-type]
    filters = {"unit": unit or "", "window": window, "band": band or ""}

    def sort_link(key: str) -> str:
        flip = "asc" if sort == key and order == "desc" else "desc"
        return "?" + urlencode({**{k: v for k, v in filters.items() if v}, "sort": key,
                                "order": flip})

    return render(request, "worklist.html", {
        "data": data, "filters": filters, "sort": sort, "order": order,
        "sort_link": sort_link, "bands": queries.BANDS, "windows": queries.TIME_WINDOWS})


def _patient_or_404(session: SessionDep, request: Request, user: Principal,
                    patient_id: str) -> queries.PatientView:
    # Set first, so a refused attempt is logged against the patient too.
    request.state.patient_id = patient_id[:32]
    require_roles(user, Role.clinician, what="a single patient's record")
    view = queries.patient_view(session, patient_id)
    if view is None:
        raise DashboardError(404, "Patient not found",
                             "No patient with this id is stored here.")
    return view


def _cache_dir(request: Request) -> Path | None:
    """Where the prediction service keeps its caches (image tensors, saliency)."""
    service = getattr(request.app.state, "predictions", None)
    for holder in (service, getattr(service, "explainer", None)):
        value = getattr(holder, "cache_dir", None)
        if value is not None:
            return Path(value)
    settings = request.app.state.settings
    return Path(settings.cache_dir) if settings.cache_dir else settings.data_dir / "cache"


@router.get("/patients/{patient_id}")
def patient_page(request: Request, user: UserDep, session: SessionDep,
                 patient_id: str) -> Response:
    view = _patient_or_404(session, request, user, patient_id)
    series = imaging.patient_series(session, view.patient)
    explanation = view.explanation
    model_view = imaging.find_model_view(_cache_dir(request), explanation.get("image"))
    n_slices = 0
    if series:
        try:
            n_slices = int(imaging.series_volume(session, request.app.state.dicom_store,
                                                 series[0].uid).shape[0])
        except (ValueError, OSError):
            n_slices = 0
    context: dict[str, Any] = {
        "v": view, "ex": explanation, "series": series[0] if series else None,
        "n_slices": n_slices, "model_view": model_view,
        "model_slices": model_view.n_slices if model_view else 0,
        "windows": imaging.WINDOWS,
        "trend": charts.trend_svg([(p.index_time, p.probability) for p in view.history],
                                  thresholds=_thresholds(view.prediction)),
        "bars": charts.modality_bars(explanation.get("modalities") or []),
        "factors": queries.top_factors(explanation),
        "reasons": queries.OVERRIDE_REASONS,
        "calibration": _calibration(request),
        "submitted": request.query_params.get("feedback") == "saved",
    }
    return render(request, "patient.html", context)


def _calibration(request: Request) -> str | None:
    """How the served model was calibrated, in words (for the risk card's note)."""
    service = getattr(request.app.state, "predictions", None)
    config = getattr(getattr(service, "model", None), "config", None) or {}
    method = (config.get("calibration") or {}).get("method") if isinstance(config, dict) \
        else None
    if not method:
        return None
    names = {"temperature": "temperature scaling", "platt": "Platt scaling",
             "isotonic": "isotonic regression", "beta": "beta calibration"}
    text = str(method).lower()
    return next((v for k, v in names.items() if text.startswith(k)), text.replace("-", " "))


def _thresholds(prediction: PredictionRow | None) -> list[tuple[str, float]]:
    out = []
    for name, item in ((prediction.decisions or {}) if prediction else {}).items():
        value = item.get("threshold") if isinstance(item, dict) else item
        if isinstance(value, int | float):
            out.append((str(name).replace("_", " "), float(value)))
    return out


def _png(data: bytes) -> Response:
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, "
                                                                            "max-age=300"})


@router.get("/patients/{patient_id}/series/{series_uid}/slices/{index}.png")
def slice_png(request: Request, user: UserDep, session: SessionDep, patient_id: str,
              series_uid: str, index: int,
              window: Annotated[str, Query(pattern="^(soft|lung|bone|brain|full)$")] = "soft"
              ) -> Response:
    view = _patient_or_404(session, request, user, patient_id)
    if series_uid not in {s.uid for s in imaging.patient_series(session, view.patient)}:
        raise DashboardError(404, "Not found", "This series does not belong to this patient.")
    volume = imaging.series_volume(session, request.app.state.dicom_store, series_uid)
    if not 0 <= index < volume.shape[0]:
        raise DashboardError(404, "Not found", "No such slice.")
    return _png(imaging.anatomy_png(volume, index, window))


def _model_view(request: Request, view: queries.PatientView) -> imaging.ModelView:
    model_view = imaging.find_model_view(_cache_dir(request), view.explanation.get("image"))
    if model_view is None:
        raise DashboardError(404, "Not found", "The model-input view is not cached.")
    return model_view


@router.get("/patients/{patient_id}/model-input/{index}.png")
def model_input_png(request: Request, user: UserDep, session: SessionDep, patient_id: str,
                    index: int) -> Response:
    model_view = _model_view(request, _patient_or_404(session, request, user, patient_id))
    if not 0 <= index < model_view.n_slices:
        raise DashboardError(404, "Not found", "No such slice.")
    return _png(imaging.model_input_png(model_view, index))


@router.get("/patients/{patient_id}/saliency/{index}.png")
def saliency_png(request: Request, user: UserDep, session: SessionDep, patient_id: str,
                 index: int) -> Response:
    model_view = _model_view(request, _patient_or_404(session, request, user, patient_id))
    if not 0 <= index < model_view.n_slices:
        raise DashboardError(404, "Not found", "No such slice.")
    return _png(imaging.heat_png(model_view, index))


@router.post("/patients/{patient_id}/feedback")
def feedback(request: Request, user: UserDep, session: SessionDep, patient_id: str,
             prediction_id: Annotated[str, Form(max_length=32)],
             verdict: Annotated[str, Form(pattern="^(agree|disagree)$")],
             reason: Annotated[str | None, Form(max_length=64)] = None,
             comment: Annotated[str | None, Form(max_length=2000)] = None,
             csrf: Annotated[str, Form(max_length=128)] = "") -> Response:
    check_csrf(request, csrf)
    _patient_or_404(session, request, user, patient_id)
    prediction = session.get(PredictionRow, prediction_id)
    if prediction is None or prediction.patient_id != patient_id:
        raise DashboardError(404, "Not found", "That prediction is not this patient's.")
    if verdict == "disagree" and not reason:
        raise DashboardError(400, "A reason is needed",
                             "Choose why you disagree, then submit again.")
    queries.record_feedback(session, prediction, agree=verdict == "agree", reason=reason,
                            comment=comment, recorded_by=user.subject)
    # Committed before the response: the session dependency would commit only after it
    # is sent, while the access-log middleware (another connection) appends before that,
    # and SQLite allows one writer at a time.
    session.commit()
    return RedirectResponse(f"/dashboard/patients/{patient_id}?feedback=saved#feedback",
                            status_code=303)


@router.get("/model-card")
def model_card(request: Request, user: UserDep) -> Response:
    service = getattr(request.app.state, "predictions", None)
    model = getattr(service, "model", None)
    artifact = getattr(model, "artifact", None)
    card = None
    if artifact is not None:
        from models.model_card import build_model_card

        card = build_model_card(artifact)
    return render(request, "model_card.html", {"card": card})


# -- SMART on FHIR EHR launch ----------------------------------------------------------


def _fhir_base(request: Request, settings: SettingsDep) -> str:
    return base_url(request, settings, "/fhir")


@router.get("/launch")
def launch(request: Request, settings: SettingsDep,
           iss: Annotated[str | None, Query(max_length=2000)] = None,
           launch: Annotated[str | None, Query(max_length=4000)] = None) -> Response:
    """EHR launch: check ``iss``, then send the browser to authorize with PKCE and state."""
    if not iss or not launch:
        # Without an EHR there is nothing to launch from: the standalone way in is the login.
        return RedirectResponse("/dashboard/login", status_code=303)
    if iss.rstrip("/") != _fhir_base(request, settings).rstrip("/"):
        raise DashboardError(400, "Unknown FHIR server",
                             "This launch came from a FHIR server the dashboard does not "
                             "trust. Open it again from your EHR.")
    state = secrets.token_urlsafe(24)
    verifier = smart_launch.new_code_verifier()
    authorize = settings.auth_authorize_endpoint or base_url(request, settings,
                                                             "/auth/authorize")
    params = {"response_type": "code", "client_id": smart_launch.DASHBOARD_CLIENT_ID,
              "redirect_uri": base_url(request, settings, "/dashboard/callback"),
              "launch": launch, "scope": LAUNCH_SCOPE, "state": state, "aud": iss,
              "code_challenge": smart_launch.code_challenge(verifier),
              "code_challenge_method": "S256"}
    response = RedirectResponse(smart_launch.redirect_with(authorize, **params),
                                status_code=302)
    # Lax, not Strict: the browser comes back here from the authorization step, and the
    # cookie holds only this launch's state and PKCE verifier, no credentials.
    response.set_cookie(LAUNCH_COOKIE, f"{state}.{verifier}", max_age=600, httponly=True,
                        samesite="lax", secure=secure_cookies(request),
                        path="/dashboard/callback")
    return response


#: The error codes of RFC 6749 section 4.1.2.1: the only part of an error redirect shown.
_OAUTH_ERRORS = frozenset({"invalid_request", "unauthorized_client", "access_denied",
                           "unsupported_response_type", "invalid_scope", "server_error",
                           "temporarily_unavailable"})
#: A FHIR resource id: the launch context's patient must be one to be put in a URL.
_FHIR_ID = re.compile(r"[A-Za-z0-9.-]{1,64}")


def _builtin_token_endpoint(request: Request, settings: Settings) -> str:
    """The built-in issuer's token endpoint, never taken from the request's Host header.

    The public URL when configured; else the address the server accepted this connection
    on (the socket's own, loopback in the demo), else the configured host and port.
    """
    if settings.public_base_url:
        return f"{settings.public_base_url.rstrip('/')}/auth/token"
    host, port = request.scope.get("server") or (settings.host, settings.port)
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    netloc = f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return f"{request.url.scheme}://{netloc}/auth/token"


@router.get("/callback")
def callback(request: Request, settings: SettingsDep, session: SessionDep,
             code: Annotated[str | None, Query(max_length=4000)] = None,
             state: Annotated[str | None, Query(max_length=256)] = None,
             error: Annotated[str | None, Query(max_length=64)] = None,
             error_description: Annotated[str | None, Query(max_length=500)] = None
             ) -> Response:
    """The redirect back from authorization: check state, redeem the code with the verifier."""
    saved = request.cookies.get(LAUNCH_COOKIE, "")
    expected_state, _, verifier = saved.partition(".")
    if not state or not expected_state or not secrets.compare_digest(state, expected_state):
        raise DashboardError(400, "Launch expired",
                             "This sign-in did not start here or took too long. Open the "
                             "dashboard from your EHR again.")
    if error or not code:
        # Only a standard OAuth error code is shown: the description is whatever text the
        # link's author chose, and this page must not carry it.
        shown = error if error in _OAUTH_ERRORS else "no authorization code came back"
        raise DashboardError(403, "Launch not authorised",
                             f"The sign-in was not authorised ({shown}).")
    token_endpoint = settings.auth_token_endpoint or _builtin_token_endpoint(request, settings)
    form = urlencode({
        "grant_type": "authorization_code", "code": code,
        "redirect_uri": base_url(request, settings, "/dashboard/callback"),
        "client_id": smart_launch.DASHBOARD_CLIENT_ID, "code_verifier": verifier})
    try:
        # Under the outbound policy (services.outbound): no redirects, a capped body, one
        # deadline. The built-in endpoint is this server's own address: http allowed.
        outbound = Outbound.from_settings(settings).with_endpoint(
            token_endpoint, allow_http=settings.auth_token_endpoint is None)
        answer = outbound.request(
            "POST", token_endpoint, purpose="the authorization server",
            headers={"Content-Type": "application/x-www-form-urlencoded",
                     "Accept": "application/json"},
            content=form.encode(), max_body_bytes=64 * 1024)
    except (OutboundError, ValueError):
        raise DashboardError(502, "Sign-in failed",
                             "The authorization server did not answer.") from None
    # Nothing of the reply is shown: its text is the remote server's, not ours.
    if answer.status != 200:
        raise DashboardError(403, "Sign-in failed", "The authorization code was refused.")
    try:
        body = json.loads(answer.body)
        principal = request.app.state.token_verifier.verify(body["access_token"])
    except (AuthError, KeyError, TypeError, ValueError):
        raise DashboardError(403, "Sign-in failed", "The token could not be verified.") \
            from None
    request.state.principal = principal
    patient = body.get("patient")
    target = (f"/dashboard/patients/{patient}"
              if isinstance(patient, str) and _FHIR_ID.fullmatch(patient)
              else _home_for(principal))
    response = RedirectResponse(target, status_code=303)
    expires_in = int(body.get("expires_in", 3600))
    set_session(response, request, open_session(session, principal, expires_in_s=expires_in),
                expires_in)
    response.delete_cookie(LAUNCH_COOKIE, path="/dashboard/callback")
    return response

