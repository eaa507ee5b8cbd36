"""The access log: every read or write of patient data, hash-chained and checkpointed.

Each entry's hash covers its fields and the previous entry's hash, so editing or
deleting an entry breaks the chain from there on. A chain alone cannot show that
its newest entries were cut off, so the head is checkpointed at intervals with an
Ed25519 signature: a tail truncated below a signed checkpoint is detected. Entries
after the newest checkpoint are only as safe as the database; checkpoints are also
written at shutdown, which keeps that window small.

Checkpoints are chained in turn: each signs the previous checkpoint's hash and the
number of entries stored, so deleting a checkpoint breaks the chain and deleting an
entry below one changes the count. Someone who can write the database can still delete
the newest entries *together with* every checkpoint above them, leaving a shorter log
that is consistent in itself; only a copy of the checkpoints outside the database shows
that. So each checkpoint is also appended, as one JSON line, to the file named by
``CLINFUSE_ACCESS_LOG_CHECKPOINT_FILE``, and :func:`verify_chain` checks the database
against it. Keeping that file where the database's writers cannot rewrite it
(append-only or WORM storage, another host) is the operator's part.

Checkpoints written before the chain existed (migration 0007) carry no previous hash
and no count; they verify as before, and the first chained checkpoint links to the
newest of them, so the chain starts there.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
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

__all__ = ["GENESIS", "AccessLog", "ChainReport", "Checkpoint", "entry_hash", "pseudonym",
           "pseudonym_secret", "verify_chain"]

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class Checkpoint:
    """One signed checkpoint, as stored in the database or exported to the file.

    ``prev_hash`` and ``entry_count`` are None in checkpoints from before the chain
    (format 1); their signature covers only the head.
    """

    seq: int
    head_hash: str
    at: datetime
    key_id: str
    signature: str
    prev_hash: str | None = None
    entry_count: int | None = None

    @classmethod
    def of(cls, row: AccessLogCheckpointRow) -> Checkpoint:
        return cls(row.seq, row.head_hash, row.at, row.key_id, row.signature, row.prev_hash,
                   row.entry_count)

    @classmethod
    def from_json(cls, line: str) -> Checkpoint:
        """One exported line; ValueError (or KeyError, TypeError) if it is not one."""
        data = json.loads(line)
        return cls(int(data["seq"]), str(data["head_hash"]),
                   datetime.fromisoformat(data["at"]), str(data["key_id"]),
                   str(data["signature"]), data.get("prev_hash"), data.get("entry_count"))

    def to_json(self) -> str:
        return json.dumps({"format": 1 if self.prev_hash is None else 2, "seq": self.seq,
                           "head_hash": self.head_hash, "at": _iso(self.at),
                           "entry_count": self.entry_count, "prev_hash": self.prev_hash,
                           "key_id": self.key_id, "signature": self.signature,
                           "hash": self.hash()}, separators=(",", ":"))

    def message(self) -> bytes:
        """What the signature covers."""
        if self.prev_hash is None:
            return f"clinfuse-access-log-checkpoint/1\n{self.seq}\n{self.head_hash}\n" \
                   f"{_iso(self.at)}".encode()
        return (f"clinfuse-access-log-checkpoint/2\n{self.seq}\n{self.head_hash}\n"
                f"{_iso(self.at)}\n{self.entry_count}\n{self.prev_hash}").encode()

    def hash(self) -> str:
        """What the next checkpoint names as its ``prev_hash``."""
        return hashlib.sha256(self.message()).hexdigest()

    def signed_by(self, key: Ed25519PublicKey) -> bool:
        try:
            key.verify(base64.b64decode(self.signature), self.message())
        except (InvalidSignature, ValueError):
            return False
        return True


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
                 checkpoint_every: int = 100, checkpoint_interval_s: float = 300.0,
                 checkpoint_file: Path | None = None) -> None:
        self.sessions = sessions
        #: Each checkpoint is also appended here as a JSON line (append-only storage).
        self.checkpoint_file = checkpoint_file
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
        """Sign the current chain head, the entry count and the previous checkpoint's
        hash; then append the checkpoint to the checkpoint file. None when the log is
        empty."""
        error: Exception | None = None
        for attempt in range(20):
            try:
                row = self._write_checkpoint()
                break
            except (IntegrityError, OperationalError) as exc:
                # Another process extended the same checkpoint first (prev_hash is
                # unique) or, on SQLite, holds the write lock: read the newest again.
                error = exc
                time.sleep(0.005 * (attempt + 1))
        else:
            raise RuntimeError("could not write an access-log checkpoint") from error
        if row is None:
            return None
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._export(Checkpoint.of(row))
        return row

    def _write_checkpoint(self) -> AccessLogCheckpointRow | None:
        with self._lock, session_scope(self.sessions) as session:
            if session.get_bind().dialect.name == "postgresql":
                session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_ID})
            last = session.scalars(select(AccessLogRow).order_by(AccessLogRow.seq.desc())
                                   .limit(1)).one_or_none()
            if last is None:
                return None
            previous = session.scalars(select(AccessLogCheckpointRow)
                                       .order_by(AccessLogCheckpointRow.id.desc())
                                       .limit(1)).one_or_none()
            count = session.scalar(select(func.count()).select_from(AccessLogRow)) or 0
            unsigned = Checkpoint(last.seq, last.hash, datetime.now(UTC), self.key_id, "",
                                  Checkpoint.of(previous).hash() if previous else GENESIS,
                                  int(count))
            signature = base64.b64encode(self._key.sign(unsigned.message())).decode()
            row = AccessLogCheckpointRow(seq=unsigned.seq, head_hash=unsigned.head_hash,
                                         at=unsigned.at, key_id=self.key_id,
                                         signature=signature, prev_hash=unsigned.prev_hash,
                                         entry_count=unsigned.entry_count)
            session.add(row)
        return row

    def _export(self, checkpoint: Checkpoint) -> None:
        """Append one JSON line, synced, after the database commit: a line in the file is
        a checkpoint the database held."""
        if self.checkpoint_file is None:
            return
        try:
            self.checkpoint_file.parent.mkdir(parents=True, exist_ok=True)
            with self.checkpoint_file.open("a", encoding="utf-8") as fh:
                fh.write(checkpoint.to_json() + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            # The checkpoint is in the database; verification reports it missing from the
            # file, so a failing export is seen there too.
            log.error("access-log checkpoint export failed (%s)", type(exc).__name__)


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
                 *, batch: int = 5000, exported: Path | None = None) -> ChainReport:
    """Recompute every hash, check every signed checkpoint against the rows and the
    checkpoint chain, and, with ``exported``, the database against the exported file."""
    key = load_public_key(public_key)
    report = ChainReport()
    prev_hash, expected_seq = GENESIS, 1
    hashes_at: dict[int, str] = {}
    rows_up_to: dict[int, int] = {}  # checkpoint seq -> entries stored with seq <= it
    checkpoints = session.scalars(select(AccessLogCheckpointRow)
                                  .order_by(AccessLogCheckpointRow.id)).all()
    wanted = sorted({c.seq for c in checkpoints})
    wanted_set = set(wanted)
    pending = 0  # index into wanted of the next checkpoint seq not yet passed
    last_seq = 0
    while True:
        rows = session.scalars(select(AccessLogRow).where(AccessLogRow.seq >= expected_seq)
                               .order_by(AccessLogRow.seq).limit(batch)).all()
        if not rows:
            break
        for row in rows:
            while pending < len(wanted) and wanted[pending] < row.seq:
                rows_up_to[wanted[pending]] = report.entries
                pending += 1
            if row.seq != expected_seq:
                report.problems.append(f"entries {expected_seq}..{row.seq - 1} are missing "
                                       "(deleted)")
            if row.prev_hash != prev_hash:
                report.problems.append(f"entry {row.seq}: does not link to the entry before "
                                       "it (an entry before it was deleted or edited)")
            if entry_hash(row) != row.hash:
                report.problems.append(f"entry {row.seq}: its contents do not match its hash "
                                       "(edited)")
            if row.seq in wanted_set:
                hashes_at[row.seq] = row.hash
            prev_hash, expected_seq, last_seq = row.hash, row.seq + 1, row.seq
            report.entries += 1
    for seq in wanted[pending:]:
        rows_up_to[seq] = report.entries
    count = session.scalar(select(func.count()).select_from(AccessLogRow)) or 0
    if count != report.entries:
        report.problems.append(f"{count} entries stored but {report.entries} read in order")
    previous: Checkpoint | None = None
    for c in map(Checkpoint.of, checkpoints):
        report.checkpoints += 1
        expected_prev = previous.hash() if previous is not None else GENESIS
        previous = c
        if not c.signed_by(key):
            report.problems.append(f"checkpoint at entry {c.seq}: bad signature (forged or "
                                   "signed with another key)")
            continue
        report.last_checkpoint_seq = c.seq
        if c.prev_hash is not None and c.prev_hash != expected_prev:
            report.problems.append(f"checkpoint at entry {c.seq}: the checkpoint before it is "
                                   "missing or was altered (the checkpoint chain is broken)")
        if c.seq > last_seq:
            report.problems.append(f"checkpoint at entry {c.seq} but the log ends at entry "
                                   f"{last_seq}: its tail was truncated")
            continue
        if hashes_at.get(c.seq) != c.head_hash:
            report.problems.append(f"checkpoint at entry {c.seq}: the entry's hash differs "
                                   "from the signed head (rewritten)")
        stored = rows_up_to.get(c.seq, 0)
        if c.entry_count is not None and stored != c.entry_count:
            what = "deleted" if stored < c.entry_count else "added"
            report.problems.append(f"checkpoint at entry {c.seq}: signed over {c.entry_count} "
                                   f"entries, but {stored} are stored up to it (entries {what})")
    if exported is not None:
        _check_exported(report, exported, key, [Checkpoint.of(c) for c in checkpoints],
                        last_seq)
    return report


def _check_exported(report: ChainReport, path: Path, key: Ed25519PublicKey,
                    stored: list[Checkpoint], last_seq: int) -> None:
    """Every exported checkpoint must still be in the database, and every database
    checkpoint since the first exported one must be in the file."""
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as exc:
        report.problems.append(f"the exported checkpoints cannot be read ({type(exc).__name__})")
        return
    in_database = {c.hash(): index for index, c in enumerate(stored)}
    first_exported: int | None = None
    seen: set[str] = set()
    for number, line in enumerate(lines, start=1):
        try:
            c = Checkpoint.from_json(line)
        except (ValueError, KeyError, TypeError):
            report.problems.append(f"exported checkpoint {number}: not a checkpoint record")
            continue
        if not c.signed_by(key):
            report.problems.append(f"exported checkpoint {number}: bad signature (forged or "
                                   "signed with another key)")
            continue
        seen.add(c.hash())
        if c.hash() in in_database:
            index = in_database[c.hash()]
            first_exported = index if first_exported is None else min(first_exported, index)
            continue
        report.problems.append(f"exported checkpoint at entry {c.seq} is not in the database: "
                               "checkpoints were deleted")
        if c.seq > last_seq:
            report.problems.append(f"exported checkpoint at entry {c.seq} but the log ends at "
                                   f"entry {last_seq}: its tail was truncated")
    if first_exported is None:
        return
    for c in stored[first_exported:]:
        if c.hash() not in seen:
            report.problems.append(f"checkpoint at entry {c.seq} is not in the exported "
                                   "checkpoints (its export failed, or the file was replaced)")
