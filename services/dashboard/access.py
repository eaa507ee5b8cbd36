"""Who may open each dashboard page: role and token scopes, in one table.

The API declares role and scope on each route with ``require(...)``; the dashboard's
pages answer with HTML (a login redirect, an error page), so theirs are declared
here and enforced by :func:`services.dashboard.web.current_user` for every page
that needs a signed-in user. A signed-in page missing from the table is refused:
forgetting to decide fails closed. docs/security.md lists these rows with the API's.

An EHR launch signs the user in with ``patient/`` scopes for the launch patient:
such a session opens that patient's pages and nothing that spans patients (the
worklist).
"""

from __future__ import annotations

from fastapi import Request

from services.api.deps import Requirement, authorize
from services.auth.principal import Principal, Role
from services.auth.scopes import Grants, Need
from services.auth.tokens import AuthError

__all__ = ["PAGES", "PUBLIC_PAGES", "enforce"]

_ALL = frozenset(Role)
_CLINICIAN = frozenset({Role.clinician, Role.admin})
_COMPLIANCE = frozenset({Role.compliance, Role.admin})
_AUDIT = Requirement(_COMPLIANCE, Need.of("clinfuse/audit"))
_PATIENT = "patient_id"

#: Pages that need no sign-in: assets, the sign-in steps themselves.
PUBLIC_PAGES = frozenset({
    ("GET", "/dashboard/static/{name}"), ("GET", "/dashboard/login"),
    ("POST", "/dashboard/login"), ("POST", "/dashboard/logout"),
    ("GET", "/dashboard/launch"), ("GET", "/dashboard/callback"),
})

#: (method, path) -> role and scopes of every signed-in page. An empty Need: the page
#: shows no patient data (the role's home redirect, the model card).
PAGES: dict[tuple[str, str], Requirement] = {
    ("GET", "/dashboard"): Requirement(_ALL, Need()),
    ("GET", "/dashboard/"): Requirement(_ALL, Need()),
    ("GET", "/dashboard/model-card"): Requirement(_ALL, Need()),
    # The worklist lists every patient's latest risk: not for a patient/ session.
    ("GET", "/dashboard/worklist"): Requirement(_CLINICIAN, Need.of("RiskAssessment.s")),
    ("GET", "/dashboard/patients/{patient_id}"): Requirement(
        _CLINICIAN, Need.of("record.r", "RiskAssessment.r", patient=_PATIENT)),
    ("GET", "/dashboard/patients/{patient_id}/series/{series_uid}/slices/{index}.png"):
        Requirement(_CLINICIAN, Need.of("ImagingStudy.r", patient=_PATIENT)),
    ("GET", "/dashboard/patients/{patient_id}/model-input/{index}.png"): Requirement(
        _CLINICIAN, Need.of("ImagingStudy.r", "RiskAssessment.r", patient=_PATIENT)),
    ("GET", "/dashboard/patients/{patient_id}/saliency/{index}.png"): Requirement(
        _CLINICIAN, Need.of("ImagingStudy.r", "RiskAssessment.r", patient=_PATIENT)),
    ("POST", "/dashboard/patients/{patient_id}/feedback"): Requirement(
        _CLINICIAN, Need.of("RiskAssessment.r", "clinfuse/feedback", patient=_PATIENT)),
    ("GET", "/dashboard/audits"): _AUDIT,
    ("POST", "/dashboard/audits"): _AUDIT,
    ("GET", "/dashboard/audits/compare"): _AUDIT,
    ("GET", "/dashboard/audits/{audit_id}"): _AUDIT,
    ("GET", "/dashboard/audits/{audit_id}/report.html"): _AUDIT,
    ("GET", "/dashboard/audits/{audit_id}/report.pdf"): _AUDIT,
    ("GET", "/dashboard/audits/{audit_id}/audit.json"): _AUDIT,
    ("GET", "/dashboard/access-log"): Requirement(_COMPLIANCE, Need.of("clinfuse/access-log")),
}


def enforce(request: Request, principal: Principal) -> str | None:
    """Check the page's role and scopes for ``principal``; the message why not, or None."""
    route = request.scope.get("route")
    method = "GET" if request.method == "HEAD" else request.method
    requirement = PAGES.get((method, str(getattr(route, "path", ""))))
    if requirement is None:
        return "This page has no access rule, so it is not shown."
    patient = requirement.scope.patient
    if patient is not None:
        # Set first, so that a refused attempt is logged against the patient too.
        request.state.patient_id = str(request.path_params.get(patient, ""))[:32] or None
    if principal.role not in requirement.roles:
        return f"The {principal.role.value} role cannot open this page."
    try:
        bound = authorize(principal, requirement.scope)
    except AuthError:
        missing = requirement.scope.missing(Grants.of(principal.scopes))
        return f"Your sign-in does not include what this page needs ({', '.join(missing)})."
    if bound is not None and patient is not None and \
            request.path_params.get(patient) != bound:
        return "Your sign-in is for one patient's record only; open it from your EHR."
    return None
