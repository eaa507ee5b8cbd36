"""HL7 v2 messages/s to PatientRecords (fast reader) vs hl7apy ``parse_message`` with groups.

Both run in this process on the same shared sample messages (already split and
CR-normalised, which favours hl7apy: it gets no BOM or LF handling to do).
The baseline only parses; ours parses, maps to FHIR R4 and builds PatientRecords.
"""

from __future__ import annotations

import contextlib
import os
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from fhir_adapters.errors import NotPatientData
from fhir_adapters.hl7v2 import records_from_hl7
from fhir_adapters.hl7v2_parse import disagreements, split_messages

# Same location rule as tests/shared_data.py.
SAMPLES = Path(os.environ.get("CLINFUSE_SHARED_DATA", "/work/shared/data")) / "hl7v2"
GOAL = 20.0


def _messages() -> list[str]:
    if not SAMPLES.is_dir():
        raise FileNotFoundError(f"shared HL7 v2 samples not found at {SAMPLES}")
    return [m for path in sorted(SAMPLES.rglob("*.hl7"))
            for m in split_messages(path.read_bytes())]


def _ours(messages: list[str]) -> int:
    records = 0
    for message in messages:
        with contextlib.suppress(NotPatientData):  # a PID-less message is a valid outcome
            records += len(records_from_hl7(message))
    return records


def _hl7apy(messages: list[str]) -> None:
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    for message in messages:
        parse_message(message, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=True)


def run(quick: bool = False) -> dict[str, Any]:
    """Rates (messages/s) of both paths, their ratio, and the agreement check's result.

    ``quick`` times hl7apy and checks agreement on the first 15 messages only.
    """
    messages = _messages()
    baseline_set = messages[:15] if quick else messages
    budget = 0.3 if quick else 2.0

    _ours(messages)  # warm imports and caches for both, outside the timings
    _hl7apy(baseline_set[:1])

    rounds, records, started = 0, 0, time.perf_counter()
    while True:
        records = _ours(messages)
        rounds += 1
        elapsed = time.perf_counter() - started
        if elapsed >= budget and rounds >= 3:
            break
    ours_rate = rounds * len(messages) / elapsed

    started = time.perf_counter()
    _hl7apy(baseline_set)
    hl7apy_rate = len(baseline_set) / (time.perf_counter() - started)

    failures = [m for m in baseline_set if disagreements(m)]
    ratio = ours_rate / hl7apy_rate
    return {
        "messages": len(messages),
        "records": records,
        "ours_messages_per_s": round(ours_rate, 1),
        "hl7apy_messages_per_s": round(hl7apy_rate, 2),
        "hl7apy_messages_timed": len(baseline_set),
        "ratio": round(ratio, 1),
        "goal_ratio": GOAL,
        "meets_goal": ratio >= GOAL,
        "agreement_checked": len(baseline_set),
        "agreement_passed": not failures,
        "agreement_failures": len(failures),
        "hl7apy_version": version("hl7apy"),
        "summary": f"{ours_rate:,.0f} vs {hl7apy_rate:,.1f} msg/s ({ratio:,.0f}x), "
                   f"agreement {'ok' if not failures else 'FAILED'}",
    }
