"""A durable job queue in the database, and the worker thread that drains it.

Jobs are rows in ``jobs``. A worker *claims* a runnable job by taking a lease
(``lease_until``); it renews the lease while the handler runs and completes or
fails the job when the handler returns. A worker that dies (kill -9, power loss)
stops renewing, its lease runs out and another worker, or the same service after a
restart, claims the job again: no job is lost, so handlers must be idempotent
(at-least-once delivery). The handler's database work and the job's completion
commit in one transaction, so a job whose lease was taken over by another worker
leaves no half-applied effects.

Claiming uses ``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL, so concurrent
workers never wait on each other's rows, and a guarded ``UPDATE ... WHERE status``
on SQLite, where writes are serialised anyway and the guard's row count says who won.

A failed attempt is retried with exponential backoff; after ``max_attempts`` the
job is ``failed`` with a *located* error (exception type, file, line, function):
exception messages can quote patient data, so they are never stored or logged.
"""

from __future__ import annotations

import logging
import os
import threading
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased, sessionmaker

from services.tables import DicomInstanceRow, JobRow, PatientIdentifierRow, PatientRow

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "PATIENT_UPDATED",
    "SERIES_STORED",
    "Handler",
    "JobWorker",
    "claim",
    "complete",
    "enqueue",
    "enqueue_patient_updated",
    "enqueue_series_stored",
    "extend_lease",
    "fail",
    "located_error",
    "patient_for_series",
    "queue_depth",
    "register_builtin_handlers",
    "requeue_expired",
]

log = logging.getLogger(__name__)

#: Built-in job kinds. ``patient-updated``: payload ``{"patient_id": <opaque id>}``,
#: dedupe key the patient id; predicts (and so warms the embedding caches) when a model
#: is served. ``series-stored``: payload ``{"SeriesInstanceUID": uid}``, dedupe key the
#: UID; queued by the DICOM store, it queues ``patient-updated`` for the linked patient.
PATIENT_UPDATED = "patient-updated"
SERIES_STORED = "series-stored"

QUEUED, RUNNING, DONE, FAILED, SUPERSEDED = "queued", "running", "done", "failed", "superseded"
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_LEASE_S = 300.0
BACKOFF_BASE_S = 5.0
BACKOFF_MAX_S = 3600.0

