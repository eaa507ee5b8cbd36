"""What the dashboard's pages show, read from the service tables.

Routes stay thin: each page calls one function here and renders its result.
Nothing here writes except :func:`record_feedback`.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fhir_adapters.record import PatientRecord, record_from_json
from services.tables import FeedbackRow, PatientRow, PredictionRow

__all__ = ["BANDS", "OVERRIDE_REASONS", "PatientView", "WorklistRow", "band_of",
           "patient_view", "record_feedback", "top_factors", "worklist"]

#: Risk bands from the model's decision thresholds (``decisions`` on each prediction).
BANDS = {"high": "High", "moderate": "Moderate", "low": "Low", "none": "No score"}
#: Why a clinician disagrees: the override reasons the dashboard offers, as Codings in
#: the CDS Hooks feedback's ``overrideReason`` form.
OVERRIDE_REASON_SYSTEM = "https://clinfuse.example.org/fhir/CodeSystem/override-reason"
OVERRIDE_REASONS: dict[str, str] = {
    "risk-too-high": "Risk seems too high for this patient",
    "risk-too-low": "Risk seems too low for this patient",
    "data-wrong": "Input data is wrong or out of date",
    "context-missing": "Clinical context the model cannot see",
    "explanation-unhelpful": "Explanation does not make clinical sense",
    "other": "Other (see comment)",
}
TIME_WINDOWS = {"24h": timedelta(hours=24), "72h": timedelta(hours=72),
                "7d": timedelta(days=7), "all": None}
SortKey = Literal["risk", "time", "patient", "unit"]


def _aware(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)  # SQLite drops the zone; everything stored is UTC


def band_of(probability: float | None, decisions: dict[str, Any] | None) -> str:
    """high / moderate / low by the model's own thresholds, so bands follow the model.

    ``decisions`` maps a threshold name to ``{"threshold": t, "flag": bool}``; the
    band is the highest threshold the risk reaches. Without thresholds 30 % / 10 %
    stand in (the demo model's defaults).
    """
    if probability is None:
        return "none"
    thresholds: list[tuple[float, str]] = []
    for name, item in (decisions or {}).items():
        value = item.get("threshold") if isinstance(item, dict) else item
        if isinstance(value, int | float):
            thresholds.append((float(value), str(name)))
    if not thresholds:
        thresholds = [(0.3, "high_risk"), (0.1, "moderate_risk")]
    thresholds.sort(reverse=True)
    if probability >= thresholds[0][0]:
        return "high"
    if len(thresholds) > 1 and probability >= thresholds[-1][0]:
        return "moderate"
    return "low"


# -- display names for codes the records carry ---------------------------------------

#: Encounter types (SNOMED CT) and classes (v3 ActCode, HL7 v2 PV1-2) as a unit name.
_ENCOUNTER_TYPES = {"32485007": "Inpatient ward", "305351004": "Intensive care unit",
                    "50849002": "Emergency department", "183452005": "Inpatient ward"}
_ENCOUNTER_CLASSES = {"IMP": "Inpatient ward", "inpatient": "Inpatient ward",
                      "I": "Inpatient ward", "ACUTE": "Inpatient acute care",
                      "EMER": "Emergency department", "E": "Emergency department",
                      "ICU": "Intensive care unit", "AMB": "Outpatient clinic",
                      "O": "Outpatient clinic"}
#: Note types (LOINC document codes, HL7 v2 TXA-2) as a title.
_NOTE_TYPES = {"34117-2": "History and physical note", "11506-3": "Progress note",
               "18842-5": "Discharge summary", "11488-4": "Consult note",
               "28570-0": "Procedure note", "PN": "Progress note",
               "HP": "History and physical note", "DS": "Discharge summary",
               "CN": "Consult note"}


# -- the unit a patient is on -------------------------------------------------------

_unit_cache: dict[tuple[str, str], str] = {}
_unit_lock = threading.Lock()


def _unit(record: PatientRecord, at: datetime | None) -> str:
    """The encounter the patient was in at ``at`` (the score's index time).

    The synthetic and most FHIR feeds carry no ward, so the encounter's type stands
    in. As of the index time, so a later transfer (an outcome) never shows here.
    """
    view = record.as_of(at) if at is not None else record
    open_encounters = [e for e in view.encounters if e.start is not None and e.end is None]
    current = max(open_encounters or view.encounters, key=lambda e: e.start or datetime.min
                  .replace(tzinfo=UTC), default=None)
    if current is None:
        return "Unknown"
    return (_ENCOUNTER_TYPES.get(current.type or "")
            or _ENCOUNTER_CLASSES.get(current.encounter_class or "")
            or current.type or current.encounter_class or "Unknown")


def _unit_key(patient_id: str, updated_at: datetime | None, at: datetime | None
              ) -> tuple[str, str]:
    return (patient_id, f"{_aware(updated_at)}|{_aware(at)}")


def _cached_unit(key: tuple[str, str]) -> str | None:
    with _unit_lock:
        return _unit_cache.get(key)


def _remember_unit(key: tuple[str, str], record: dict[str, Any], at: datetime | None) -> str:
    unit = _unit(record_from_json(record), _aware(at))
    with _unit_lock:
        if len(_unit_cache) > 50_000:
            _unit_cache.clear()
        _unit_cache[key] = unit
    return unit


def _unit_for(row: PatientRow, at: datetime | None) -> str:
    key = _unit_key(row.id, row.updated_at, at)
    return _cached_unit(key) or _remember_unit(key, row.record, at)


# -- the worklist ---------------------------------------------------------------------


@dataclass(frozen=True)
class WorklistRow:
    patient_id: str
    mrn: str
    age: float | None
    sex: str | None
    unit: str
    probability: float | None
    band: str
    scored_at: datetime | None
    index_time: datetime | None
    modalities: str
    refusal: str | None
    model_version: str | None


@dataclass
class Worklist:
    rows: list[WorklistRow]
    units: list[str]
    total: int


def _latest_predictions(session: Session) -> dict[str, Any]:
    """Each patient's newest prediction: the worklist's columns only, not the explanation."""
    latest = (select(PredictionRow.patient_id, func.max(PredictionRow.created_at).label("at"))
              .group_by(PredictionRow.patient_id).subquery())
    rows = session.execute(select(
        PredictionRow.patient_id, PredictionRow.probability, PredictionRow.decisions,
        PredictionRow.created_at, PredictionRow.index_time, PredictionRow.modalities,
        PredictionRow.refusal, PredictionRow.model_version).join(
        latest, (PredictionRow.patient_id == latest.c.patient_id)
        & (PredictionRow.created_at == latest.c.at)))
    out: dict[str, Any] = {}
    for row in rows:
        out.setdefault(row.patient_id, row)
    return out


def worklist(session: Session, *, unit: str | None = None, window: str = "all",
             band: str | None = None, sort: SortKey = "risk", descending: bool = True,
             now: datetime | None = None) -> Worklist:
    """Patients with their current (latest) risk, filtered and sorted."""
    now = now or datetime.now(UTC)
    latest = _latest_predictions(session)
    # Only the columns shown: a patient's full record is parsed only when its unit is not
    # cached yet (the record or the score changed), which keeps the page fast at 300+.
    patients = session.execute(select(
        PatientRow.id, PatientRow.identifier_value, PatientRow.updated_at,
        PatientRow.record["demographics"].label("demographics"))).all()
    unit_keys = {pid: _unit_key(pid, updated, _aware(latest[pid].index_time)
                                if pid in latest else None) for pid, _, updated, _ in patients}
    units = {pid: _cached_unit(key) for pid, key in unit_keys.items()}
    missing = [pid for pid, unit in units.items() if unit is None]
    for start in range(0, len(missing), 500):
        for pid, record in session.execute(select(PatientRow.id, PatientRow.record).where(
                PatientRow.id.in_(missing[start:start + 500]))):
            pred = latest.get(pid)
            units[pid] = _remember_unit(unit_keys[pid], record,
                                        pred.index_time if pred is not None else None)
    rows: list[WorklistRow] = []
    for pid, mrn, _, demo in patients:
        pred = latest.get(pid)
        demo = demo if isinstance(demo, dict) else {}
        index_time = _aware(pred.index_time) if pred else None
        age = None
        birth = demo.get("birth_date")
        if birth and index_time is not None:
            try:
                born = datetime.fromisoformat(str(birth)).replace(tzinfo=UTC)
                age = (index_time - born).days / 365.25
            except ValueError:
                age = None
        prob = pred.probability if pred else None
        rows.append(WorklistRow(
            patient_id=pid, mrn=mrn, age=age, sex=demo.get("sex"),
            unit=units.get(pid) or "Unknown", probability=prob,
            band=band_of(prob, pred.decisions if pred else None),
            scored_at=_aware(pred.created_at) if pred else None, index_time=index_time,
            modalities=pred.modalities if pred else "", refusal=pred.refusal if pred else None,
            model_version=pred.model_version if pred else None))
    unit_names = sorted({r.unit for r in rows})
    total = len(rows)
    if unit:
        rows = [r for r in rows if r.unit == unit]
    span = TIME_WINDOWS.get(window)
    if span is not None:
        rows = [r for r in rows if r.scored_at is not None and r.scored_at >= now - span]
    if band:
        rows = [r for r in rows if r.band == band]
    keys: dict[str, Any] = {
        "risk": lambda r: (r.probability is not None, r.probability or 0.0),
        "time": lambda r: (r.scored_at is not None, r.scored_at or datetime.min.replace(
            tzinfo=UTC)),
        "patient": lambda r: r.mrn,
        "unit": lambda r: (r.unit, r.probability or 0.0),
    }
    rows.sort(key=keys.get(sort, keys["risk"]), reverse=descending)
    return Worklist(rows=rows, units=unit_names, total=total)


# -- one patient ----------------------------------------------------------------------


@dataclass
class NoteView:
    """One note with its sentences split into plain text and attributed highlights."""

    title: str
    time: datetime | None
    parts: list[dict[str, Any]]


@dataclass
class PatientView:
    patient: PatientRow
    record: PatientRecord
    prediction: PredictionRow | None
    history: list[PredictionRow]
    feedback: list[FeedbackRow]
    band: str
    unit: str
    notes: list[NoteView] = field(default_factory=list)
    outcome: dict[str, Any] = field(default_factory=dict)

    @property
    def explanation(self) -> dict[str, Any]:
        return (self.prediction.explanation or {}) if self.prediction else {}


def _outcome_of(prediction: PredictionRow | None) -> dict[str, Any]:
    """Outcome name, definition and horizon, from the RiskAssessment the score was sent as."""
    out: dict[str, Any] = {"name": "deterioration", "definition": None, "horizon_days": None}
    ra = prediction.risk_assessment if prediction else None
    if not ra:
        return out
    pred = (ra.get("prediction") or [{}])[0]
    text = (pred.get("outcome") or {}).get("text")
    if text:
        out["definition"] = text
    period = pred.get("whenPeriod") or {}
    start, end = period.get("start"), period.get("end")
    if start and end:
        try:
            days = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).days
            out["horizon_days"] = days
        except ValueError:
            pass
    rationale = (explanation_rationale(prediction) or "")
    match = re.search(r"Predicted risk of (.+?)(?: within (\d+) days)?:", rationale)
    if match:
        out["name"] = match.group(1)
        if match.group(2) and out["horizon_days"] is None:
            out["horizon_days"] = int(match.group(2))
    return out


def explanation_rationale(prediction: PredictionRow | None) -> str | None:
    if prediction is None or not prediction.explanation:
        return None
    value = prediction.explanation.get("rationale")
    return str(value) if value else None


def _note_views(record: PatientRecord, explanation: dict[str, Any],
                index_time: datetime | None) -> list[NoteView]:
    """The notes the model read, with each attributed sentence marked in place.

    Highlighted sentences are found by their text in each note, so the marking does
    not depend on how the notes were joined for the model. Negated findings are never
    shown as evidence (the explanation already keeps them out of its highlights).
    """
    notes = explanation.get("notes") or {}
    highlights = [h for h in notes.get("highlights", [])
                  if h.get("sentence") and not h.get("negated")]
    view = record.as_of(index_time) if index_time is not None else record
    ordered = sorted(view.notes, key=lambda n: n.time or datetime.min.replace(tzinfo=UTC),
                     reverse=True)
    out: list[NoteView] = []
    seen: set[tuple[str, datetime | None]] = set()
    for note in ordered:
        text = note.text
        # The same note often arrives twice (a FHIR DocumentReference and an HL7 MDM).
        key = (" ".join(text.split()), note.time)
        if key in seen:
            continue
        seen.add(key)
        found = []
        for h in highlights:
            at = text.find(str(h["sentence"]))
            if at >= 0:
                found.append((at, at + len(str(h["sentence"])), float(h.get("points", 0.0))))
        found.sort()
        parts: list[dict[str, Any]] = []
        cursor = 0
        for start, end, points in found:
            if start < cursor:
                continue  # overlapping repeats: keep the first mark
            if start > cursor:
                parts.append({"text": text[cursor:start]})
            parts.append({"text": text[start:end], "points": points,
                          "direction": "up" if points > 0 else "down"})
            cursor = end
        parts.append({"text": text[cursor:]})
        title = _NOTE_TYPES.get(note.type or "", note.type or "Clinical note")
        out.append(NoteView(title=title, time=note.time, parts=parts))
    return out


def top_factors(explanation: dict[str, Any], limit: int = 8) -> list[dict[str, Any]]:
    """The explanation's top EHR findings, with unmeasured summaries of one lab merged.

    A lab that was not measured shows up once per summary (last, lowest, mean...);
    a clinician needs to read "not measured" once, with the summed effect.
    """
    out: list[dict[str, Any]] = []
    missing: dict[str, dict[str, Any]] = {}
    for f in (explanation.get("ehr") or {}).get("top_features") or []:
        if f.get("raw_value") is None:
            name = str(f.get("display") or f.get("feature") or "").split(" (")[0]
            key = str(f.get("feature") or name)
            if key in missing:
                missing[key]["points"] += float(f.get("points") or 0.0)
                missing[key]["n"] += 1
                continue
            row = {**f, "display": name, "points": float(f.get("points") or 0.0), "n": 1}
            missing[key] = row
            out.append(row)
        else:
            out.append({**f, "n": 1})
    out.sort(key=lambda f: -abs(float(f.get("points") or 0.0)))
    return out[:limit]


def patient_view(session: Session, patient_id: str, *, history: int = 20
                 ) -> PatientView | None:
    """Everything the patient page shows; None when the patient does not exist."""
    patient = session.get(PatientRow, patient_id)
    if patient is None:
        return None
    preds = list(session.scalars(
        select(PredictionRow).where(PredictionRow.patient_id == patient_id)
        .order_by(PredictionRow.created_at.desc()).limit(history)))
    current = preds[0] if preds else None
    feedback = list(session.scalars(
        select(FeedbackRow).join(PredictionRow, FeedbackRow.prediction_id == PredictionRow.id)
        .where(PredictionRow.patient_id == patient_id)
        .order_by(FeedbackRow.created_at.desc()).limit(20)))
    record = record_from_json(patient.record)
    index_time = _aware(current.index_time) if current else None
    view = PatientView(patient=patient, record=record, prediction=current,
                       history=list(reversed(preds)), feedback=feedback,
                       band=band_of(current.probability if current else None,
                                    current.decisions if current else None),
                       unit=_unit_for(patient, index_time))
    view.notes = _note_views(record, view.explanation, index_time)
    view.outcome = _outcome_of(current)
    return view


def record_feedback(session: Session, prediction: PredictionRow, *, agree: bool,
                    reason: str | None, comment: str | None, recorded_by: str) -> FeedbackRow:
    """Store a clinician's verdict as the CDS Hooks feedback record, channel ``dashboard``.

    Agree is CDS Hooks' ``accepted``; disagree is ``overridden`` with the chosen
    reason as its ``overrideReason`` Coding.
    """
    override = None
    if not agree:
        code = reason if reason in OVERRIDE_REASONS else "other"
        override = {"system": OVERRIDE_REASON_SYSTEM, "code": code,
                    "display": OVERRIDE_REASONS[code]}
    row = FeedbackRow(prediction_id=prediction.id, outcome="accepted" if agree else
                      "overridden", override_reason=override,
                      user_comment=(comment or "").strip()[:2000] or None,
                      outcome_timestamp=datetime.now(UTC), recorded_by=recorded_by[:256],
                      channel="dashboard")
    session.add(row)
    session.flush()
    return row
