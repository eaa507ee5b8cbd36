"""The dashboard's web plumbing: templates, the session cookie, CSRF, HTML errors.

The session lives on the server (:mod:`services.dashboard.sessions`): the
HttpOnly, SameSite=Strict, Secure cookie holds only a random id, and the session
holds what the token that signed the user in granted (verified with the same
:class:`TokenVerifier` as the API), so a dashboard user has exactly the rights of
that token's role; logout revokes it. Every POST form
carries a CSRF token derived (HMAC) from a random per-browser cookie, so a form
posted from another site, which cannot read that cookie, is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, Request
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from starlette.responses import RedirectResponse, Response

from services.api.deps import SessionDep
from services.auth.principal import Principal, Role
from services.core.config import Settings
from services.dashboard import access
from services.dashboard.sessions import session_principal

__all__ = ["CSRF_COOKIE", "SESSION_COOKIE", "DashboardError", "DashboardRoute", "Forbidden",
           "LoginRequired", "UserDep", "csrf_token", "finish", "render", "templates"]

SESSION_COOKIE = "clinfuse_session"
CSRF_COOKIE = "clinfuse_csrf"
HERE = Path(__file__).parent
templates = Jinja2Templates(directory=str(HERE / "templates"))


def _pct(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "—"
    if 0 < value < 0.5 / 10 ** (digits + 2):
        return f"<{1 / 10 ** digits:g}%"  # "0%" would read as "no risk"
    return f"{100 * value:.{digits}f}%"


def _points(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:+.1f} pts"


def _when(value: datetime | str | None) -> str:
    """A time as the dashboard shows it: UTC, to the minute, unambiguous."""
    if value is None:
        return "—"
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return value
        value = parsed
    if value.tzinfo is None:  # SQLite hands back naive datetimes; everything stored is UTC
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


#: UCUM codes as clinicians write them.
_UNITS = {"10*3/uL": "×10³/µL", "10*9/L": "×10⁹/L", "10*6/uL": "×10⁶/µL", "mm[Hg]": "mmHg",
          "Cel": "°C", "[degF]": "°F", "umol/L": "µmol/L", "ug/L": "µg/L", "/min": "/min",
          "{beats}/min": "/min", "{breaths}/min": "/min", "g/dL": "g/dL", "%": "%"}


def _unit(value: str | None) -> str:
    if not value:
        return ""
    if value in _UNITS:
        return _UNITS[value]
    # Derived units (a trend is "per hour") contain the base unit's code.
    for code, text in sorted(_UNITS.items(), key=lambda kv: -len(kv[0])):
        if len(code) > 2 and code in value:
            value = value.replace(code, text)
    return value.replace("/min/h", "/min per h")


templates.env.filters["unit"] = _unit
templates.env.filters["pct"] = _pct
templates.env.filters["points"] = _points
templates.env.filters["when"] = _when


class DashboardError(Exception):
    """Shown to the user as an HTML error page with ``status``."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status, self.title, self.message = status, title, message


class Forbidden(DashboardError):
    def __init__(self, message: str) -> None:
        super().__init__(403, "Not available for your role", message)


class LoginRequired(Exception):
    """No valid session: the browser is sent to the login page."""


def _csrf_key(settings: Settings) -> bytes:
    """The per-deployment CSRF key, created once (0600) beside the other keys."""
    path = settings.keys_dir / "dashboard-csrf.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path.read_bytes()
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
    return path.read_bytes()


def _browser_nonce(request: Request) -> str:
    """This browser's CSRF nonce: from its cookie, or a new one set on the response."""
    nonce = request.cookies.get(CSRF_COOKIE)
    if not nonce or len(nonce) > 64:
        nonce = getattr(request.state, "new_csrf_nonce", None) or secrets.token_urlsafe(24)
        request.state.new_csrf_nonce = nonce
    return nonce


def csrf_token(request: Request) -> str:
    """The hidden form value that proves a POST came from a page of this dashboard."""
    key = _csrf_key(request.app.state.settings)
    return hmac.new(key, b"csrf|" + _browser_nonce(request).encode(), hashlib.sha256).hexdigest()


