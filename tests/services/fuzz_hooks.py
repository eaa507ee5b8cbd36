"""Schemathesis hooks for tests/services/test_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

The API takes three text or binary media types that schemathesis cannot serialize on its
own: NDJSON ($import), HL7 v2 ER7 (/hl7v2) and multipart/related (STOW-RS). Their
documented schemas are strings (or binary), sent as they are.

Schemathesis cannot generate a multipart/related body of DICOM parts at all; for the
schema-valid (positive) STOW-RS cases this sends the seeded study's real multipart body
(``CLINFUSE_FUZZ_STOW_BODY``, ``CLINFUSE_FUZZ_STOW_TYPE``), so that STOW is exercised
past its media-type check. Storing the same instances again is idempotent.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import schemathesis
from schemathesis import GenerationMode

STOW_PATHS = frozenset({"/dicomweb/studies", "/dicomweb/studies/{study}"})


def _raw(ctx: Any, value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    return repr(value).encode()


schemathesis.serializer("application/fhir+ndjson", "x-application/hl7-v2+er7",
                        "multipart/related")(_raw)


@schemathesis.hook
def before_call(ctx: Any, case: Any, **kwargs: Any) -> None:
    body_file = os.environ.get("CLINFUSE_FUZZ_STOW_BODY")
    if (not body_file or case.method.upper() != "POST" or case.path not in STOW_PATHS
            or case.meta is None or case.meta.generation.mode is not GenerationMode.POSITIVE):
        return
    case.body = Path(body_file).read_bytes()
    case.headers = {**(case.headers or {}),
                    "Content-Type": os.environ["CLINFUSE_FUZZ_STOW_TYPE"]}
