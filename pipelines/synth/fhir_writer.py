"""One FHIR R4 transaction Bundle per patient (Synthea-like, lean).

Patient (MRN identifier, US Core race/ethnicity, language; ``deceasedDateTime``
for deaths), the ED and inpatient Encounters, vitals and labs (LOINC + UCUM,
including measurements after the index time that the as-of view must hide),
Conditions (SNOMED CT), MedicationRequests (RxNorm), notes as DocumentReference
with base64 text/plain, an ImagingStudy for the CT series, and for ICU
transfers an Encounter (class ACUTE, type SNOMED 305351004) after the index.
Resource ids are UUID5s of (seed, MRN, kind, n), so output is deterministic.
With ``--realism hard`` the inpatient Encounter names its site (``serviceProvider``)
and the ImagingStudy is one chest radiograph (DX) instead of a CT series.
"""

from __future__ import annotations

import base64
import uuid
from datetime import datetime
from typing import Any

from pipelines.synth import codes
from pipelines.synth.dicom_writer import sop_instance_uid
from pipelines.synth.hard_patient import HardPatientSim
from pipelines.synth.patient import PatientSim

__all__ = ["bundle", "iso"]

_NAMESPACE = uuid.UUID("6f1c2a52-8d0e-4b8e-9c61-3f0b1f6f2a10")
_V3_ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
_OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
_US_CORE = "http://hl7.org/fhir/us/core/StructureDefinition"


def iso(when: datetime) -> str:
    """ISO 8601 with an explicit UTC offset, e.g. 2023-04-01T08:30:00+00:00."""
    return when.isoformat()


def _coding(system: str, code: str, display: str) -> dict[str, Any]:
    return {"system": system, "code": code, "display": display}


def _concept(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [_coding(system, code, display)], "text": display}


class _Ids:
    def __init__(self, seed: int, mrn: str) -> None:
        self.prefix = f"{seed}/{mrn}"

    def __call__(self, kind: str, n: int = 0) -> str:
        return str(uuid.uuid5(_NAMESPACE, f"{self.prefix}/{kind}/{n}"))


def bundle(p: PatientSim, *, seed: int, n_slices: int) -> dict[str, Any]:
    """The transaction Bundle of one patient."""
    ids = _Ids(seed, p.mrn)
    pat_ref = {"reference": f"urn:uuid:{ids('patient')}"}
    enc_id = ids("encounter", 1)
    enc_ref = {"reference": f"urn:uuid:{enc_id}"}
    resources: list[dict[str, Any]] = [_patient(p, ids("patient"))]
    resources.append({
        "resourceType": "Encounter", "id": ids("encounter", 0), "status": "finished",
        "class": _coding(_V3_ACT, "EMER", "emergency"),
        "type": [_concept(codes.SNOMED, "50849002", "Emergency room admission")],
        "subject": pat_ref,
        "period": {"start": iso(p.ed_arrival), "end": iso(p.admission)},
    })
    # No period.end: a discharge time would be visible in the as-of view and is outcome-laden.
    resources.append({
        "resourceType": "Encounter", "id": enc_id, "status": "in-progress",
        "class": _coding(_V3_ACT, "IMP", "inpatient encounter"),
        "type": [_concept(codes.SNOMED, "32485007", "Hospital admission")],
        "subject": pat_ref, "period": {"start": iso(p.admission)},
        "reasonCode": [_concept(codes.SNOMED, p.reason[0], p.reason[1])],
    })
    hard = isinstance(p, HardPatientSim)
    if isinstance(p, HardPatientSim):  # --realism hard: the site (hospital) of the admission
        resources[-1]["serviceProvider"] = {"display": p.site}
    if p.event_type == "icu" and p.event_time is not None:
        resources.append({
            "resourceType": "Encounter", "id": ids("encounter", 2), "status": "in-progress",
            "class": _coding(_V3_ACT, "ACUTE", "inpatient acute"),
            "type": [_concept(codes.SNOMED, "305351004", "Admission to intensive care unit")],
            "subject": pat_ref, "period": {"start": iso(p.event_time)},
            "location": [{"location": {"display": "Medical intensive care unit"},
                          "status": "active"}],
            "partOf": enc_ref,
        })
    for k, obs in enumerate(p.observations):
        resources.append(_observation(obs, ids("observation", k), pat_ref, enc_ref))
    for k, (code, display, onset) in enumerate(p.conditions):
        resources.append({
            "resourceType": "Condition", "id": ids("condition", k),
            "clinicalStatus": _concept("http://terminology.hl7.org/CodeSystem/condition-clinical",
                                       "active", "Active"),
            "verificationStatus": _concept(
                "http://terminology.hl7.org/CodeSystem/condition-ver-status", "confirmed",
                "Confirmed"),
            "code": _concept(codes.SNOMED, code, display),
            "subject": pat_ref, "onsetDateTime": iso(onset), "recordedDate": iso(onset),
        })
    for k, (code, display, authored) in enumerate(p.medications):
        resources.append({
            "resourceType": "MedicationRequest", "id": ids("medication", k), "status": "active",
            "intent": "order", "medicationCodeableConcept": _concept(codes.RXNORM, code, display),
            "subject": pat_ref, "authoredOn": iso(authored),
        })
    for k, note in enumerate(p.notes):
        data = base64.b64encode(note.text.encode("utf-8")).decode("ascii")
        resources.append({
            "resourceType": "DocumentReference", "id": ids("note", k), "status": "current",
            "type": _concept(codes.LOINC, note.loinc, note.display),
            "category": [_concept("http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category",
                                  "clinical-note", "Clinical Note")],
            "subject": pat_ref, "date": iso(note.time),
            "content": [{"attachment": {"contentType": "text/plain; charset=utf-8",
                                        "data": data, "creation": iso(note.time)}}],
            "context": {"encounter": [enc_ref], "period": {"start": iso(note.time)}},
        })
    if not p.withheld_imaging and hard:
        resources.append(_radiograph_study(p, ids("imaging"), pat_ref, enc_ref))
    elif not p.withheld_imaging:
        resources.append(_imaging_study(p, ids("imaging"), pat_ref, enc_ref, seed, n_slices))
    entries = []
    for res in resources:
        entries.append({"fullUrl": f"urn:uuid:{res['id']}", "resource": res,
                        "request": {"method": "POST", "url": res["resourceType"]}})
    return {"resourceType": "Bundle", "id": ids("bundle"), "type": "transaction",
            "entry": entries}


