"""Server-side dashboard sessions: the cookie holds a random id, the database the rest.

Sign-in (the local login form, or the SMART launch's callback) verifies an access
token once and opens a session holding what the token granted: subject, role,
scopes, issuer and launch patient. The token itself is dropped, never put in a
cookie. The browser gets 256 random bits; the table keeps only their sha256, so a
read of the database yields no usable cookie. Logout revokes the row, so a cookie
copied before logout stops working at once, on every replica.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, update
from sqlalchemy.orm import Session

from services.auth.principal import Principal, Role
from services.tables import DashboardSessionRow

__all__ = ["open_session", "revoke_session", "session_principal"]

#: Longest id a cookie may carry; anything longer is not one of ours.
_MAX_ID_LENGTH = 64


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def _aware(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything stored is UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def open_session(db: Session, principal: Principal, *, expires_in_s: int) -> str:
    """A new session for ``principal`` lasting ``expires_in_s``; returns the cookie's id.

    ``expires_in_s`` is the lifetime of the token that signed the user in: the session
    grants nothing the token would not have, for no longer.
    """
    now = datetime.now(UTC)
    # Expired sessions (revoked or not) are purged on the way; they open nothing.
    db.execute(delete(DashboardSessionRow).where(DashboardSessionRow.expires_at < now),
               execution_options={"synchronize_session": False})
    session_id = secrets.token_urlsafe(32)
    db.add(DashboardSessionRow(
        id_hash=_digest(session_id), subject=principal.subject, role=principal.role.value,
        scopes=" ".join(sorted(principal.scopes)), issuer=principal.issuer,
        patient=principal.patient, created_at=now,
        expires_at=now + timedelta(seconds=max(expires_in_s, 0))))
    db.flush()
    return session_id


def session_principal(db: Session, session_id: str) -> Principal | None:
    """The signed-in user of a live session; None when unknown, expired or revoked."""
    if not session_id or len(session_id) > _MAX_ID_LENGTH:
        return None
    row = db.get(DashboardSessionRow, _digest(session_id))
    if row is None or row.revoked_at is not None or \
            _aware(row.expires_at) <= datetime.now(UTC):
        return None
    return Principal(subject=row.subject, role=Role(row.role),
                     scopes=frozenset(row.scopes.split()), issuer=row.issuer,
                     patient=row.patient)


def revoke_session(db: Session, session_id: str) -> None:
    """End a session now (logout); an unknown id is ignored."""
    if not session_id or len(session_id) > _MAX_ID_LENGTH:
        return
    db.execute(update(DashboardSessionRow)
               .where(DashboardSessionRow.id_hash == _digest(session_id),
                      DashboardSessionRow.revoked_at.is_(None))
               .values(revoked_at=datetime.now(UTC)),
               execution_options={"synchronize_session": False})
