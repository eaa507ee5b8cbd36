"""Terminology the synthetic cohort writes: LOINC, UCUM, SNOMED CT, RxNorm, OMB race.

Everything coded lives here so the writers (FHIR, HL7 v2, DICOM) agree, and so
the outcome definition is stated once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "ADMISSION_REASONS",
    "COMORBIDITIES",
    "ETHNICITIES",
    "HOME_MEDICATIONS",
    "MRN_AUTHORITY",
    "MRN_OID",
    "MRN_SYSTEM",
    "OUTCOME_DEFINITION",
    "OUTCOME_TERMS",
    "RACES",
    "ObservationCode",
    "observation_codes",
]

#: Assigning authority of the medical record numbers (FHIR system, HL7 CX-4, DICOM issuer).
MRN_OID = "2.16.840.1.113883.3.9999.1"
MRN_SYSTEM = f"urn:oid:{MRN_OID}"
MRN_AUTHORITY = "SYNTHHOSP"

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"
OMB = "urn:oid:2.16.840.1.113883.6.238"

#: Words no note phrase and no DICOM tag may contain (case-insensitive substrings).
OUTCOME_TERMS: tuple[str, ...] = ("icu", "death", "died", "dead", "expired", "deteriorat",
                                  "transfer", "intensive care", "mortality", "deceased")

#: The label, stated once; written to truth.yaml and manifest.yaml.
OUTCOME_DEFINITION: dict[str, Any] = {
    "name": "deterioration",
    "definition": "death or ICU transfer within 30 days of the index time",
    "horizon_days": 30,
    "index_time": "72 h after inpatient admission",
    "population": "adult inpatients (age >= 18) still admitted 72 h after admission",
    # The same population as rules the service checks (pipelines/population.py).
    "population_rules": {"alive": True, "inpatient_encounter_active": True,
                         "min_hours_since_admission": 72, "min_age_years": 18},
    "coding": {
        "death": {"system": SNOMED, "code": "419620001", "display": "Death",
                  "fhir": "Patient.deceasedDateTime"},
        "icu_transfer": {"system": SNOMED, "code": "305351004",
                         "display": "Admission to intensive care unit",
                         "fhir": "Encounter (class ACUTE, type SNOMED 305351004, partOf the "
                                 "inpatient encounter)"},
    },
}


@dataclass(frozen=True)
class ObservationCode:
    """How one measurement is written: LOINC code and UCUM unit.

    ``to_spec`` converts a value in ``unit`` to the DEFAULT_SPEC unit of the
    feature; ``from_spec`` is its inverse. The factors are this module's own
    (UCUM definitions and molar masses), not the adapter's unit table.
    """

    loinc: str
    display: str
    unit: str
    scale: float = 1.0  # spec value = value * scale + offset
    offset: float = 0.0
    decimals: int = 1
    category: str = "laboratory"

    def to_spec(self, value: float) -> float:
        if self.scale == 1.0 and self.offset == 0.0:
            return value
        return value * self.scale + self.offset

    def from_spec(self, value: float) -> float:
        return (value - self.offset) / self.scale


_GLUCOSE_MOLAR = 180.156
_CREATININE_MOLAR = 113.12
_LACTATE = "Lactate [Moles/volume] in"

#: Per feature: the primary coding, then alternatives (commensurable units or codes).
_CODES: dict[str, tuple[ObservationCode, ...]] = {
    "heart_rate": (ObservationCode("8867-4", "Heart rate", "/min", decimals=0,
                                   category="vital-signs"),),
    "resp_rate": (ObservationCode("9279-1", "Respiratory rate", "/min", decimals=0,
                                  category="vital-signs"),),
    "sbp": (ObservationCode("8480-6", "Systolic blood pressure", "mm[Hg]", decimals=0,
                            category="vital-signs"),),
    "temperature": (
        ObservationCode("8310-5", "Body temperature", "Cel", decimals=1, category="vital-signs"),
        ObservationCode("8310-5", "Body temperature", "[degF]", scale=5 / 9,
                        offset=-32 * 5 / 9, decimals=1, category="vital-signs"),
    ),
    "spo2": (
        ObservationCode("59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry", "%",
                        decimals=1, category="vital-signs"),
        ObservationCode("2708-6", "Oxygen saturation in Arterial blood", "%", decimals=1,
                        category="vital-signs"),
    ),
    "lactate": (
        ObservationCode("2524-7", f"{_LACTATE} Serum or Plasma", "mmol/L", decimals=1),
        ObservationCode("32693-4", f"{_LACTATE} Blood", "mmol/L", decimals=1),
    ),
    "wbc": (ObservationCode("6690-2", "Leukocytes [#/volume] in Blood by Automated count",
                            "10*3/uL", decimals=1),),
    "creatinine": (
        ObservationCode("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL",
                        decimals=2),
        # umol/L -> mg/dL: x 1e-6 mol/L x 113.12 g/mol = g/L; / 10 -> g/dL; x 1000 -> mg/dL.
        ObservationCode("14682-9", "Creatinine [Moles/volume] in Serum or Plasma", "umol/L",
                        scale=_CREATININE_MOLAR * 1e-4, decimals=0),
    ),
    "glucose": (
        ObservationCode("2345-7", "Glucose [Mass/volume] in Serum or Plasma", "mg/dL",
                        decimals=0),
        ObservationCode("15074-8", "Glucose [Moles/volume] in Blood", "mmol/L",
                        scale=_GLUCOSE_MOLAR * 0.1, decimals=1),
    ),
    "sodium": (
        ObservationCode("2951-2", "Sodium [Moles/volume] in Serum or Plasma", "mmol/L",
                        decimals=0),
        ObservationCode("2951-2", "Sodium [Moles/volume] in Serum or Plasma", "mEq/L",
                        decimals=0),  # monovalent: 1 mEq/L = 1 mmol/L
    ),
    "hemoglobin": (ObservationCode("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL",
                                   decimals=1),),
}


def observation_codes(feature: str) -> tuple[ObservationCode, ...]:
    """The codings a feature may be written with; the first is the spec's own unit."""
    try:
        return _CODES[feature]
    except KeyError:
        raise KeyError(f"no synthetic coding for feature {feature!r}; "
                       f"known: {sorted(_CODES)}") from None


