"""A prediction for a posted Bundle that stores nothing: scoring without writing.

``POST /fhir/$predict`` with a Bundle stores the Bundle and the prediction only for
a caller who may write (the integration or admin role, with write scopes for the
Bundle's resource types). Anyone else who may predict (a clinician) gets the risk
for the Bundle as posted, computed in memory: the what-if use ("what would the
model say for this record?") without a read role turning into a write.

The record is the Bundle's alone: no stored data of the patient is looked up, not
even imaging, so the answer reveals nothing stored here.
"""

from __future__ import annotations

import re
import shutil
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol

from fhir_adapters.fhir_json import records_from_json
from fhir_adapters.record import PatientRecord, ensure_utc
from services.prediction import Prediction

__all__ = ["NotOnePatient", "score_bundle"]

_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


class _Scorer(Protocol):
    """What of :class:`services.prediction.PredictionService` scoring needs."""

    artifacts_dir: Any

    def clock(self) -> datetime: ...

    def evaluate(self, record: PatientRecord, index_time: datetime, imaging: Any, *,
                 patient_id: str, prediction_id: str | None = None) -> Prediction: ...


class NotOnePatient(ValueError):
    """The Bundle holds no patient, or several."""


def score_bundle(service: _Scorer, bundle: Mapping[str, Any], *,
                 index_time: datetime | None) -> Prediction:
    """Score ``bundle`` (one patient's data) as of ``index_time`` (default now); store nothing.

    The RiskAssessment's subject is the Bundle's own Patient id when it has one (the
    caller's reference), else the prediction's id; nothing of either is stored.

    Raises
    ------
    fhir_adapters.errors.IngestError
        The Bundle does not parse as FHIR R4 (located issues, as ``POST /fhir`` gives).
    NotOnePatient
        It holds no patient's data, or more than one patient's.
    services.prediction.PredictionError
        The record cannot become model input.
    """
    records = records_from_json(bundle)
    if len(records) != 1:
        raise NotOnePatient(f"$predict takes one patient's Bundle; this one holds "
                            f"{len(records)} patients' data")
    record = records[0]
    prediction_id = uuid.uuid4().hex
    own = record.resource_id
    subject = own if isinstance(own, str) and _FHIR_ID.match(own) else prediction_id
    when = ensure_utc(index_time) if index_time is not None else service.clock()
    try:
        return service.evaluate(record, when, None, patient_id=subject,
                                prediction_id=prediction_id)
    finally:
        # Saliency overlays are written per prediction; an unsaved one keeps none.
        shutil.rmtree(service.artifacts_dir / prediction_id, ignore_errors=True)
