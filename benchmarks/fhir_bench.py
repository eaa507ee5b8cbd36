"""FHIR R4 Bundles to PatientRecord: the fast path against a full ``fhir.resources`` parse.

Both sides start from the same bytes of the 10 shared Synthea patient Bundles,
in the same process. The fast path does all of its work (JSON parse, reference
resolution, checks, note decoding, PatientRecords); the baseline is
``fhir.resources.R4B`` ``Bundle.model_validate(json.loads(...))``, the cheapest
way to get validated models, which still stops short of any PatientRecord.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fhir_adapters.fhir_json import parse_fhir_datetime, records_from_json

SHARED = Path(os.environ.get("CLINFUSE_SHARED_DATA",
                             Path(__file__).resolve().parents[2] / "shared" / "data"))
SYNTHEA = SHARED / "fhir" / "synthea_r4_bundles"
GOAL = 5.0


def _patient_bundles() -> list[Path]:
    files = sorted(p for p in SYNTHEA.glob("*.json")
                   if not p.name.startswith(("hospitalInformation", "practitionerInformation")))
    if len(files) != 10:
        raise RuntimeError(f"expected the 10 shared Synthea patient Bundles in {SYNTHEA}, "
                           f"found {len(files)}; set CLINFUSE_SHARED_DATA to the shared data")
    return files


def _time(fn: Callable[[bytes], object], blobs: list[bytes], repeats: int) -> float:
    """Best-of-``repeats`` seconds for one pass over all blobs."""
    best = float("inf")
    for _ in range(repeats):
        # Cold date cache each pass, so repeats do not flatter the fast path.
        parse_fhir_datetime.cache_clear()
        started = time.perf_counter()
        for blob in blobs:
            fn(blob)
        best = min(best, time.perf_counter() - started)
    return best


def _observation_rows(obs: Any) -> int:
    """How many Observation rows a validated model should give: components, plus the
    panel itself when it has a value or no components."""
    components = len(obs.component or [])
    has_value = any(k.startswith("value") for k in obs.model_dump(exclude_none=True))
    return components + (1 if has_value or not components else 0)


def run(quick: bool = False) -> dict[str, Any]:
    """Bundles/s and entries/s of both paths, their ratio, and an agreement check."""
    import fhir.resources
    import pydantic
    from fhir.resources.R4B.bundle import Bundle

    files = _patient_bundles()
    if quick:
        files = files[:3]
    blobs = [p.read_bytes() for p in files]
    entries = sum(len(json.loads(b)["entry"]) for b in blobs)
    repeats = 1 if quick else 5

    def fast(blob: bytes) -> object:
        return records_from_json(blob)

    def baseline(blob: bytes) -> object:
        return Bundle.model_validate(json.loads(blob))

    fast(blobs[0])  # import and first-call costs out of the timing
    baseline(blobs[0])
    fast_s = _time(fast, blobs, repeats)
    base_s = _time(baseline, blobs, repeats)

    # Agreement: strict (fhir.resources-validated) and fast ingest give identical records,
    # and the validated model agrees on the facts the records carry.
    agree = 0
    mismatched: list[str] = []
    for path, blob in zip(files, blobs, strict=True):
        records = records_from_json(blob)
        model = Bundle.model_validate(json.loads(blob))
        patient = next(e.resource for e in model.entry if e.resource.get_resource_type()
                       == "Patient")
        n_obs = sum(_observation_rows(e.resource) for e in model.entry
                    if e.resource.get_resource_type() == "Observation")
        ok = (records == records_from_json(blob, strict=True) and len(records) == 1
              and records[0].demographics.birth_date == patient.birthDate
              and len(records[0].observations) == n_obs)
        agree += ok
        if not ok:
            mismatched.append(path.name)

    n = len(blobs)
    ratio = base_s / fast_s
    return {
        "bundles": n,
        "entries": entries,
        "repeats": repeats,
        "fast": {"seconds": round(fast_s, 4), "bundles_per_s": round(n / fast_s, 1),
                 "entries_per_s": round(entries / fast_s)},
        "baseline_fhir_resources_R4B": {
            "seconds": round(base_s, 4), "bundles_per_s": round(n / base_s, 1),
            "entries_per_s": round(entries / base_s)},
        "speedup": round(ratio, 2),
        "goal": GOAL,
        "meets_goal": ratio >= GOAL,
        "agreement": {"bundles_agreeing": agree, "bundles": n, "mismatched": mismatched},
        "versions": {"fhir.resources": fhir.resources.__version__,
                     "pydantic": pydantic.VERSION},
        "summary": (f"{n / fast_s:.0f} Bundles/s ({entries / fast_s:,.0f} entries/s) vs "
                    f"{n / base_s:.1f} Bundles/s for fhir.resources R4B: {ratio:.1f}x "
                    f"(goal {GOAL:.0f}x); {agree}/{n} agree"),
    }
