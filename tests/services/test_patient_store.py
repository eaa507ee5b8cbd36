"""A PatientRecord survives a round trip through SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest
from sqlalchemy import Engine, inspect

from fhir_adapters.record import (
    Coding,
    Demographics,
    Note,
    Observation,
    PatientIdentifier,
    PatientRecord,
)
from services.db import session_factory, session_scope
from services.patient_store import load_record, save_record

MRN = PatientIdentifier("http://hospital.example.org/mrn", "MRN00000042")


def _record() -> PatientRecord:
    return PatientRecord(
        key=MRN,
        resource_id="p42",
        identifiers=(MRN,),
        demographics=Demographics(
            sex="female", birth_date=date(1950, 2, 3),
            race=(Coding("urn:oid:2.16.840.1.113883.6.238", "2054-5", "Black"),),
        ),
        observations=[Observation("2524-7", "http://loinc.org", "Lactate", 4.1, "mmol/L",
                                  datetime(2026, 1, 2, 3, 4, tzinfo=UTC), 0.5, 2.2)],
        notes=[Note("Patient denies chest pain.", "progress note",
                    datetime(2026, 1, 2, tzinfo=UTC), "DocumentReference/n1")],
    )


def test_schema_is_migrated(db_engine: Engine) -> None:
    assert "patients" in inspect(db_engine).get_table_names()
    assert "alembic_version" in inspect(db_engine).get_table_names()


def test_record_round_trip(db_engine: Engine) -> None:
    factory = session_factory(db_engine)
    with session_scope(factory) as session:
        patient_id = save_record(session, _record())
    with session_scope(factory) as session:
        loaded = load_record(session, MRN)
    assert loaded == _record()
    assert len(patient_id) == 32 and "MRN" not in patient_id


def test_save_is_idempotent(db_engine: Engine) -> None:
    factory = session_factory(db_engine)
    with session_scope(factory) as session:
        first = save_record(session, _record())
    with session_scope(factory) as session:
        second = save_record(session, _record())
    assert first == second


def test_failed_transaction_leaves_nothing(db_engine: Engine) -> None:
    factory = session_factory(db_engine)
    with pytest.raises(RuntimeError), session_scope(factory) as session:
        save_record(session, _record())
        raise RuntimeError("crash mid-ingest")
    with session_scope(factory) as session:
        assert load_record(session, MRN) is None