def check_csrf(request: Request, submitted: str | None) -> None:
    """Refuse a POST whose CSRF token does not match this browser's cookie."""
    nonce = request.cookies.get(CSRF_COOKIE)
    if not nonce or not submitted:
        raise DashboardError(403, "Form expired", "The form could not be verified. Reload "
                                                  "the page and submit it again.")
    key = _csrf_key(request.app.state.settings)
    expected = hmac.new(key, b"csrf|" + nonce.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, submitted):
        raise DashboardError(403, "Form expired", "The form could not be verified. Reload "
                                                  "the page and submit it again.")


def secure_cookies(request: Request) -> bool:
    """Cookies are Secure unless settings say plain-http loopback (the demo) explicitly.

    Not guessed from the base URL: a deployment behind a TLS proxy that forgot its
    public URL would otherwise send the session id over any plain-http request.
    """
    return bool(request.app.state.settings.session_cookie_secure)


def set_session(response: Response, request: Request, session_id: str, max_age: int) -> None:
    """The session cookie: the random id of a server-side session, never a token."""
    response.set_cookie(SESSION_COOKIE, session_id, max_age=max_age, httponly=True,
                        samesite="strict", secure=secure_cookies(request), path="/")


def finish(request: Request, response: Response) -> Response:
    nonce = getattr(request.state, "new_csrf_nonce", None)
    if nonce:
        response.set_cookie(CSRF_COOKIE, nonce, httponly=True, samesite="strict",
                            secure=secure_cookies(request), path="/")
    # Pages carry patient data: never cached, never framed by another site.
    response.headers.setdefault("Cache-Control", "no-store")
    response.headers.setdefault("X-Frame-Options", "SAMEORIGIN")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers.setdefault(
        "Content-Security-Policy",
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "frame-src 'self'; frame-ancestors 'self'; form-action 'self'; base-uri 'none'")
    return response


def render(request: Request, template: str, context: dict[str, Any] | None = None, *,
           status_code: int = 200) -> Response:
    """A template with the dashboard's common context (user, CSRF token, nav)."""
    principal: Principal | None = getattr(request.state, "principal", None)
    ctx = {"request": request, "principal": principal, "csrf": csrf_token(request),
           "Role": Role, **(context or {})}
    return templates.TemplateResponse(request, template, ctx, status_code=status_code)


class DashboardRoute(APIRoute):
    """Turns dashboard errors into HTML pages and a missing session into the login page."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            try:
                response = await handler(request)
            except LoginRequired:
                target = request.url.path
                if request.url.query:
                    target += "?" + request.url.query
                response = RedirectResponse(f"/dashboard/login?next={quote(target, safe='')}",
                                            status_code=303)
            except DashboardError as exc:
                response = render(request, "error.html", {"title": exc.title,
                                                          "message": exc.message},
                                  status_code=exc.status)
            return finish(request, response)

        return route_handler


def current_user(request: Request, session: SessionDep) -> Principal:
    """The signed-in dashboard user of the session cookie; redirect to login otherwise."""
    session_id = request.cookies.get(SESSION_COOKIE)
    principal = session_principal(session, session_id) if session_id else None
    if principal is None:
        raise LoginRequired
    if principal.is_system:
        raise Forbidden("System clients cannot use the dashboard.")
    # The access-log middleware records every request that has a principal.
    request.state.principal = principal
    # Role and token scopes of this page (services.dashboard.access), as require() for the API.
    refusal = access.enforce(request, principal)
    if refusal is not None:
        raise Forbidden(refusal)
    return principal


UserDep = Annotated[Principal, Depends(current_user)]


def require_roles(principal: Principal, *roles: Role, what: str) -> None:
    """Forbidden unless ``principal`` has one of ``roles`` (admin may do everything)."""
    if principal.role not in (*roles, Role.admin):
        raise Forbidden(f"The {principal.role.value} role cannot open {what}.")
