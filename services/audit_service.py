"""Fairness audits over stored predictions: run, list, get and compare.

An audit reads the predictions whose **index time** lies in ``[start, end)`` (the
time each prediction is about; for live predictions that is when it was made),
for one model version. Rules, stated in every report (a note in its summary and
``selection`` in its JSON):

- **One prediction per patient**: the latest one made in the window, so a patient
  re-scored after every update counts once, as a patient seen once would.
- **Label**: from the patient's stored record and the model's outcome definition
  (:class:`services.cohort_export.OutcomeDefinition`): 1 when an outcome event
  lies in ``(index, index + horizon]``; 0 when none does and the follow-up
  (``follow_up_until``, default now) covers the whole horizon; otherwise the
  label is not known yet and the prediction is left out (censored), as are
  predictions made after the outcome had already happened.
- **Attributes**: the sensitive attributes copied into the prediction when it
  was made (``PredictionRow.attributes``), so a later edit to a record does not
  move a patient between groups after the fact.
- Refused predictions (out of population, no input) are counted, not scored.

Small groups stay suppressed ("insufficient data"): the audit itself does it.
The stored report never holds patient ids, only aggregates.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from sqlalchemy import select
from sqlalchemy.orm import Session

from fhir_adapters.record import ensure_utc, record_from_json
from services.cohort_export import OutcomeDefinition
from services.tables import AuditRow, PatientRow, PredictionRow

__all__ = ["AuditParams", "AuditServiceError", "compare_audits", "get_audit", "list_audits",
           "prediction_table", "run_audit"]

#: The attributes audited when the request names none (those present are used).
DEFAULT_SENSITIVE = ("sex", "race", "ethnicity", "age_band")


class AuditServiceError(ValueError):
    """An audit that cannot run as asked; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class AuditParams:
    """What to audit. ``threshold`` None: the predictions' own ``decision`` threshold."""

    outcome: OutcomeDefinition
    window_start: datetime | None = None
    window_end: datetime | None = None
    model_version: str | None = None
    sensitive: list[str] | None = None
    threshold: float | None = None
    decision: str = "high_risk"
    min_group_size: int = 30
    n_boot: int = 1000
    multiplicity: Literal["bh", "holm"] = "bh"
    follow_up_until: datetime | None = None
    seed: int = 0


@dataclass
class PredictionTable:
    """The score table built from stored predictions, and what was left out and why."""

    frame: pd.DataFrame
    model_version: str
    threshold: float | None
    excluded: dict[str, int] = field(default_factory=dict)
    n_predictions: int = 0


def _window(params: AuditParams) -> tuple[datetime | None, datetime | None]:
    start = ensure_utc(params.window_start) if params.window_start else None
    end = ensure_utc(params.window_end) if params.window_end else None
    if start is not None and end is not None and end <= start:
        raise AuditServiceError(f"the window ends ({end.isoformat()}) before it starts "
                                f"({start.isoformat()})")
    return start, end


def _describe(start: datetime | None, end: datetime | None) -> str:
    return (f"from {start.isoformat() if start else 'the beginning'} to "
            f"{end.isoformat() if end else 'now'}")


def prediction_table(session: Session, params: AuditParams) -> PredictionTable:
    """Stored predictions in the window, one per patient, labelled from the records."""
    start, end = _window(params)
    query = select(PredictionRow)
    if start is not None:
        query = query.where(PredictionRow.index_time >= start)
    if end is not None:
        query = query.where(PredictionRow.index_time < end)
    if params.model_version is not None:
        query = query.where(PredictionRow.model_version == params.model_version)
    rows = session.scalars(query.order_by(PredictionRow.created_at, PredictionRow.id)).all()
    where = _describe(start, end)
    if not rows:
        version = (f" of model version {params.model_version!r}" if params.model_version
                   else "")
        raise AuditServiceError(f"no stored predictions{version} have an index time {where}: "
                                "nothing to audit; widen the window or check model_version")
    versions = sorted({r.model_version for r in rows})
    if len(versions) > 1:
        raise AuditServiceError(f"the window holds predictions of {len(versions)} model "
                                f"versions ({', '.join(versions)}); audit one at a time by "
                                "passing model_version")
    latest: dict[str, PredictionRow] = {}
    for row in rows:  # ordered by creation: the last one wins
        latest[row.patient_id] = row
    records = {p.id: p.record for p in session.scalars(
        select(PatientRow).where(PatientRow.id.in_(list(latest))))}
    cutoff = ensure_utc(params.follow_up_until or datetime.now(UTC))
    excluded: Counter[str] = Counter()
    excluded["earlier predictions of the same patient"] = len(rows) - len(latest)
    thresholds: set[float] = set()
    out: list[dict[str, Any]] = []
    for patient_id, row in latest.items():
        stored = records.get(patient_id)
        if stored is None:
            excluded["patient record no longer stored"] += 1
            continue
        record = record_from_json(stored)
        label = params.outcome.label(record, row.index_time, follow_up_until=cutoff)
        if label is None:
            prevalent = any(t <= ensure_utc(row.index_time)
                            for t in params.outcome.events(record))
            excluded["outcome before the prediction" if prevalent
                     else "follow-up shorter than the horizon (censored)"] += 1
            continue
        decision = (row.decisions or {}).get(params.decision)
        if isinstance(decision, dict) and isinstance(decision.get("threshold"), int | float):
            thresholds.add(float(decision["threshold"]))
        attributes = row.attributes or {}
        out.append({"patient_id": patient_id,
                    "score": row.probability if row.refusal is None else None,
                    "refusal": row.refusal or "", "label": label,
                    "index_time": ensure_utc(row.index_time).isoformat(),
                    "model_version": row.model_version, "modalities": row.modalities,
                    **{k: (None if v is None else str(v)) for k, v in attributes.items()
                       if k not in ("patient_id", "score", "label", "refusal")}})
    if not out:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(excluded.items()) if n)
        raise AuditServiceError(f"{len(rows)} stored prediction(s) {where}, but none has a "
                                f"known outcome yet ({reasons}): nothing to audit", status=409)
    threshold = params.threshold
    if threshold is None and len(thresholds) == 1:
        threshold = thresholds.pop()
    elif threshold is None:
        raise AuditServiceError(
            f"the predictions carry {len(thresholds) or 'no'} {params.decision!r} decision "
            "threshold(s); pass threshold (a probability) or another decision name")
    return PredictionTable(pd.DataFrame(out), versions[0], threshold,
                           {k: v for k, v in excluded.items() if v}, len(rows))


