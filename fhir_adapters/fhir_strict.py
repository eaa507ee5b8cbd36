"""Strict FHIR R4 validation with ``fhir.resources`` (its R4B models), as located Issues.

``fhir.resources`` 8 defaults to R5, so the models come from ``fhir.resources.R4B``,
whose resources are R4's (with R4B's few additions). Each resource is validated
on its own so a failure is located as ``Bundle.entry[3].resource.birthDate``.

pydantic's messages often quote the offending input, which can be a patient's
value, so issues are written from the error type and location only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from fhir_adapters.errors import Issue, IssueCode

__all__ = ["issues_from_validation_error", "validate_document", "validate_resource"]

#: pydantic / fhir_core error type -> (issue code, value-free description).
_ERROR_TEXT: dict[str, tuple[IssueCode, str]] = {
    "missing": ("required", "required element is missing"),
    "model_field_validation.missing": ("required", "required element is missing"),
    "extra_forbidden": ("structure", "is not an element of this type (unknown element)"),
    "string_type": ("structure", "must be a JSON string"),
    "string_pattern_mismatch": ("value", "does not match its FHIR datatype's pattern"),
    "string_too_short": ("value", "must not be empty"),
    "int_type": ("structure", "must be an integer"),
    "int_parsing": ("structure", "must be an integer"),
    "int_from_float": ("structure", "must be an integer"),
    "float_type": ("structure", "must be a number"),
    "float_parsing": ("structure", "must be a number"),
    "decimal_type": ("structure", "must be a number"),
    "decimal_parsing": ("structure", "must be a number"),
    "bool_type": ("structure", "must be a boolean"),
    "bool_parsing": ("structure", "must be a boolean"),
    "list_type": ("structure", "must be an array"),
    "dict_type": ("structure", "must be an object"),
    "model_type": ("structure", "must be an object"),
    "model_attributes_type": ("structure", "must be an object"),
    "literal_error": ("value", "is not one of the allowed codes"),
    "enum": ("value", "is not one of the allowed codes"),
    "value_error": ("value", "does not conform to its FHIR datatype"),
    "assertion_error": ("invariant", "violates a FHIR invariant"),
}


def _model_class(resource_type: str) -> Any:
    from fhir.resources.R4B import get_fhir_model_class

    return get_fhir_model_class(resource_type)


def validate_resource(
    resource: Mapping[str, Any], expression: str, label: str | None = None
) -> list[Issue]:
    """Validate one resource; issues are located under ``expression`` (e.g. ``Patient``)."""
    rt = resource.get("resourceType")
    prefix = f"{label}: " if label else ""
    try:
        cls = _model_class(str(rt))
    except (ValueError, KeyError):
        return [Issue("not-supported", f"{prefix}resource type {rt!r} has no R4B model, so it "
                      "cannot be validated strictly; ingest without strict=True", expression)]
    try:
        cls.model_validate(dict(resource))
    except ValidationError as e:
        return issues_from_validation_error(e, expression, label)
    except (KeyError, TypeError, ValueError) as e:
        # fhir_core raises plain errors for e.g. an unknown type inside `contained`.
        return [Issue("structure", f"{prefix}could not be validated ({type(e).__name__}); "
                      "check contained resources and choice elements", expression)]
    return []


def validate_document(document: Mapping[str, Any]) -> list[Issue]:
    """Validate a parsed FHIR JSON document: a Bundle entry by entry, or one resource."""
    rt = document.get("resourceType")
    if rt != "Bundle":
        return validate_resource(document, str(rt))
    entries = document.get("entry")
    # The Bundle itself is validated without its resources, which are validated one by
    # one below so each issue names its entry.
    shell = dict(document)
    if isinstance(entries, list):
        shell["entry"] = [
            {k: v for k, v in e.items() if k != "resource"} if isinstance(e, dict) else e
            for e in entries
        ]
    issues = validate_resource(shell, "Bundle")
    if isinstance(entries, list):
        for i, entry in enumerate(entries):
            if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
                issues.extend(validate_resource(entry["resource"], f"Bundle.entry[{i}].resource"))
    return issues


def issues_from_validation_error(
    error: ValidationError, expression: str, label: str | None = None
) -> list[Issue]:
    """Located, value-free Issues from a pydantic ValidationError.

    Only the error type and location are used: ``error.errors()`` carries the
    input and messages that may quote it, and neither may reach a log.
    """
    prefix = f"{label}: " if label else ""
    issues: list[Issue] = []
    seen: set[tuple[str, str]] = set()
    for err in error.errors(include_url=False, include_input=False, include_context=False):
        where = _fhirpath(expression, err.get("loc", ()))
        etype = str(err.get("type", "value_error"))
        code, text = _ERROR_TEXT.get(etype, ("value", f"is invalid ({etype})"))
        if where == expression and etype == "value_error":
            code, text = "invariant", "violates a FHIR rule for this resource type"
        if (where, etype) in seen:
            continue
        seen.add((where, etype))
        issues.append(Issue(code, f"{prefix}{text}", where))
    return issues


def _fhirpath(expression: str, loc: tuple[Any, ...] | list[Any]) -> str:
    path = expression
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and part.replace("_", "").isalnum():
            path += f".{part}"
        # Other parts (validator names such as "function-after[...]") are not locations.
    return path
