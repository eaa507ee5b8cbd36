"""One-time ids (a client assertion's ``jti``, an authorization code) kept in the database.

Each may be used once until it expires. Remembered in one process's memory, an id
could be used again against another replica or after a restart; in the database,
the primary key makes the check atomic across all of them: of two transactions
claiming the same id, the second one's insert fails (on PostgreSQL it waits for the
first to commit, then fails).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Literal

from sqlalchemy import delete, insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.tables import OneTimeIdRow

__all__ = ["OneTimeKind", "claim_once"]

OneTimeKind = Literal["assertion-jti", "authorization-code"]


def claim_once(session: Session, kind: OneTimeKind, value: str, expires_at: float) -> bool:
    """True the first time ``value`` is claimed before ``expires_at`` (epoch s); else False.

    The claim joins the caller's transaction, so it counts once that commits (a failed
    request leaves the id unused). Expired ids are purged on the way: they are refused
    anyway by their signed ``exp``.
    """
    now = datetime.now(UTC)
    # Not synchronised with loaded rows: SQLite hands back naive times that Python cannot
    # compare with ``now``, and nothing reads a purged row again.
    session.execute(delete(OneTimeIdRow).where(OneTimeIdRow.expires_at < now),
                    execution_options={"synchronize_session": False})
    digest = hashlib.sha256(f"{kind}\x00{value}".encode()).hexdigest()
    try:
        # A savepoint: a replay fails alone, the caller's transaction goes on.
        # A Core insert: the ORM would warn about a replayed id already in its identity map.
        with session.begin_nested():
            session.execute(insert(OneTimeIdRow).values(
                id_hash=digest, kind=kind, expires_at=datetime.fromtimestamp(expires_at, UTC)))
    except IntegrityError:
        return False
    return True