#: A handler gets the transaction its effects commit in and the job's payload.
Handler = Callable[[Session, dict[str, Any]], None]


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(at: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; everything stored here is UTC.
    if at is None or at.tzinfo is not None:
        return at
    return at.replace(tzinfo=UTC)


# -- queue operations (each runs in the caller's transaction) --------------------------


def enqueue(session: Session, kind: str, payload: dict[str, Any],
            dedupe_key: str | None = None, *, delay_s: float = 0.0) -> JobRow:
    """Queue a job; with ``dedupe_key``, an already queued (kind, key) job is returned instead.

    At most one job per (kind, dedupe_key) waits in the queue. A *running* one does
    not absorb a new request, because it may already have read the data the request
    is about; the new job waits until the running one ends (see :func:`claim`).
    ``delay_s`` debounces: the job runs no sooner than ``delay_s`` after the *last*
    enqueue of its key (a series arriving one C-STORE at a time is handled once).
    The caller commits; the job becomes visible to workers with that commit.
    """
    run_after = _now() + timedelta(seconds=delay_s) if delay_s > 0 else None
    if not kind or len(kind) > 64:
        raise ValueError(f"job kind must be 1..64 characters, got {len(kind)}")
    if dedupe_key is not None and len(dedupe_key) > 256:
        raise ValueError(f"dedupe_key must be at most 256 characters, got {len(dedupe_key)}")
    if dedupe_key is not None:
        existing = _queued_twin(session, kind, dedupe_key)
        if existing is not None:
            return _debounce(existing, run_after)
    job = JobRow(kind=kind, dedupe_key=dedupe_key, payload=dict(payload), status=QUEUED,
                 attempts=0, created_at=_now(), run_after=run_after)
    if dedupe_key is None:
        session.add(job)
        session.flush()
        return job
    try:
        # A savepoint: losing the race to a concurrent enqueue must not undo the
        # caller's other work in this transaction.
        with session.begin_nested():
            session.add(job)
    except IntegrityError:
        existing = _queued_twin(session, kind, dedupe_key)
        if existing is None:  # the twin was claimed meanwhile; queue behind it
            return enqueue(session, kind, payload, dedupe_key, delay_s=delay_s)
        return _debounce(existing, run_after)
    return job


def _debounce(job: JobRow, run_after: datetime | None) -> JobRow:
    current = _aware(job.run_after)
    if run_after is not None and (current is None or current < run_after):
        job.run_after = run_after
    return job


def _queued_twin(session: Session, kind: str, dedupe_key: str) -> JobRow | None:
    return session.scalars(select(JobRow).where(
        JobRow.kind == kind, JobRow.dedupe_key == dedupe_key, JobRow.status == QUEUED)
    ).first()


def _runnable(now: datetime, kinds: list[str] | None) -> Any:
    busy = aliased(JobRow)
    # A queued job waits while a twin (same kind and key) runs under a live lease, so
    # one patient's work never runs twice at once.
    twin_running = exists().where(busy.kind == JobRow.kind, busy.dedupe_key == JobRow.dedupe_key,
                                  busy.status == RUNNING, busy.lease_until >= now,
                                  busy.id != JobRow.id)
    queued = and_(JobRow.status == QUEUED,
                  or_(JobRow.run_after.is_(None), JobRow.run_after <= now),
                  or_(JobRow.dedupe_key.is_(None), ~twin_running))
    expired = and_(JobRow.status == RUNNING, JobRow.lease_until < now)
    condition = or_(queued, expired)
    if kinds is not None:
        condition = and_(condition, JobRow.kind.in_(kinds))
    return condition


def claim(session: Session, worker_id: str, *, lease_s: float = DEFAULT_LEASE_S,
          kinds: list[str] | None = None, max_attempts: int = DEFAULT_MAX_ATTEMPTS
          ) -> JobRow | None:
    """Lease the oldest runnable job to ``worker_id``; None when nothing is runnable.

    Runnable: queued and past its backoff, or running under an expired lease (its
    worker died). A job whose lease expired ``max_attempts`` times (it kills its
    worker every time) is failed instead of being handed out again.
    Commit right after, so other workers see the lease.
    """
    now = _now()
    dialect = session.get_bind().dialect.name
    for _ in range(10):
        query = (select(JobRow).where(_runnable(now, kinds))
                 .order_by(JobRow.created_at, JobRow.id).limit(1))
        if dialect == "postgresql":
            query = query.with_for_update(skip_locked=True, of=JobRow)
        job = session.scalars(query).first()
        if job is None:
            return None
        was_expired = job.status == RUNNING
        if was_expired and job.attempts >= max_attempts:
            _finish(session, job.id, FAILED, now,
                    f"the worker's lease expired {job.attempts} times (the worker died "
                    "or hung while running it)")
            continue
        # The guard makes the claim safe without row locks (SQLite): it only matches if
        # the row is still in the state we read it in.
        guard = (and_(JobRow.status == RUNNING, JobRow.lease_until < now) if was_expired
                 else JobRow.status == QUEUED)
        result = session.execute(
            update(JobRow).where(JobRow.id == job.id, guard)
            .values(status=RUNNING, locked_by=worker_id, attempts=JobRow.attempts + 1,
                    lease_until=now + timedelta(seconds=lease_s), run_after=None)
            .execution_options(synchronize_session=False))
        if _rowcount(result) == 1:
            session.refresh(job)
            if was_expired:
                log.warning("job %s (%s): lease expired, re-running (attempt %d)", job.id,
                            job.kind, job.attempts)
            return job
    return None


def _rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


def extend_lease(session: Session, job_id: str, worker_id: str, lease_s: float) -> bool:
    """Renew the lease; False when the job is no longer this worker's."""
    result = session.execute(
        update(JobRow).where(JobRow.id == job_id, JobRow.status == RUNNING,
                             JobRow.locked_by == worker_id)
        .values(lease_until=_now() + timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False))
    return _rowcount(result) == 1


def complete(session: Session, job_id: str, worker_id: str) -> bool:
    """Mark the job done; False (and nothing changes) if the worker lost its lease."""
    result = session.execute(
        update(JobRow).where(JobRow.id == job_id, JobRow.status == RUNNING,
                             JobRow.locked_by == worker_id)
        .values(status=DONE, finished_at=_now(), lease_until=None, last_error=None)
        .execution_options(synchronize_session=False))
    return _rowcount(result) == 1


def backoff_s(attempts: int) -> float:
    """Seconds before retry number ``attempts`` (1-based): 5 s, 10 s, 20 s, ... up to 1 h."""
    return float(min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** max(0, attempts - 1)))