def _fingerprint(frame: pd.DataFrame) -> str:
    """sha256 of the audited table in a canonical form: the same data, the same print."""
    canonical = frame.sort_values(["patient_id", "index_time"]).to_csv(index=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def run_audit(session: Session, params: AuditParams, *, run_by: str) -> AuditRow:
    """Run the audit, store it (JSON, HTML, PDF) and return the stored row."""
    from audits.frame import AuditFrame, FlagRules
    from audits.report import write_report
    from audits.table import AuditInputError, load_score_table

    table = prediction_table(session, params)
    frame = table.frame
    sensitive = params.sensitive
    if sensitive is None:
        sensitive = [c for c in DEFAULT_SENSITIVE if c in frame.columns]
    missing = [c for c in sensitive if c not in frame.columns]
    if missing or not sensitive:
        known = sorted(set(frame.columns) - {"patient_id", "score", "refusal", "label",
                                             "index_time", "model_version", "modalities"})
        raise AuditServiceError(f"sensitive attribute(s) {missing or '(none)'} are not "
                                f"recorded with these predictions; recorded: {known}")
    start, end = _window(params)
    try:
        scores = load_score_table(frame, sensitive=sensitive, threshold=float(table.threshold
                                                                              or 0.5),
                                  run_by=run_by)
        scores.fingerprint = _fingerprint(frame)
        scores.source = "stored predictions"
        # The requested window, not the span seen: comparing audits compares windows.
        scores.window = (start.isoformat() if start else None,
                         end.isoformat() if end else None)
        scores.threshold_source = (f"decision {params.decision!r} of the predictions"
                                   if params.threshold is None else "given")
        audit = AuditFrame(scores=scores, min_group_size=params.min_group_size,
                           n_boot=params.n_boot, rules=FlagRules(multiplicity=params.multiplicity),
                           seed=params.seed)
    except AuditInputError as exc:
        raise AuditServiceError(str(exc)) from None
    rule = params.outcome.rule_text()
    dropped = "; ".join(f"{n} {why}" for why, n in sorted(table.excluded.items()))
    # A note in the summary puts the labelling rule into every rendering (JSON, HTML, PDF).
    audit.warnings.insert(0, f"Outcome {params.outcome.name!r} ({params.outcome.definition}): "
                             f"{rule}. One prediction per patient (the latest in the window). "
                             f"Left out: {dropped or 'none'}.")
    audit_id = uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="clinfuse-audit-") as tmp:
        record = write_report(audit, Path(tmp), audit_id=audit_id)
        html = (Path(tmp) / "report.html").read_text(encoding="utf-8")
        pdf = (Path(tmp) / "report.pdf").read_bytes()
    record["selection"] = {
        "window": {"start": scores.window[0], "end": scores.window[1], "on": "index_time"},
        "predictions_in_window": table.n_predictions, "audited": len(frame),
        "excluded": table.excluded, "one_per_patient": "latest prediction in the window",
        "outcome": _plain(dict(params.outcome.config)), "label_rule": rule,
        "attributes": "PredictionRow.attributes, as recorded when the prediction was made",
    }
    row = AuditRow(id=audit_id, run_by=run_by[:256], model_version=table.model_version,
                   window_start=start, window_end=end,
                   data_fingerprint=scores.fingerprint or "",
                   report=json.loads(json.dumps(record, allow_nan=False, default=str)),
                   html=html, pdf=pdf)
    session.add(row)
    session.flush()
    return row


def list_audits(session: Session, *, limit: int = 100, offset: int = 0) -> list[AuditRow]:
    """Stored audits, newest first."""
    return list(session.scalars(select(AuditRow).order_by(AuditRow.created_at.desc(),
                                                          AuditRow.id)
                                .limit(limit).offset(offset)))


def get_audit(session: Session, audit_id: str) -> AuditRow:
    row = session.get(AuditRow, audit_id)
    if row is None:
        raise AuditServiceError(f"no audit {audit_id!r}", status=404)
    return row


def compare_audits(session: Session, a: str, b: str) -> dict[str, Any]:
    """What changed from audit ``a`` to audit ``b`` (the audits package's comparison)."""
    from audits.store import compare_records

    return compare_records(get_audit(session, a).report, get_audit(session, b).report)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    return value
