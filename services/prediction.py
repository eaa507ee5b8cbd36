"""The prediction service: one verified model, a patient's record as of a time, one explained risk.

:class:`PredictionService` is built once at start-up from ``settings.model_path``
(the artifact's signature checked with ``settings.model_trusted_keys``); a missing,
unsigned or corrupt artifact stops start-up with :class:`ModelLoadError`.

A prediction turns a :class:`~fhir_adapters.record.PatientRecord` into the
research import format the model was trained on -- a one-row
:class:`~pipelines.manifest.CohortManifest` -- so that the service and
``clinfuse score``/``clinfuse explain`` compute exactly the same thing:

- EHR features: :func:`~pipelines.ehr_features.record_features` with the model's
  own feature spec over ``record.as_of(index_time)``;
- the note: the notes visible at the index time, oldest first, joined by a blank
  line (as ``clinfuse synth`` writes the manifest);
- the image: the newest series in the DICOM store linked to one of the patient's
  identifiers (PatientID + IssuerOfPatientID) and acquired at or before the index
  time, materialised as a folder of symlinks to the stored files.

The :class:`~pipelines.explain.Explainer` then explains the row; the result is
stored as a :class:`~services.tables.PredictionRow` with the RiskAssessment (FHIR
R4) it is answered as. Rows outside the model's population are stored too, with
the refusal instead of a score. Image tensors, image logits, sentence vectors and
saliency maps are cached under ``settings.cache_dir``, so a patient's second
prediction skips the expensive parts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from fhir_adapters.errors import UnitError
from fhir_adapters.record import (
    Demographics,
    PatientIdentifier,
    PatientRecord,
    age_band,
    ensure_utc,
    record_from_json,
)
from fhir_adapters.risk_assessment import (
    BasisReference,
    OutcomeCoding,
    RiskAssessmentError,
    RiskAssessmentInput,
    build_risk_assessment,
    validate_risk_assessment,
)
from models.fusion import MODALITIES
from pipelines.ehr_features import record_features
from pipelines.explain import Explainer, ExplainError, validation_label
from pipelines.feature_spec import DEFAULT_SPEC, FeatureSpec
from pipelines.freshness import check_freshness
from pipelines.manifest import CohortManifest
from pipelines.model_inputs import ModelDataError
from pipelines.population import check_population
from pipelines.scoring import LoadedModel, load_model
from services.core.config import Settings
from services.dicom_store import DicomStore
from services.tables import DicomInstanceRow, PatientRow, PredictionRow

__all__ = ["AUDIT_ATTRIBUTES", "ImagingSeries", "ModelLoadError", "PatientNotFound",
           "Prediction", "PredictionError", "PredictionService",
           "audit_attributes", "indicator_for"]

log = logging.getLogger(__name__)

#: The audit attributes copied onto every prediction (the synth cohort's sensitive columns).
AUDIT_ATTRIBUTES = ("sex", "race", "ethnicity", "age_band")
#: The identifier system of DICOM UIDs in FHIR (RFC 3001 OIDs).
DICOM_UID_SYSTEM = "urn:dicom:uid"
#: Basis references per resource type, newest first: enough to trace, not the whole chart.
MAX_BASIS = 40
_FHIR_REF = re.compile(r"^(Observation|DocumentReference|DiagnosticReport|ImagingStudy)/"
                       r"[A-Za-z0-9\-.]{1,64}$")


class ModelLoadError(RuntimeError):
    """The configured model artifact cannot be served; start-up stops with this message."""


class PredictionError(ValueError):
    """This record cannot be turned into model input; the message names why, never values."""


class PatientNotFound(LookupError):
    """No stored patient has this opaque id."""


@dataclass(frozen=True)
class ImagingSeries:
    """A stored series, materialised as a folder of symlinks the image loader reads."""

    StudyInstanceUID: str
    SeriesInstanceUID: str
    folder: Path
    acquired: datetime | None
    n_instances: int


@dataclass
class Prediction:
    """What :meth:`PredictionService.evaluate` computed for one record (not yet stored)."""

    id: str
    patient_id: str
    index_time: datetime
    probability: float | None
    refusal: str | None
    decisions: dict[str, Any]
    modalities: str
    explanation: dict[str, Any] | None
    risk_assessment: dict[str, Any] | None
    attributes: dict[str, Any]
    timings_ms: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------- helpers


def _category(text: str | None, codings: Iterable[Any]) -> str | None:
    # US Core requires the text sub-extension, which also summarises several codings.
    if text:
        return text
    for c in codings:
        if getattr(c, "display", None):
            return str(c.display)
    return None


def audit_attributes(demographics: Demographics, index_time: datetime) -> dict[str, Any]:
    """sex, race, ethnicity and age band at ``index_time``, as the audits group them."""
    return {"sex": demographics.sex,
            "race": _category(demographics.race_text, demographics.race),
            "ethnicity": _category(demographics.ethnicity_text, demographics.ethnicity),
            "age_band": age_band(demographics.age_at(index_time))}


def indicator_for(probability: float | None, thresholds: dict[str, float]) -> str:
    """CDS Hooks indicator from the model's decision thresholds.

    Above the highest of two or more thresholds: ``critical``; above any other:
    ``warning``; below all, or no score: ``info``.
    """
    if probability is None or not thresholds:
        return "info"
    values = sorted(float(v) for v in thresholds.values())
    crossed = sum(probability >= v for v in values)
    if crossed == 0:
        return "info"
    return "critical" if crossed == len(values) and len(values) >= 2 else "warning"


def _dicom_datetime(study_date: str | None, study_time: str | None
                    ) -> tuple[datetime | None, bool]:
    """(acquisition time in UTC, whether the time of day is known); DICOM times taken as UTC."""
    if not study_date or len(study_date) < 8 or not study_date[:8].isdigit():
        return None, False
    day = datetime(int(study_date[:4]), int(study_date[4:6]), int(study_date[6:8]), tzinfo=UTC)
    digits = (study_time or "").split(".")[0]
    if len(digits) >= 2 and digits.isdigit():
        hh, mm = int(digits[:2]), int(digits[2:4] or 0)
        ss = int(digits[4:6] or 0)
        try:
            return day.replace(hour=hh, minute=mm, second=ss), True
        except ValueError:
            pass
    return day, False


def _attribute(row: DicomInstanceRow, tag: str) -> str | None:
    element = (row.attributes or {}).get(tag) or {}
    values = element.get("Value") or []
    return str(values[0]) if values else None


def _resource_ref(source: str | None) -> str:
    """``Observation/1`` from an observation's source (``Observation/1.component[0]``)."""
    return re.sub(r"\.component\[\d+\]$", "", source or "")


