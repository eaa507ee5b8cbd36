"""The durable job queue: dedupe, leases, retries with backoff, crash recovery."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session, sessionmaker

from services import jobs
from services.db import session_factory
from services.tables import DicomInstanceRow, JobRow, PatientIdentifierRow, PatientRow


@pytest.fixture
def sessions(db_engine: Engine) -> sessionmaker[Session]:
    return session_factory(db_engine)


def _enqueue(sessions: sessionmaker[Session], kind: str, payload: dict[str, Any],
             key: str | None = None) -> str:
    with sessions.begin() as session:
        return jobs.enqueue(session, kind, payload, key).id


def _job(sessions: sessionmaker[Session], job_id: str) -> JobRow:
    with sessions() as session:
        job = session.get(JobRow, job_id)
        assert job is not None
        return job


def _expire_lease(sessions: sessionmaker[Session], job_id: str) -> None:
    with sessions.begin() as session:
        session.execute(update(JobRow).where(JobRow.id == job_id).values(
            lease_until=datetime.now(UTC) - timedelta(seconds=1)))


def _make_runnable(sessions: sessionmaker[Session], job_id: str) -> None:
    """Skip the retry backoff."""
    with sessions.begin() as session:
        session.execute(update(JobRow).where(JobRow.id == job_id).values(run_after=None))


def test_enqueue_dedupes_queued_jobs(sessions: sessionmaker[Session]) -> None:
    a = _enqueue(sessions, "k", {"n": 1}, "p1")
    b = _enqueue(sessions, "k", {"n": 2}, "p1")
    c = _enqueue(sessions, "k", {"n": 3}, "p2")
    d = _enqueue(sessions, "other", {"n": 4}, "p1")
    e = _enqueue(sessions, "k", {"n": 5})
    f = _enqueue(sessions, "k", {"n": 6})
    assert a == b
    assert len({a, c, d, e, f}) == 5
    with sessions() as session:
        assert jobs.queue_depth(session) == {"k": {"queued": 4}, "other": {"queued": 1}}


def test_a_running_job_does_not_absorb_a_new_request(sessions: sessionmaker[Session]) -> None:
    first = _enqueue(sessions, "k", {}, "p1")
    with sessions.begin() as session:
        claimed = jobs.claim(session, "w1")
        assert claimed is not None and claimed.id == first
    second = _enqueue(sessions, "k", {}, "p1")
    assert second != first
    # The twin waits while the first runs under a live lease: one patient, one run.
    with sessions.begin() as session:
        assert jobs.claim(session, "w2") is None
    with sessions.begin() as session:
        assert jobs.complete(session, first, "w1")
    with sessions.begin() as session:
        claimed = jobs.claim(session, "w2")
        assert claimed is not None and claimed.id == second


def test_claim_complete_and_stale_worker_cannot_complete(sessions: sessionmaker[Session]
                                                         ) -> None:
    job_id = _enqueue(sessions, "k", {"x": 1})
    with sessions.begin() as session:
        job = jobs.claim(session, "w1", lease_s=60)
        assert job is not None and job.status == "running" and job.attempts == 1
        assert job.locked_by == "w1"
    with sessions.begin() as session:
        assert jobs.claim(session, "w2") is None  # leased: nobody else gets it
        assert not jobs.complete(session, job_id, "w2")
        assert jobs.complete(session, job_id, "w1")
    done = _job(sessions, job_id)
    assert done.status == "done" and done.finished_at is not None and done.lease_until is None


def test_failures_retry_with_backoff_then_fail_with_a_located_error(
        sessions: sessionmaker[Session]) -> None:
    worker = jobs.JobWorker(sessions, max_attempts=3)
    calls: list[int] = []

    def broken(session: Session, payload: dict[str, Any]) -> None:
        calls.append(1)
        raise ValueError(f"patient {payload['secret']} is weird")  # PHI in the message

    worker.register("broken", broken)
    job_id = _enqueue(sessions, "broken", {"secret": "DOE^JANE"})
    assert worker.run_once()
    job = _job(sessions, job_id)
    assert job.status == "queued" and job.attempts == 1
    run_after = job.run_after
    assert run_after is not None
    run_after = run_after.replace(tzinfo=run_after.tzinfo or UTC)
    assert run_after > datetime.now(UTC) + timedelta(seconds=3)  # 5 s backoff
    assert not worker.run_once()  # still backing off
    _make_runnable(sessions, job_id)
    assert worker.run_once()
    assert _job(sessions, job_id).run_after is not None
    assert jobs.backoff_s(2) == 2 * jobs.backoff_s(1)
    _make_runnable(sessions, job_id)
    assert worker.run_once()
    job = _job(sessions, job_id)
    assert len(calls) == 3
    assert job.status == "failed" and job.attempts == 3
    assert job.last_error is not None
    assert job.last_error.startswith("ValueError in tests/services/test_jobs.py:")
    assert "broken" in job.last_error
    assert "DOE" not in job.last_error  # the message (patient data) is never stored
    with sessions() as session:
        assert jobs.queue_depth(session) == {"broken": {"failed": 1}}


def test_handler_effects_and_completion_commit_together(sessions: sessionmaker[Session]
                                                        ) -> None:
    worker = jobs.JobWorker(sessions)

    def half_done(session: Session, payload: dict[str, Any]) -> None:
        session.add(PatientRow(identifier_system="urn:s", identifier_value="v1", record={}))
        session.flush()
        raise RuntimeError("after the write")

    worker.register("half", half_done)
    _enqueue(sessions, "half", {})
    worker.run_once()
    with sessions() as session:  # the failed attempt's write was rolled back
        assert session.scalars(select(PatientRow)).all() == []


def test_an_expired_lease_is_run_again(sessions: sessionmaker[Session]) -> None:
    job_id = _enqueue(sessions, "k", {})
    with sessions.begin() as session:
        assert jobs.claim(session, "dead-worker", lease_s=60) is not None
    _expire_lease(sessions, job_id)
    ran: list[str] = []
    worker = jobs.JobWorker(sessions, worker_id="w2")
    worker.register("k", lambda s, p: ran.append("k"))
    assert worker.run_once()
    job = _job(sessions, job_id)
    assert ran == ["k"] and job.status == "done" and job.attempts == 2
    # The dead worker, should it come back, cannot overwrite the result.
    with sessions.begin() as session:
        assert not jobs.complete(session, job_id, "dead-worker")
        assert jobs.fail(session, job_id, "dead-worker", "x") is None


def test_a_job_that_keeps_killing_its_worker_ends_failed(sessions: sessionmaker[Session]
                                                         ) -> None:
    job_id = _enqueue(sessions, "k", {})
    for n in range(2):
        with sessions.begin() as session:
            assert jobs.claim(session, f"w{n}", max_attempts=2) is not None
        _expire_lease(sessions, job_id)
    with sessions.begin() as session:
        assert jobs.claim(session, "w9", max_attempts=2) is None
    job = _job(sessions, job_id)
    assert job.status == "failed" and "lease expired" in (job.last_error or "")


def test_a_restart_loses_no_job(sessions: sessionmaker[Session], db_engine: Engine) -> None:
    ids = [_enqueue(sessions, "k", {"n": n}, f"key-{n}") for n in range(3)]
    # The first worker takes one job and "dies" (kill -9: no completion, no cleanup).
    first = jobs.JobWorker(sessions, worker_id="before-restart", lease_s=60)
    with sessions.begin() as session:
        taken = jobs.claim(session, first.worker_id, lease_s=60)
        assert taken is not None
    _expire_lease(sessions, taken.id)
    # After the restart: a new engine, a new worker on the same database.
    fresh = session_factory(db_engine.engine)
    with fresh.begin() as session:
        assert jobs.requeue_expired(session) == 1
    seen: list[int] = []
    worker = jobs.JobWorker(fresh, worker_id="after-restart")
    worker.register("k", lambda s, p: seen.append(int(p["n"])))
    assert worker.run_until_empty() == 3
    assert sorted(seen) == [0, 1, 2]
    assert {_job(sessions, i).status for i in ids} == {"done"}


def test_worker_thread_drains_the_queue(sessions: sessionmaker[Session]) -> None:
    done = threading.Event()
    worker = jobs.JobWorker(sessions, poll_s=0.05)
    worker.register("k", lambda s, p: done.set())
    worker.start()
    try:
        _enqueue(sessions, "k", {})
        worker.wake()
        assert done.wait(10)
    finally:
        worker.stop()


def test_concurrent_workers_claim_each_job_once(sessions: sessionmaker[Session]) -> None:
    for n in range(12):
        _enqueue(sessions, "k", {"n": n})
    seen: list[int] = []
    lock = threading.Lock()

    def record(session: Session, payload: dict[str, Any]) -> None:
        with lock:
            seen.append(int(payload["n"]))

    workers = [jobs.JobWorker(sessions, worker_id=f"w{i}") for i in range(3)]
    errors: list[BaseException] = []

    def drain(w: jobs.JobWorker) -> None:
        w.register("k", record)
        try:
            w.run_until_empty()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=drain, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # SQLite may report "database is locked" to a loser; the job then stays queued.
    leftover = jobs.JobWorker(sessions, worker_id="sweeper")
    leftover.register("k", record)
    leftover.run_until_empty()
    assert sorted(seen) == list(range(12))


class _FakePredictions:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str | None]] = []

    def predict_patient(self, session: Session, patient_id: str, *, source: str,
                        requested_by: str | None) -> None:
        self.calls.append((patient_id, source, requested_by))


def test_series_stored_triggers_patient_updated(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        patient = PatientRow(identifier_system="urn:mrn", identifier_value="MRN1", record={})
        session.add(patient)
        session.flush()
        session.add(PatientIdentifierRow(patient_id=patient.id, system="urn:mrn", value="MRN1"))
        for n, (pid, issuer) in enumerate([("MRN1", "urn:mrn"), ("MRN1", None),
                                           ("OTHER", "urn:mrn")]):
            session.add(DicomInstanceRow(
                SOPInstanceUID=f"1.2.{n}", SOPClassUID="1.2.840.10008.5.1.4.1.1.2",
                StudyInstanceUID="1.3", SeriesInstanceUID=f"1.4.{n}", PatientID=pid,
                IssuerOfPatientID=issuer, sha256="0" * 64, size=1, attributes={}))
        patient_id = patient.id

    class State:
        predictions = _FakePredictions()

    worker = jobs.JobWorker(sessions)
    jobs.register_builtin_handlers(worker, State)
    with sessions.begin() as session:
        jobs.enqueue_series_stored(session, {"1.4.0", "1.4.1", "1.4.2"}, delay_s=0)
    worker.run_until_empty()
    # Only the series whose PatientID + IssuerOfPatientID names the patient links to it.
    assert State.predictions.calls == [(patient_id, "job", None)]
    with sessions() as session:
        statuses = session.scalars(select(JobRow.status)).all()
    assert set(statuses) == {"done"} and len(statuses) == 4


def test_patient_updated_without_a_model_is_a_no_op(sessions: sessionmaker[Session]) -> None:
    worker = jobs.JobWorker(sessions)
    jobs.register_builtin_handlers(worker, object())
    _enqueue(sessions, jobs.PATIENT_UPDATED, {"patient_id": "x"}, "x")
    assert worker.run_until_empty() == 1


def test_enqueue_with_delay_debounces(sessions: sessionmaker[Session]) -> None:
    first = _enqueue(sessions, "k", {}, "s")
    with sessions.begin() as session:
        again = jobs.enqueue(session, "k", {}, "s", delay_s=30)
        assert again.id == first
    job = _job(sessions, first)
    assert job.run_after is not None  # the later enqueue pushed the run back
    with sessions.begin() as session:
        assert jobs.claim(session, "w") is None


def test_storing_a_series_queues_one_series_stored_job(sessions: sessionmaker[Session],
                                                       tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    from services.dicom_store import DicomStore

    store = DicomStore(tmp_path / "dicom", sessions)
    path = get_testdata_file("CT_small.dcm")
    assert isinstance(path, str)
    data = Path(path).read_bytes()
    assert store.store(data).ok
    assert store.store(data).ok  # a duplicate stores nothing new and queues nothing new
    with sessions() as session:
        queued = session.scalars(select(JobRow)).all()
        series = session.scalars(select(DicomInstanceRow.SeriesInstanceUID)).one()
    assert [(j.kind, j.dedupe_key, j.payload) for j in queued] == [
        (jobs.SERIES_STORED, series, {"SeriesInstanceUID": series})]


_DOOMED_WORKER = """
import sys, time
from services.db import make_engine, session_factory
from services.jobs import JobWorker

