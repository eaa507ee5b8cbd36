"""The patients an imaging read returned, named for the access log.

A QIDO-RS search may span the whole archive and a WADO-RS retrieve returns one study:
the access log gets one entry per patient whose instances were returned
(:meth:`services.access_log.AccessLog.record_many`), so an auditor asking who saw a
patient's images finds every such read.

Instances name their patient by PatientID + IssuerOfPatientID, linked to the opaque
patient id as the service links imaging everywhere (:func:`services.jobs.patient_for_series`):
the pair must equal one of a stored patient's business identifiers. Instances of a
patient not (yet) stored, or without an issuer (a bare PatientID is ambiguous across
assigning authorities), get a label instead: ``dicom-`` and a keyed hash of the pair,
stable within a deployment (the pseudonym secret keys it), so their accesses can still be
followed, and an investigator holding the key can compute the label of a given PatientID
without the log ever holding it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session, sessionmaker

from services.tables import DicomInstanceRow, PatientIdentifierRow, PatientRow

__all__ = ["NO_PATIENT_ID", "imaging_patient_label", "patients_of"]

#: The label of instances that carry no PatientID at all.
NO_PATIENT_ID = "dicom-no-patient-id"
_CHUNK = 400


def imaging_patient_label(issuer: str | None, patient_id: str, secret: bytes) -> str:
    """``dicom-`` and 26 hex digits (32 characters, the access log's patient column)."""
    # Issuers that are OIDs are written with or without urn:oid:; both give one label.
    bare = (issuer or "").removeprefix("urn:oid:")
    message = f"clinfuse-imaging-patient/1\0{bare}\0{patient_id}".encode()
    return "dicom-" + hmac.new(secret, message, hashlib.sha256).hexdigest()[:26]


def patients_of(sessions: sessionmaker[Session], rows: Iterable[DicomInstanceRow],
                secret: bytes) -> list[str]:
    """The sorted, distinct patients of ``rows``: opaque ids where linked, else labels."""
    pairs = {(r.IssuerOfPatientID or None, r.PatientID or None) for r in rows}
    if not pairs:
        return []
    linked = _linked(sessions, {(i, v) for i, v in pairs if i and v})
    out: set[str] = set()
    for issuer, value in pairs:
        if not value:
            out.add(NO_PATIENT_ID)
        elif issuer and (issuer, value) in linked:
            out.add(linked[(issuer, value)])
        else:
            out.add(imaging_patient_label(issuer, value, secret))
    return sorted(out)


def _systems(issuer: str) -> list[str]:
    bare = issuer.removeprefix("urn:oid:")
    return sorted({issuer, bare, f"urn:oid:{bare}"})


def _linked(sessions: sessionmaker[Session], pairs: set[tuple[str, str]]
            ) -> dict[tuple[str, str], str]:
    """(issuer, PatientID) -> opaque patient id, for the pairs a stored patient carries."""
    if not pairs:
        return {}
    wanted = {(system, value): (issuer, value)
              for issuer, value in pairs for system in _systems(issuer)}
    keys = list(wanted)
    columns = ((PatientRow.identifier_system, PatientRow.identifier_value, PatientRow.id),
               # After the primary key: a merge (ADT^A40) repoints these, so they win.
               (PatientIdentifierRow.system, PatientIdentifierRow.value,
                PatientIdentifierRow.patient_id))
    found: dict[tuple[str, str], str] = {}
    with sessions() as session:
        for system_col, value_col, patient_col in columns:
            # In chunks: a whole-archive search may name thousands of patients, more
            # than one statement may bind.
            for start in range(0, len(keys), _CHUNK):
                query = select(system_col, value_col, patient_col).where(
                    tuple_(system_col, value_col).in_(keys[start:start + _CHUNK]))
                for system, value, patient in session.execute(query):
                    found[wanted[(system, value)]] = str(patient)
    return found
