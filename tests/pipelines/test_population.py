"""Population rules (issue 20): each rule passes, fails with a reason, or is unchecked.

Synthetic records test each rule; the shared Synthea Bundles (read in place) test the
two cases the issue found scored: outpatients with no inpatient stay, and a patient
who died in 1999 (scored as a 116-year-old).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from fhir_adapters.fhir_json import records_from_json
from fhir_adapters.record import Demographics, Encounter, Outcome, PatientRecord
from pipelines.population import PopulationRules, RuleResult, check_population
from pipelines.synth.codes import OUTCOME_DEFINITION
from tests.shared_data import shared_data_dir

T = datetime(2024, 3, 10, 12, 0, tzinfo=UTC)
RULES = {"description": "adult inpatients still admitted 72 h after admission",
         "alive": True, "inpatient_encounter_active": True,
         "min_hours_since_admission": 72, "min_age_years": 18}


def record(*, encounters: list[Encounter] | None = None, born: date | None = date(1960, 1, 1),
           died: datetime | None = None, deceased: bool | None = None) -> PatientRecord:
    return PatientRecord(key=None, resource_id="p1",
                         demographics=Demographics(birth_date=born),
                         encounters=list(encounters or []),
                         outcome=Outcome(deceased=deceased if died is None else True,
                                         deceased_time=died))


def stay(hours_before: float, *, cls: str = "IMP", status: str = "in-progress",
         ended_hours_after: float | None = None) -> Encounter:
    start = T - timedelta(hours=hours_before)
    end = None if ended_hours_after is None else T + timedelta(hours=ended_hours_after)
    return Encounter(cls, status, start, end)


def results(rec: PatientRecord, rules: dict[str, object] | None = None) -> dict[str, RuleResult]:
    return {r.rule: r for r in PopulationRules.from_config(rules or RULES).check(rec, T)}


def test_an_inpatient_admitted_long_enough_passes_every_rule() -> None:
    got = results(record(encounters=[stay(80)]))
    assert {k: r.status for k, r in got.items()} == {
        "alive": "pass", "inpatient_encounter_active": "pass",
        "min_hours_since_admission": "pass", "min_age_years": "pass"}
    assert check_population(RULES, record(encounters=[stay(80)]), T) == (None, [])
    # An ICU stay (class ACUTE) within the admission counts; the admission sets the hours.
    icu = Encounter("ACUTE", "in-progress", T - timedelta(hours=10))
    assert check_population(RULES, record(encounters=[stay(100), icu]), T) == (None, [])


@pytest.mark.parametrize(("encounters", "reason"), [
    ([stay(80, cls="AMB", status="finished", ended_hours_after=-79)],
     "no inpatient encounter active at the index time"),
    # Discharged before the index time, or admitted after it.
    ([stay(200, status="finished", ended_hours_after=-1)],
     "no inpatient encounter active at the index time"),
    ([stay(-5)], "no inpatient encounter active at the index time"),
    ([stay(80, status="cancelled")], "no inpatient encounter active at the index time"),
    ([stay(80, status="finished")], "no inpatient encounter active at the index time"),
])
def test_no_active_inpatient_stay_fails(encounters: list[Encounter], reason: str) -> None:
    got = results(record(encounters=encounters))
    assert got["inpatient_encounter_active"] == RuleResult("inpatient_encounter_active",
                                                           "fail", reason)
    refusal, _ = check_population(RULES, record(encounters=encounters), T)
    # The shared reason appears once, with the population's description.
    assert refusal == f"out of population: {reason} ({RULES['description']})"


def test_too_soon_after_admission_fails_with_the_hours() -> None:
    # Still admitted (discharged after the index time: the stay covers it), but 40 h in.
    got = results(record(encounters=[stay(40, status="finished", ended_hours_after=30)]))
    assert got["inpatient_encounter_active"].status == "pass"
    assert got["min_hours_since_admission"] == RuleResult(
        "min_hours_since_admission", "fail",
        "admitted 40 h before the index time, less than 72 h")
    assert results(record(encounters=[stay(72)]))["min_hours_since_admission"].status == "pass"


def test_deceased_fails_and_a_later_death_passes() -> None:
    dead = record(encounters=[stay(80)], died=T - timedelta(days=1))
    assert results(dead)["alive"] == RuleResult("alive", "fail", "deceased before the index time")
    assert results(record(encounters=[stay(80)], died=T + timedelta(days=3)))["alive"].status \
        == "pass"
    assert results(record(encounters=[stay(80)], deceased=True))["alive"] == RuleResult(
        "alive", "fail", "recorded as deceased (no date of death)")


def test_age_fails_below_the_minimum_and_is_unchecked_without_birth_date() -> None:
    child = record(encounters=[stay(80)], born=date(2015, 1, 1))
    assert results(child)["min_age_years"] == RuleResult("min_age_years", "fail",
                                                         "age below 18 years")
    assert check_population(RULES, child, T)[0] == (
        f"out of population: age below 18 years ({RULES['description']})")
    refusal, unchecked = check_population(RULES, record(encounters=[stay(80)], born=None), T)
    assert refusal is None
    assert unchecked == ["population rule unchecked: min_age_years (the record has no birth "
                         "date)"]


def test_no_encounters_at_all_is_unchecked_not_refused() -> None:
    refusal, unchecked = check_population(RULES, record(), T)
    assert refusal is None
    assert [u.split(" (")[0] for u in unchecked] == [
        "population rule unchecked: inpatient_encounter_active",
        "population rule unchecked: min_hours_since_admission"]
    assert "has no encounters" in unchecked[0]


def test_old_configs_check_age_only() -> None:
    old = {"description": "adult inpatients (age >= 18) still admitted 72 h after admission",
           "min_age_years": 18.0}
    rules = PopulationRules.from_config(old)
    assert (rules.alive, rules.inpatient_encounter_active,
            rules.min_hours_since_admission, rules.min_age_years) == (False, False, None, 18.0)
    outpatient = record(encounters=[stay(80, cls="AMB")])
    assert check_population(old, outpatient, T) == (None, [])
    # The oldest artifacts: a bare description string, its age read as training reads it.
    assert PopulationRules.from_config("adults on the ward").min_age_years == 18.0
    assert check_population("adults", record(born=date(2015, 1, 1)), T)[0] == (
        "out of population: age below 18 years (adults)")
    assert check_population(None, outpatient, T) == (None, [])
    with pytest.raises(ValueError, match=r"population\.min_hours_since_admission"):
        PopulationRules.from_config({"min_hours_since_admission": "72"})


def test_the_synth_outcome_states_the_rules_of_its_description() -> None:
    rules = PopulationRules.from_config({"description": OUTCOME_DEFINITION["population"],
                                         **OUTCOME_DEFINITION["population_rules"]})
    assert (rules.alive, rules.inpatient_encounter_active, rules.min_hours_since_admission,
            rules.min_age_years) == (True, True, 72, 18)


def synthea(name: str) -> PatientRecord:
    folder = shared_data_dir("fhir/synthea_r4_bundles")
    [rec] = records_from_json(next(folder.glob(f"{name}_*.json")).read_bytes())
    return rec


def test_synthea_outpatients_and_the_dead_are_refused() -> None:
    now = datetime(2026, 12, 1, tzinfo=UTC)
    for name in ("Carlota_Muro", "Milan_Beatty", "Gloria_Covarrubias"):
        refusal, unchecked = check_population(RULES, synthea(name), now)
        assert refusal == ("out of population: no inpatient encounter active at the index "
                           f"time ({RULES['description']})"), name
        assert unchecked == []
    # Born 1910, died 1999: refused as deceased, not scored as a 116-year-old.
    refusal, _ = check_population(RULES, synthea("Sydney_Oberbrunner"), now)
    assert refusal is not None and refusal.startswith(
        "out of population: deceased before the index time; no inpatient encounter")
    # Deidre's 2017 stay (16 Jan 16:27 to 17 Jan 18:27): admitted but for less than 72 h.
    deidre = synthea("Deidre_Daniel")
    during = datetime(2017, 1, 17, 12, 0, tzinfo=UTC)
    assert results(deidre)["inpatient_encounter_active"].status == "fail"
    got = {r.rule: r for r in PopulationRules.from_config(RULES).check(deidre, during)}
    assert got["inpatient_encounter_active"].status == "pass"
    assert got["min_hours_since_admission"].reason == (
        "admitted 20 h before the index time, less than 72 h")


def test_a_research_manifest_flags_the_rules_it_cannot_check() -> None:
    from pipelines.scoring import manifest_unchecked
    assert manifest_unchecked(RULES) == [
        f"population rule unchecked: {name} (a manifest row has no record to check it "
        "against)" for name in ("alive", "inpatient_encounter_active",
                                "min_hours_since_admission")]
    assert manifest_unchecked({"description": "adults", "min_age_years": 18}) == []
