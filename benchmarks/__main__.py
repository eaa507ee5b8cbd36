"""Run the benchmarks: ``python -m benchmarks [--quick] [NAME ...]``.

Writes ``benchmarks/results/<name>.json`` and rewrites the table in
``benchmarks/README.md`` between its markers.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
RESULTS = HERE / "results"
BENCHMARKS = {
    "fhir": ("benchmarks.fhir_bench", "FHIR Bundles/s to PatientRecord vs fhir.resources R4B"),
    "hl7v2": ("benchmarks.hl7v2_bench", "HL7 v2 messages/s to PatientRecord vs hl7apy"),
    "synth": ("benchmarks.synth_bench", "clinfuse synth patients/s"),
    "notes": ("benchmarks.notes_bench", "Clinical-note embedding (MiniLM, 2 cores)"),
    "pacs": ("benchmarks.pacs_bench", "PACS ingest: STOW-RS and C-STORE (beside Orthanc)"),
    "audit": ("benchmarks.audit_bench",
              "Fairness audit: 1M rows, 4 attributes + pairs, 1000 resamples; vs fairlearn"),
    "audit_planted": ("benchmarks.audit_planted_bias",
                      "Fairness audit finds planted disparities (and only those)"),
    "imaging": ("benchmarks.imaging_bench", "DICOM series -> model-ready tensor vs MONAI"),
    "load": ("benchmarks.load_cds",
             "CDS Hooks patient-view under open-loop load (separate server process)"),
    "explain": ("benchmarks.explain_bench",
                "Explanation for one patient (p50) and EHR SHAP vs KernelExplainer"),
    "inference": ("benchmarks.inference_bench",
                  "Per-patient inference latency on the CPU, image and note embeddings cached"),
    "mllp": ("benchmarks.mllp_bench",
             "MLLP framing: unterminated frame in 64 KiB reads, pre-issue-19 reader vs framer"),
    "fuzz": ("benchmarks.fuzz_parsers",
             "Mutation fuzzing of the readers (in-process, isolated worker, 5 s and memory "
             "bound per input)"),
}
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # Other work on the machine skews absolute rates (less so the ratios), so say how busy it was.
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "load_average_1m": round(os.getloadavg()[0], 2)}


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=HERE).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run_one(name: str, quick: bool) -> dict[str, Any]:
    module_name, title = BENCHMARKS[name]
    module = importlib.import_module(module_name)
    started = time.perf_counter()
    result = module.run(quick=quick)
    return {"benchmark": name, "title": title, "quick": quick,
            "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(),
            "commit": git_commit(), "seconds": round(time.perf_counter() - started, 2),
            "result": result}


def summary_line(entry: dict[str, Any]) -> str:
    result = entry["result"]
    figure = result.get("summary") or json.dumps(result)[:120]
    m = entry["machine"]
    load = m.get("load_average_1m")
    busy = f", load {load}" if load is not None else ""
    return (f"| {entry['title']} | {figure} | {m['cpu']}, {m['cores']} cores{busy} | "
            f"{entry['date'][:10]} |")


def write_table() -> None:
    rows = ["| benchmark | figure | machine | date |", "| --- | --- | --- | --- |"]
    for name in BENCHMARKS:
        path = RESULTS / f"{name}.json"
        if path.exists():
            rows.append(summary_line(json.loads(path.read_text())))
    readme = HERE / "README.md"
    text = readme.read_text() if readme.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    readme.write_text(head + BEGIN + "\n" + "\n".join(rows) + "\n" + END + tail)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("names", nargs="*", choices=[*BENCHMARKS, []], default=[])
    parser.add_argument("--quick", action="store_true", help="small sizes, for smoke tests")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    for name in args.names or list(BENCHMARKS):
        entry = run_one(name, args.quick)
        print(json.dumps(entry, indent=2))
        if not args.no_write and not args.quick:
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / f"{name}.json").write_text(json.dumps(entry, indent=2) + "\n")
    if not args.no_write and not args.quick:
        write_table()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
