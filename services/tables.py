"""ORM tables. The schema grows with the service; migrations live in migrations/."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


def _uuid() -> str:
    return uuid.uuid4().hex


def _now() -> datetime:
    return datetime.now(UTC)


class PatientRow(Base):
    """One patient, keyed by its business identifier; URLs use the opaque ``id``."""

    __tablename__ = "patients"
    __table_args__ = (UniqueConstraint("identifier_system", "identifier_value"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=_uuid)
    identifier_system: Mapped[str] = mapped_column(String(512))
    identifier_value: Mapped[str] = mapped_column(String(256))
    resource_id: Mapped[str | None] = mapped_column(String(256))
    record: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now,
                                                 onupdate=_now)


class DicomInstanceRow(Base):
    """The index of stored DICOM instances; the bytes live in content-addressed files."""

    __tablename__ = "dicom_instances"

    SOPInstanceUID: Mapped[str] = mapped_column(String(64), primary_key=True)
    SOPClassUID: Mapped[str] = mapped_column(String(64))
    StudyInstanceUID: Mapped[str] = mapped_column(String(64), index=True)
    SeriesInstanceUID: Mapped[str] = mapped_column(String(64), index=True)
    PatientID: Mapped[str | None] = mapped_column(String(64), index=True)
    IssuerOfPatientID: Mapped[str | None] = mapped_column(String(64))
    Modality: Mapped[str | None] = mapped_column(String(16))
    StudyDate: Mapped[str | None] = mapped_column(String(8))
    InstanceNumber: Mapped[int | None] = mapped_column()
    TransferSyntaxUID: Mapped[str | None] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column()
    #: Study/series-level attributes kept for QIDO, as DICOM JSON.
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON)
    stored_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class PatientIdentifierRow(Base):
    """Every business identifier that names a patient; a merge (ADT^A40) repoints them."""

    __tablename__ = "patient_identifiers"
    __table_args__ = (UniqueConstraint("system", "value"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    patient_id: Mapped[str] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"),
                                            index=True)
    system: Mapped[str] = mapped_column(String(512))
    value: Mapped[str] = mapped_column(String(256))


class FhirResourceRow(Base):
    """One ingested FHIR resource, keyed by identity; the patient's record is built from these.

    ``identity`` is the resource's business identifier (system|value) or, failing that, its
    id in the sending system, so ingesting the same content twice changes nothing.
    """

    __tablename__ = "fhir_resources"
    __table_args__ = (UniqueConstraint("resource_type", "identity"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=_uuid)
    patient_id: Mapped[str | None] = mapped_column(
        ForeignKey("patients.id", ondelete="CASCADE"), index=True)
    resource_type: Mapped[str] = mapped_column(String(64))
    identity: Mapped[str] = mapped_column(String(800))
    content_sha256: Mapped[str] = mapped_column(String(64))
    #: active | entered-in-error | cancelled | merged | applied (see services.record_store):
    #: only active resources enter the record.
    status: Mapped[str] = mapped_column(String(32), default="active")
    resource: Mapped[dict[str, Any]] = mapped_column(JSON)
    source: Mapped[str] = mapped_column(String(32))  # fhir | ndjson | hl7v2 | cds-prefetch
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now,
                                                 onupdate=_now)


class PredictionRow(Base):
    """One risk prediction with its explanation and the RiskAssessment it was answered as."""

    __tablename__ = "predictions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=_uuid)
    patient_id: Mapped[str] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"),
                                            index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now,
                                                 index=True)
    index_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64), index=True)
    probability: Mapped[float | None] = mapped_column(Float)
    #: Why no score was given (out of population, no input); None when scored.
    refusal: Mapped[str | None] = mapped_column(Text)
    #: {"name": {"threshold": t, "flag": bool}} from the model's decision thresholds.
    decisions: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    modalities: Mapped[str] = mapped_column(String(64))  # e.g. "image+ehr+note"
    explanation: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    risk_assessment: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: Audit attributes copied at prediction time (sex, race, ethnicity, age_band, ...).
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    source: Mapped[str] = mapped_column(String(32))  # fhir | cds-hooks | job | dashboard
    cds_card_uuid: Mapped[str | None] = mapped_column(String(64), unique=True)
    requested_by: Mapped[str | None] = mapped_column(String(256))
    #: sha256 of what the prediction was made from (model version, the patient's record,
    #: the imaging series): a CDS hook reuses a fresh prediction with the same digest.
    input_digest: Mapped[str | None] = mapped_column(String(64), index=True)


class FeedbackRow(Base):
    """A clinician's verdict on a prediction, in CDS Hooks' feedback terms."""

    __tablename__ = "feedback"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=_uuid)
    prediction_id: Mapped[str] = mapped_column(
        ForeignKey("predictions.id", ondelete="CASCADE"), index=True)
    outcome: Mapped[str] = mapped_column(String(16))  # accepted | overridden
    override_reason: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # Coding
    user_comment: Mapped[str | None] = mapped_column(Text)
    outcome_timestamp: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    recorded_by: Mapped[str] = mapped_column(String(256))
    channel: Mapped[str] = mapped_column(String(32))  # cds-hooks | dashboard
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class AuditRow(Base):
    """A stored fairness audit: its JSON report, HTML and PDF renderings."""

    __tablename__ = "audits"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=_uuid)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now,
                                                 index=True)
    run_by: Mapped[str] = mapped_column(String(256))
    model_version: Mapped[str | None] = mapped_column(String(64))
    window_start: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    window_end: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    data_fingerprint: Mapped[str] = mapped_column(String(64))
    report: Mapped[dict[str, Any]] = mapped_column(JSON)
    html: Mapped[str] = mapped_column(Text)
    pdf: Mapped[bytes] = mapped_column(LargeBinary)


class JobRow(Base):
    """A durable background job; a lease makes a crashed worker's job runnable again."""

    __tablename__ = "jobs"
    __table_args__ = (
        # One *queued* job per (kind, dedupe_key), enforced by the database so that two
        # concurrent enqueues cannot both insert. A running job does not count: it may
        # already have read the data that the new request is about.
        Index("uq_jobs_queued_dedupe", "kind", "dedupe_key", unique=True,
              postgresql_where=text("status = 'queued' AND dedupe_key IS NOT NULL"),
              sqlite_where=text("status = 'queued' AND dedupe_key IS NOT NULL")),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=_uuid)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    #: One queued job per (kind, dedupe_key): re-ingest does not enqueue twice.
    dedupe_key: Mapped[str | None] = mapped_column(String(256))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    #: queued | running | done | failed | superseded
    status: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: A queued job is not claimed before this time (retry backoff); None: at once.
    run_after: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: The worker holding the lease; only it may complete or fail the job.
    locked_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AccessLogRow(Base):
    """One access to patient data; each row's hash covers the previous row's hash."""

    __tablename__ = "access_log"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    subject: Mapped[str] = mapped_column(String(256))
    role: Mapped[str] = mapped_column(String(32))
    action: Mapped[str] = mapped_column(String(64))  # e.g. read, write, predict, export
    resource: Mapped[str] = mapped_column(String(512))  # route or resource type, no values
    patient_id: Mapped[str | None] = mapped_column(String(32), index=True)
    purpose: Mapped[str | None] = mapped_column(String(128))
    status: Mapped[int] = mapped_column(Integer)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AccessLogCheckpointRow(Base):
    """A signed checkpoint of the access-log chain head; catches a truncated tail.

    Checkpoints are chained too (migration 0007): each signs the hash of the one before
    it and the number of entries stored, so a deleted checkpoint breaks the chain.
    Checkpoints written before 0007 have neither and verify as they always did.
    """

    __tablename__ = "access_log_checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    seq: Mapped[int] = mapped_column(Integer)
    head_hash: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    key_id: Mapped[str] = mapped_column(String(80))  # "sha256:" + 64 hex digits
    signature: Mapped[str] = mapped_column(String(256))  # base64 Ed25519
    #: The previous checkpoint's hash (GENESIS for the first); unique, so two writers
    #: cannot both extend the same checkpoint and fork the chain. None before 0007.
    prev_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    #: Entries stored when it was signed. None before 0007.
    entry_count: Mapped[int | None] = mapped_column(Integer)


