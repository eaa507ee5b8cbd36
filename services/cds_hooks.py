"""CDS Hooks 2.0: the patient-view service, its cards, and feedback on them.

The EHR (a CDS Client) discovers one service, ``clinfuse-risk``, on ``patient-view``.
A hook call carries the patient's data in ``prefetch`` (the templates below) or
lets the service fetch it from ``fhirServer`` with ``fhirAuthorization``; either
way the resources are stored (source ``cds-prefetch``), the patient's record is
rebuilt from everything known about them, and one prediction is made and stored
with the uuid of the card that answers it. Feedback (``accepted``/``overridden``
with an ``overrideReason`` and ``userComment``) is stored against that card.

Errors are value-free: a malformed request is 400, data the service cannot get is
412 (the spec's "Precondition Failed"), an unknown card is 404; the routes answer
them as OperationOutcomes. Fetching follows searchset ``next`` links only on the
``fhirServer``'s own origin, so the EHR's access token never leaves it, and goes
through :mod:`services.outbound`: the origin must be on the allow-list, one deadline
covers all of a hook's fetching, bodies are capped, and a failure is reported with
one generic message (no status code or error type: no port-scanning oracle).
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urljoin, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from fhir_adapters.errors import IngestError, Issue
from services import record_store
from services.outbound import Outbound, OutboundError, OutboundSession
from services.prediction import PredictionService, indicator_for
from services.tables import FeedbackRow, PredictionRow

__all__ = ["FEEDBACK_CHANNEL", "OVERRIDE_REASONS", "OVERRIDE_REASON_SYSTEM", "PREFETCH",
           "SERVICE_ID", "FeedbackRequest", "HookError", "HookRequest", "build_card",
           "card_summary", "discovery", "fetch_prefetch", "handle_patient_view",
           "record_feedback"]

log = logging.getLogger(__name__)

SERVICE_ID = "clinfuse-risk"
HOOK = "patient-view"
FEEDBACK_CHANNEL = "cds-hooks"
#: Prefetch templates: the patient, the newest vitals and labs, conditions, newest notes.
#: "Recent" is the first page of a newest-first search; fetched data follows paging.
PREFETCH: dict[str, str] = {
    "patient": "Patient/{{context.patientId}}",
    "observations": "Observation?patient={{context.patientId}}"
                    "&category=vital-signs,laboratory&_sort=-date&_count=200",
    "conditions": "Condition?patient={{context.patientId}}",
    "documents": "DocumentReference?patient={{context.patientId}}&_sort=-date&_count=50",
}
#: Override reasons offered on every card (CDS Hooks lets the service define them).
#: The same code system and codes as the dashboard's feedback form, so both channels'
#: FeedbackRows group together.
OVERRIDE_REASON_SYSTEM = "https://clinfuse.example.org/fhir/CodeSystem/override-reason"
OVERRIDE_REASONS: tuple[dict[str, str], ...] = tuple(
    {"system": OVERRIDE_REASON_SYSTEM, "code": code, "display": display}
    for code, display in (
        ("risk-too-high", "Risk seems too high for this patient"),
        ("risk-too-low", "Risk seems too low for this patient"),
        ("data-wrong", "Input data is wrong or out of date"),
        ("context-missing", "Clinical context the model cannot see"),
        ("explanation-unhelpful", "Explanation does not make clinical sense"),
        ("other", "Other (see comment)"),
    ))
SUMMARY_MAX = 139  # the spec: "<140 characters"
#: Fetch limits: one slow or huge FHIR server must not hold a hook for long. The
#: deadline (all of one hook's fetching, pages included) and the body cap are the
#: outbound settings (``outbound_deadline_s``, ``outbound_max_body_bytes``).
MAX_PAGES = 20
MAX_ENTRIES = 5000

_FHIR_ID = r"^[A-Za-z0-9\-.]{1,64}$"
_UUID = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?"
                   r"[0-9a-fA-F]{12}$")
_LOOPBACK = {"localhost", "127.0.0.1", "::1"}


class HookError(Exception):
    """A hook or feedback request the service cannot answer; value-free."""

    def __init__(self, status: int, message: str, expression: str | None = None,
                 code: str = "invalid") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.expression = expression
        self.code = code

    def issues(self) -> list[Issue]:
        return [Issue(code=self.code, diagnostics=self.message,  # type: ignore[arg-type]
                      expression=self.expression)]


# ----------------------------------------------------------------------------- requests


class FhirAuthorization(BaseModel):
    """The OAuth 2.0 token the service may use against ``fhirServer`` (CDS Hooks 2.0)."""

    model_config = ConfigDict(extra="allow")

    access_token: str = Field(min_length=1, max_length=8192)
    token_type: Literal["Bearer"]
    expires_in: int = Field(ge=0)
    scope: str = Field(max_length=4096)
    subject: str = Field(max_length=256)
    patient: str | None = Field(None, pattern=_FHIR_ID)


class PatientViewContext(BaseModel):
    """``patient-view`` context: who is looking at which patient."""

    model_config = ConfigDict(extra="allow")

    userId: str = Field(min_length=1, max_length=256)
    patientId: str = Field(pattern=_FHIR_ID)
    encounterId: str | None = Field(None, pattern=_FHIR_ID)


#: A hook request, for the OpenAPI docs.
HOOK_EXAMPLE: dict[str, Any] = {
    "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea", "hook": "patient-view",
    "fhirServer": "https://ehr.example.org/fhir",
    "fhirAuthorization": {"access_token": "some-opaque-token", "token_type": "Bearer",
                          "expires_in": 300, "scope": "user/Patient.read "
                          "user/Observation.read", "subject": "clinfuse"},
    "context": {"userId": "Practitioner/123", "patientId": "1288992"},
    "prefetch": {"patient": {"resourceType": "Patient", "id": "1288992"}}}


class HookRequest(BaseModel):
    """A CDS Hooks 2.0 request for ``patient-view``."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [HOOK_EXAMPLE]})

    hook: str = Field(max_length=64)
    hookInstance: str = Field(max_length=64)
    fhirServer: str | None = Field(None, max_length=2048)
    fhirAuthorization: FhirAuthorization | None = None
    context: PatientViewContext
    prefetch: dict[str, dict[str, Any] | None] | None = None

    @model_validator(mode="after")
    def _check(self) -> HookRequest:
        if not _UUID.match(self.hookInstance):
            raise ValueError("hookInstance must be a UUID")
        if self.fhirAuthorization is not None and not self.fhirServer:
            raise ValueError("fhirServer is required when fhirAuthorization is given")
        if self.fhirServer:
            parts = urlsplit(self.fhirServer)
            # https only, except a loopback server (tests, a sidecar): the token travels.
            if not parts.netloc or not (parts.scheme == "https" or (
                    parts.scheme == "http" and parts.hostname in _LOOPBACK)):
                raise ValueError("fhirServer must be an https URL")
        return self


