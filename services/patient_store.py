"""Store and load PatientRecords by business identifier."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from fhir_adapters.record import PatientIdentifier, PatientRecord, record_from_json
from services.tables import PatientRow


def save_record(session: Session, record: PatientRecord) -> str:
    """Insert or replace a patient's record; returns the patient's opaque id."""
    if record.key is None:
        raise ValueError("a stored record needs a business identifier (system and value)")
    row = session.scalars(
        select(PatientRow).where(PatientRow.identifier_system == record.key.system,
                                 PatientRow.identifier_value == record.key.value)
    ).one_or_none()
    if row is None:
        row = PatientRow(identifier_system=record.key.system, identifier_value=record.key.value)
        session.add(row)
    row.resource_id = record.resource_id
    row.record = record.to_json()
    session.flush()
    return row.id


def load_record(session: Session, key: PatientIdentifier) -> PatientRecord | None:
    row = session.scalars(
        select(PatientRow).where(PatientRow.identifier_system == key.system,
                                 PatientRow.identifier_value == key.value)
    ).one_or_none()
    return None if row is None else record_from_json(row.record)
