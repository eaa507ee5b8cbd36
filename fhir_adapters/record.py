"""The PatientRecord: one patient's data, as every other package reads it.

Everything time-stamped carries an aware UTC datetime. ``PatientRecord.as_of``
is the leakage guard: models and features only ever see the view it returns.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from fhir_adapters.errors import Issue

__all__ = [
    "Coding",
    "Condition",
    "Demographics",
    "Encounter",
    "ImagingSeriesRef",
    "ImagingStudyRef",
    "Medication",
    "Note",
    "Observation",
    "Outcome",
    "PatientIdentifier",
    "PatientRecord",
    "merge_records",
    "record_from_json",
]


@dataclass(frozen=True, order=True)
class PatientIdentifier:
    """A business identifier: FHIR ``Patient.identifier``, HL7 PID-3 with its
    assigning authority, or DICOM PatientID with IssuerOfPatientID."""

    system: str
    value: str

    def __str__(self) -> str:
        return f"{self.system}|{self.value}"


@dataclass(frozen=True)
class Coding:
    system: str | None
    code: str | None
    display: str | None = None


@dataclass(frozen=True)
class Observation:
    """One measurement. ``code`` is the LOINC code when the source coded one."""

    code: str | None
    system: str | None
    display: str | None
    value: float | str | bool | None
    unit: str | None
    effective: datetime | None
    reference_low: float | None = None
    reference_high: float | None = None
    category: str | None = None
    source: str | None = None


@dataclass(frozen=True)
class Condition:
    code: str | None
    system: str | None
    display: str | None
    onset: datetime | None
    abatement: datetime | None = None
    clinical_status: str | None = None
    source: str | None = None


@dataclass(frozen=True)
class Medication:
    code: str | None
    system: str | None
    display: str | None
    authored: datetime | None
    status: str | None = None
    source: str | None = None


@dataclass(frozen=True)
class Note:
    text: str
    type: str | None
    time: datetime | None
    source: str | None = None


@dataclass(frozen=True)
class Encounter:
    encounter_class: str | None
    status: str | None
    start: datetime | None
    end: datetime | None = None
    type: str | None = None
    source: str | None = None


@dataclass(frozen=True)
class ImagingSeriesRef:
    SeriesInstanceUID: str
    Modality: str | None = None
    BodySite: str | None = None
    NumberOfInstances: int | None = None


@dataclass(frozen=True)
class ImagingStudyRef:
    StudyInstanceUID: str | None
    started: datetime | None
    series: tuple[ImagingSeriesRef, ...] = ()
    source: str | None = None


@dataclass(frozen=True)
class Demographics:
    sex: str | None = None  # FHIR administrative gender
    gender_identity: str | None = None
    birth_date: date | None = None
    race: tuple[Coding, ...] = ()  # US Core race ombCategory/detailed codings
    race_text: str | None = None
    ethnicity: tuple[Coding, ...] = ()
    ethnicity_text: str | None = None
    language: str | None = None
    payers: tuple[str, ...] = ()

    def age_at(self, when: datetime) -> float | None:
        """Age in years at ``when``; None when the birth date is unknown."""
        if self.birth_date is None:
            return None
        days = (when.date() - self.birth_date).days
        return days / 365.25


def age_band(age: float | None) -> str | None:
    """The audit age band: 0-17, 18-44, 45-64, 65-79 or 80+; None when the age is unknown."""
    if age is None or math.isnan(age):
        return None
    for upper, band in ((18, "0-17"), (45, "18-44"), (65, "45-64"), (80, "65-79")):
        if age < upper:
            return band
    return "80+"


@dataclass(frozen=True)
class Outcome:
    deceased: bool | None = None
    deceased_time: datetime | None = None


@dataclass
class PatientRecord:
    """One patient's data from any source, keyed by a business identifier."""

    key: PatientIdentifier | None
    resource_id: str | None = None
    identifiers: tuple[PatientIdentifier, ...] = ()
    demographics: Demographics = field(default_factory=Demographics)
    observations: list[Observation] = field(default_factory=list)
    conditions: list[Condition] = field(default_factory=list)
    medications: list[Medication] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    encounters: list[Encounter] = field(default_factory=list)
    imaging: list[ImagingStudyRef] = field(default_factory=list)
    outcome: Outcome = field(default_factory=Outcome)
    #: When set, this record is an as-of view and nothing later is in it.
    index_time: datetime | None = None
    #: Located, value-free notices of what ingest nulled or dropped on the way to
    #: this record (docs/ingest-policy.md). Not part of record equality.
    warnings: list[Issue] = field(default_factory=list, compare=False)

    @property
    def patient_id(self) -> str:
        """A stable string id: the business key when known, else the resource id."""
        if self.key is not None:
            return str(self.key)
        return f"resource|{self.resource_id}"

    def as_of(self, index_time: datetime) -> PatientRecord:
        """Return the view of this record at ``index_time``: nothing dated after it.

        Undated clinical items are dropped too, because nothing proves they
        happened before the index time. Demographics stay; the outcome is
        visible only if it happened at or before the index time.
        """
        t = ensure_utc(index_time)

        def visible(when: datetime | None) -> bool:
            return when is not None and when <= t

        deceased_visible = visible(self.outcome.deceased_time)
        # An end or abatement after the index time would leak how the stay went.
        encounters = [e if e.end is None or e.end <= t else dataclasses.replace(e, end=None)
                      for e in self.encounters if visible(e.start)]
        conditions = [c if c.abatement is None or c.abatement <= t
                      else dataclasses.replace(c, abatement=None)
                      for c in self.conditions if visible(c.onset)]
        return dataclasses.replace(
            self,
            observations=[o for o in self.observations if visible(o.effective)],
            conditions=conditions,
            medications=[m for m in self.medications if visible(m.authored)],
            notes=[n for n in self.notes if visible(n.time)],
            encounters=encounters,
            imaging=[s for s in self.imaging if visible(s.started)],
            outcome=Outcome(
                deceased=True if deceased_visible else None,
                deceased_time=self.outcome.deceased_time if deceased_visible else None,
            ),
            index_time=t,
        )

    def merge(self, other: PatientRecord) -> None:
        """Fold another record of the same patient into this one, in place."""
        self.identifiers = tuple(sorted(set(self.identifiers) | set(other.identifiers)))
        if self.key is None:
            self.key = other.key
        if self.resource_id is None:
            self.resource_id = other.resource_id
        self.demographics = _merge_demographics(self.demographics, other.demographics)
        for name in ("observations", "conditions", "medications", "notes", "encounters", "imaging"):
            mine: list[Any] = getattr(self, name)
            seen = set(mine)
            mine.extend(x for x in getattr(other, name) if x not in seen)
        if other.outcome.deceased is not None and self.outcome.deceased is None:
            self.outcome = other.outcome
        self.warnings.extend(w for w in other.warnings if w not in self.warnings)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict, dates as ISO 8601 strings."""
        return _jsonable(dataclasses.asdict(self))


def _merge_demographics(a: Demographics, b: Demographics) -> Demographics:
    values = {}
    for f in dataclasses.fields(Demographics):
        mine, theirs = getattr(a, f.name), getattr(b, f.name)
        values[f.name] = mine if mine not in (None, ()) else theirs
    return Demographics(**values)


def ensure_utc(when: datetime) -> datetime:
    """Treat naive datetimes as UTC; convert aware ones to UTC."""
    if when.tzinfo is None:
        return when.replace(tzinfo=UTC)
    return when.astimezone(UTC)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


def merge_records(records: Iterable[PatientRecord]) -> list[PatientRecord]:
    """Merge records that share any identifier (or, lacking one, a resource id)."""
    merged: dict[str, PatientRecord] = {}
    alias: dict[str, str] = {}
    for record in records:
        keys = [str(i) for i in record.identifiers] or [record.patient_id]
        target = next((alias[k] for k in keys if k in alias), None)
        if target is None:
            target = record.patient_id
            merged[target] = record
        else:
            merged[target].merge(record)
        for k in keys:
            alias.setdefault(k, target)
    return list(merged.values())


def _dt(value: str | None) -> datetime | None:
    return None if value is None else ensure_utc(datetime.fromisoformat(value))


def record_from_json(data: dict[str, Any]) -> PatientRecord:
    """Rebuild a PatientRecord from ``PatientRecord.to_json()`` output."""
    demo = dict(data.get("demographics") or {})
    birth = demo.get("birth_date")
    demographics = Demographics(
        **{
            **demo,
            "birth_date": date.fromisoformat(birth) if birth else None,
            "race": tuple(Coding(**c) for c in demo.get("race", ())),
            "ethnicity": tuple(Coding(**c) for c in demo.get("ethnicity", ())),
            "payers": tuple(demo.get("payers", ())),
        }
    )
    key = data.get("key")
    outcome = data.get("outcome") or {}
    return PatientRecord(
        key=PatientIdentifier(**key) if key else None,
        resource_id=data.get("resource_id"),
        identifiers=tuple(PatientIdentifier(**i) for i in data.get("identifiers", ())),
        demographics=demographics,
        observations=[Observation(**{**o, "effective": _dt(o.get("effective"))})
                      for o in data.get("observations", ())],
        conditions=[Condition(**{**c, "onset": _dt(c.get("onset")),
                                 "abatement": _dt(c.get("abatement"))})
                    for c in data.get("conditions", ())],
        medications=[Medication(**{**m, "authored": _dt(m.get("authored"))})
                     for m in data.get("medications", ())],
        notes=[Note(**{**n, "time": _dt(n.get("time"))}) for n in data.get("notes", ())],
        encounters=[Encounter(**{**e, "start": _dt(e.get("start")), "end": _dt(e.get("end"))})
                    for e in data.get("encounters", ())],
        imaging=[ImagingStudyRef(StudyInstanceUID=s.get("StudyInstanceUID"),
                                 started=_dt(s.get("started")),
                                 series=tuple(ImagingSeriesRef(**x) for x in s.get("series", ())),
                                 source=s.get("source"))
                 for s in data.get("imaging", ())],
        outcome=Outcome(deceased=outcome.get("deceased"),
                        deceased_time=_dt(outcome.get("deceased_time"))),
        index_time=_dt(data.get("index_time")),
        warnings=[Issue(**w) for w in data.get("warnings", ())],
    )
