"""The model's intended population as structured rules, checked against a patient's record.

A model config's ``population`` states who the model is for. Since issue 20 it holds
structured rules beside the free-text ``description``::

    population:
      description: adult inpatients (age >= 18) still admitted 72 h after admission
      alive: true                        # no death at or before the index time
      inpatient_encounter_active: true   # an inpatient Encounter covers the index time
      min_hours_since_admission: 72      # ... and began at least this long before it
      min_age_years: 18

Older artifacts carry only ``description`` and ``min_age_years`` (or, older still, a
bare description string); they are read as the age rule alone, as before.

Each rule, checked against a :class:`~fhir_adapters.record.PatientRecord` at the
index time, *passes*, *fails* with a reason (the prediction is refused), or is
*unchecked* with a reason: the input cannot answer it (a record with no Encounters
at all cannot say whether the patient is admitted). An unchecked rule never refuses
and is never silently accepted: the prediction carries a "population rule unchecked"
warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from fhir_adapters.record import PatientRecord, ensure_utc

__all__ = ["INPATIENT_CLASSES", "PopulationRules", "RuleResult", "check_population"]

#: FHIR v3 ActCode encounter classes that are an inpatient stay (inpatient, inpatient
#: acute -- an ICU stay is one -- and inpatient non-acute), plus the words some systems
#: send as the code and HL7 v2's PV1-2 "I" (as services/cohort_export.py accepts it).
INPATIENT_CLASSES = frozenset({"IMP", "ACUTE", "NONAC", "inpatient", "INPATIENT", "I"})
#: Encounter statuses that say the stay never happened or is not under way.
_NOT_UNDER_WAY = frozenset({"planned", "cancelled", "entered-in-error"})

Status = Literal["pass", "fail", "unchecked"]


@dataclass(frozen=True)
class RuleResult:
    """One population rule's answer for one record at one index time."""

    rule: str
    status: Status
    reason: str | None = None


@dataclass(frozen=True)
class PopulationRules:
    """The structured population of a model config (see the module docstring)."""

    description: str = ""
    alive: bool = False
    inpatient_encounter_active: bool = False
    min_hours_since_admission: float | None = None
    min_age_years: float | None = None

    @classmethod
    def from_config(cls, population: Any) -> PopulationRules:
        """Read a config's ``population`` (a mapping, an old free-text string, or None)."""
        if population is None:
            return cls()
        if isinstance(population, str):
            # The oldest artifacts: free text only; its age, as training read it.
            from pipelines.training import min_age_of
            return cls(description=population,
                       min_age_years=min_age_of({"population": population}))
        if not isinstance(population, dict):
            raise ValueError(f"model config 'population' must be a mapping or a string, "
                             f"not {type(population).__name__}")

        def number(key: str) -> float | None:
            value = population.get(key)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"model config 'population.{key}' must be a number")
            return float(value)

        def flag(key: str) -> bool:
            value = population.get(key, False)
            if not isinstance(value, bool):
                raise ValueError(f"model config 'population.{key}' must be true or false")
            return value

        return cls(description=str(population.get("description") or ""),
                   alive=flag("alive"),
                   inpatient_encounter_active=flag("inpatient_encounter_active"),
                   min_hours_since_admission=number("min_hours_since_admission"),
                   min_age_years=number("min_age_years"))

    def to_config(self) -> dict[str, Any]:
        """The ``population`` mapping a model config stores."""
        return {"description": self.description, "alive": self.alive,
                "inpatient_encounter_active": self.inpatient_encounter_active,
                "min_hours_since_admission": self.min_hours_since_admission,
                "min_age_years": self.min_age_years}

    def check(self, record: PatientRecord, index_time: datetime) -> list[RuleResult]:
        """Every stated rule's result for ``record`` at ``index_time``."""
        t = ensure_utc(index_time)
        results: list[RuleResult] = []
        if self.alive:
            results.append(_alive(record, t))
        if self.inpatient_encounter_active or self.min_hours_since_admission is not None:
            results.extend(self._stay(record, t))
        if self.min_age_years is not None:
            results.append(_age(record, t, self.min_age_years))
        return results

    def _stay(self, record: PatientRecord, t: datetime) -> list[RuleResult]:
        rules = (["inpatient_encounter_active"] if self.inpatient_encounter_active else []) + (
            ["min_hours_since_admission"] if self.min_hours_since_admission is not None
            else [])
        if not record.encounters:
            return [RuleResult(r, "unchecked", "the record has no encounters, so whether "
                               "the patient is an admitted inpatient cannot be told")
                    for r in rules]
        stays = [e for e in record.encounters if e.encounter_class in INPATIENT_CLASSES
                 and e.status not in _NOT_UNDER_WAY and e.start is not None
                 and ensure_utc(e.start) <= t
                 and (ensure_utc(e.end) > t if e.end is not None
                      else e.status != "finished")]
        if not stays:
            return [RuleResult(r, "fail", "no inpatient encounter active at the index time")
                    for r in rules]
        out = [RuleResult("inpatient_encounter_active", "pass")] if (
            self.inpatient_encounter_active) else []
        if self.min_hours_since_admission is not None:
            # The stay's admission: the earliest start among the overlapping inpatient
            # encounters (an ICU encounter is part of the admission that preceded it).
            admitted = min(ensure_utc(e.start) for e in stays if e.start is not None)
            hours = (t - admitted) / timedelta(hours=1)
            if hours < self.min_hours_since_admission:
                out.append(RuleResult("min_hours_since_admission", "fail",
                                      f"admitted {hours:.0f} h before the index time, less "
                                      f"than {self.min_hours_since_admission:g} h"))
            else:
                out.append(RuleResult("min_hours_since_admission", "pass"))
        return out


def _alive(record: PatientRecord, t: datetime) -> RuleResult:
    outcome = record.outcome
    if outcome.deceased_time is not None:
        if ensure_utc(outcome.deceased_time) <= t:
            return RuleResult("alive", "fail", "deceased before the index time")
        return RuleResult("alive", "pass")
    if outcome.deceased:
        # Deceased with no date: the death may precede the index time; never score it.
        return RuleResult("alive", "fail", "recorded as deceased (no date of death)")
    return RuleResult("alive", "pass")


def _age(record: PatientRecord, t: datetime, minimum: float) -> RuleResult:
    age = record.demographics.age_at(t)
    if age is None:
        return RuleResult("min_age_years", "unchecked", "the record has no birth date")
    if age < minimum:
        return RuleResult("min_age_years", "fail", f"age below {minimum:g} years")
    return RuleResult("min_age_years", "pass")


def check_population(population: Any, record: PatientRecord, index_time: datetime
                     ) -> tuple[str | None, list[str]]:
    """(the refusal, or None; the "population rule unchecked: ..." warnings).

    ``population`` is the model config's ``population``. The refusal reads
    "out of population: <reasons> (<description>)", as the age refusal always has.
    """
    rules = PopulationRules.from_config(population)
    results = rules.check(record, index_time)
    failed = list(dict.fromkeys(r.reason or r.rule for r in results if r.status == "fail"))
    unchecked = [f"population rule unchecked: {r.rule} ({r.reason})"
                 for r in results if r.status == "unchecked"]
    refusal = None
    if failed:
        refusal = f"out of population: {'; '.join(failed)} ({rules.description})"
    return refusal, unchecked
