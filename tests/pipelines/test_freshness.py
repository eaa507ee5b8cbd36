"""Data freshness rules (issue 20): stale or absent vitals and labs withhold or flag."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from fhir_adapters.record import Observation, PatientRecord
from pipelines.freshness import FreshnessRules, check_freshness

T = datetime(2024, 3, 10, 12, 0, tzinfo=UTC)
RULES = {"vitals_hours": 24, "labs_hours": 72}


def obs(category: str, hours_before: float) -> Observation:
    return Observation("8867-4", "http://loinc.org", None, 80.0, "/min",
                       T - timedelta(hours=hours_before), category=category)


def record(*observations: Observation) -> PatientRecord:
    return PatientRecord(key=None, resource_id="p1", observations=list(observations))


def test_fresh_inputs_pass_and_report_their_age() -> None:
    got = check_freshness(RULES, record(obs("vital-signs", 2), obs("vital-signs", 30),
                                        obs("laboratory", 50)), T)
    assert got.problems == [] and got.refusal is None and got.warnings == []
    assert got.hours_since == {"vitals": 2.0, "labs": 50.0}


def test_stale_or_missing_inputs_withhold_the_score() -> None:
    # A vital sign after the index time does not make the record fresh.
    got = check_freshness(RULES, record(obs("vital-signs", 30), obs("vital-signs", -1)), T)
    assert got.hours_since == {"vitals": 30.0, "labs": None}
    assert got.refusal == ("insufficient data: newest vital signs 30 h before the index "
                           "time, older than 24 h; no laboratory results before the index time")
    assert got.warnings == []


def test_flag_action_scores_with_a_stale_warning() -> None:
    got = check_freshness({**RULES, "action": "flag"}, record(obs("laboratory", 100)), T)
    assert got.refusal is None
    assert got.warnings == ["stale data: no vital signs before the index time",
                            "stale data: newest laboratory results 100 h before the index "
                            "time, older than 72 h"]


def test_no_rules_check_nothing_and_bad_rules_are_named() -> None:
    got = check_freshness(None, record(), T)
    assert got.problems == [] and got.hours_since == {"vitals": None, "labs": None}
    with pytest.raises(ValueError, match=r"freshness\.vitals_hours"):
        FreshnessRules.from_config({"vitals_hours": -1})
    with pytest.raises(ValueError, match=r"freshness\.action"):
        FreshnessRules.from_config({"action": "hide"})
