"""SMART App Launch scopes: what a token grants, what a route needs, what each role gets.

clinfuse is a resource server: every route checks the caller's role *and* the
scopes of its token. Scopes follow SMART App Launch 2.0 (v1 spellings are
accepted too):

==============================  =====================================================
``system/ImagingStudy.cu``      v2: context ``/`` resource type ``.`` letters from
                                ``cruds`` in that order (c create, r read, u update,
                                d delete, s search)
``user/*.rs``                   ``*``: every resource type
``patient/Observation.read``    v1: ``read`` = ``rs``, ``write`` = ``cud``, ``*`` =
                                ``cruds``
``clinfuse/audit``              clinfuse's own scopes, for what is no FHIR resource
                                (:data:`CLINFUSE_SCOPES`)
==============================  =====================================================

Contexts: ``system/`` and ``user/`` scopes cover every patient the route serves;
``patient/`` scopes cover only the patient named by the token's ``patient`` claim
(the launch context), and only on routes that are about one patient
(:attr:`Need.patient`). A scope restricted by a query (``patient/Observation.rs?
category=laboratory``) grants nothing here: clinfuse cannot honour the restriction,
so it does not pretend to. Anything that does not parse grants nothing.

Every token issuer of the project (the demo's password grant, SMART Backend
Services, the authorization code of the EHR launch) takes its default scopes from
one table, :data:`ROLE_SCOPES`, via :func:`default_scopes`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from fhir_adapters.fhir_json import MAPPED_RESOURCE_TYPES
from services.auth.principal import Role

__all__ = ["BODY_TYPES", "CLINFUSE_SCOPES", "IDENTITY_SCOPES", "INTERACTIONS", "RECORD",
           "RECORD_TYPES", "ROLE_SCOPES", "Grants", "Need", "ResourceScope", "bundle_types",
           "default_scopes", "narrow", "parse_scope"]

Context = Literal["patient", "user", "system"]
#: SMART v2 interaction letters, in the order a scope must list them.
INTERACTIONS = "cruds"
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}
_SCOPE_RE = re.compile(r"^(patient|user|system)/(\*|[A-Z][A-Za-z]{0,63})\.([a-z*]{1,5})"
                       r"(\?.*)?$")
#: Scopes the built-in issuer recognises that carry no data permission.
IDENTITY_SCOPES = frozenset({"openid", "fhirUser", "profile", "launch", "launch/patient",
                             "offline_access", "online_access"})

#: clinfuse's own scopes: what the service does that is no FHIR resource.
CLINFUSE_SCOPES: dict[str, str] = {
    "clinfuse/cds-hooks": "discover and call the CDS Hooks service",
    "clinfuse/feedback": "record feedback (accepted, overridden) on a prediction",
    "clinfuse/audit": "run and read fairness audits (aggregates over all predictions)",
    "clinfuse/access-log": "read and verify the access log",
    "clinfuse/admin": "see and switch the served model",
}

#: What a prediction reads: the resource types that become a patient's record.
RECORD_TYPES = frozenset(MAPPED_RESOURCE_TYPES)
#: How docs and :meth:`Need.describe` name :data:`RECORD_TYPES` as one group.
RECORD = "record"
#: How they name "each resource type the request body carries".
BODY_TYPES = "<Type>"


@dataclass(frozen=True)
class ResourceScope:
    """One SMART resource scope, parsed."""

    context: Context
    #: A FHIR resource type, or ``*`` for all.
    resource: str
    #: Letters of :data:`INTERACTIONS`.
    interactions: frozenset[str]
    #: The scope carried a ``?query`` restriction (it then grants nothing here).
    restricted: bool = False

    def grants(self, resource: str, interaction: str) -> bool:
        return (not self.restricted and interaction in self.interactions
                and self.resource in ("*", resource))

    def covers(self, other: ResourceScope) -> bool:
        """Whether everything ``other`` grants is granted by this scope too."""
        if other.restricted or self.restricted:
            return self == other
        # patient/ is a narrowing of user/ (and system/): the same rights, one patient.
        context_ok = self.context == other.context or (
            other.context == "patient" and self.context in ("user", "system"))
        return (context_ok and self.resource in ("*", other.resource)
                and other.interactions <= self.interactions)


def parse_scope(text: str) -> ResourceScope | None:
    """The resource scope ``text`` spells, or None (an identity, clinfuse or bad scope)."""
    match = _SCOPE_RE.match(text)
    if match is None:
        return None
    context, resource, letters, query = match.groups()
    if letters in _V1:
        letters = _V1[letters]
    # v2: distinct letters of "cruds", in that order ("rs", not "sr").
    elif "*" in letters or "".join(c for c in INTERACTIONS if c in letters) != letters:
        return None
    ctx: Context = "patient" if context == "patient" else "user" if context == "user" \
        else "system"
    return ResourceScope(ctx, resource, frozenset(letters), restricted=query is not None)


@dataclass(frozen=True)
class Grants:
    """What a token's scopes grant: resource scopes and clinfuse's own."""

    resources: tuple[ResourceScope, ...] = ()
    custom: frozenset[str] = frozenset()

    @classmethod
    def of(cls, scopes: Iterable[str]) -> Grants:
        parsed, custom = [], set()
        for text in scopes:
            scope = parse_scope(text)
            if scope is not None:
                parsed.append(scope)
            elif text in CLINFUSE_SCOPES:
                custom.add(text)
        return cls(tuple(parsed), frozenset(custom))

    def allows(self, resource: str, interaction: str, *, patient: bool = False) -> bool:
        """``interaction`` on ``resource`` by a ``user/``/``system/`` scope, or also by a
        ``patient/`` scope when ``patient`` (the caller is bound to its launch patient)."""
        return any(s.grants(resource, interaction) for s in self.resources
                   if s.context != "patient" or patient)

    def has_letters(self, letters: str) -> bool:
        """Some ``user/``/``system/`` scope grants every one of ``letters`` on some type."""
        broad = [s for s in self.resources if not s.restricted and s.context != "patient"]
        return any(all(self.allows(s.resource, c) for c in letters) for s in broad)


@dataclass(frozen=True)
class Need:
    """What a route needs from the token's scopes (besides a role).

    Every item is needed: ``letters`` on each listed resource type, and each clinfuse
    scope. ``body`` letters are needed on every resource type the request body carries
    (checked by the route once the body is parsed; before that, the token must grant
    those letters on some type). ``patient`` says whether ``patient/`` scopes can
    count: None (the route spans patients), the path parameter naming the patient,
    or :attr:`ROUTE` (the route finds the patient and calls ``check_patient``).
    """

    resources: tuple[tuple[str, str], ...] = ()
    custom: tuple[str, ...] = ()
    body: str = ""
    patient: str | None = None
    #: Written after the route's own description in docs, e.g. what storing needs more.
    note: str = field(default="", compare=False)

    ROUTE = "(route)"

    @classmethod
    def of(cls, *scopes: str, body: str = "", patient: str | None = None,
           note: str = "") -> Need:
        """``Need.of("Patient.r", "record.r", "clinfuse/audit", patient="id")``."""
        resources: list[tuple[str, str]] = []
        custom: list[str] = []
        for text in scopes:
            if text in CLINFUSE_SCOPES:
                custom.append(text)
                continue
            resource, _, letters = text.rpartition(".")
            if not resource or not letters or \
                    "".join(c for c in INTERACTIONS if c in letters) != letters:
                raise ValueError(f"need {text!r}: write Type.letters (letters from "
                                 f"{INTERACTIONS!r} in order) or a clinfuse scope "
                                 f"({', '.join(sorted(CLINFUSE_SCOPES))})")
            types = sorted(RECORD_TYPES) if resource == RECORD else [resource]
            resources.extend((t, letters) for t in types)
        if body and "".join(c for c in INTERACTIONS if c in body) != body:
            raise ValueError(f"need body={body!r}: letters from {INTERACTIONS!r} in order")
        return cls(tuple(resources), tuple(custom), body, patient, note)

    def missing(self, grants: Grants, *, patient: bool = False) -> list[str]:
        """The needed scopes ``grants`` lacks, as ``Type.letter`` and clinfuse scopes."""
        out = [f"{t}.{c}" for t, letters in self.resources for c in letters
               if not grants.allows(t, c, patient=patient)]
        out += [c for c in self.custom if c not in grants.custom]
        if self.body and not grants.has_letters(self.body):
            out.append(f"{BODY_TYPES}.{self.body}")
        return out

    def describe(self) -> str:
        """The need as docs/security.md's route table writes it."""
        by_letters: dict[str, list[str]] = {}
        for resource, letters in self.resources:
            by_letters.setdefault(letters, []).append(resource)
        parts: list[str] = []
        for letters, types in by_letters.items():
            rest = set(types)
            if rest >= RECORD_TYPES:
                parts.append(f"{RECORD}.{letters}")
                rest -= RECORD_TYPES
            parts.extend(f"{t}.{letters}" for t in sorted(rest, key=types.index))
        if self.body:
            parts.append(f"{BODY_TYPES}.{self.body}")
        parts.extend(self.custom)
        return " ".join(parts)


