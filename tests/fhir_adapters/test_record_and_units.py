"""The as-of view hides the future; UCUM conversions match published factors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from fhir_adapters.errors import UnitError
from fhir_adapters.record import (
    Note,
    Observation,
    Outcome,
    PatientIdentifier,
    PatientRecord,
    merge_records,
    record_from_json,
)
from fhir_adapters.units import convert

T = datetime(2026, 1, 1, tzinfo=UTC)


def test_as_of_hides_everything_later_and_undated() -> None:
    record = PatientRecord(
        key=PatientIdentifier("s", "v"),
        observations=[Observation("1", None, None, 1.0, "1", T - timedelta(hours=1)),
                      Observation("2", None, None, 2.0, "1", T + timedelta(seconds=1)),
                      Observation("3", None, None, 3.0, "1", None)],
        notes=[Note("later", None, T + timedelta(days=1))],
        outcome=Outcome(deceased=True, deceased_time=T + timedelta(days=3)),
    )
    view = record.as_of(T)
    assert [o.code for o in view.observations] == ["1"]
    assert view.notes == [] and view.outcome.deceased is None
    assert view.index_time == T
    assert len(record.observations) == 3  # the original is untouched


def test_as_of_hides_encounter_end_and_abatement_after_index() -> None:
    from fhir_adapters.record import Condition, Encounter

    record = PatientRecord(
        key=None,
        encounters=[Encounter("IMP", "finished", T - timedelta(days=2), T + timedelta(days=5))],
        conditions=[Condition("1", None, None, T - timedelta(days=9), T + timedelta(days=1))],
    )
    view = record.as_of(T)
    assert view.encounters[0].end is None and view.encounters[0].start is not None
    assert view.conditions[0].abatement is None


def test_as_of_treats_naive_time_as_utc() -> None:
    record = PatientRecord(key=None, observations=[
        Observation("1", None, None, 1.0, "1", T)])
    assert record.as_of(datetime(2026, 1, 1)).observations


def test_json_round_trip() -> None:
    record = PatientRecord(key=PatientIdentifier("s", "v"), resource_id="r",
                           observations=[Observation("1", "x", None, 1.5, "mg/dL", T)])
    assert record_from_json(record.to_json()) == record


def test_merge_by_shared_identifier() -> None:
    a = PatientRecord(key=PatientIdentifier("s", "1"), identifiers=(PatientIdentifier("s", "1"),),
                      notes=[Note("a", None, T)])
    b = PatientRecord(key=PatientIdentifier("s", "1"), identifiers=(PatientIdentifier("s", "1"),),
                      notes=[Note("b", None, T)])
    merged = merge_records([a, b])
    assert len(merged) == 1 and [n.text for n in merged[0].notes] == ["a", "b"]


@pytest.mark.parametrize(("value", "src", "dst", "kwargs", "expected"), [
    (100.0, "mg/dL", "mmol/L", {"molar_mass": 180.156}, 5.5507),  # glucose
    (1.0, "mg/dL", "umol/L", {"molar_mass": 113.12}, 88.40),  # creatinine
    (98.6, "[degF]", "Cel", {}, 37.0),
    (140.0, "mEq/L", "mmol/L", {"valence": 1}, 140.0),
    (7.5, "x10E3/uL", "10*9/L", {}, 7.5),
    (12.0, "kPa", "mm[Hg]", {}, 90.0074),
    (154.0, "[lb_av]", "kg", {}, 69.853),
])
def test_conversions(value: float, src: str, dst: str, kwargs: dict[str, float],
                     expected: float) -> None:
    assert convert(value, src, dst, **kwargs) == pytest.approx(expected, rel=1e-4)  # type: ignore[arg-type]


def test_mass_to_substance_without_molar_mass_is_incommensurable() -> None:
    with pytest.raises(UnitError, match="molar mass"):
        convert(100.0, "mg/dL", "mmol/L", where="Observation/x")


def test_unknown_unit_is_named() -> None:
    with pytest.raises(UnitError, match="furlong"):
        convert(1.0, "furlong", "m")
