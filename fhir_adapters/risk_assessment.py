"""A model prediction as a FHIR R4 RiskAssessment, validated with ``fhir.resources.R4B``.

Formats only: the caller passes ids, numbers and strings; nothing here knows the
model. The performing model is a contained ``Device`` carrying the model name and
version; ``basis`` references the Observations, DocumentReferences and
ImagingStudy the prediction used.

Examples
--------
>>> ra = build_risk_assessment(
...     RiskAssessmentInput(subject="Patient/p1", occurrence="2024-01-01T00:00:00Z",
...                         probability=0.25, horizon_days=30, model_name="m",
...                         model_version="1.0.0", outcome_text="deterioration"))
>>> ra["resourceType"], ra["prediction"][0]["probabilityDecimal"]
('RiskAssessment', 0.25)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

__all__ = ["BasisReference", "OutcomeCoding", "RiskAssessmentError", "RiskAssessmentInput",
           "build_risk_assessment"]

SNOMED = "http://snomed.info/sct"
_STATUSES = ("registered", "preliminary", "final", "amended", "corrected", "cancelled",
             "entered-in-error", "unknown")
_BASIS_TYPES = ("Observation", "DocumentReference", "ImagingStudy", "Patient", "Encounter")


class RiskAssessmentError(ValueError):
    """The inputs do not make a conformant RiskAssessment; the message says which element."""


@dataclass(frozen=True)
class OutcomeCoding:
    """One coding of the predicted outcome (SNOMED CT unless ``system`` says otherwise)."""

    code: str
    display: str
    system: str = SNOMED


@dataclass(frozen=True)
class BasisReference:
    """A resource the prediction used: ``reference`` ("Observation/123") or, when the
    source has no FHIR id, an ``identifier`` (system, value) and a ``display``."""

    resource_type: Literal["Observation", "DocumentReference", "ImagingStudy", "Patient",
                           "Encounter"]
    reference: str | None = None
    identifier_system: str | None = None
    identifier_value: str | None = None
    display: str | None = None

    def to_fhir(self) -> dict[str, Any]:
        if self.resource_type not in _BASIS_TYPES:
            raise RiskAssessmentError(f"basis type {self.resource_type!r} is not one of "
                                      f"{list(_BASIS_TYPES)}")
        out: dict[str, Any] = {"type": self.resource_type}
        if self.reference:
            out["reference"] = self.reference
        if self.identifier_value:
            ident = {"value": self.identifier_value}
            if self.identifier_system:
                ident["system"] = self.identifier_system
            out["identifier"] = ident
        if self.display:
            out["display"] = self.display
        if len(out) == 1:
            raise RiskAssessmentError(f"basis {self.resource_type} needs a reference, an "
                                      "identifier or a display")
        return out


@dataclass(frozen=True)
class RiskAssessmentInput:
    """Everything one RiskAssessment says, as plain values."""

    subject: str  # "Patient/<id>"
    occurrence: str  # ISO 8601 date-time with zone: the index time
    probability: float
    model_name: str
    model_version: str
    outcome_text: str
    horizon_days: float | None = None
    outcome_codings: Sequence[OutcomeCoding] = ()
    rationale: str | None = None
    basis: Sequence[BasisReference] = ()
    status: str = "preliminary"  # a decision-support output, not a signed-off assessment
    method_text: str = "Late-fusion multimodal risk model (image, EHR, notes)"
    subject_identifier: tuple[str | None, str] | None = None  # (system, value): no FHIR id
    identifier: str | None = None
    extra_notes: Sequence[str] = field(default_factory=tuple)


def _when_period(occurrence: str, horizon_days: float) -> dict[str, str]:
    try:
        start = datetime.fromisoformat(occurrence.replace("Z", "+00:00"))
    except ValueError:
        raise RiskAssessmentError(f"occurrence {occurrence!r} is not an ISO 8601 date-time"
                                  ) from None
    if start.tzinfo is None:
        raise RiskAssessmentError(f"occurrence {occurrence!r} has no time zone; FHIR "
                                  "dateTime with a time needs one")
    end = start + timedelta(days=float(horizon_days))
    return {"start": start.isoformat().replace("+00:00", "Z"),
            "end": end.isoformat().replace("+00:00", "Z")}


def build_risk_assessment(inp: RiskAssessmentInput, *, validate: bool = True
                          ) -> dict[str, Any]:
    """The RiskAssessment as a JSON-ready dict, validated with R4B unless ``validate=False``.

    Raises
    ------
    RiskAssessmentError
        A value out of range (probability, status, dates) or a resource that
        ``fhir.resources.R4B`` rejects; the message names the element.
    """
    if inp.status not in _STATUSES:
        raise RiskAssessmentError(f"status {inp.status!r} is not one of {list(_STATUSES)}")
    if not 0.0 <= float(inp.probability) <= 1.0:
        raise RiskAssessmentError(f"probability must be in [0, 1], got {inp.probability}")
    device = {"resourceType": "Device", "id": "model",
              "deviceName": [{"name": inp.model_name, "type": "model-name"}],
              "version": [{"value": inp.model_version}],
              "type": {"text": "Clinical decision support software (risk model)"}}
    subject: dict[str, Any] = {"reference": inp.subject} if inp.subject else {}
    if inp.subject_identifier is not None and inp.subject_identifier[1]:
        system, value = inp.subject_identifier
        subject["identifier"] = {"value": value, **({"system": system} if system else {})}
    if not subject:
        raise RiskAssessmentError("subject needs a reference or an identifier")
    outcome: dict[str, Any] = {"text": inp.outcome_text}
    if inp.outcome_codings:
        outcome["coding"] = [{"system": c.system, "code": c.code, "display": c.display}
                             for c in inp.outcome_codings]
    prediction: dict[str, Any] = {"outcome": outcome,
                                  "probabilityDecimal": round(float(inp.probability), 6)}
    if inp.horizon_days is not None:
        prediction["whenPeriod"] = _when_period(inp.occurrence, inp.horizon_days)
    if inp.rationale:
        prediction["rationale"] = inp.rationale
    resource: dict[str, Any] = {
        "resourceType": "RiskAssessment",
        "contained": [device],
        "status": inp.status,
        "method": {"text": inp.method_text},
        "subject": subject,
        "occurrenceDateTime": inp.occurrence,
        "performer": {"reference": "#model",
                      "display": f"{inp.model_name} {inp.model_version}"},
        "prediction": [prediction],
    }
    if inp.identifier:
        resource["identifier"] = [{"value": inp.identifier}]
    if inp.basis:
        resource["basis"] = [b.to_fhir() for b in inp.basis]
    if inp.extra_notes:
        resource["note"] = [{"text": t} for t in inp.extra_notes]
    if validate:
        validate_risk_assessment(resource)
    return resource


def validate_risk_assessment(resource: dict[str, Any]) -> None:
    """Validate with ``fhir.resources.R4B``; raise :class:`RiskAssessmentError` if rejected."""
    from fhir.resources.R4B.riskassessment import RiskAssessment
    from pydantic import ValidationError

    try:
        RiskAssessment.model_validate(resource)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                             for e in exc.errors()[:5])
        raise RiskAssessmentError(f"RiskAssessment does not validate against FHIR R4 "
                                  f"(fhir.resources.R4B): {problems}") from None