def fail(session: Session, job_id: str, worker_id: str, error: str, *,
         max_attempts: int = DEFAULT_MAX_ATTEMPTS, retry: bool = True) -> str | None:
    """Record a failed attempt: queued again after a backoff, or ``failed`` when spent.

    Returns the job's new status, or None if the worker had lost its lease. ``error``
    must be free of patient data (use :func:`located_error`).
    """
    job = session.get(JobRow, job_id, populate_existing=True)
    if job is None or job.status != RUNNING or job.locked_by != worker_id:
        return None
    now = _now()
    error = error[:2000]
    if not retry or job.attempts >= max_attempts:
        _finish(session, job_id, FAILED, now, error)
        return FAILED
    if job.dedupe_key is not None and _queued_twin(session, job.kind, job.dedupe_key):
        # A newer request for the same work is already queued and will redo it.
        _finish(session, job_id, SUPERSEDED, now, error)
        return SUPERSEDED
    session.execute(
        update(JobRow).where(JobRow.id == job_id)
        .values(status=QUEUED, lease_until=None, locked_by=None, last_error=error,
                run_after=now + timedelta(seconds=backoff_s(job.attempts)))
        .execution_options(synchronize_session=False))
    return QUEUED


def _finish(session: Session, job_id: str, status: str, now: datetime, error: str) -> None:
    session.execute(update(JobRow).where(JobRow.id == job_id)
                    .values(status=status, finished_at=now, lease_until=None, last_error=error)
                    .execution_options(synchronize_session=False))


def requeue_expired(session: Session) -> int:
    """Put running jobs whose lease expired back in the queue; returns how many.

    :func:`claim` already picks such jobs up by itself; this is for start-up, so
    the queue's depth shows them as waiting rather than running.
    """
    now = _now()
    expired = session.scalars(select(JobRow).where(JobRow.status == RUNNING,
                                                   JobRow.lease_until < now)).all()
    for job in expired:
        if job.dedupe_key is not None and _queued_twin(session, job.kind, job.dedupe_key):
            _finish(session, job.id, SUPERSEDED, now, "lease expired; a newer twin is queued")
            continue
        session.execute(update(JobRow).where(JobRow.id == job.id, JobRow.status == RUNNING)
                        .values(status=QUEUED, lease_until=None, locked_by=None)
                        .execution_options(synchronize_session=False))
    return len(expired)


def located_error(exc: BaseException) -> str:
    """Where an exception was raised, without its message (which may quote patient data).

    ``"KeyError in services/prediction.py:120 predict_patient <- services/jobs.py:400 run"``.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    parts = [f"{_short(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames[-4:])]
    where = " <- ".join(parts) if parts else "unknown location"
    return f"{type(exc).__name__} in {where}"


_ROOT = Path(__file__).resolve().parents[1]


def _short(filename: str) -> str:
    # Paths relative to the project (no home directories or site layout in errors).
    path = Path(filename)
    try:
        return path.resolve().relative_to(_ROOT).as_posix()
    except ValueError:
        return path.name


def enqueue_patient_updated(session: Session, patient_id: str) -> JobRow:
    """Recompute a patient's prediction (one queued job per patient, whoever asks)."""
    return enqueue(session, PATIENT_UPDATED, {"patient_id": patient_id},
                   dedupe_key=f"{PATIENT_UPDATED}:{patient_id}")


