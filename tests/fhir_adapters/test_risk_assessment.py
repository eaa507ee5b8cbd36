"""RiskAssessment: validates with fhir.resources R4B; model version, horizon and basis."""

from __future__ import annotations

import pytest
from fhir.resources.R4B.riskassessment import RiskAssessment

from fhir_adapters.risk_assessment import (
    BasisReference,
    OutcomeCoding,
    RiskAssessmentError,
    RiskAssessmentInput,
    build_risk_assessment,
)


def _input(**kw: object) -> RiskAssessmentInput:
    base: dict[str, object] = dict(
        subject="Patient/p1", occurrence="2024-03-01T08:00:00+00:00", probability=0.237,
        horizon_days=30, model_name="clinfuse-late-fusion", model_version="1.2.3",
        outcome_text="death or ICU transfer within 30 days",
        outcome_codings=[OutcomeCoding("419620001", "Death"),
                         OutcomeCoding("305351004", "Admission to intensive care unit")],
        rationale="Raised by vital signs and labs: +8 points.",
        basis=[BasisReference("Observation", reference="Observation/o1"),
               BasisReference("DocumentReference", reference="DocumentReference/d1"),
               BasisReference("ImagingStudy", reference="ImagingStudy/i1")])
    base.update(kw)
    return RiskAssessmentInput(**base)  # type: ignore[arg-type]


def test_validates_and_carries_every_element() -> None:
    ra = build_risk_assessment(_input())
    parsed = RiskAssessment.model_validate(ra)
    assert parsed.status == "preliminary"
    assert ra["performer"]["reference"] == "#model"
    device = ra["contained"][0]
    assert device["resourceType"] == "Device" and device["version"][0]["value"] == "1.2.3"
    pred = ra["prediction"][0]
    assert pred["probabilityDecimal"] == pytest.approx(0.237)
    assert pred["whenPeriod"] == {"start": "2024-03-01T08:00:00Z",
                                  "end": "2024-03-31T08:00:00Z"}
    assert {c["code"] for c in pred["outcome"]["coding"]} == {"419620001", "305351004"}
    assert all(c["system"] == "http://snomed.info/sct" for c in pred["outcome"]["coding"])
    assert [b["reference"] for b in ra["basis"]] == [
        "Observation/o1", "DocumentReference/d1", "ImagingStudy/i1"]
    assert ra["method"]["text"] and ra["occurrenceDateTime"] == "2024-03-01T08:00:00+00:00"


def test_identifier_only_references_validate() -> None:
    ra = build_risk_assessment(_input(
        subject="", subject_identifier=("urn:oid:1.2.3", "MRN1"),
        basis=[BasisReference("ImagingStudy", identifier_system="urn:dicom:uid",
                              identifier_value="urn:oid:1.2.840.1", display="CT chest")]))
    assert ra["subject"] == {"identifier": {"system": "urn:oid:1.2.3", "value": "MRN1"}}
    RiskAssessment.model_validate(ra)


@pytest.mark.parametrize(("kw", "message"), [
    ({"probability": 1.5}, "probability must be in"),
    ({"status": "done"}, "status 'done'"),
    ({"occurrence": "2024-03-01T08:00:00"}, "no time zone"),
    ({"occurrence": "yesterday"}, "not an ISO 8601"),
    ({"subject": ""}, "subject needs"),
    ({"basis": [BasisReference("Observation")]}, "needs a reference"),
])
def test_bad_input_is_refused_with_the_element(kw: dict[str, object], message: str) -> None:
    with pytest.raises(RiskAssessmentError, match=message):
        build_risk_assessment(_input(**kw))