def _issuer_matches(issuer: str | None, system: str) -> bool:
    # DICOM often carries the bare OID where FHIR writes urn:oid:...
    if not issuer:
        return False
    return issuer.removeprefix("urn:oid:") == system.removeprefix("urn:oid:")


# ----------------------------------------------------------------------------- explainer


class _ServiceExplainer(Explainer):
    """The pipeline's Explainer with a background that never depends on the request.

    ``Explainer.background`` falls back on k-means centroids of the manifest being
    explained; the service's manifest is one row, so that would explain a patient
    against themself. Without a background in the artifact the service uses the
    training mean (the origin of the scaled input space, nothing missing).
    """

    def background(self, manifest: CohortManifest) -> tuple[np.ndarray, str]:
        docs = self.model.artifact.documents
        stored = docs.get("shap_background") if isinstance(docs, dict) else None
        if isinstance(stored, dict) and stored.get("centroids") is not None:
            return super().background(manifest)
        if self.model.scaler is None:
            raise ExplainError("the model has no EHR features to explain")
        width = int(self.model.scaler.n_features_out)
        return (np.zeros((1, width), dtype=np.float64),
                "training mean (the artifact stores no summarised background)")


# ----------------------------------------------------------------------------- service


class PredictionService:
    """A loaded model with its explainer and caches, shared by every request.

    Parameters
    ----------
    model : LoadedModel
        The verified artifact.
    cache_dir : Path
        Image tensors, logits, sentence vectors, saliency maps and series folders.
    artifacts_dir : Path
        Per-prediction files (saliency overlay PNGs), ``artifacts_dir/<prediction id>/``.
    dicom_store : DicomStore, optional
        Where the patient's imaging is looked up; None predicts without imaging.
    clock : callable, optional
        The current time (aware); the default index time of a prediction.
    """

    def __init__(self, model: LoadedModel, *, cache_dir: Path, artifacts_dir: Path,
                 dicom_store: DicomStore | None = None,
                 clock: Callable[[], datetime] | None = None) -> None:
        self.model = model
        self.cache_dir = Path(cache_dir)
        self.artifacts_dir = Path(artifacts_dir)
        self.dicom_store = dicom_store
        self.clock: Callable[[], datetime] = clock or (lambda: datetime.now(UTC))
        self.spec = self._feature_spec(model)
        self.explainer = _ServiceExplainer(model, self.cache_dir)
        # Torch modules, the explainer's caches and the file caches are shared: one
        # prediction at a time (the model is small; the lock costs no throughput on CPU).
        self._lock = threading.Lock()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)

    # -- construction --------------------------------------------------------------------

    @classmethod
    def from_settings(cls, settings: Settings, dicom_store: DicomStore | None = None
                      ) -> PredictionService | None:
        """The service for ``settings.model_path``; None when no model is configured.

        Raises
        ------
        ModelLoadError
            The artifact is missing, unsigned by a trusted key, corrupt, or needs
            features a FHIR record cannot supply.
        """
        path = settings.model_path
        if path is None:
            return None
        if not settings.model_trusted_keys:
            raise ModelLoadError(
                f"CLINFUSE_MODEL_PATH is set ({path}) but CLINFUSE_MODEL_TRUSTED_KEYS names no "
                "public key to verify its signature with; the service serves only signed "
                "models (list the PEM path of the key that signed it)")
        missing = [str(k) for k in settings.model_trusted_keys if not Path(k).is_file()]
        if missing:
            raise ModelLoadError(f"trusted model key file(s) {missing} do not exist; fix "
                                 "CLINFUSE_MODEL_TRUSTED_KEYS")
        try:
            exists = Path(path).exists()
        except OSError:  # not a path this filesystem can hold (too long, say)
            exists = False
        if not exists:
            raise ModelLoadError(f"model artifact {path} does not exist; fix CLINFUSE_MODEL_PATH "
                                 "or unset it to run without predictions")
        try:
            model = load_model(path, trusted_keys=list(settings.model_trusted_keys),
                               device="cpu")
        except Exception as exc:
            # The artifact's own error says what is wrong (signature, hash, format); the
            # type is kept in case the message is terse.
            raise ModelLoadError(f"model artifact {path} cannot be served: "
                                 f"{type(exc).__name__}: {exc}") from exc
        cache = settings.cache_dir or settings.data_dir / "cache"
        try:
            return cls(model, cache_dir=cache, artifacts_dir=settings.data_dir / "predictions",
                       dicom_store=dicom_store)
        except PredictionError as exc:
            raise ModelLoadError(f"model artifact {path} cannot be served: {exc}") from exc

    @staticmethod
    def _feature_spec(model: LoadedModel) -> FeatureSpec:
        """The spec the model's EHR columns were built with; refuses columns a record lacks."""
        source = model.config.get("feature_source") or {}
        if isinstance(source, dict) and source.get("kind") == "fhir-spec" and source.get("spec"):
            spec = FeatureSpec.from_dict(source["spec"])
        else:
            spec = DEFAULT_SPEC
        known = set(spec.column_names())
        foreign = [c for c in model.encoding.numeric if c not in known]
        if foreign:
            raise PredictionError(
                f"the model was trained on manifest column(s) {foreign[:5]}"
                f"{' ...' if len(foreign) > 5 else ''} that the FHIR feature spec does not "
                "define, so a patient record cannot supply them; train it on a cohort "
                "exported with feature_source: fhir-spec")
        return spec

    # -- the model's facts -----------------------------------------------------------

    @property
    def model_name(self) -> str:
        return str(self.model.config.get("model_name"))

    @property
    def model_version(self) -> str:
        return str(self.model.config.get("model_version"))

    @property
    def thresholds(self) -> dict[str, float]:
        return {str(k): float(v) for k, v in
                (self.model.config.get("decision_thresholds") or {}).items()}

    @property
    def outcome(self) -> dict[str, Any]:
        return dict(self.model.config.get("outcome") or {})

    @property
    def validation_label(self) -> str:
        return validation_label(self.model.config)

    # -- imaging -----------------------------------------------------------------------

    def find_imaging(self, record: PatientRecord, index_time: datetime
                     ) -> ImagingSeries | None:
        """The newest stored series of this patient acquired at or before ``index_time``.

        Instances link to the patient by PatientID + IssuerOfPatientID equal to one of
        the record's identifiers; without an issuer there is no link, since a bare
        PatientID is ambiguous across assigning authorities. A study with a date but
        no time counts only from the day after (nothing proves it came before the
        index time that day). Of the newest study's series, the one with the most
        instances is taken (the volume, not a scout).
        """
        if self.dicom_store is None:
            return None
        t = ensure_utc(index_time)
        idents = set(record.identifiers) | ({record.key} if record.key else set())
        if not idents:
            return None
        sessions: sessionmaker[Session] = self.dicom_store.sessions
        with sessions() as session:
            rows = list(session.scalars(select(DicomInstanceRow).where(
                DicomInstanceRow.PatientID.in_(sorted({i.value for i in idents})))))
        rows = [r for r in rows if any(r.PatientID == i.value and
                                       _issuer_matches(r.IssuerOfPatientID, i.system)
                                       for i in idents)]
        series: dict[str, list[DicomInstanceRow]] = {}
        for r in rows:
            series.setdefault(r.SeriesInstanceUID, []).append(r)
        best: tuple[datetime, int, str] | None = None
        for uid, instances in series.items():
            first = instances[0]
            when, timed = _dicom_datetime(first.StudyDate, _attribute(first, "00080030"))
            if when is None:
                continue  # undated: nothing proves it came before the index time
            if (when > t) if timed else (when + timedelta(days=1) > t):
                continue
            key = (when, len(instances), uid)
            if best is None or key > best:
                best = key
        if best is None:
            return None
        instances = series[best[2]]
        return ImagingSeries(instances[0].StudyInstanceUID, best[2],
                             self._series_folder(instances), best[0], len(instances))

    def _series_folder(self, instances: list[DicomInstanceRow]) -> Path:
        """A folder of symlinks to the stored files, named by their content (immutable)."""
        assert self.dicom_store is not None
        ordered = sorted(instances, key=lambda r: (r.InstanceNumber or 0, r.SOPInstanceUID))
        digest = hashlib.sha256("\n".join(r.sha256 for r in ordered).encode()).hexdigest()
        folder = self.cache_dir / "series" / digest[:32]
        if folder.is_dir():
            return folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=folder.parent))
        try:
            for i, r in enumerate(ordered):
                os.symlink(self.dicom_store.path_for(r.sha256), tmp / f"{i:05d}.dcm")
            os.replace(tmp, folder)  # atomic; a concurrent builder's identical folder wins
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not folder.is_dir():
                raise
        return folder

    # -- model input ---------------------------------------------------------------------

    def build_manifest(self, record: PatientRecord, index_time: datetime,
                       imaging: ImagingSeries | None, *, row_id: str, patient_id: str
                       ) -> CohortManifest:
        """The one-row manifest the model reads: features, note and image as of the index.

        ``patient_id`` (the opaque id) and ``row_id`` (the prediction id) name the row,
        so the explanation carries no business identifier.
        """
        t = ensure_utc(index_time)
        view = record.as_of(t)
        try:
            features = record_features(view, self.spec)
        except UnitError as exc:
            raise PredictionError(f"an observation cannot be used: {exc}") from None
        notes = sorted((n for n in view.notes if n.text and n.text.strip()),
                       key=lambda n: n.time or t)
        attributes = audit_attributes(record.demographics, t)
        row: dict[str, Any] = {
            "example_id": row_id, "patient_id": patient_id, "label": 0,
            "index_time": pd.Timestamp(t),
            "image": str(imaging.folder) if imaging is not None else None,
            "note": "\n\n".join(n.text for n in notes) if notes else None,
            **attributes,
        }
        row.update(zip(self.spec.column_names(), features, strict=True))
        for column in self.model.encoding.categorical:
            row.setdefault(column, None)  # a categorical the record cannot give: missing
        frame = pd.DataFrame([row])
        frame["index_time"] = pd.to_datetime(frame["index_time"], utc=True)
        root = self.cache_dir / "manifests"
        return CohortManifest(path=root / f"{row_id}.csv", frame=frame,
                              sensitive=list(AUDIT_ATTRIBUTES),
                              categorical=list(AUDIT_ATTRIBUTES),
                              sidecar={"outcome": self.outcome})

    # -- prediction ----------------------------------------------------------------------

    def evaluate(self, record: PatientRecord, index_time: datetime,
                 imaging: ImagingSeries | None, *, patient_id: str,
                 prediction_id: str | None = None) -> Prediction:
        """Score and explain ``record`` as of ``index_time``; nothing is stored.

        An image the model cannot use (a radiograph for a CT model, a broken series)
        does not fail the prediction: it is made without imaging and the explanation
        says so under ``warnings``.

        Raises
        ------
        PredictionError
            The record cannot become model input (an unconvertible unit, say).
        """
        pid = prediction_id or uuid.uuid4().hex
        t = ensure_utc(index_time)
        with self._lock:
            try:
                return self._evaluate(record, t, imaging, patient_id, pid, [])
            except ModelDataError:
                if imaging is None:
                    raise PredictionError("the record cannot be turned into model input"
                                          ) from None
                log.warning("prediction %s: the imaging series cannot be used; predicting "
                            "without it", pid)
                return self._evaluate(record, t, None, patient_id, pid, [
                    "The newest imaging series could not be read as the model's input "
                    "(wrong dimensionality or a broken series); the risk was computed "
                    "without imaging."])

    def _evaluate(self, record: PatientRecord, t: datetime, imaging: ImagingSeries | None,
                  patient_id: str, pid: str, warnings: list[str]) -> Prediction:
        t0 = time.perf_counter()
        m = self.model
        manifest = self.build_manifest(record, t, imaging, row_id=pid, patient_id=patient_id)
        inputs = m.inputs(manifest, self.cache_dir)
        present = [mod for j, mod in enumerate(MODALITIES) if inputs.available[0, j]]
        modalities = "+".join(present) or "none"
        attributes = audit_attributes(record.demographics, t)
        # The stated population, every rule checked against the record (issue 20): a
        # failed rule refuses; one the record cannot answer is scored with a warning.
        population_refusal, unchecked = check_population(m.config.get("population"),
                                                         record, t)
        # Stale or missing inputs never pass as a low score: the model's freshness rules
        # withhold the score ("insufficient data") or flag it, as its config says.
        freshness = (check_freshness(m.config["freshness"], record, t)
                     if m.config.get("freshness") else None)
        refusal = (population_refusal or (freshness.refusal if freshness else None)
                   or inputs.refusal[0])
        warnings = [*warnings, *unchecked, *(freshness.warnings if freshness else [])]
        timings = {"inputs": 1000 * (time.perf_counter() - t0)}
        if refusal is not None:
            decisions = {k: {"threshold": v, "flag": None} for k, v in self.thresholds.items()}
            return Prediction(pid, patient_id, t, None, refusal, decisions, modalities, None,
                              None, attributes, timings)
        probability = float(m.predict(inputs, np.array([0]))[0])
        out_dir = self.artifacts_dir / pid
        out_dir.mkdir(parents=True, exist_ok=True)
        t1 = time.perf_counter()
        explanation = self.explainer.explain_row(manifest, 0, out_dir)
        timings["explain"] = 1000 * (time.perf_counter() - t1)
        if explanation.get("image") is not None and imaging is not None:
            # The series folder is a cache path; the dashboard needs the DICOM identity.
            explanation["image"]["series"] = imaging.SeriesInstanceUID
            explanation["image"]["study"] = imaging.StudyInstanceUID
        explanation["prediction_id"] = pid
        explanation["probability"] = probability
        explanation["thresholds"] = self.thresholds
        explanation["outcome"] = self.outcome
        explanation["warnings"] = warnings
        if freshness is not None:
            explanation["data_freshness"] = freshness.to_json()
        decisions = {k: {"threshold": v, "flag": bool(probability >= v)}
                     for k, v in self.thresholds.items()}
        t2 = time.perf_counter()
        risk_assessment = self.risk_assessment(record, t, explanation, probability,
                                               patient_id=patient_id, prediction_id=pid,
                                               imaging=imaging, present=set(present))
        timings["fhir"] = 1000 * (time.perf_counter() - t2)
        timings["total"] = 1000 * (time.perf_counter() - t0)
        return Prediction(pid, patient_id, t, probability, None, decisions, modalities,
                          explanation, risk_assessment, attributes, timings)

    def risk_assessment(self, record: PatientRecord, index_time: datetime,
                        explanation: dict[str, Any], probability: float, *,
                        patient_id: str, prediction_id: str,
                        imaging: ImagingSeries | None, present: set[str]
                        ) -> dict[str, Any]:
        """The validated FHIR R4 RiskAssessment: subject by opaque id and identifier.

        ``basis`` names what the prediction used, by the references the sending
        system gave (Observations in the feature windows, the notes, the series).
        """
        outcome = self.outcome
        coding = outcome.get("coding") or {}
        codings = [OutcomeCoding(str(c["code"]), str(c.get("display", "")),
                                 str(c.get("system", "http://snomed.info/sct")))
                   for c in (coding.values() if isinstance(coding, dict) else coding)
                   if isinstance(c, dict) and c.get("code")]
        view = record.as_of(index_time)
        basis: list[BasisReference] = []
        used = set(self.model.modalities) & present
        if "ehr" in used:
            start = index_time - timedelta(hours=self.spec.lookback_hours)
            codes = self.spec.by_loinc()
            refs = sorted({(o.effective, _resource_ref(o.source)) for o in view.observations
                           if o.code in codes and o.effective and o.effective > start
                           and _FHIR_REF.match(_resource_ref(o.source))}, reverse=True)
            seen: set[str] = set()
            for _, ref in refs:
                if ref not in seen and len(seen) < MAX_BASIS:
                    seen.add(ref)
                    basis.append(BasisReference("Observation", reference=ref))
            if not seen:
                basis.append(BasisReference("Observation", display="vital signs and labs"))
        if "note" in used:
            note_refs = sorted({n.source for n in view.notes if n.source and
                                _FHIR_REF.match(n.source) and
                                n.source.startswith("DocumentReference/")})
            basis.extend(BasisReference("DocumentReference", reference=r)
                         for r in note_refs[-MAX_BASIS:])
            if not note_refs:
                basis.append(BasisReference("DocumentReference", display="clinical notes"))
        if "image" in used and imaging is not None and explanation.get("image") is not None:
            basis.append(BasisReference(
                "ImagingStudy", identifier_system=DICOM_UID_SYSTEM,
                identifier_value=f"urn:oid:{imaging.StudyInstanceUID}",
                display=f"imaging series {imaging.SeriesInstanceUID}"))
        key = record.key
        try:
            resource = build_risk_assessment(RiskAssessmentInput(
                subject=f"Patient/{patient_id}",
                subject_identifier=(key.system, key.value) if key else None,
                occurrence=index_time.isoformat().replace("+00:00", "Z"),
                probability=probability, model_name=self.model_name,
                model_version=self.model_version,
                outcome_text=str(outcome.get("definition") or outcome.get("name") or "outcome"),
                outcome_codings=codings, horizon_days=outcome.get("horizon_days"),
                rationale=explanation.get("rationale"), basis=basis,
                identifier=prediction_id, extra_notes=(self.validation_label,)),
                validate=False)
        except RiskAssessmentError as exc:
            raise PredictionError(str(exc)) from None
        resource = {"resourceType": "RiskAssessment", "id": prediction_id,
                    **{k: v for k, v in resource.items() if k != "resourceType"}}
        resource["identifier"] = [{"system": "urn:clinfuse:prediction",
                                   "value": prediction_id}]
        try:
            validate_risk_assessment(resource)
        except RiskAssessmentError as exc:
            raise PredictionError(str(exc)) from None
        return resource

    def input_digest(self, record: Mapping[str, Any], imaging: ImagingSeries | None) -> str:
        """sha256 of what a prediction is made from: the model, the stored record, the series.

        The series folder is named by its instances' content hashes, so a new or
        replaced instance changes the digest.
        """
        h = hashlib.sha256(f"clinfuse-prediction-input/1\n{self.model_name}\n"
                           f"{self.model_version}\n".encode())
        h.update(json.dumps(record, sort_keys=True, separators=(",", ":"),
                            default=str).encode())
        if imaging is not None:
            h.update(f"\n{imaging.SeriesInstanceUID}\n{imaging.folder.name}".encode())
        return h.hexdigest()

    def predict_record(self, session: Session, patient_id: str, record: PatientRecord,
                       index_time: datetime, imaging: ImagingSeries | None, *, source: str,
                       requested_by: str | None, card_uuid: str | None = None,
                       input_digest: str | None = None) -> PredictionRow:
        """Evaluate and store one prediction (flushed, not committed: the caller commits)."""
        result = self.evaluate(record, index_time, imaging, patient_id=patient_id)
        # A refusal leaves explanation and risk_assessment unset, so they are SQL NULL
        # (a JSON column would store Python None as the JSON value null).
        documents = {k: v for k, v in (("explanation", _jsonable(result.explanation)),
                                       ("risk_assessment", result.risk_assessment))
                     if v is not None}
        row = PredictionRow(
            id=result.id, patient_id=patient_id, index_time=result.index_time,
            model_name=self.model_name, model_version=self.model_version,
            probability=result.probability, refusal=result.refusal,
            decisions=result.decisions, modalities=result.modalities,
            attributes=result.attributes, source=source, cds_card_uuid=card_uuid,
            requested_by=requested_by, created_at=datetime.now(UTC),
            input_digest=input_digest, **documents)
        session.add(row)
        session.flush()
        log.info("prediction %s stored (source %s, %s, %.0f ms)", row.id, source,
                 "refused" if result.refusal else "scored", result.timings_ms.get("total", 0))
        return row

    def predict_patient(self, session: Session, patient_id: str, *, source: str,
                        requested_by: str | None, index_time: datetime | None = None,
                        card_uuid: str | None = None, reuse_within_s: float = 0.0
                        ) -> PredictionRow:
        """Predict for a stored patient as of ``index_time`` (default: now).

        The background job worker calls this for ``patient-updated`` jobs, the
        ``$predict`` routes and the CDS hook (with the card's uuid) too.

        With ``reuse_within_s`` > 0 (the CDS hook, index time now), a prediction this
        model made from the same record and imaging series (same input digest) at most
        that many seconds ago is returned instead of a new one: a chart opened again
        a minute later gets the same answer without the model running. Only features
        that age with the clock (hours since the last result) could differ. The reused
        row takes ``card_uuid`` if it has no card yet.

        Raises
        ------
        PatientNotFound
            No patient has this opaque id.
        """
        patient = session.get(PatientRow, patient_id)
        if patient is None:
            raise PatientNotFound(f"no patient with id {patient_id}")
        record = record_from_json(patient.record)
        if record.key is None:
            record.key = PatientIdentifier(patient.identifier_system, patient.identifier_value)
        t = ensure_utc(index_time) if index_time is not None else self.clock()
        imaging = self.find_imaging(record, t)
        digest = self.input_digest(patient.record, imaging)
        if reuse_within_s > 0 and index_time is None:
            fresh = session.scalars(
                select(PredictionRow).where(
                    PredictionRow.patient_id == patient_id,
                    PredictionRow.input_digest == digest,
                    PredictionRow.created_at >= datetime.now(UTC) - timedelta(
                        seconds=reuse_within_s))
                # A row that already carries a card first: the background job the
                # hook's own ingest queued may have stored the same prediction since,
                # and the reopened chart should get the card it had.
                .order_by(PredictionRow.cds_card_uuid.is_(None),
                          PredictionRow.created_at.desc()).limit(1)).first()
            if fresh is not None:
                if fresh.cds_card_uuid is None and card_uuid is not None:
                    fresh.cds_card_uuid = card_uuid
                    session.flush()
                return fresh
        return self.predict_record(session, patient_id, record, t, imaging, source=source,
                                   requested_by=requested_by, card_uuid=card_uuid,
                                   input_digest=digest)

    def warm_up(self) -> None:
        """Run one throw-away explanation so the first request does not pay for imports."""
        record = PatientRecord(key=PatientIdentifier("urn:clinfuse:warm-up", "0"),
                               demographics=Demographics(birth_date=date(1960, 1, 1)))
        try:
            self.evaluate(record, self.clock(), None, patient_id="warm-up",
                          prediction_id="warm-up")
        except Exception as exc:  # a warm-up failure only costs the first request time
            log.warning("prediction warm-up failed: %s", type(exc).__name__)
        finally:
            shutil.rmtree(self.artifacts_dir / "warm-up", ignore_errors=True)

    def start_warm_up(self) -> threading.Thread:
        """:meth:`warm_up` in a daemon thread, so start-up does not wait for it."""
        thread = threading.Thread(target=self.warm_up, name="clinfuse-model-warm-up",
                                  daemon=True)
        thread.start()
        return thread

    def artifact_path(self, prediction_id: str, name: str) -> Path | None:
        """A stored prediction's file (an overlay PNG), or None; names cannot escape."""
        if not re.fullmatch(r"[0-9a-f]{32}", prediction_id) or not re.fullmatch(
                r"[A-Za-z0-9_.-]{1,128}", name) or name.startswith("."):
            return None
        path = self.artifacts_dir / prediction_id / name
        return path if path.is_file() else None


def _jsonable(value: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None (JSON has neither)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, datetime | date):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    return value
