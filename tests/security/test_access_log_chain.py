"""Access-log checkpoints are chained, count the entries and are exported (issue 19, finding 10).

Someone with write access to the database could delete the newest entries together with
every checkpoint above them, and the log still verified. Now each signed checkpoint
carries the previous checkpoint's hash and the number of entries it covers, and is also
appended to a file (``CLINFUSE_ACCESS_LOG_CHECKPOINT_FILE``) meant for append-only
storage: a deleted tail is caught against that file, a deleted checkpoint breaks the
chain, and a deleted entry is a gap and a count mismatch.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, delete, select
from sqlalchemy.orm import Session, sessionmaker

from services.access_log import AccessLog, verify_chain
from services.auth.principal import Principal, Role
from services.db import migrate, session_factory
from services.tables import AccessLogCheckpointRow, AccessLogRow

CLINICIAN = Principal(subject="dr-lee", role=Role.clinician)


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    engine = create_engine(f"sqlite:///{tmp_path / 'log.sqlite'}")
    migrate(engine)
    return engine


def _log(engine: Engine, tmp_path: Path, exported: Path | None = None) -> AccessLog:
    return AccessLog(session_factory(engine), tmp_path / "keys" / "log.pem",
                     checkpoint_every=10_000, checkpoint_interval_s=1e9,
                     checkpoint_file=exported)


def _append(access_log: AccessLog, n: int) -> None:
    for k in range(n):
        access_log.record(CLINICIAN, action="read", resource="GET /fhir/Patient/{id}",
                          patient_id=f"p{k % 3}")


def _problems(engine: Engine, access_log: AccessLog, exported: Path | None = None
              ) -> list[str]:
    with session_factory(engine)() as session:
        return verify_chain(session, access_log.public_key, exported=exported).problems


def _delete_newest_checkpoint_and_entries_above(engine: Engine, seq: int) -> None:
    """What an attacker with database access does: a consistent, shorter log."""
    with engine.begin() as conn:
        newest = conn.scalar(select(AccessLogCheckpointRow.id)
                             .order_by(AccessLogCheckpointRow.id.desc()).limit(1))
        conn.execute(delete(AccessLogCheckpointRow).where(AccessLogCheckpointRow.id == newest))
        conn.execute(delete(AccessLogRow).where(AccessLogRow.seq > seq))


def test_a_truncated_tail_with_its_checkpoint_is_caught_by_the_export(
        engine: Engine, tmp_path: Path) -> None:
    exported = tmp_path / "worm" / "checkpoints.jsonl"
    access_log = _log(engine, tmp_path, exported)
    _append(access_log, 5)
    access_log.checkpoint()
    _append(access_log, 5)
    access_log.checkpoint()
    assert _problems(engine, access_log, exported) == []
    lines = [json.loads(line) for line in exported.read_text().splitlines()]
    assert [(c["seq"], c["entry_count"]) for c in lines] == [(5, 5), (10, 10)]

    _delete_newest_checkpoint_and_entries_above(engine, 7)
    # The database alone is consistent again: this is what finding 10 found.
    assert _problems(engine, access_log) == []
    problems = _problems(engine, access_log, exported)
    assert any("checkpoint at entry 10" in p and "not in the database" in p for p in problems)
    assert any("log ends at entry 7" in p for p in problems)


def test_a_deleted_middle_checkpoint_breaks_the_chain(engine: Engine, tmp_path: Path) -> None:
    access_log = _log(engine, tmp_path)
    for _ in range(3):
        _append(access_log, 2)
        access_log.checkpoint()
    with engine.begin() as conn:
        conn.execute(delete(AccessLogCheckpointRow).where(AccessLogCheckpointRow.seq == 4))
    problems = _problems(engine, access_log)
    assert problems == ["checkpoint at entry 6: the checkpoint before it is missing or was "
                        "altered (the checkpoint chain is broken)"]


def test_a_deleted_middle_entry_is_a_gap_and_a_count_mismatch(engine: Engine,
                                                              tmp_path: Path) -> None:
    access_log = _log(engine, tmp_path)
    _append(access_log, 8)
    access_log.checkpoint()
    _append(access_log, 2)
    with engine.begin() as conn:
        conn.execute(delete(AccessLogRow).where(AccessLogRow.seq == 3))
    problems = _problems(engine, access_log)
    assert "entries 3..3 are missing (deleted)" in problems
    assert ("checkpoint at entry 8: signed over 8 entries, but 7 are stored up to it "
            "(entries deleted)") in problems


def test_checkpoints_from_before_the_chain_still_verify(engine: Engine, tmp_path: Path) -> None:
    """A checkpoint written before migration 0007 (no previous hash, no count) verifies as
    before; the first chained checkpoint links to it and starts the chain."""
    access_log = _log(engine, tmp_path)
    _append(access_log, 4)
    sessions: sessionmaker[Session] = session_factory(engine)
    with sessions.begin() as session:
        head = session.scalars(select(AccessLogRow).order_by(AccessLogRow.seq.desc())
                               .limit(1)).one()
        at = datetime.now(UTC)
        message = f"clinfuse-access-log-checkpoint/1\n{head.seq}\n{head.hash}\n" \
                  f"{at.isoformat(timespec='microseconds')}".encode()
        session.add(AccessLogCheckpointRow(
            seq=head.seq, head_hash=head.hash, at=at, key_id=access_log.key_id,
            signature=base64.b64encode(access_log._key.sign(message)).decode()))
    _append(access_log, 3)
    access_log.checkpoint()
    assert _problems(engine, access_log) == []
    # The chained checkpoint covers the old one: deleting it is seen.
    with engine.begin() as conn:
        conn.execute(delete(AccessLogCheckpointRow).where(AccessLogCheckpointRow.seq == 4))
    assert _problems(engine, access_log) == [
        "checkpoint at entry 7: the checkpoint before it is missing or was altered (the "
        "checkpoint chain is broken)"]


def test_an_edited_export_line_is_refused(engine: Engine, tmp_path: Path) -> None:
    exported = tmp_path / "checkpoints.jsonl"
    access_log = _log(engine, tmp_path, exported)
    _append(access_log, 3)
    access_log.checkpoint()
    line = json.loads(exported.read_text())
    line["seq"] = 2
    exported.write_text(json.dumps(line) + "\n")
    assert any("exported checkpoint 1: bad signature" in p
               for p in _problems(engine, access_log, exported))


def test_the_cli_checks_the_export(engine: Engine, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from cryptography.hazmat.primitives import serialization

    from services.cli import main

    exported = tmp_path / "checkpoints.jsonl"
    access_log = _log(engine, tmp_path, exported)
    _append(access_log, 4)
    access_log.checkpoint()
    _delete_newest_checkpoint_and_entries_above(engine, 2)
    pem = tmp_path / "log.pub.pem"
    pem.write_bytes(access_log.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(SystemExit) as exit_info:
        main(["verify-access-log", "--database-url", str(engine.url), "--public-key",
              str(pem), "--checkpoint-file", str(exported)])
    assert exit_info.value.code == 1
    assert "exported checkpoint at entry 4 is not in the database" in capsys.readouterr().out
