"""services.auth.scopes: SMART v1/v2 scope parsing, needs, narrowing and role defaults."""

from __future__ import annotations

import pytest

from services.auth.principal import Role
from services.auth.scopes import (
    CLINFUSE_SCOPES,
    RECORD_TYPES,
    ROLE_SCOPES,
    Grants,
    Need,
    bundle_types,
    default_scopes,
    narrow,
    parse_scope,
)


@pytest.mark.parametrize(("text", "context", "resource", "letters"), [
    ("patient/Observation.rs", "patient", "Observation", "rs"),
    ("user/*.cruds", "user", "*", "cruds"),
    ("system/ImagingStudy.cu", "system", "ImagingStudy", "cu"),
    ("system/*.read", "system", "*", "rs"),  # v1
    ("user/Patient.write", "user", "Patient", "cud"),  # v1
    ("patient/*.*", "patient", "*", "cruds"),  # v1
    ("user/Observation.s", "user", "Observation", "s"),
])
def test_parse_v1_and_v2(text: str, context: str, resource: str, letters: str) -> None:
    scope = parse_scope(text)
    assert scope is not None
    assert (scope.context, scope.resource, scope.interactions) == (
        context, resource, frozenset(letters))
    assert not scope.restricted


@pytest.mark.parametrize("text", [
    "openid", "launch/patient", "clinfuse/audit", "user/Patient.sr",  # v2 order is cruds
    "user/Patient.rr", "user/Patient.x", "admin/Patient.r", "user/patient.r",
    "user/Patient", "user/.r", "user/Patient.*s",
])
def test_what_is_not_a_resource_scope(text: str) -> None:
    assert parse_scope(text) is None


def test_a_restricted_scope_grants_nothing() -> None:
    scope = parse_scope("patient/Observation.rs?category=laboratory")
    assert scope is not None and scope.restricted
    assert not scope.grants("Observation", "r")
    assert not Grants.of(["user/Observation.rs?category=laboratory"]).allows("Observation", "r")


def test_grants_by_context() -> None:
    grants = Grants.of(["patient/*.rs", "user/Observation.c", "clinfuse/audit", "nonsense"])
    assert grants.allows("Observation", "c")
    assert not grants.allows("Observation", "r")  # only patient/ grants r
    assert grants.allows("Observation", "r", patient=True)
    assert grants.custom == {"clinfuse/audit"}
    assert Grants.of(["system/*.crus"]).allows("Basic", "u")
    assert not Grants.of(["system/*.crus"]).allows("Basic", "d")
    # Letters may come from several scopes of one type.
    assert Grants.of(["user/Observation.c", "user/Observation.u"]).has_letters("cu")
    assert not Grants.of(["user/Observation.c", "user/Patient.u"]).has_letters("cu")


def test_need_missing_and_describe() -> None:
    need = Need.of("record.r", "RiskAssessment.c", "clinfuse/feedback", patient="id")
    assert {t for t, _ in need.resources} == RECORD_TYPES | {"RiskAssessment"}
    assert need.describe() == "record.r RiskAssessment.c clinfuse/feedback"
    grants = Grants.of(["user/*.rs"])
    assert need.missing(grants) == ["RiskAssessment.c", "clinfuse/feedback"]
    assert Need.of(body="cu").describe() == "<Type>.cu"
    assert Need.of(body="cu").missing(Grants.of(["user/*.rs"])) == ["<Type>.cu"]
    assert not Need.of(body="cu").missing(Grants.of(["user/Observation.cu"]))
    assert Need().missing(Grants()) == []
    with pytest.raises(ValueError, match=r"Type\.letters"):
        Need.of("Patient.sr")
    with pytest.raises(ValueError, match="clinfuse scope"):
        Need.of("clinfuse/everything")


def test_narrow_keeps_what_is_covered() -> None:
    allowed = ["system/*.crus", "clinfuse/cds-hooks"]
    assert narrow(["system/Observation.rs", "system/*.read", "system/*.cruds",
                   "user/*.rs", "clinfuse/admin", "clinfuse/cds-hooks"], allowed) == [
        "system/Observation.rs", "system/*.read", "clinfuse/cds-hooks"]
    # patient/ is a narrowing of user/: a launch asks for patient/*.rs of a user/*.rs role.
    assert narrow(["patient/*.rs", "patient/*.read", "patient/*.write"], ["user/*.rs"]) == [
        "patient/*.rs", "patient/*.read"]
    assert narrow(["user/Observation.rs?category=vital-signs"], ["user/*.rs"]) == []


def test_every_role_has_defaults_that_parse() -> None:
    assert set(ROLE_SCOPES) == set(Role)
    for role in Role:
        for system in (False, True):
            for scope in default_scopes(role, system=system).split():
                assert parse_scope(scope) is not None or scope in CLINFUSE_SCOPES, scope
    assert default_scopes(Role.integration, system=True).startswith("system/*.crus")
    assert "user/*.rs" in default_scopes(Role.clinician, system=False).split()
    # Compliance reads aggregates and the log, no patient record.
    assert all(s.startswith("clinfuse/") for s in default_scopes(Role.compliance,
                                                                 system=False).split())


def test_bundle_types() -> None:
    assert bundle_types({"entry": [{"resource": {"resourceType": "Patient"}},
                                   {"resource": {"resourceType": "Observation"}},
                                   {"resource": "junk"}, "junk", {}]}) == {
        "Patient", "Observation"}
    assert bundle_types([]) == set() and bundle_types({"entry": "x"}) == set()
