"""The authenticated caller and the four roles."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Role(StrEnum):
    """What a caller may do; admin may do everything."""

    integration = "integration"  # write data, call hooks
    clinician = "clinician"  # read patient predictions and explanations
    compliance = "compliance"  # audits and aggregate data only
    admin = "admin"


#: HL7 v3 PurposeOfUse code recorded in the access log when the caller names none.
DEFAULT_PURPOSE = {Role.integration: "HOPERAT", Role.clinician: "TREAT",
                   Role.compliance: "HOPERAT", Role.admin: "HOPERAT"}


@dataclass(frozen=True)
class Principal:
    """A verified caller: a person (``sub``) or a system client (``client_id``)."""

    subject: str
    role: Role
    client_id: str | None = None
    scopes: frozenset[str] = field(default_factory=frozenset)
    issuer: str | None = None
    #: The token's SMART launch context (``patient`` claim): the one patient its
    #: ``patient/`` scopes reach (services.auth.scopes).
    patient: str | None = None

    @property
    def is_system(self) -> bool:
        return self.client_id is not None and self.client_id == self.subject
