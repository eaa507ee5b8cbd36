"""ORM tables. The schema grows with the service; migrations live in migrations/."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, String, UniqueConstraint
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
