"""EHR features against values worked out by hand."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta

import pytest
from sklearn.exceptions import NotFittedError

from fhir_adapters.errors import UnitError
from fhir_adapters.record import Demographics, Observation, PatientIdentifier, PatientRecord
from pipelines.ehr_features import EHRFeatureBuilder
from pipelines.feature_spec import DEFAULT_SPEC, STATISTICS, FeatureSpec, LabFeature

#: The default features with the 24 h and 72 h windows and recency columns as well.
WINDOWED = FeatureSpec(features=DEFAULT_SPEC.features, windows_hours=(24.0, 72.0),
                       statistics=STATISTICS, course_hours=120.0, recency=True)
INDEX = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
LOINC = "http://loinc.org"


def obs(code: str, value: float, unit: str, hours_before: float) -> Observation:
    return Observation(code, LOINC, None, value, unit, INDEX - timedelta(hours=hours_before))


def patient(observations: list[Observation], birth: date | None = date(1956, 3, 10)
            ) -> PatientRecord:
    return PatientRecord(key=PatientIdentifier("urn:mrn", "1"), demographics=Demographics(
        sex="male", birth_date=birth), observations=observations)


def row(record: PatientRecord, spec: FeatureSpec = WINDOWED) -> dict[str, float]:
    table = EHRFeatureBuilder(spec=spec).fit([record.as_of(INDEX)]).transform(
        [record.as_of(INDEX)])
    return table.iloc[0].to_dict()


def test_window_statistics_by_hand() -> None:
    record = patient([
        obs("2524-7", 2.0, "mmol/L", 10), obs("2524-7", 4.0, "mmol/L", 1),
        obs("2524-7", 1.0, "mmol/L", 30), obs("2524-7", 9.0, "mmol/L", -2),  # after index
    ])
    r = row(record)
    assert r["lactate_last_24h"] == 4.0
    assert r["lactate_min_24h"] == 2.0 and r["lactate_max_24h"] == 4.0
    assert r["lactate_mean_24h"] == 3.0
    # slope over (-10 h, 2.0), (-1 h, 4.0): 2.0 / (9/24 day)
    assert r["lactate_trend_24h"] == pytest.approx(2.0 / (9 / 24))
    assert r["lactate_min_72h"] == 1.0 and r["lactate_mean_72h"] == pytest.approx(7 / 3)
    assert r["lactate_hours_since_last"] == pytest.approx(1.0)
    assert r["lactate_missing"] == 0.0
    assert r["age_years"] == pytest.approx(25567 / 365.25)  # 70 y + 17 leap days


def test_single_point_has_no_trend_and_absent_feature_is_missing() -> None:
    r = row(patient([obs("8867-4", 88, "/min", 3)]))
    assert r["heart_rate_last_24h"] == 88 and math.isnan(r["heart_rate_trend_24h"])
    assert r["wbc_missing"] == 1.0 and math.isnan(r["wbc_last_72h"])
    assert math.isnan(r["wbc_hours_since_last"])


def test_commensurable_units_are_converted() -> None:
    r = row(patient([
        obs("15074-8", 5.5, "mmol/L", 2),  # glucose by substance, 180.156 g/mol
        obs("14682-9", 88.4, "umol/L", 2),  # creatinine, 113.12 g/mol
        obs("8310-5", 98.6, "[degF]", 2),
    ]))
    assert r["glucose_last_24h"] == pytest.approx(5.5 * 180.156 / 10)
    assert r["creatinine_last_24h"] == pytest.approx(88.4 * 113.12 / 10000)
    assert r["temperature_last_24h"] == pytest.approx(37.0)


def test_incommensurable_unit_is_an_error_naming_the_source() -> None:
    bad = Observation("2339-0", LOINC, None, 5.0, "kg", INDEX - timedelta(hours=1),
                      source="Observation/glu-1")
    with pytest.raises(UnitError, match=r"Observation/glu-1.*'kg'.*mass") as info:
        row(patient([bad]))
    assert "5.0" not in str(info.value)


def test_record_without_index_time_is_refused() -> None:
    builder = EHRFeatureBuilder().fit([patient([]).as_of(INDEX)])
    with pytest.raises(ValueError, match="as_of"):
        builder.transform([patient([])])


def test_transform_before_fit_raises() -> None:
    with pytest.raises(NotFittedError):
        EHRFeatureBuilder().transform([patient([]).as_of(INDEX)])


def test_fit_learns_only_from_training_records() -> None:
    train = [patient([obs("8867-4", v, "/min", 1)]).as_of(INDEX) for v in (60, 70, 80)]
    test = [patient([obs("8867-4", 200, "/min", 1)]).as_of(INDEX)]
    builder = EHRFeatureBuilder(spec=WINDOWED, impute=True).fit(train)
    before = builder.medians_.copy()
    builder.transform(test)
    assert builder.medians_.equals(before)
    assert before["heart_rate_last_24h"] == 70
    filled = builder.transform([patient([]).as_of(INDEX)])
    assert filled.loc[0, "heart_rate_last_24h"] == 70
    assert filled.loc[0, "heart_rate_missing"] == 1.0


def test_spec_round_trips_through_yaml(tmp_path) -> None:  # type: ignore[no-untyped-def]
    spec = FeatureSpec(features=(LabFeature("k", ("2823-3",), "mmol/L", "Potassium", 3.5, 5.1),),
                       windows_hours=(12.0,))
    spec.to_yaml(tmp_path / "spec.yaml")
    assert FeatureSpec.from_yaml(tmp_path / "spec.yaml") == spec
    assert spec.column_names()[:3] == ["age_years", "k_last_12h", "k_min_12h"]


def test_column_blocks_group_one_statistic_across_features() -> None:
    blocks = DEFAULT_SPEC.column_blocks()
    assert list(blocks) == ["course mean 120h", "course trend 120h", "course count 120h"]
    assert blocks["course trend 120h"][:2] == ["heart_rate_course_trend_120h",
                                               "resp_rate_course_trend_120h"]
    assert all(len(cols) == 11 for cols in blocks.values())
    # Every column but age is in exactly one block.
    flat = [c for cols in blocks.values() for c in cols]
    assert sorted(flat) == sorted(DEFAULT_SPEC.column_names()[1:])
    windowed = FeatureSpec(features=DEFAULT_SPEC.features[:2], windows_hours=(24.0,),
                           statistics=("last", "trend"), recency=True)
    assert windowed.column_blocks() == {
        "last 24h": ["heart_rate_last_24h", "resp_rate_last_24h"],
        "trend 24h": ["heart_rate_trend_24h", "resp_rate_trend_24h"],
        "hours since last": ["heart_rate_hours_since_last", "resp_rate_hours_since_last"],
        "missing": ["heart_rate_missing", "resp_rate_missing"]}


def test_spec_rejects_unknown_statistic() -> None:
    with pytest.raises(ValueError, match="median"):
        FeatureSpec(features=(), statistics=("median",))


def test_course_statistics_on_the_log_scale_by_hand() -> None:
    # The 100 h admission draw is outside both windows but inside the 120 h course.
    record = patient([
        obs("2524-7", 4.0, "mmol/L", 100), obs("2524-7", 2.0, "mmol/L", 52),
        obs("2524-7", 1.0, "mmol/L", 4), obs("2524-7", 8.0, "mmol/L", 130),  # before the course
        obs("8867-4", 90, "/min", 30), obs("8867-4", 110, "/min", 6),
    ])
    r = row(record)
    assert r["lactate_course_count_120h"] == 3.0
    # geometric mean of 4, 2, 1 is 2
    assert r["lactate_course_mean_120h"] == pytest.approx(math.log(2.0))
    days = [-100 / 24, -52 / 24, -4 / 24]
    logs = [math.log(4.0), math.log(2.0), 0.0]
    mx, my = sum(days) / 3, sum(logs) / 3
    slope = (sum((x - mx) * (y - my) for x, y in zip(days, logs, strict=True))
             / sum((x - mx) ** 2 for x in days))
    assert r["lactate_course_trend_120h"] == pytest.approx(slope)
    assert r["lactate_mean_72h"] == pytest.approx(1.5)  # the short window misses the ED draw
    # linear-scale features keep their unit: +20/min over one day
    assert r["heart_rate_course_mean_120h"] == pytest.approx(100.0)
    assert r["heart_rate_course_trend_120h"] == pytest.approx(20.0)
    assert r["wbc_course_count_120h"] == 0.0 and math.isnan(r["wbc_course_mean_120h"])


def test_saturation_of_100_percent_stays_finite_on_the_deficit_scale() -> None:
    r = row(patient([obs("59408-5", 100.0, "%", 2), obs("59408-5", 92.0, "%", 1)]))
    # ln(100 - 100) is floored at ln(0.5): the mean of ln 0.5 and ln 8 is ln 2
    assert r["spo2_course_mean_120h"] == pytest.approx(math.log(2.0))


def test_default_spec_is_the_course_statistics_and_age() -> None:
    columns = DEFAULT_SPEC.column_names()
    assert columns[:4] == ["age_years", "heart_rate_course_mean_120h",
                           "heart_rate_course_trend_120h", "heart_rate_course_count_120h"]
    assert len(columns) == 1 + 3 * len(DEFAULT_SPEC.features)
    assert FeatureSpec.from_dict(DEFAULT_SPEC.to_dict()) == DEFAULT_SPEC
    r = row(patient([obs("2524-7", 4.0, "mmol/L", 100)]), DEFAULT_SPEC)
    assert list(r) == columns and r["lactate_course_mean_120h"] == pytest.approx(math.log(4.0))


def test_version_1_spec_has_no_course_columns() -> None:
    data = WINDOWED.to_dict()
    for key in ("course_hours", "course_statistics", "recency"):
        data.pop(key)
    for feature in data["features"]:
        feature.pop("scale")
    old = FeatureSpec.from_dict(data)
    assert old.course_hours is None
    assert not [c for c in old.column_names() if "_course_" in c]
    assert len(old.column_names()) == 1 + len(old.features) * (2 * 5 + 2)


def test_spec_rejects_unknown_scale_and_course_statistic() -> None:
    with pytest.raises(ValueError, match="unknown scale 'sqrt'"):
        LabFeature("x", ("1-1",), "mg/dL", "X", scale="sqrt")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown course statistics"):
        FeatureSpec(features=DEFAULT_SPEC.features, course_hours=120.0,
                    course_statistics=("median",))
    with pytest.raises(ValueError, match="windows_hours or course_hours"):
        FeatureSpec(features=DEFAULT_SPEC.features, windows_hours=())


def test_a_measurement_reported_twice_counts_once() -> None:
    # the same creatinine over HL7 v2 (umol/L) and as a FHIR Observation (mg/dL)
    twice = [obs("2160-0", 1.2, "mg/dL", 30), obs("14682-9", 1.2 * 10000 / 113.12, "umol/L", 30),
             obs("2160-0", 2.4, "mg/dL", 6)]
    r = row(patient(twice))
    assert r["creatinine_course_count_120h"] == 2.0
    assert r["creatinine_course_mean_120h"] == pytest.approx(math.log(1.2 * 2.4) / 2)
    assert r["creatinine_mean_72h"] == pytest.approx(1.8)