class UserRow(Base):
    """A local user of the embedded demo issuer (hospitals use their own identity provider)."""

    __tablename__ = "users"

    username: Mapped[str] = mapped_column(String(128), primary_key=True)
    password_hash: Mapped[str] = mapped_column(String(256))  # argon2id
    role: Mapped[str] = mapped_column(String(32))
    display_name: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class ClientRow(Base):
    """A SMART Backend Services client: its public JWKS authenticates its token requests."""

    __tablename__ = "clients"

    client_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    role: Mapped[str] = mapped_column(String(32))
    jwks: Mapped[dict[str, Any]] = mapped_column(JSON)
    scope: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class ModelActivationRow(Base):
    """Which model artifact the service serves, and since when: the switch/rollback history."""

    __tablename__ = "model_activations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    activated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    activated_by: Mapped[str] = mapped_column(String(256))
    model_path: Mapped[str] = mapped_column(String(1024))
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    #: switch | rollback
    action: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)


class OneTimeIdRow(Base):
    """A used one-time id (assertion ``jti``, authorization code): refused again until expiry.

    The primary key makes the replay check atomic across processes and replicas: a second
    insert of the same id fails in the database, not in one process's memory.
    """

    __tablename__ = "one_time_ids"

    #: sha256 of kind and id: fixed length, and a stored row does not hold the id itself.
    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))  # assertion-jti | authorization-code
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class SignInFailureRow(Base):
    """A failed local sign-in; recent ones throttle the user name and the client address.

    Both are stored as sha256 digests: a password typed into the user name field is not
    kept in clear (the digest of an address is not anonymous, only fixed-length).
    """

    __tablename__ = "sign_in_failures"
    __table_args__ = (
        Index("ix_sign_in_failures_user_key_at", "user_key", "at"),
        Index("ix_sign_in_failures_address_key_at", "address_key", "at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_key: Mapped[str] = mapped_column(String(64))
    address_key: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class DashboardSessionRow(Base):
    """A signed-in dashboard browser: its cookie holds a random id, this row what it may do.

    Logout revokes the row, so a copied cookie stops working; no bearer token is kept.
    """

    __tablename__ = "dashboard_sessions"

    #: sha256 of the cookie's random id: reading the table gives no usable cookie.
    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    subject: Mapped[str] = mapped_column(String(256), index=True)
    role: Mapped[str] = mapped_column(String(32))
    #: The granted scopes, space-separated, as in the token that opened the session.
    scopes: Mapped[str] = mapped_column(Text, default="")
    issuer: Mapped[str | None] = mapped_column(String(512))
    #: The SMART launch's patient in context, as the token response named it.
    patient: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
