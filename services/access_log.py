"""The access log: every read or write of patient data, hash-chained and checkpointed.

Each entry's hash covers its fields and the previous entry's hash, so editing or
deleting an entry breaks the chain from there on. A chain alone cannot show that
its newest entries were cut off, so the head is checkpointed at intervals with an
Ed25519 signature: a tail truncated below a signed checkpoint is detected. Entries
after the newest checkpoint are only as safe as the database; checkpoints are also
written at shutdown, which keeps that window small.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from models.artifact import (
    generate_signing_key,
    load_public_key,
    load_signing_key,
    public_key_fingerprint,
)
from services.auth.principal import DEFAULT_PURPOSE, Principal
from services.core.config import Settings
from services.db import session_scope
from services.tables import AccessLogCheckpointRow, AccessLogRow

__all__ = ["GENESIS", "AccessLog", "ChainReport", "entry_hash", "pseudonym", "pseudonym_secret",
           "verify_chain"]

GENESIS = "0" * 64
PSEUDONYM_KEY_FILE = "pseudonym.key"
_PG_LOCK_ID = 0x636C696E  # any constant: serialises appends across server processes


def entry_hash(row: AccessLogRow) -> str:
    """The sha256 over an entry's fields and its predecessor's hash."""
    payload = json.dumps([row.seq, _iso(row.at), row.subject, row.role, row.action,
                          row.resource, row.patient_id, row.purpose, row.status, row.prev_hash],
                         separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _iso(at: datetime) -> str:
    # SQLite hands back naive datetimes; the chain must hash the same text on every backend.
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def _checkpoint_message(seq: int, head_hash: str, at: datetime) -> bytes:
    return f"clinfuse-access-log-checkpoint/1\n{seq}\n{head_hash}\n{_iso(at)}".encode()


def pseudonym_secret(settings: Settings) -> bytes:
    """``CLINFUSE_PSEUDONYM_SECRET``, else a random key kept in the keys directory.

    Keys the pseudonyms compliance sees, and the labels of imaging patients not (yet)
    linked to a stored patient (:mod:`services.imaging_access`).
    """
    if settings.pseudonym_secret:
        return settings.pseudonym_secret.encode()
    path = Path(settings.keys_dir) / PSEUDONYM_KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Created 0600 from the start; O_EXCL: a concurrent creator wins, we read its key.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(32))
    return path.read_bytes()


def pseudonym(patient_id: str | None, secret: bytes) -> str | None:
    """A stable per-deployment pseudonym for a patient id (keyed HMAC, not reversible)."""
    if patient_id is None:
        return None
    return "P-" + hmac.new(secret, patient_id.encode(), hashlib.sha256).hexdigest()[:16]


@dataclass
class _Pending:
    """One entry waiting for its group commit."""

    principal: Principal
    action: str
    resource: str
    patient_id: str | None
    purpose: str
    status: int
    seq: int | None = None
    error: Exception | None = None


class AccessLog:
    """Appends entries and writes signed checkpoints of the chain head."""

    def __init__(self, sessions: sessionmaker[Session], key_path: Path, *,
                 checkpoint_every: int = 100, checkpoint_interval_s: float = 300.0) -> None:
        self.sessions = sessions
        if not key_path.exists():
            key_path.parent.mkdir(parents=True, exist_ok=True)
            generate_signing_key(key_path)
        self._key: Ed25519PrivateKey = load_signing_key(key_path)
        self.public_key: Ed25519PublicKey = self._key.public_key()
        self.key_id = public_key_fingerprint(self.public_key)
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval_s = checkpoint_interval_s
        self._lock = threading.Lock()  # one writer at a time
        self._queue_lock = threading.Lock()
        self._pending: list[_Pending] = []
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()

    def record(self, principal: Principal, *, action: str, resource: str,
               patient_id: str | None = None, purpose: str | None = None,
               status: int = 200) -> int:
        """Append one entry; returns its sequence number once it is committed.

        Group commit: the thread that gets the writer lock appends every entry waiting
        at that moment in one transaction, so under load the requests share a few
        transactions instead of queueing for the database's write lock one by one.
        """
        return self.record_many(principal, patient_ids=[patient_id], action=action,
                                resource=resource, purpose=purpose, status=status)[0]

    def record_many(self, principal: Principal, *, patient_ids: Sequence[str | None],
                    action: str, resource: str, purpose: str | None = None,
                    status: int = 200) -> list[int]:
        """Append one entry per patient of one access (a search that returned several
        patients' data), all in one transaction; returns their sequence numbers.

        An auditor asking who saw a patient's data filters by that patient, so a read
        that spans patients is one entry for each of them, never one entry for none.
        """
        purpose = purpose or DEFAULT_PURPOSE[principal.role]
        entries = [_Pending(principal, action, resource, p, purpose, status)
                   for p in (patient_ids or [None])]
        with self._queue_lock:
            # Queued together, so one batch (one transaction) takes all of them.
            self._pending.extend(entries)
        with self._lock:
            if entries[0].seq is None and entries[0].error is None:
                with self._queue_lock:
                    batch, self._pending = self._pending, []
                self._write(batch)
        for entry in entries:
            if entry.error is not None:
                raise RuntimeError("could not append to the access log") from entry.error
        if (self._since_checkpoint >= self.checkpoint_every
                or time.monotonic() - self._last_checkpoint >= self.checkpoint_interval_s):
            self.checkpoint()
        return [e.seq for e in entries if e.seq is not None]

    def _write(self, batch: list[_Pending]) -> None:
        """Append ``batch`` in one transaction (the caller holds the writer lock)."""
        error: Exception | None = None
        for attempt in range(20):
            try:
                with session_scope(self.sessions) as session:
                    seqs = [self._append(session, e.principal, e.action, e.resource,
                                         e.patient_id, e.purpose, e.status) for e in batch]
                for e, seq in zip(batch, seqs, strict=True):
                    e.seq = seq
                self._since_checkpoint += len(batch)
                return
            except (IntegrityError, OperationalError) as exc:
                # Another process took this seq first (or, on SQLite, holds the write lock):
                # re-read the head and try again.
                error = exc
                time.sleep(0.005 * (attempt + 1))
        for e in batch:
            e.error = error or RuntimeError("the chain head kept moving")

    def _append(self, session: Session, principal: Principal, action: str, resource: str,
                patient_id: str | None, purpose: str, status: int) -> int:
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_ID})
        last = self._head(session)
        row = AccessLogRow(seq=(last.seq + 1) if last else 1, at=datetime.now(UTC),
                           subject=principal.subject[:256], role=principal.role.value,
                           action=action[:64], resource=resource[:512], patient_id=patient_id,
                           purpose=purpose[:128], status=status,
                           prev_hash=last.hash if last else GENESIS)
        row.hash = entry_hash(row)
        session.add(row)
        session.flush()
        session.info["access_log_head"] = row
        return row.seq

    @staticmethod
    def _head(session: Session) -> AccessLogRow | None:
        """The chain head: the row this transaction appended last, else the newest stored."""
        head: AccessLogRow | None = session.info.get("access_log_head")
        if head is not None:
            return head
        return session.scalars(select(AccessLogRow).order_by(AccessLogRow.seq.desc())
                               .limit(1)).one_or_none()

    def checkpoint(self) -> AccessLogCheckpointRow | None:
        """Sign the current chain head; None when the log is empty."""
        with self._lock, session_scope(self.sessions) as session:
            last = session.scalars(select(AccessLogRow).order_by(AccessLogRow.seq.desc())
                                   .limit(1)).one_or_none()
            if last is None:
                return None
            at = datetime.now(UTC)
            signature = self._key.sign(_checkpoint_message(last.seq, last.hash, at))
            row = AccessLogCheckpointRow(seq=last.seq, head_hash=last.hash, at=at,
                                         key_id=self.key_id,
                                         signature=base64.b64encode(signature).decode())
            session.add(row)
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        return row


@dataclass
class ChainReport:
    """What :func:`verify_chain` found; ``ok`` only when there are no problems."""

    entries: int = 0
    checkpoints: int = 0
    last_checkpoint_seq: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_chain(session: Session, public_key: Ed25519PublicKey | Path | str,
                 *, batch: int = 5000) -> ChainReport:
    """Recompute every hash and check every signed checkpoint against the rows."""
    key = load_public_key(public_key)
    report = ChainReport()
    prev_hash, expected_seq = GENESIS, 1
    hashes_at: dict[int, str] = {}
    checkpoints = session.scalars(select(AccessLogCheckpointRow)
                                  .order_by(AccessLogCheckpointRow.seq)).all()
    wanted = {c.seq for c in checkpoints}
    last_seq = 0
    while True:
        rows = session.scalars(select(AccessLogRow).where(AccessLogRow.seq >= expected_seq)
                               .order_by(AccessLogRow.seq).limit(batch)).all()
        if not rows:
            break
        for row in rows:
            if row.seq != expected_seq:
                report.problems.append(f"entries {expected_seq}..{row.seq - 1} are missing "
                                       "(deleted)")
            if row.prev_hash != prev_hash:
                report.problems.append(f"entry {row.seq}: does not link to the entry before "
                                       "it (an entry before it was deleted or edited)")
            if entry_hash(row) != row.hash:
                report.problems.append(f"entry {row.seq}: its contents do not match its hash "
                                       "(edited)")
            if row.seq in wanted:
                hashes_at[row.seq] = row.hash
            prev_hash, expected_seq, last_seq = row.hash, row.seq + 1, row.seq
            report.entries += 1
    count = session.scalar(select(func.count()).select_from(AccessLogRow)) or 0
    if count != report.entries:
        report.problems.append(f"{count} entries stored but {report.entries} read in order")
    for c in checkpoints:
        report.checkpoints += 1
        try:
            key.verify(base64.b64decode(c.signature), _checkpoint_message(c.seq, c.head_hash,
                                                                         c.at))
        except (InvalidSignature, ValueError):
            report.problems.append(f"checkpoint at entry {c.seq}: bad signature (forged or "
                                   "signed with another key)")
            continue
        report.last_checkpoint_seq = c.seq
        if c.seq > last_seq:
            report.problems.append(f"checkpoint at entry {c.seq} but the log ends at entry "
                                   f"{last_seq}: its tail was truncated")
        elif hashes_at.get(c.seq) != c.head_hash:
            report.problems.append(f"checkpoint at entry {c.seq}: the entry's hash differs "
                                   "from the signed head (rewritten)")
    return report