def queue_depth(session: Session) -> dict[str, dict[str, int]]:
    """Job counts by kind and status, for metrics: ``{"patient-updated": {"queued": 3}}``.

    Done and superseded jobs are history, not depth, and are left out.
    """
    rows = session.execute(
        select(JobRow.kind, JobRow.status, func.count()).where(
            JobRow.status.in_([QUEUED, RUNNING, FAILED])).group_by(JobRow.kind, JobRow.status))
    depth: dict[str, dict[str, int]] = {}
    for kind, status, n in rows:
        depth.setdefault(str(kind), {})[str(status)] = int(n)
    return depth


# -- the worker --------------------------------------------------------------------------


class JobWorker:
    """A thread that claims jobs and runs the handler registered for their kind.

    Start it with :meth:`start`, stop it with :meth:`stop` (the running job, if any,
    finishes first). Several workers, in one process or many, may share a database.
    """

    def __init__(self, sessions: sessionmaker[Session], *, lease_s: float = DEFAULT_LEASE_S,
                 poll_s: float = 1.0, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                 worker_id: str | None = None) -> None:
        self.sessions = sessions
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.max_attempts = max_attempts
        self.worker_id = worker_id or f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.handlers: dict[str, Handler] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def register(self, kind: str, handler: Handler) -> None:
        """Run ``handler(session, payload)`` for jobs of ``kind``; it must be idempotent."""
        self.handlers[kind] = handler

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=f"clinfuse-jobs-{self.worker_id}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def is_alive(self) -> bool:
        """Whether the worker thread runs (the readiness probe asks)."""
        return self._thread is not None and self._thread.is_alive()

    def wake(self) -> None:
        """Look for work now instead of at the next poll (after an enqueue)."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                ran = self.run_once()
            except Exception as exc:
                # The database may be briefly unavailable; the queue survives, so wait.
                log.error("job worker: %s", located_error(exc))
                ran = False
            if not ran:
                self._wake.wait(self.poll_s)
                self._wake.clear()

    def run_once(self) -> bool:
        """Claim and run one job; False when none was runnable."""
        with self.sessions() as session:
            job = claim(session, self.worker_id, lease_s=self.lease_s,
                        kinds=sorted(self.handlers), max_attempts=self.max_attempts)
            session.commit()
            if job is None:
                return False
            job_id, kind, payload = job.id, job.kind, dict(job.payload)
        self._run(job_id, kind, payload)
        return True

    def run_until_empty(self, max_jobs: int = 1000) -> int:
        """Run jobs until none is runnable (tests, CLI); returns how many ran."""
        n = 0
        while n < max_jobs and self.run_once():
            n += 1
        return n

    def _run(self, job_id: str, kind: str, payload: dict[str, Any]) -> None:
        handler = self.handlers[kind]
        heartbeat = _Heartbeat(self, job_id)
        heartbeat.start()
        error: str | None = None
        try:
            with self.sessions() as session:
                try:
                    handler(session, payload)
                    if complete(session, job_id, self.worker_id):
                        session.commit()
                        log.info("job %s (%s) done", job_id, kind)
                    else:
                        # Another worker took the job over after our lease ran out; its
                        # run is authoritative, so ours leaves no effects.
                        session.rollback()
                        log.warning("job %s (%s): lease lost, result discarded", job_id, kind)
                except Exception as exc:
                    session.rollback()
                    error = located_error(exc)
        finally:
            heartbeat.stop()
        if error is not None:
            with self.sessions() as session:
                status = fail(session, job_id, self.worker_id, error,
                              max_attempts=self.max_attempts)
                session.commit()
            log.warning("job %s (%s) attempt failed (%s): %s", job_id, kind, status, error)


class _Heartbeat:
    """Renews a running job's lease at a third of its length, so long jobs keep it."""

    def __init__(self, worker: JobWorker, job_id: str) -> None:
        self.worker = worker
        self.job_id = job_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name=f"clinfuse-lease-{job_id}")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _loop(self) -> None:
        while not self._stop.wait(self.worker.lease_s / 3):
            try:
                with self.worker.sessions() as session:
                    extend_lease(session, self.job_id, self.worker.worker_id,
                                 self.worker.lease_s)
                    session.commit()
            except Exception as exc:
                log.warning("job %s: lease renewal failed: %s", self.job_id,
                            located_error(exc))


