"""Errors raised at the EHR edge, and their FHIR OperationOutcome form.

Messages name the problem and where it is (file, entry index, element path,
HL7 segment and field) and never echo a patient's values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

IssueCode = Literal[
    "invalid", "structure", "required", "value", "invariant", "not-found",
    "not-supported", "too-long", "processing", "exception",
]


@dataclass(frozen=True)
class Issue:
    """One problem found in the input, located but free of patient values."""

    code: IssueCode
    diagnostics: str
    expression: str | None = None  # FHIRPath-like location, e.g. Bundle.entry[3].resource.birthDate
    severity: Literal["fatal", "error", "warning", "information"] = "error"
    #: HL7 v2 location, e.g. ("PID", 1, 7) for PID-7 of the first PID segment.
    segment: str | None = None
    segment_index: int | None = None
    field: int | None = None

    def where(self) -> str:
        if self.segment is not None:
            loc = f"{self.segment}"
            if self.segment_index is not None:
                loc += f"[{self.segment_index}]"
            if self.field is not None:
                loc += f"-{self.field}"
            return loc
        return self.expression or "input"

    def to_fhir(self) -> dict[str, Any]:
        issue: dict[str, Any] = {
            "severity": self.severity,
            "code": self.code,
            "diagnostics": self.diagnostics,
        }
        if self.expression:
            issue["expression"] = [self.expression]
        elif self.segment:
            issue["expression"] = [self.where()]
        return issue


class IngestError(ValueError):
    """Input that cannot become a PatientRecord. Carries located issues."""

    def __init__(self, issues: list[Issue] | Issue, *, source: str | None = None) -> None:
        self.issues = [issues] if isinstance(issues, Issue) else list(issues)
        self.source = source
        super().__init__(self._message())

    def _message(self) -> str:
        prefix = f"{self.source}: " if self.source else ""
        parts = [f"{i.where()}: {i.diagnostics}" for i in self.issues]
        return prefix + "; ".join(parts)

    def to_operation_outcome(self) -> dict[str, Any]:
        return operation_outcome(self.issues)


class NotPatientData(IngestError):
    """Well-formed input that carries no patient data (a ValueSet, say)."""


class UnitError(IngestError):
    """A unit that cannot be converted to the unit a feature needs."""


def operation_outcome(issues: list[Issue]) -> dict[str, Any]:
    """A FHIR R4 OperationOutcome resource (as JSON) listing ``issues``."""
    return {"resourceType": "OperationOutcome", "issue": [i.to_fhir() for i in issues]}
