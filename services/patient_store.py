"""Store and load PatientRecords by business identifier; find patients by any identifier."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import or_, select, tuple_
from sqlalchemy.orm import Session

from fhir_adapters.record import PatientIdentifier, PatientRecord, record_from_json
from services.tables import PatientIdentifierRow, PatientRow


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
    # Index every identifier, so FHIR and HL7 ingest (which look patients up by any of
    # them) find this patient; identifiers that already name another patient stay theirs.
    link_identifiers(session, row.id, (record.key, *record.identifiers), steal=False)
    return row.id


def load_record(session: Session, key: PatientIdentifier) -> PatientRecord | None:
    row = session.scalars(
        select(PatientRow).where(PatientRow.identifier_system == key.system,
                                 PatientRow.identifier_value == key.value)
    ).one_or_none()
    return None if row is None else record_from_json(row.record)


def find_patients(session: Session, identifiers: Iterable[PatientIdentifier]) -> set[str]:
    """The opaque ids of the stored patients that any of ``identifiers`` names.

    More than one id means the identifiers name different patients (a merge is due).
    """
    keys = sorted({(i.system, i.value) for i in identifiers})
    if not keys:
        return set()
    found: set[str] = set()
    for start in range(0, len(keys), 200):
        chunk = keys[start:start + 200]
        found.update(session.scalars(select(PatientIdentifierRow.patient_id).where(
            tuple_(PatientIdentifierRow.system, PatientIdentifierRow.value).in_(chunk))))
        # Records saved before identifiers were indexed carry only their primary key.
        found.update(session.scalars(select(PatientRow.id).where(or_(*(
            (PatientRow.identifier_system == s) & (PatientRow.identifier_value == v)
            for s, v in chunk)))))
    return found


def _stored_identifiers(session: Session, wanted: set[tuple[str, str]]
                        ) -> dict[tuple[str, str], PatientIdentifierRow]:
    """The stored rows of the ``(system, value)`` pairs in ``wanted``, by pair."""
    return {(r.system, r.value): r for r in session.scalars(
        select(PatientIdentifierRow).where(
            tuple_(PatientIdentifierRow.system, PatientIdentifierRow.value).in_(sorted(wanted))))}


def link_identifiers(session: Session, patient_id: str,
                     identifiers: Iterable[PatientIdentifier], *, steal: bool = True) -> None:
    """Make every identifier in ``identifiers`` name ``patient_id``.

    With ``steal`` (a merge), an identifier that names another patient is moved;
    without it, that identifier is left where it is.
    """
    wanted = {(i.system, i.value) for i in identifiers}
    if not wanted:
        return
    existing = _stored_identifiers(session, wanted)
    for system, value in sorted(wanted):
        row = existing.get((system, value))
        if row is None:
            session.add(PatientIdentifierRow(patient_id=patient_id, system=system, value=value))
        elif row.patient_id != patient_id and steal:
            row.patient_id = patient_id
    session.flush()


def identifiers_known(session: Session, identifiers: Iterable[PatientIdentifier]) -> bool:
    """Whether every one of ``identifiers`` is already stored (naming any patient)."""
    wanted = {(i.system, i.value) for i in identifiers}
    return not wanted or set(_stored_identifiers(session, wanted)) == wanted


def identifiers_of(session: Session, patient_id: str) -> list[PatientIdentifier]:
    """Every identifier that names the patient, sorted."""
    rows = session.execute(select(PatientIdentifierRow.system, PatientIdentifierRow.value)
                           .where(PatientIdentifierRow.patient_id == patient_id))
    return sorted(PatientIdentifier(s, v) for s, v in rows)