# -- built-in handlers -------------------------------------------------------------------


class PredictionService(Protocol):
    def predict_patient(self, session: Session, patient_id: str, *, source: str,
                        requested_by: str | None) -> Any: ...


@dataclass
class _AppState:
    """Reads the prediction service at run time: the model may be loaded after start-up."""

    state: Any

    @property
    def predictions(self) -> PredictionService | None:
        return getattr(self.state, "predictions", None)


def patient_for_series(session: Session, series_uid: str) -> str | None:
    """The opaque id of the patient a stored series belongs to, or None.

    Linked by PatientID + IssuerOfPatientID, which must equal one of the patient's
    business identifiers (system = the issuer). Without an issuer there is no link:
    a bare PatientID is ambiguous across assigning authorities.
    """
    row = session.execute(
        select(DicomInstanceRow.PatientID, DicomInstanceRow.IssuerOfPatientID)
        .where(DicomInstanceRow.SeriesInstanceUID == series_uid,
               DicomInstanceRow.PatientID.is_not(None),
               DicomInstanceRow.IssuerOfPatientID.is_not(None)).limit(1)).first()
    if row is None:
        return None
    value, issuer = str(row[0]), str(row[1])
    # An issuer that is an OID may be written with or without FHIR's urn:oid: prefix.
    bare = issuer.removeprefix("urn:oid:")
    systems = sorted({issuer, bare, f"urn:oid:{bare}"})
    linked = session.scalar(select(PatientIdentifierRow.patient_id).where(
        PatientIdentifierRow.system.in_(systems), PatientIdentifierRow.value == value))
    if linked is not None:
        return str(linked)
    # Records saved before identifiers were indexed carry only their primary key.
    primary = session.scalar(select(PatientRow.id).where(
        PatientRow.identifier_system.in_(systems), PatientRow.identifier_value == value))
    return None if primary is None else str(primary)


def register_builtin_handlers(worker: JobWorker, app_state: Any) -> None:
    """``patient-updated`` (predict and warm the caches) and ``series-stored``."""
    state = _AppState(app_state)

    def patient_updated(session: Session, payload: dict[str, Any]) -> None:
        predictions = state.predictions
        if predictions is None:
            return  # no model is served: nothing to warm or predict
        predictions.predict_patient(session, str(payload["patient_id"]), source="job",
                                    requested_by=None)

    def series_stored(session: Session, payload: dict[str, Any]) -> None:
        patient_id = patient_for_series(session, str(payload["SeriesInstanceUID"]))
        if patient_id is None:
            # The imaging arrived before the patient's record; the record's ingest
            # enqueues patient-updated, which picks the series up then.
            return
        enqueue_patient_updated(session, patient_id)
        worker.wake()

    worker.register(PATIENT_UPDATED, patient_updated)
    worker.register(SERIES_STORED, series_stored)


#: Instances of one series arrive one by one over DIMSE; wait this long after the last.
SERIES_SETTLE_S = 10.0


def enqueue_series_stored(session: Session, series_uids: set[str], *,
                          delay_s: float = SERIES_SETTLE_S) -> None:
    """Queue ``series-stored`` for each series that got new instances (DICOM store)."""
    for uid in sorted(series_uids):
        enqueue(session, SERIES_STORED, {"SeriesInstanceUID": uid}, dedupe_key=uid,
                delay_s=delay_s)
