"""Local sign-in: the one door for the built-in issuer's users, on every path.

Local users sign in three ways: the password grant (``POST /auth/token``), the
SMART authorization form (``POST /auth/authorize``, then code and token) and the
dashboard's login form. All three call :func:`sign_in_local_user`, so they share

* one environment rule (:func:`require_local_sign_in`): local users exist for the
  demo only. A deployment may run the built-in issuer for SMART Backend Services
  clients (deploy/compose.yaml does), and its users must still not sign in there;
* one throttle: failed sign-ins are counted per user name and per client address
  over a sliding window, in the database, so every replica and every restart sees
  the same counts. Past the limit a try is refused with 429 and ``Retry-After``
  *before* its password is hashed: each argon2 verification costs 64 MiB and tens of
  milliseconds, so unthrottled guessing was also a way to exhaust the server.

The client address is the request's peer as the ASGI server reports it; behind a
reverse proxy, run uvicorn with ``--forwarded-allow-ips`` naming the proxy, so the
address is the browser's and not the proxy's (else every user shares one counter).
"""

from __future__ import annotations

import hashlib
import math
from datetime import UTC, datetime, timedelta
from functools import cache

from sqlalchemy import delete, func, select
from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker
from starlette.requests import Request

from services.auth.passwords import hash_password, verify_password
from services.auth.tokens import AuthError
from services.core.config import Settings
from services.tables import SignInFailureRow, UserRow

__all__ = ["LOCAL_SIGN_IN_OFF", "TooManySignInFailures", "check_password", "client_address",
           "local_sign_in_allowed", "require_local_sign_in", "sign_in_local_user"]

LOCAL_SIGN_IN_OFF = ("local sign-in exists only in the demo environment; sign in through "
                     "the hospital's identity provider")


class TooManySignInFailures(AuthError):
    """429: too many recent failures for this user name or client address."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(429, "too many failed sign-ins for this user name or address; "
                              f"try again in {retry_after_s} s", error="too_many_attempts")
        self.retry_after_s = retry_after_s


def local_sign_in_allowed(settings: Settings) -> bool:
    """Whether local users may sign in: the demo environment with the built-in issuer."""
    return settings.builtin_issuer_enabled and settings.environment == "demo"


def require_local_sign_in(settings: Settings) -> None:
    """AuthError (400, ``unsupported_grant_type``) unless local sign-in is allowed."""
    if not local_sign_in_allowed(settings):
        raise AuthError(400, LOCAL_SIGN_IN_OFF, error="unsupported_grant_type")


def client_address(request: Request) -> str:
    """The address the throttle counts for this request (see the module's note on proxies)."""
    return request.client.host if request.client is not None else "unknown"


@cache
def _dummy_hash() -> str:
    return hash_password("not-a-real-password-used-for-timing")


def check_password(session: Session, username: str, password: str) -> UserRow:
    """The local user with this password; AuthError otherwise (same answer for both cases).

    The password check alone, for :func:`sign_in_local_user`; it applies neither the
    environment rule nor the throttle.
    """
    user = session.get(UserRow, username) if username else None
    # Verify against a dummy hash for unknown users, so timing does not reveal who exists.
    if not verify_password(user.password_hash if user else _dummy_hash(), password) or \
            user is None:
        raise AuthError(401, "unknown user or wrong password", error="invalid_grant")
    return user


def _key(kind: str, value: str) -> str:
    return hashlib.sha256(f"{kind}\x00{value}".encode()).hexdigest()


def _aware(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything stored is UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _retry_after(session: Session, column: InstrumentedAttribute[str], key: str, *,
                 limit: int, since: datetime, window: timedelta, now: datetime,
                 pending_id: int) -> int | None:
    """Seconds until ``key`` is back under ``limit`` failures; None when it is under now.

    Counts this try's own pending row, so concurrent tries see each other: of a burst,
    only about ``limit`` get as far as hashing.
    """
    where = (column == key, SignInFailureRow.at >= since)
    count = session.scalar(select(func.count()).select_from(SignInFailureRow).where(*where))
    if not count or count <= limit:
        return None
    # Once the limit-th newest other failure leaves the window, a try is admitted again.
    times = session.scalars(select(SignInFailureRow.at).where(
        *where, SignInFailureRow.id != pending_id).order_by(SignInFailureRow.at.desc())
        .offset(limit - 1).limit(1)).all()
    if not times:
        return 1
    return max(1, math.ceil((_aware(times[0]) + window - now).total_seconds()))


def sign_in_local_user(sessions: sessionmaker[Session], settings: Settings, username: str,
                       password: str, *, address: str) -> UserRow:
    """The signed-in local user, or AuthError: 400 off, 429 throttled, 401 wrong password.

    Each step commits on its own, whatever the caller's transaction does: a failure is
    counted even when the request then fails, and a burst of tries sees itself.
    """
    require_local_sign_in(settings)
    now = datetime.now(UTC)
    window = timedelta(seconds=settings.sign_in_window_s)
    user_key, address_key = _key("user", username), _key("address", address)
    with sessions() as session, session.begin():
        # Old failures are purged on the way; they no longer count.
        session.execute(delete(SignInFailureRow).where(SignInFailureRow.at < now - window),
                        execution_options={"synchronize_session": False})
        # This try is recorded as a failure before its password is hashed; a success
        # clears it (with the user's earlier failures) afterwards.
        pending = SignInFailureRow(user_key=user_key, address_key=address_key, at=now)
        session.add(pending)
        session.flush()
        pending_id = pending.id
    with sessions() as session, session.begin():
        waits = [_retry_after(session, SignInFailureRow.user_key, user_key,
                              limit=settings.sign_in_max_failures_per_user, since=now - window,
                              window=window, now=now, pending_id=pending_id),
                 _retry_after(session, SignInFailureRow.address_key, address_key,
                              limit=settings.sign_in_max_failures_per_address,
                              since=now - window, window=window, now=now,
                              pending_id=pending_id)]
        wait = max((w for w in waits if w is not None), default=None)
        if wait is not None:
            # A refused try is not a failure: it cost no hash, and counting it would keep
            # a patient user locked out for as long as they keep trying.
            session.execute(delete(SignInFailureRow).where(SignInFailureRow.id == pending_id))
    if wait is not None:
        raise TooManySignInFailures(wait)
    with sessions() as session, session.begin():
        user = check_password(session, username, password)  # AuthError keeps the failure
        session.execute(delete(SignInFailureRow).where(SignInFailureRow.user_key == user_key,
                                                       SignInFailureRow.id <= pending_id))
        # Out of the session before it commits, so the returned row keeps its attributes.
        session.expunge(user)
    return user