worker = JobWorker(session_factory(make_engine(sys.argv[1])), lease_s=1.0,
                   worker_id="doomed")

def hang(session, payload):
    print("claimed", flush=True)
    time.sleep(600)

worker.register("k", hang)
worker.run_once()
"""


def test_a_kill_9_worker_loses_no_job(sessions: sessionmaker[Session],
                                      db_engine: Engine) -> None:
    import signal
    import subprocess
    import sys
    import time

    job_id = _enqueue(sessions, "k", {"n": 1})
    url = db_engine.url.render_as_string(hide_password=False)
    proc = subprocess.Popen([sys.executable, "-c", _DOOMED_WORKER, url],
                            stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parents[2])
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "claimed"
        assert _job(sessions, job_id).locked_by == "doomed"
        time.sleep(1.0)  # the heartbeat keeps a live worker's lease
        with sessions.begin() as session:
            assert jobs.claim(session, "too-early") is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    ran: list[int] = []
    worker = jobs.JobWorker(sessions, worker_id="survivor")
    worker.register("k", lambda s, p: ran.append(int(p["n"])))
    deadline = time.monotonic() + 10
    while not ran and time.monotonic() < deadline:
        if not worker.run_once():
            time.sleep(0.2)  # until the dead worker's lease runs out
    job = _job(sessions, job_id)
    assert ran == [1] and job.status == "done" and job.attempts == 2


def test_concurrent_enqueues_of_one_key_make_one_job(sessions: sessionmaker[Session]) -> None:
    """The partial unique index, not the read-then-insert, is what keeps one queued job."""
    first = sessions()
    a = jobs.enqueue(first, "k", {"from": "a"}, "same")  # inserted, not yet committed
    result: dict[str, str] = {}

    def other() -> None:
        with sessions.begin() as session:
            result["b"] = jobs.enqueue(session, "k", {"from": "b"}, "same").id

    thread = threading.Thread(target=other)
    thread.start()
    thread.join(0.5)  # b waits on a's uncommitted row (PostgreSQL) or write lock (SQLite)
    first.commit()
    first.close()
    thread.join(10)
    assert result["b"] == a.id
    with sessions() as session:
        assert len(session.scalars(select(JobRow)).all()) == 1