class OverrideReason(BaseModel):
    """Why the user overrode the card: a Coding from the card's overrideReasons, a comment."""

    model_config = ConfigDict(extra="allow")

    reason: dict[str, Any] | None = None
    userComment: str | None = Field(None, max_length=4000)

    @model_validator(mode="after")
    def _check(self) -> OverrideReason:
        if self.reason is not None and not (isinstance(self.reason.get("code"), str) and
                                            self.reason.get("code")):
            raise ValueError("overrideReason.reason must be a Coding with a code")
        return self


class AcceptedSuggestion(BaseModel):
    id: str = Field(max_length=64)


class Feedback(BaseModel):
    """One user action on a card (CDS Hooks 2.0 Feedback)."""

    model_config = ConfigDict(extra="allow")

    card: str = Field(max_length=64)
    outcome: Literal["accepted", "overridden"]
    acceptedSuggestions: list[AcceptedSuggestion] | None = None
    overrideReason: OverrideReason | None = None
    outcomeTimestamp: datetime

    @model_validator(mode="after")
    def _check(self) -> Feedback:
        if not _UUID.match(self.card):
            raise ValueError("card must be the uuid of a card this service returned")
        if self.overrideReason is not None and self.outcome != "overridden":
            raise ValueError("overrideReason is only allowed with outcome 'overridden'")
        if self.outcomeTimestamp.tzinfo is None:
            raise ValueError("outcomeTimestamp needs a time zone")
        return self


