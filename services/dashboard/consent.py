"""The built-in issuer's authorization step (``/auth/authorize``): demo login and consent.

The routes live with the other OAuth endpoints in :mod:`services.api.routes.auth`;
this module renders the page and decides, with :mod:`services.auth.smart_launch`
doing the protocol checks. Nothing about the patient in context is shown before
the user has signed in: the page says only that a patient was selected.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import RedirectResponse, Response

from services.api.deps import base_url
from services.auth import sign_in, smart_launch
from services.auth.principal import Role
from services.auth.tokens import AuthError, LocalIssuer
from services.dashboard.web import DashboardError, check_csrf, finish, render

__all__ = ["authorize_get", "authorize_post"]


def _issuer(request: Request) -> LocalIssuer:
    issuer: LocalIssuer | None = getattr(request.app.state, "local_issuer", None)
    if issuer is None:
        raise AuthError(400, "the built-in issuer is disabled; sign in through the hospital's "
                             "authorization server", error="unsupported_response_type")
    return issuer


def _check(request: Request, params: dict[str, str]) -> smart_launch.AuthorizationRequest:
    settings = request.app.state.settings
    return smart_launch.parse_authorization_request(
        params, issuer=_issuer(request), origin=base_url(request, settings, ""),
        fhir_base=base_url(request, settings, "/fhir"))


def _page(request: Request, auth: smart_launch.AuthorizationRequest, *, error: str | None,
          status_code: int = 200) -> Response:
    return render(request, "consent.html", {"fields": auth.hidden_fields(),
                                            "has_patient": auth.patient is not None,
                                            "scope": auth.scope, "error": error},
                  status_code=status_code)


def _error_page(request: Request, exc: AuthError) -> Response:
    return finish(request, render(request, "error.html", {
        "title": "This sign-in request is not valid",
        "message": f"{exc.message}. Open clinfuse from your EHR again."},
        status_code=exc.status if exc.status < 500 else 400))


def _local_sign_in_off(request: Request) -> Response | None:
    """The error page when local users may not sign in here (no form is ever shown)."""
    if sign_in.local_sign_in_allowed(request.app.state.settings):
        return None
    return finish(request, render(request, "error.html", {
        "title": "Local sign-in is off",
        "message": "This deployment signs in through the hospital's identity provider. "
                   "Open clinfuse from your EHR."}, status_code=400))


def authorize_get(request: Request) -> Response:
    """Show the login and consent page for a checked authorization request."""
    if (off := _local_sign_in_off(request)) is not None:
        return off
    params = {k: v[:4000] for k, v in request.query_params.items()}
    try:
        auth = _check(request, params)
    except smart_launch.RedirectableError as exc:
        return RedirectResponse(exc.location, status_code=302)
    except AuthError as exc:
        return _error_page(request, exc)
    return finish(request, _page(request, auth, error=None))


def authorize_post(request: Request, form: dict[str, str]) -> Response:
    """Sign the user in, and on consent send the browser back with a one-time code."""
    if (off := _local_sign_in_off(request)) is not None:
        return off
    try:
        check_csrf(request, form.get("csrf"))
        auth = _check(request, form)
    except smart_launch.RedirectableError as exc:
        return RedirectResponse(exc.location, status_code=303)
    except AuthError as exc:
        return _error_page(request, exc)
    except DashboardError as exc:
        return finish(request, render(request, "error.html", {"title": exc.title,
                                                              "message": exc.message},
                                      status_code=exc.status))
    if form.get("decision") != "allow":
        return RedirectResponse(smart_launch.redirect_with(
            auth.redirect_uri, error="access_denied", error_description="the user declined",
            state=auth.state), status_code=303)
    try:
        user = sign_in.sign_in_local_user(
            request.app.state.sessions, request.app.state.settings,
            form.get("username", "")[:128], form.get("password", "")[:256],
            address=sign_in.client_address(request))
    except sign_in.TooManySignInFailures as exc:
        response = _page(request, auth, error="Too many failed sign-ins. Try again in "
                                              f"{exc.retry_after_s} seconds.", status_code=429)
        response.headers["Retry-After"] = str(exc.retry_after_s)
        return finish(request, response)
    except AuthError:
        return finish(request, _page(request, auth, error="Unknown user or wrong password.",
                                     status_code=401))
    if auth.patient is not None and Role(user.role) not in (Role.clinician, Role.admin):
        # Only roles that may read a patient's record may launch into one.
        return RedirectResponse(smart_launch.redirect_with(
            auth.redirect_uri, error="access_denied",
            error_description=f"the {user.role} role cannot open a patient's record",
            state=auth.state), status_code=303)
    code = smart_launch.issue_code(_issuer(request), auth, user)
    return RedirectResponse(smart_launch.redirect_with(auth.redirect_uri, code=code,
                                                       state=auth.state), status_code=303)
