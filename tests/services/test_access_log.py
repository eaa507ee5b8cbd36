"""The access log under attack (edit, delete, truncate) and read back by compliance.

Each attack is detected by ``verify_chain``, by ``clinfuse verify-access-log`` and
by ``GET /access-log/verify``; an untouched log verifies. Compliance sees patient
pseudonyms, admins the opaque ids.
"""

from __future__ import annotations

import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from fastapi.testclient import TestClient
from sqlalchemy import Engine, delete, select, text, update

from services.access_log import AccessLog, entry_hash, pseudonym, verify_chain
from services.api.routes.access_log import pseudonym_secret
from services.app import create_app
from services.auth.principal import Principal, Role
from services.cli import main
from services.core.config import Settings
from services.db import session_factory
from services.tables import AccessLogCheckpointRow, AccessLogRow
from tests.services.service_support import bearer

CLINICIAN = Principal(subject="dr-lee", role=Role.clinician)


@pytest.fixture
def log_and_key(db_engine: Engine, tmp_path: Path) -> tuple[AccessLog, Path]:
    """Ten entries, a signed checkpoint after the eighth, and the public key as PEM."""
    access_log = AccessLog(session_factory(db_engine), tmp_path / "keys" / "log.pem",
                           checkpoint_every=10_000, checkpoint_interval_s=1e9)
    for n in range(1, 11):
        access_log.record(CLINICIAN, action="read", resource="GET /fhir/Patient/{id}",
                          patient_id=f"patient{n % 3}")
        if n == 8:
            assert access_log.checkpoint() is not None
    pem = tmp_path / "log.pub.pem"
    pem.write_bytes(access_log.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return access_log, pem


def _cli(engine: Engine, pem: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(["verify-access-log", "--database-url",
              engine.url.render_as_string(hide_password=False), "--public-key", str(pem)])
    return int(exit_info.value.code or 0), capsys.readouterr().out


def _problems(engine: Engine, pem: Path) -> list[str]:
    with session_factory(engine)() as session:
        return verify_chain(session, pem).problems


def test_untouched_log_verifies(db_engine: Engine, log_and_key: tuple[AccessLog, Path],
                                capsys: pytest.CaptureFixture[str]) -> None:
    _, pem = log_and_key
    assert _problems(db_engine, pem) == []
    code, out = _cli(db_engine, pem, capsys)
    assert code == 0 and "access log OK: 10 entries, 1 signed checkpoint" in out


def test_concurrent_appends_share_transactions_and_keep_one_chain(
        db_engine: Engine, tmp_path: Path) -> None:
    access_log = AccessLog(session_factory(db_engine), tmp_path / "log.pem",
                           checkpoint_every=50, checkpoint_interval_s=1e9)
    seqs: list[int] = []
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for n in range(25):
                seqs.append(access_log.record(CLINICIAN, action="read", resource="GET /x",
                                              patient_id=f"p{worker}-{n}"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(seqs) == list(range(1, 201))
    with session_factory(db_engine)() as session:
        assert verify_chain(session, access_log.public_key).ok
        patients = set(session.scalars(select(AccessLogRow.patient_id)))
    assert patients == {f"p{w}-{n}" for w in range(8) for n in range(25)}


def test_edited_entry_is_detected(db_engine: Engine, log_and_key: tuple[AccessLog, Path],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    _, pem = log_and_key
    with db_engine.begin() as conn:
        conn.execute(update(AccessLogRow).where(AccessLogRow.seq == 4)
                     .values(subject="someone-else"))
    assert any("entry 4" in p and "edited" in p for p in _problems(db_engine, pem))
    code, out = _cli(db_engine, pem, capsys)
    assert code == 1 and "entry 4: its contents do not match its hash (edited)" in out


def test_edit_with_a_recomputed_hash_breaks_the_next_link(
        db_engine: Engine, log_and_key: tuple[AccessLog, Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    _, pem = log_and_key
    sessions = session_factory(db_engine)
    with sessions.begin() as session:
        row = session.get(AccessLogRow, 4)
        assert row is not None
        row.subject = "someone-else"
        row.hash = entry_hash(row)  # the attacker re-hashes the edited entry
    problems = _problems(db_engine, pem)
    assert any("entry 5: does not link" in p for p in problems)
    assert _cli(db_engine, pem, capsys)[0] == 1


def test_deleted_entry_is_detected(db_engine: Engine, log_and_key: tuple[AccessLog, Path],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    _, pem = log_and_key
    with db_engine.begin() as conn:
        conn.execute(delete(AccessLogRow).where(AccessLogRow.seq == 6))
    problems = _problems(db_engine, pem)
    assert any("entries 6..6 are missing" in p for p in problems)
    code, out = _cli(db_engine, pem, capsys)
    assert code == 1 and "missing (deleted)" in out


def test_truncated_tail_below_a_checkpoint_is_detected(
        db_engine: Engine, log_and_key: tuple[AccessLog, Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    _, pem = log_and_key
    # Cutting the tail keeps the chain itself consistent; only the signed head shows it.
    with db_engine.begin() as conn:
        conn.execute(delete(AccessLogRow).where(AccessLogRow.seq >= 7))
    problems = _problems(db_engine, pem)
    assert problems == ["checkpoint at entry 8 but the log ends at entry 6: its tail was "
                        "truncated"]
    code, out = _cli(db_engine, pem, capsys)
    assert code == 1 and "truncated" in out


def test_forged_checkpoint_is_detected(db_engine: Engine, log_and_key: tuple[AccessLog, Path],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    _, pem = log_and_key
    with db_engine.begin() as conn:
        conn.execute(update(AccessLogCheckpointRow).values(seq=5))
    assert any("bad signature" in p for p in _problems(db_engine, pem))
    assert _cli(db_engine, pem, capsys)[0] == 1


def test_cli_without_a_key_says_what_to_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CLINFUSE_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(SystemExit) as exit_info:
        main(["verify-access-log", "--database-url", f"sqlite:///{tmp_path / 'x.db'}"])
    assert exit_info.value.code == 2
    assert "--public-key" in capsys.readouterr().err


# -- the routes ------------------------------------------------------------------------


@pytest.fixture
def client(db_engine: Engine, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(database_url=db_engine.url.render_as_string(hide_password=False),
                        data_dir=tmp_path / "data")
    app = create_app(settings)
    with TestClient(app, headers=bearer(app, Role.compliance, "officer-1")) as test_client:
        access_log: AccessLog = app.state.access_log
        for n in range(3):
            access_log.record(CLINICIAN, action="read", resource="GET /fhir/Patient/{id}",
                              patient_id=f"opaque{n}")
        yield test_client


def test_compliance_sees_pseudonyms_admin_sees_ids(client: TestClient) -> None:
    settings: Settings = client.app.state.settings  # type: ignore[attr-defined]
    secret = pseudonym_secret(settings)
    key_file = settings.keys_dir / "pseudonym.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    entries = client.get("/access-log").json()
    reads = [e for e in entries if e["subject"] == "dr-lee"]
    assert [e["patient"] for e in reads] == [pseudonym(f"opaque{n}", secret)
                                             for n in (2, 1, 0)]
    assert all(e["pseudonymised"] for e in entries)
    assert "opaque" not in str(entries)
    # Stable: the same patient gets the same pseudonym on the next request.
    again = [e for e in client.get("/access-log").json() if e["subject"] == "dr-lee"]
    assert [e["patient"] for e in again] == [e["patient"] for e in reads]
    admin = client.get("/access-log", headers=bearer(client.app, Role.admin)  # type: ignore[arg-type]
                       ).json()
    assert [e["patient"] for e in admin if e["subject"] == "dr-lee"] == [
        "opaque2", "opaque1", "opaque0"]
    assert not any(e["pseudonymised"] for e in admin)
    # The compliance officer's own reads are logged too, without a patient.
    own = [e for e in admin if e["subject"] == "officer-1"]
    assert own and own[0]["resource"] == "GET /access-log" and own[0]["patient"] is None


def test_filters_and_paging(client: TestClient) -> None:
    page = client.get("/access-log", params={"subject": "dr-lee", "limit": 2}).json()
    assert [e["seq"] for e in page] == [3, 2]
    rest = client.get("/access-log", params={"subject": "dr-lee", "offset": 2}).json()
    assert [e["seq"] for e in rest] == [1]
    assert client.get("/access-log", params={"action": "delete"}).json() == []


def test_configured_secret_is_used(db_engine: Engine, tmp_path: Path) -> None:
    settings = Settings(database_url=db_engine.url.render_as_string(hide_password=False),
                        data_dir=tmp_path / "data2", pseudonym_secret="site-secret")
    assert pseudonym_secret(settings) == b"site-secret"
    assert not (settings.keys_dir / "pseudonym.key").exists()


def test_verify_route(client: TestClient, db_engine: Engine) -> None:
    result = client.get("/access-log/verify").json()
    assert result["ok"] is True and result["entries"] >= 3 and result["problems"] == []
    with db_engine.begin() as conn:
        conn.execute(text("UPDATE access_log SET resource = 'GET /elsewhere' WHERE seq = 2"))
    result = client.get("/access-log/verify").json()
    assert result["ok"] is False
    assert result["problems"] == ["entry 2: its contents do not match its hash (edited)"]


@pytest.mark.parametrize("role", [Role.clinician, Role.integration])
def test_other_roles_may_not_read_the_log(client: TestClient, role: Role) -> None:
    headers = bearer(client.app, role)  # type: ignore[arg-type]
    assert client.get("/access-log", headers=headers).status_code == 403
    assert client.get("/access-log/verify", headers=headers).status_code == 403