#: A feedback request, for the OpenAPI docs.
FEEDBACK_EXAMPLE: dict[str, Any] = {"feedback": [{
    "card": "9368d37b-283f-44a0-93ea-547cebab93ed", "outcome": "overridden",
    "overrideReason": {"reason": dict(OVERRIDE_REASONS[0]),
                       "userComment": "Recently reviewed; stable."},
    "outcomeTimestamp": "2026-11-26T10:00:00Z"}]}


class FeedbackRequest(BaseModel):
    """The feedback endpoint's body: ``{"feedback": [...]}``."""

    model_config = ConfigDict(extra="allow",
                              json_schema_extra={"examples": [FEEDBACK_EXAMPLE]})

    feedback: list[Feedback] = Field(min_length=1, max_length=100)


def _fhirpath(loc: Any) -> str:
    """A pydantic error location as a FHIRPath-like path: ``feedback[0].outcome``.

    Union members and validator names that pydantic adds (``dict[str,any]``,
    ``function-after[...]``) are not elements, so they are left out.
    """
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and "[" not in part and "-" not in part:
            out += f".{part}" if out else part
    return out or "request"


def parse_model(model: type[BaseModel], body: bytes) -> Any:
    """Validate a JSON body; errors name the element and the problem, never the value."""
    try:
        data = json.loads(body or b"null")
    except ValueError:
        raise HookError(400, "the body is not JSON", "request") from None
    if not isinstance(data, dict):
        raise HookError(400, "the body must be a JSON object", "request")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = _fhirpath(first.get("loc", ()))
        kind = "required" if first.get("type") == "missing" else "invalid"
        raise HookError(400, f"{where}: {first.get('msg', 'invalid value')}", where,
                        kind) from None


# ----------------------------------------------------------------------------- discovery


def discovery(service: PredictionService | None) -> dict[str, Any]:
    """The discovery document: one patient-view service with its prefetch templates."""
    outcome = (service.outcome if service is not None else {}) or {}
    name = str(outcome.get("name") or "clinical risk")
    horizon = outcome.get("horizon_days")
    within = f" within {horizon:g} days" if isinstance(horizon, int | float) else ""
    model = (f" Model {service.model_name} {service.model_version}: "
             f"{service.validation_label}." if service is not None else
             " No model is loaded: calls answer 503.")
    return {"services": [{
        "hook": HOOK, "id": SERVICE_ID, "title": f"clinfuse {name} risk",
        "description": f"Predicted risk of {name}{within} from imaging, vital signs, labs and "
                       f"clinical notes, with its explanation.{model}",
        "prefetch": dict(PREFETCH),
        "usageRequirements": "Send the prefetch, or fhirServer with fhirAuthorization allowing "
                             "read of Patient, Observation, Condition and DocumentReference.",
    }]}


# ----------------------------------------------------------------------------- data


def _fill(template: str, context: PatientViewContext) -> str:
    return template.replace("{{context.patientId}}", context.patientId)


def _entries(bundle: Mapping[str, Any], where: str) -> Iterator[dict[str, Any]]:
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise HookError(400, "Bundle.entry must be an array", f"{where}.entry")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise HookError(400, "a Bundle entry must be an object", f"{where}.entry[{i}]")
        search = entry.get("search")
        if isinstance(search, dict) and search.get("mode") == "outcome":
            continue  # the server's OperationOutcome about the search, not data
        resource = entry.get("resource")
        if isinstance(resource, dict):
            yield resource


def _prefetched(key: str, value: dict[str, Any]) -> list[dict[str, Any]]:
    where = f"prefetch.{key}"
    kind = value.get("resourceType")
    if kind == "Bundle":
        return list(_entries(value, where))
    if kind == "OperationOutcome":
        return []  # the EHR's search failed: fetch it ourselves if we can
    if not isinstance(kind, str):
        raise HookError(400, "a prefetch value must be a FHIR resource or Bundle",
                        f"{where}.resourceType")
    return [value]