def _patient(p: PatientSim, rid: str) -> dict[str, Any]:
    race_system = codes.OMB if p.race[0] != "UNK" else \
        "http://terminology.hl7.org/CodeSystem/v3-NullFlavor"
    res: dict[str, Any] = {
        "resourceType": "Patient", "id": rid,
        "extension": [
            {"url": f"{_US_CORE}/us-core-race", "extension": [
                {"url": "ombCategory", "valueCoding": _coding(race_system, *p.race)},
                {"url": "text", "valueString": p.race[1]}]},
            {"url": f"{_US_CORE}/us-core-ethnicity", "extension": [
                {"url": "ombCategory", "valueCoding": _coding(codes.OMB, *p.ethnicity)},
                {"url": "text", "valueString": p.ethnicity[1]}]},
        ],
        "identifier": [{
            "use": "usual",
            "type": _concept("http://terminology.hl7.org/CodeSystem/v2-0203", "MR",
                             "Medical Record Number"),
            "system": codes.MRN_SYSTEM, "value": p.mrn,
        }],
        "name": [{"use": "official", "family": p.family, "given": [p.given]}],
        "gender": p.sex,
        "birthDate": p.birth_date.isoformat(),
        "communication": [{"language": _concept("urn:ietf:bcp:47", *p.language)}],
    }
    if p.event_type == "death" and p.event_time is not None:
        res["deceasedDateTime"] = iso(p.event_time)
    return res


def _observation(obs: Any, rid: str, pat_ref: dict[str, str], enc_ref: dict[str, str]
                 ) -> dict[str, Any]:
    code = obs.code
    category = "Vital Signs" if code.category == "vital-signs" else "Laboratory"
    return {
        "resourceType": "Observation", "id": rid, "status": "final",
        "category": [_concept(_OBS_CATEGORY, code.category, category)],
        "code": _concept(codes.LOINC, code.loinc, code.display),
        "subject": pat_ref, "encounter": enc_ref,
        "effectiveDateTime": iso(obs.time),
        "valueQuantity": {"value": obs.value, "unit": code.unit, "system": codes.UCUM,
                          "code": code.unit},
    }


def _imaging_study(p: PatientSim, rid: str, pat_ref: dict[str, str], enc_ref: dict[str, str],
                   seed: int, n_slices: int) -> dict[str, Any]:
    img = p.imaging
    instances = [{"uid": sop_instance_uid(seed, p, k),
                  "sopClass": {"system": "urn:ietf:rfc:3986",
                               "code": "urn:oid:1.2.840.10008.5.1.4.1.1.2"}}
                 for k in range(n_slices)]
    return {
        "resourceType": "ImagingStudy", "id": rid, "status": "available",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{img.study_uid}"},
                       {"type": _concept("http://terminology.hl7.org/CodeSystem/v2-0203", "ACSN",
                                         "Accession ID"), "value": img.accession}],
        "subject": pat_ref, "encounter": enc_ref, "started": iso(img.acquired),
        "modality": [_coding("http://dicom.nema.org/resources/ontology/DCM", "CT",
                             "Computed Tomography")],
        "numberOfSeries": 1, "numberOfInstances": n_slices,
        "description": "CT CHEST WITHOUT CONTRAST",
        "series": [{
            "uid": img.series_uid, "number": 1,
            "modality": _coding("http://dicom.nema.org/resources/ontology/DCM", "CT",
                                "Computed Tomography"),
            "numberOfInstances": n_slices,
            "bodySite": _coding(codes.SNOMED, "51185008", "Thoracic structure"),
            "started": iso(img.acquired),
            "instance": instances,
        }],
    }


def _radiograph_study(p: PatientSim, rid: str, pat_ref: dict[str, str],
                      enc_ref: dict[str, str]) -> dict[str, Any]:
    """--realism hard: one chest radiograph (DX), written as a PNG or JPEG, not DICOM."""
    img = p.imaging
    dx = _coding("http://dicom.nema.org/resources/ontology/DCM", "DX", "Digital Radiography")
    return {
        "resourceType": "ImagingStudy", "id": rid, "status": "available",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{img.study_uid}"},
                       {"type": _concept("http://terminology.hl7.org/CodeSystem/v2-0203", "ACSN",
                                         "Accession ID"), "value": img.accession}],
        "subject": pat_ref, "encounter": enc_ref, "started": iso(img.acquired),
        "modality": [dx], "numberOfSeries": 1, "numberOfInstances": 1,
        "description": "XR CHEST PA",
        "series": [{"uid": img.series_uid, "number": 1, "modality": dx, "numberOfInstances": 1,
                    "bodySite": _coding(codes.SNOMED, "51185008", "Thoracic structure"),
                    "started": iso(img.acquired)}],
    }