#: (OMB code, display, cohort share). ``UNK`` is a v3 NullFlavor.
RACES: tuple[tuple[str, str, float], ...] = (
    ("2106-3", "White", 0.60),
    ("2054-5", "Black or African American", 0.20),
    ("2028-9", "Asian", 0.08),
    ("1002-5", "American Indian or Alaska Native", 0.02),
    ("2076-8", "Native Hawaiian or Other Pacific Islander", 0.01),
    ("UNK", "Unknown", 0.09),
)
ETHNICITIES: tuple[tuple[str, str, float], ...] = (
    ("2135-2", "Hispanic or Latino", 0.17),
    ("2186-5", "Not Hispanic or Latino", 0.83),
)

#: (SNOMED code, display, prevalence): chronic conditions, pure noise for the outcome.
COMORBIDITIES: tuple[tuple[str, str, float], ...] = (
    ("38341003", "Hypertensive disorder", 0.45),
    ("44054006", "Diabetes mellitus type 2", 0.25),
    ("13645005", "Chronic obstructive lung disease", 0.15),
    ("709044004", "Chronic kidney disease", 0.12),
    ("84114007", "Heart failure", 0.12),
)
#: (SNOMED code, display, phrase for notes): the reason for admission, noise too.
ADMISSION_REASONS: tuple[tuple[str, str, str], ...] = (
    ("233604007", "Pneumonia", "community-acquired pneumonia"),
    ("128045006", "Cellulitis", "cellulitis of the lower leg"),
    ("68566005", "Urinary tract infectious disease", "a urinary tract infection"),
    ("195951007", "Acute exacerbation of chronic obstructive airways disease",
     "an exacerbation of COPD"),
    ("42343007", "Congestive heart failure", "volume overload from heart failure"),
)
#: (RxNorm code, display): home medications.
HOME_MEDICATIONS: tuple[tuple[str, str], ...] = (
    ("314076", "lisinopril 10 MG Oral Tablet"),
    ("860975", "24 HR metformin hydrochloride 500 MG Extended Release Oral Tablet"),
    ("259255", "atorvastatin 80 MG Oral Tablet"),
    ("197361", "amlodipine 5 MG Oral Tablet"),
    ("309362", "clopidogrel 75 MG Oral Tablet"),
    ("313782", "acetaminophen 325 MG Oral Tablet"),
)
