"""``clinfuse cohort export``: a cohort manifest built from the store, so models can be
trained on ingested data.

One row per patient. The rules, also written into the sidecar so that a reader of
the manifest sees them:

- **Index time**: ``index_hours`` (default 72, the outcome definition's "72 h after
  inpatient admission") after the start of the patient's *first* inpatient
  encounter (FHIR Encounter.class ``IMP``, HL7 PV1-2 ``I``). A patient with no
  dated inpatient encounter has no index time and is left out.
- **Population**: at the index time the patient is alive, not discharged (the
  inpatient encounter has not ended), has not already had the outcome (a
  prevalent outcome is not a prediction target), and is at least the outcome's
  ``min_age_years`` old (parsed from its population text, as training does).
- **Label**: 1 when an outcome event lies in ``(index, index + horizon_days]``, 0
  when none does and the record is followed up to ``index + horizon``; patients
  whose follow-up ends earlier (``follow_up_until``, default now) and who had no
  event are *censored* and left out, because their label is not known yet.
  Outcome events, from :class:`OutcomeDefinition`: death
  (``Patient.deceasedDateTime`` / PID-29) when the definition codes death, and
  encounters whose type carries one of its other codes (ICU admission, SNOMED
  305351004, for ``deterioration``).
- **Features**: the FHIR feature spec (``pipelines.feature_spec``) over the record
  as of the index time; **notes**: the notes dated at or before the index time,
  oldest first, one copy of a note that came by two feeds, joined by a blank line;
  **image**: the latest study at or before
  the index time that is in the DICOM store (the as-of view's ImagingStudy
  references first; PatientID + IssuerOfPatientID link instances to the patient),
  its series with the most instances, copied under ``images/<example_id>/``.
- **Sensitive attributes** (kept for audits, not features): sex, race, ethnicity,
  age band at the index time.

The ``patient_id`` column holds the store's opaque patient id unless
``patient_ids="identifier"`` asks for the business identifier (``system|value``,
as ``clinfuse synth`` spells it). Copied DICOM files are the stored bytes, so they
carry the patients' identifiers; de-identify them (``clinfuse deid``) before they
leave the hospital.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import yaml
from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from fhir_adapters.errors import IngestError
from fhir_adapters.record import PatientRecord, age_band, ensure_utc, record_from_json
from pipelines.ehr_features import record_features
from pipelines.feature_spec import DEFAULT_SPEC, FeatureSpec
from pipelines.synth.codes import OUTCOME_DEFINITION
from pipelines.synth.manifest import FLOAT_FORMAT
from services.tables import DicomInstanceRow, PatientIdentifierRow, PatientRow

__all__ = ["BUILTIN_OUTCOMES", "CohortExport", "OutcomeDefinition", "audit_attributes",
           "export_cohort", "index_time_for"]

log = logging.getLogger(__name__)

SENSITIVE = ["sex", "race", "ethnicity", "age_band"]
DEFAULT_INDEX_HOURS = 72.0
#: Encounter classes that mean an inpatient stay (FHIR v3 ActCode, HL7 v2 PV1-2 mapped).
INPATIENT_CLASSES = frozenset({"IMP", "inpatient", "I"})
_SNOMED = "http://snomed.info/sct"
_DEATH_WORDS = re.compile(r"\b(death|died|mortality|deceased)\b", re.IGNORECASE)

#: Outcome definitions known by name; a YAML file may define others.
BUILTIN_OUTCOMES: dict[str, dict[str, Any]] = {
    "deterioration": OUTCOME_DEFINITION,
    "mortality": {
        "name": "mortality", "definition": "death within 30 days of the index time",
        "horizon_days": 30, "index_time": "72 h after inpatient admission",
        "population": OUTCOME_DEFINITION["population"],
        "coding": {"death": OUTCOME_DEFINITION["coding"]["death"]},
    },
    "icu_transfer": {
        "name": "icu_transfer", "definition": "ICU transfer within 30 days of the index time",
        "horizon_days": 30, "index_time": "72 h after inpatient admission",
        "population": OUTCOME_DEFINITION["population"],
        "coding": {"icu_transfer": OUTCOME_DEFINITION["coding"]["icu_transfer"]},
    },
}


@dataclass(frozen=True)
class OutcomeDefinition:
    """What counts as the outcome, and within what horizon after the index time.

    Built from a model config's or a manifest sidecar's ``outcome`` mapping. A
    mapping without ``coding`` (model artifacts keep only name, definition and
    horizon) takes the coding of the built-in definition of the same name.
    """

    name: str
    definition: str
    horizon_days: float
    death: bool
    encounter_codes: frozenset[str]
    population: str = ""
    index_time: str = ""
    config: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | str) -> OutcomeDefinition:
        if isinstance(config, str):
            if config not in BUILTIN_OUTCOMES:
                raise ValueError(f"unknown outcome {config!r}; known: "
                                 f"{sorted(BUILTIN_OUTCOMES)} (or give a YAML definition)")
            config = BUILTIN_OUTCOMES[config]
        name = str(config.get("name") or "")
        builtin = BUILTIN_OUTCOMES.get(name, {})
        horizon = config.get("horizon_days", builtin.get("horizon_days"))
        if horizon is None or not isinstance(horizon, int | float) or horizon <= 0:
            raise ValueError(f"outcome {name or '(unnamed)'!r} needs a positive horizon_days, "
                             f"got {horizon!r}")
        coding = config.get("coding") or builtin.get("coding")
        if not isinstance(coding, Mapping) or not coding:
            raise ValueError(f"outcome {name or '(unnamed)'!r} has no 'coding' saying which "
                             "events count (e.g. death: {fhir: Patient.deceasedDateTime}, "
                             "icu_transfer: {system: http://snomed.info/sct, code: 305351004})")
        death = False
        codes: set[str] = set()
        for key, entry in coding.items():
            entry = entry if isinstance(entry, Mapping) else {}
            if key == "death" or "deceased" in str(entry.get("fhir", "")):
                death = True
            elif entry.get("code"):
                codes.add(str(entry["code"]))
        merged = {**builtin, **dict(config), "coding": dict(coding), "horizon_days": horizon}
        return cls(name=name or "outcome", definition=str(merged.get("definition", "")),
                   horizon_days=float(horizon), death=death, encounter_codes=frozenset(codes),
                   population=str(merged.get("population", "")),
                   index_time=str(merged.get("index_time", "")), config=merged)

    @classmethod
    def from_yaml(cls, path: str | Path) -> OutcomeDefinition:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("outcome"), dict):
            data = data["outcome"]  # a manifest sidecar or model config
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected an outcome mapping (name, definition, "
                             "horizon_days, coding)")
        return cls.from_config(data)

    @property
    def horizon(self) -> timedelta:
        return timedelta(days=self.horizon_days)

    @property
    def min_age_years(self) -> float | None:
        # Imported here: pipelines.training pulls in torch, which the API does not need.
        from pipelines.training import min_age_of

        return min_age_of(dict(self.config))

    def rule_text(self) -> str:
        """The labelling rule in words, for reports and sidecars."""
        events = (["death (Patient.deceasedDateTime)"] if self.death else []) + [
            f"an encounter typed {c}" for c in sorted(self.encounter_codes)]
        return (f"label = 1 when {' or '.join(events) or 'no event'} is dated after the index "
                f"time and at most {self.horizon_days:g} days after it; 0 when no such event "
                f"is recorded and the record covers the whole {self.horizon_days:g} days; "
                "otherwise the label is unknown (censored) and the row is left out")

    def events(self, record: PatientRecord) -> list[datetime]:
        """Times of the outcome events in the full record."""
        times: list[datetime] = []
        if self.death and record.outcome.deceased_time is not None:
            times.append(ensure_utc(record.outcome.deceased_time))
        for enc in record.encounters:
            if enc.start is not None and enc.type in self.encounter_codes:
                times.append(ensure_utc(enc.start))
        return sorted(times)

    def label(self, record: PatientRecord, index_time: datetime, *,
              follow_up_until: datetime) -> int | None:
        """1, 0, or None when the label is not known (censored, or the outcome came first)."""
        index = ensure_utc(index_time)
        events = self.events(record)
        if any(t <= index for t in events):
            return None  # prevalent: the outcome happened before the prediction
        if any(t <= index + self.horizon for t in events):
            return 1
        if ensure_utc(follow_up_until) < index + self.horizon:
            return None
        return 0


def index_time_for(record: PatientRecord, hours: float = DEFAULT_INDEX_HOURS
                   ) -> tuple[datetime | None, str | None]:
    """The index time under the admission + ``hours`` rule, or (None, why not)."""
    stays = sorted((e for e in record.encounters
                    if e.encounter_class in INPATIENT_CLASSES and e.start is not None),
                   key=lambda e: e.start or datetime.min.replace(tzinfo=UTC))
    if not stays:
        return None, "no dated inpatient encounter"
    first = stays[0]
    assert first.start is not None
    index = ensure_utc(first.start) + timedelta(hours=hours)
    if first.end is not None and ensure_utc(first.end) <= index:
        return None, "discharged before the index time"
    deceased = record.outcome.deceased_time
    if deceased is not None and ensure_utc(deceased) <= index:
        return None, "died before the index time"
    return index, None


def audit_attributes(record: PatientRecord, at: datetime) -> dict[str, str]:
    """Sex, race, ethnicity and age band at ``at``: the audit's sensitive attributes."""
    demo = record.demographics
    race = demo.race_text or next((c.display for c in demo.race if c.display), None)
    ethnicity = demo.ethnicity_text or next((c.display for c in demo.ethnicity if c.display),
                                            None)
    return {"sex": demo.sex or "", "race": race or "", "ethnicity": ethnicity or "",
            "age_band": age_band(demo.age_at(at)) or ""}