#: Default scopes per role, for every issuer in the project. ``{ctx}`` is ``user`` for
#: a person and ``system`` for a backend client. No route deletes (HL7 merges and
#: cancellations mark rows), so no role needs ``d``.
ROLE_SCOPES: dict[Role, tuple[str, ...]] = {
    # Integration engines write records and images, read them back, call hooks.
    Role.integration: ("{ctx}/*.crus", "clinfuse/cds-hooks", "clinfuse/feedback"),
    # Clinicians read; a prediction they ask for is stored (RiskAssessment.c).
    Role.clinician: ("{ctx}/*.rs", "{ctx}/RiskAssessment.c", "clinfuse/cds-hooks",
                     "clinfuse/feedback"),
    # Compliance sees aggregates and the pseudonymised access log, no record.
    Role.compliance: ("clinfuse/audit", "clinfuse/access-log"),
    Role.admin: ("{ctx}/*.crus", *CLINFUSE_SCOPES),
}


def default_scopes(role: Role, *, system: bool) -> str:
    """The space-separated default scopes of ``role`` (``system/`` for a backend client)."""
    ctx = "system" if system else "user"
    return " ".join(s.replace("{ctx}", ctx) for s in ROLE_SCOPES[role])


def narrow(requested: Iterable[str], allowed: Iterable[str]) -> list[str]:
    """The requested scopes that ``allowed`` covers, in request order, without repeats.

    A resource scope is covered by an allowed one of the same (or, for ``patient/``,
    a broader) context, type (or ``*``) and more letters; others match exactly.
    """
    allowed = list(allowed)
    allowed_resources = [s for s in map(parse_scope, allowed) if s is not None]
    out: list[str] = []
    for text in requested:
        scope = parse_scope(text)
        ok = (any(a.covers(scope) for a in allowed_resources) if scope is not None
              else text in allowed)
        if ok and text not in out:
            out.append(text)
    return out


def bundle_types(bundle: object) -> set[str]:
    """The resource types of a Bundle's entries (what storing it writes); malformed
    entries are left to the ingest, which refuses them with their location."""
    entries = bundle.get("entry") if isinstance(bundle, dict) else None
    types: set[str] = set()
    for entry in entries if isinstance(entries, list) else []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        kind = resource.get("resourceType") if isinstance(resource, dict) else None
        if isinstance(kind, str):
            types.add(kind)
    return types