class _Fetcher:
    """Reads from the EHR's FHIR server with its token; same-origin paging only."""

    def __init__(self, base: str, token: str | None, session: OutboundSession) -> None:
        self.base = base.rstrip("/") + "/"
        self.origin = urlsplit(self.base)[:2]
        self.headers = {"Accept": "application/fhir+json"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.session = session

    def _get(self, url: str, key: str) -> dict[str, Any]:
        if urlsplit(url)[:2] != self.origin:
            raise HookError(412, "the FHIR server's paging link leaves its origin; not "
                            "followed", f"prefetch.{key}", "processing")
        try:
            return self.session.get_json(url, headers=self.headers)
        except OutboundError:
            # One message for every failure (refused token, missing patient, timeout,
            # closed port): anything more would tell a caller what is listening where.
            # The outbound log has the reason at DEBUG.
            raise HookError(412, f"the FHIR server could not be reached or did not return "
                            f"the {key} data", "fhirServer", "processing") from None

    def fetch(self, key: str, query: str) -> list[dict[str, Any]]:
        url = urljoin(self.base, query)
        data = self._get(url, key)
        if data.get("resourceType") != "Bundle":
            return [data]
        out: list[dict[str, Any]] = []
        for page in range(MAX_PAGES):
            out.extend(_entries(data, f"prefetch.{key}"))
            if len(out) >= MAX_ENTRIES:
                log.warning("CDS fetch %s: stopped at %d entries", key, len(out))
                break
            nxt = next((link.get("url") for link in data.get("link") or []
                        if isinstance(link, dict) and link.get("relation") == "next"), None)
            if not isinstance(nxt, str) or not nxt:
                break
            if page == MAX_PAGES - 1:
                log.warning("CDS fetch %s: stopped after %d pages", key, MAX_PAGES)
                break
            data = self._get(urljoin(url, nxt), key)
        return out


def fetch_prefetch(request: HookRequest, *, outbound: Outbound
                   ) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """Each prefetch key's resources: from the request, else fetched (key list returned).

    Raises
    ------
    HookError
        412 when data is missing and there is no fhirServer to fetch it from, the
        fhirServer's origin is not on the outbound allow-list, or the server fails;
        400 for a malformed prefetch value.
    """
    data: dict[str, list[dict[str, Any]]] = {}
    missing: list[str] = []
    given = request.prefetch or {}
    for key in PREFETCH:
        value = given.get(key)
        if value is not None:
            resources = _prefetched(key, value)
            if resources or value.get("resourceType") != "OperationOutcome":
                data[key] = resources
                continue
        missing.append(key)
    if missing:
        if not request.fhirServer:
            raise HookError(412, f"prefetch {missing} missing and no fhirServer to fetch it "
                            "from", "prefetch", "required")
        token = request.fhirAuthorization.access_token if request.fhirAuthorization else None
        # One session: one deadline over all searches and pages, the host resolved once.
        with outbound.session("the FHIR server") as session:
            try:
                session.check(request.fhirServer)
            except OutboundError as exc:
                raise HookError(412, "fhirServer is not a FHIR server this service may "
                                "fetch from: its origin is not on the outbound allow-list",
                                "fhirServer", "processing") from exc
            fetcher = _Fetcher(request.fhirServer, token, session)
            # The searches are independent: run them side by side (I/O bound).
            with ThreadPoolExecutor(max_workers=len(missing)) as pool:
                futures = {k: pool.submit(fetcher.fetch, k, _fill(PREFETCH[k], request.context))
                           for k in missing}
                for key, future in futures.items():
                    data[key] = future.result()
    return data, missing


# ----------------------------------------------------------------------------- cards


def _pct(p: float) -> str:
    if p < 0.005:
        return "<1%"
    if p > 0.995:
        return ">99%"
    return f"{100 * p:.0f}%"


def _level(probability: float, thresholds: dict[str, float]) -> str:
    crossed = [(v, k) for k, v in thresholds.items() if probability >= v]
    if not crossed:
        return "below thresholds"
    return max(crossed)[1].replace("_", " ")


def _factors(explanation: Mapping[str, Any], service: PredictionService
             ) -> list[tuple[float, str]]:
    """(points, name) of the modalities (imaging, notes) and EHR features, largest first."""
    # Sentence case inside the summary ("systolic blood pressure"), acronyms kept.
    names = {f.name: f.display if f.display[:2].isupper() else
             f.display[:1].lower() + f.display[1:] for f in service.spec.features}
    names["age_years"] = "age"
    short = {"image": "imaging", "note": "notes"}
    out: list[tuple[float, str]] = []
    for m in explanation.get("modalities") or []:
        if m.get("modality") in short:
            out.append((float(m.get("points") or 0.0), short[m["modality"]]))
    ehr = explanation.get("ehr") or {}
    for feature, pts in (ehr.get("by_feature_points") or {}).items():
        out.append((float(pts or 0.0), names.get(feature, str(feature))))
    if not ehr:  # EHR not explained in detail: its modality total stands in
        for m in explanation.get("modalities") or []:
            if m.get("modality") == "ehr":
                out.append((float(m.get("points") or 0.0), "vitals and labs"))
    out.sort(key=lambda t: -abs(t[0]))
    return [t for t in out if abs(t[0]) >= 0.05]


def card_summary(prediction: PredictionRow, service: PredictionService) -> str:
    """The card's summary (< 140 characters): risk, level and the top factors."""
    name = str(service.outcome.get("name") or "risk").capitalize()
    if prediction.probability is None:
        text = f"{name} risk not scored: {prediction.refusal or 'no result'}"
        return text if len(text) <= SUMMARY_MAX else text[:SUMMARY_MAX - 1] + "…"
    p = float(prediction.probability)
    head = f"{name} risk {_pct(p)} ({_level(p, service.thresholds)})"
    factors = [f"{label} {pts:+.0f}" if abs(pts) >= 0.5 else f"{label} {pts:+.1f}"
               for pts, label in _factors(prediction.explanation or {}, service)[:3]]
    while factors:
        text = f"{head}. Top factors: {', '.join(factors)} pts"
        if len(text) <= SUMMARY_MAX:
            return text
        factors.pop()
    return head[:SUMMARY_MAX]


def _detail(prediction: PredictionRow, service: PredictionService) -> str:
    thresholds = ", ".join(f"{k.replace('_', ' ')} {_pct(v)}"
                           for k, v in sorted(service.thresholds.items(), key=lambda kv: kv[1]))
    outcome = service.outcome
    lines = []
    if prediction.probability is None:
        lines.append(f"No risk was computed: {prediction.refusal}.")
    else:
        lines.append(str((prediction.explanation or {}).get("rationale") or ""))
        lines.append("")
        lines.append(f"Outcome: {outcome.get('definition') or outcome.get('name')}. "
                     f"Decision thresholds: {thresholds}. "
                     f"Inputs used: {prediction.modalities.replace('+', ', ')}. "
                     "The risk is calibrated on the model's validation data.")
    when = prediction.index_time.strftime("%Y-%m-%d %H:%M")
    lines.append(f"Computed {when} UTC by {prediction.model_name} "
                 f"{prediction.model_version}.")
    lines.append("")
    lines.append(f"**{service.validation_label}.**")
    return "\n".join(lines)


def build_card(prediction: PredictionRow, service: PredictionService, *, base_url: str
               ) -> dict[str, Any]:
    """The CDS Hooks 2.0 card for a stored prediction."""
    indicator = indicator_for(prediction.probability, service.thresholds)
    link_url = f"{base_url.rstrip('/')}/dashboard/patients/{prediction.patient_id}"
    return {
        "uuid": prediction.cds_card_uuid,
        "summary": card_summary(prediction, service),
        "detail": _detail(prediction, service),
        "indicator": indicator,
        "source": {"label": f"{service.model_name} {service.model_version} · "
                            f"{service.validation_label}",
                   "topic": {"system": "urn:clinfuse:cds-hooks:topic", "code": "risk",
                             "display": f"{service.outcome.get('name') or 'clinical'} risk"}},
        "links": [{"label": "Open the risk and its explanation in clinfuse",
                   "url": link_url, "type": "smart",
                   "appContext": json.dumps({"patient": prediction.patient_id,
                                             "prediction": prediction.id})}],
        "overrideReasons": [dict(r) for r in OVERRIDE_REASONS],
    }


# ----------------------------------------------------------------------------- the hook


@dataclass
class HookResult:
    """The answer and what was done, for the route (access log) and the tests."""

    response: dict[str, Any]
    prediction: PredictionRow
    fetched: list[str]


def _store(session: Session, request: HookRequest, data: dict[str, list[dict[str, Any]]],
           fetched: list[str]) -> str:
    """Store the EHR's resources (source cds-prefetch); returns the patient's opaque id."""
    patients = [r for r in data.get("patient", []) if r.get("resourceType") == "Patient"]
    where = "fhirServer" if "patient" in fetched else "prefetch.patient"
    if len(patients) != 1 or patients[0].get("id") != request.context.patientId:
        raise HookError(412 if "patient" in fetched else 400,
                        "the Patient resource is missing or is not context.patientId", where,
                        "required")
    items: list[record_store.Incoming] = []
    for key, resources in data.items():
        for i, resource in enumerate(resources):
            kind = resource.get("resourceType")
            if key != "patient" and kind == "Patient":
                continue  # _include'd patients: the one above is authoritative
            items.append(record_store.Incoming(resource, f"prefetch.{key}[{i}]"))
    try:
        result = record_store.ingest(session, items, source="cds-prefetch")
    except IngestError as exc:
        first = exc.issues[0]
        status = 412 if fetched else 400
        raise HookError(status, f"the patient's data cannot be used: {first.diagnostics}",
                        first.expression, "invalid") from None
    ids = {e.id for e in result.entries if e.resource_type == "Patient"}
    if len(ids) != 1:
        raise HookError(400, "the data names more than one patient", "prefetch.patient")
    return ids.pop()


def handle_patient_view(session: Session, service: PredictionService, request: HookRequest,
                        *, requested_by: str, base_url: str, outbound: Outbound,
                        reuse_within_s: float = 0.0) -> HookResult:
    """Answer a patient-view call: store the data, predict, one card.

    The index time is now (the service's clock): patient-view asks about the patient
    as they are when the chart opens. A prediction made from the same data at most
    ``reuse_within_s`` seconds ago is answered again (``prediction_reuse_s``).
    """
    if request.hook != HOOK:
        raise HookError(400, f"this service answers the {HOOK} hook only", "hook", "value")
    data, fetched = fetch_prefetch(request, outbound=outbound)
    patient_id = _store(session, request, data, fetched)
    # Commit the data before the model runs: no write lock is held during the prediction
    # (SQLite has one writer), and the data is worth keeping even if the prediction fails.
    session.commit()
    card_uuid = str(uuid.uuid4())
    row = service.predict_patient(session, patient_id, source="cds-hooks",
                                  requested_by=requested_by, card_uuid=card_uuid,
                                  reuse_within_s=reuse_within_s)
    # Committed before answering: the card's uuid must exist when feedback on it arrives.
    session.commit()
    return HookResult({"cards": [build_card(row, service, base_url=base_url)]}, row, fetched)


# ----------------------------------------------------------------------------- feedback


def record_feedback(session: Session, prediction: PredictionRow, *,
                    outcome: Literal["accepted", "overridden"],
                    override_reason: dict[str, Any] | None, user_comment: str | None,
                    outcome_timestamp: datetime, recorded_by: str, channel: str
                    ) -> FeedbackRow:
    """Store one verdict on a prediction (the dashboard's feedback uses this too)."""
    if outcome not in ("accepted", "overridden"):
        raise ValueError(f"outcome must be 'accepted' or 'overridden', got {outcome!r}")
    row = FeedbackRow(prediction_id=prediction.id, outcome=outcome,
                      override_reason=override_reason, user_comment=user_comment,
                      outcome_timestamp=outcome_timestamp.astimezone(UTC),
                      recorded_by=recorded_by, channel=channel)
    session.add(row)
    return row


def handle_feedback(session: Session, request: FeedbackRequest, *, recorded_by: str
                    ) -> list[FeedbackRow]:
    """Store every feedback entry, or none: an unknown card is 404 for the whole request."""
    cards = [f.card.lower() for f in request.feedback]
    found = {p.cds_card_uuid: p for p in session.scalars(
        select(PredictionRow).where(PredictionRow.cds_card_uuid.in_(set(cards))))}
    for i, card in enumerate(cards):
        if card not in found:
            raise HookError(404, "no card with this uuid was issued by this service",
                            f"feedback[{i}].card", "not-found")
    rows = []
    for card, entry in zip(cards, request.feedback, strict=True):
        reason = entry.overrideReason
        rows.append(record_feedback(
            session, found[card], outcome=entry.outcome,
            override_reason=reason.reason if reason is not None else None,
            user_comment=reason.userComment if reason is not None else None,
            outcome_timestamp=entry.outcomeTimestamp, recorded_by=recorded_by,
            channel=FEEDBACK_CHANNEL))
    session.flush()
    return rows