@dataclass
class CohortExport:
    """What :func:`export_cohort` wrote and left out."""

    manifest_path: Path
    rows: int
    positives: int
    images: int
    excluded: dict[str, int]


def export_cohort(session: Session, dicom_root: Path | None, out_dir: Path,
                  outcome: OutcomeDefinition, *, index_hours: float = DEFAULT_INDEX_HOURS,
                  spec: FeatureSpec = DEFAULT_SPEC,
                  patient_ids: Literal["opaque", "identifier"] = "opaque",
                  follow_up_until: datetime | None = None,
                  images: bool = True) -> CohortExport:
    """Write ``out_dir/manifest.csv`` + ``manifest.yaml`` (+ ``images/``) from the store.

    ``dicom_root`` is the DICOM store's directory (``Settings.dicom_storage_dir``);
    None or ``images=False`` exports no imaging. Raises ValueError when no patient
    qualifies (the message lists the exclusion counts, never patient data).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cutoff = ensure_utc(follow_up_until or datetime.now(UTC))
    min_age = outcome.min_age_years
    excluded: Counter[str] = Counter()
    head_rows: list[dict[str, Any]] = []
    feature_rows: list[list[float]] = []
    n_images = 0
    rows = session.scalars(select(PatientRow).order_by(PatientRow.id)).all()
    for row in rows:
        record = record_from_json(row.record)
        index, why = index_time_for(record, index_hours)
        if index is None:
            excluded[why or "no index time"] += 1
            continue
        age = record.demographics.age_at(index)
        if min_age is not None and (age is None or age < min_age):
            excluded[f"younger than {min_age:g} years (or no birth date)"] += 1
            continue
        label = outcome.label(record, index, follow_up_until=cutoff)
        if label is None:
            prevalent = any(t <= index for t in outcome.events(record))
            excluded["outcome before the index time" if prevalent
                     else "follow-up shorter than the horizon (censored)"] += 1
            continue
        view = record.as_of(index)
        try:
            features = record_features(view, spec)
        except IngestError as exc:
            # The message names the code and unit, never the value; count it, go on.
            log.warning("patient %s left out of the export: %s", row.id, type(exc).__name__)
            excluded["observations with unusable units"] += 1
            continue
        example_id = f"{row.id}-{index:%Y%m%dT%H%M}"
        image = ""
        if images and dicom_root is not None:
            series = _series_for(session, row, record, view, index)
            if series:
                image = _materialise(dicom_root, series, out_dir, example_id)
                n_images += 1
        # The same note may arrive by two feeds (FHIR DocumentReference and HL7 MDM).
        notes = sorted({(n.time or index, n.text.strip()): n for n in view.notes
                        if n.text.strip()}.values(), key=lambda n: n.time or index)
        pid = (str(record.key) if patient_ids == "identifier" and record.key is not None
               else row.id)
        head_rows.append({"example_id": example_id, "patient_id": pid, "label": label,
                          "index_time": index.isoformat(), "image": image,
                          "note": "\n\n".join(n.text for n in notes),
                          **audit_attributes(record, index)})
        feature_rows.append(features)
    if not head_rows:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(excluded.items())) or "none stored"
        raise ValueError(f"no patient qualifies for the cohort ({len(rows)} stored; left out: "
                         f"{reasons})")
    frame = pd.concat([pd.DataFrame(head_rows),
                       pd.DataFrame(feature_rows, columns=spec.column_names(), dtype=float)],
                      axis=1)
    path = out_dir / "manifest.csv"
    frame.to_csv(path, index=False, float_format=FLOAT_FORMAT)
    positives = int(frame["label"].sum())
    sidecar = {
        "sensitive": SENSITIVE,
        "categorical": SENSITIVE,
        "include_sensitive": False,
        "feature_source": "fhir-spec",
        "feature_spec_version": spec.version,
        "feature_columns": spec.column_names(),
        "outcome": _plain(dict(outcome.config)),
        "label_rule": outcome.rule_text(),
        "index_time_rule": (f"{index_hours:g} h after the start of the first inpatient "
                            "encounter; the patient must be alive, still admitted and without "
                            "the outcome at that time"),
        "patient_id": ("the store's opaque patient id" if patient_ids == "opaque"
                       else "the business identifier 'system|value'"),
        "image": "DICOM series folder relative to this file (the latest study at or before "
                 "the index time, its largest series); blank when none is stored",
        "note": "the patient's notes at or before the index time, oldest first, joined by a "
                "blank line",
        "export": {"created": datetime.now(UTC).isoformat(timespec="seconds"),
                   "follow_up_until": cutoff.isoformat(), "patients_stored": len(rows),
                   "rows": len(frame), "positives": positives, "with_image": n_images,
                   "excluded": dict(sorted(excluded.items()))},
        "generator": {"name": "clinfuse cohort export"},
    }
    (out_dir / "manifest.yaml").write_text(yaml.safe_dump(sidecar, sort_keys=False),
                                           encoding="utf-8")
    return CohortExport(path, len(frame), positives, n_images, dict(excluded))


def _identifiers(session: Session, row: PatientRow, record: PatientRecord
                 ) -> set[tuple[str, str]]:
    ids = {(row.identifier_system, row.identifier_value)}
    ids |= {(i.system, i.value) for i in record.identifiers}
    ids |= {(s, v) for s, v in session.execute(
        select(PatientIdentifierRow.system, PatientIdentifierRow.value)
        .where(PatientIdentifierRow.patient_id == row.id))}
    return ids


def _series_for(session: Session, row: PatientRow, record: PatientRecord,
                view: PatientRecord, index: datetime) -> list[DicomInstanceRow]:
    """The instances of the series chosen for this example (empty when none is stored)."""
    keys = _identifiers(session, row, record)
    stored = session.scalars(select(DicomInstanceRow).where(
        tuple_(DicomInstanceRow.IssuerOfPatientID, DicomInstanceRow.PatientID).in_(
            sorted(keys)))).all()
    if not stored:
        return []
    by_series: dict[str, list[DicomInstanceRow]] = {}
    for inst in stored:
        by_series.setdefault(inst.SeriesInstanceUID, []).append(inst)
    # The as-of view's ImagingStudy references say which series existed by the index time.
    referenced = [(study.started, s.SeriesInstanceUID) for study in view.imaging
                  for s in study.series if s.SeriesInstanceUID in by_series]
    if referenced:
        latest = max(t for t, _ in referenced if t is not None)
        candidates = [uid for t, uid in referenced if t == latest]
    else:
        # No reference in the record: fall back on the DICOM study date and time.
        dated = [(when, uid) for uid, insts in by_series.items()
                 if (when := _study_time(insts[0])) is not None and when <= index]
        if not dated:
            return []
        latest = max(t for t, _ in dated)
        candidates = [uid for t, uid in dated if t == latest]
    best = max(candidates, key=lambda uid: (len(by_series[uid]), uid))
    return sorted(by_series[best], key=lambda i: (i.InstanceNumber or 0, i.SOPInstanceUID))


def _study_time(inst: DicomInstanceRow) -> datetime | None:
    if not inst.StudyDate:
        return None
    tag = (inst.attributes or {}).get("00080030", {})
    values = tag.get("Value") if isinstance(tag, dict) else None
    clock = str(values[0]) if values else "000000"
    clock = (clock.split(".")[0] + "000000")[:6]
    try:
        return datetime.strptime(inst.StudyDate + clock, "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        return None


def _materialise(dicom_root: Path, instances: Iterable[DicomInstanceRow], out_dir: Path,
                 example_id: str) -> str:
    folder = out_dir / "images" / example_id
    folder.mkdir(parents=True, exist_ok=True)
    for n, inst in enumerate(instances):
        source = dicom_root / inst.sha256[:2] / inst.sha256[2:4] / inst.sha256
        shutil.copyfile(source, folder / f"{n:05d}.dcm")
    return folder.relative_to(out_dir).as_posix()


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | frozenset | set):
        return [_plain(v) for v in value]
    return value
