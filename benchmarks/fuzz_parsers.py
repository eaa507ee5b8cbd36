"""Mutation fuzzing of the readers over the shared real samples: 0 tracebacks, 0 hangs.

``python -m benchmarks fuzz`` runs 10,000 mutated inputs per format (FHIR JSON/NDJSON,
HL7 v2, DICOM, NIfTI, cohort manifest) and writes ``results/fuzz.json``;
``python -m benchmarks.fuzz_parsers --inputs N --seed S [--formats a,b] [--jobs 2]`` does
the same with other sizes, and ``--replay dicom:123`` runs one input in this process
with its full traceback (``--keep DIR`` keeps the input files).

Every input comes from ``(format, seed, index)`` alone, so a failure listed in the
results replays exactly. What counts as a failure is defined in
:mod:`benchmarks.fuzz_targets`; how inputs are isolated in
:mod:`benchmarks.fuzz_isolation`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.fuzz_isolation import IsolatedFuzzer
from benchmarks.fuzz_targets import FAILURES, FORMATS, Outcome, case_rng, make_target

__all__ = ["SEEDS", "fuzz_format", "run", "summarise"]

#: One fixed seed per format (issue 17, formats 1-5).
SEEDS = {"fhir": 1701, "hl7v2": 1702, "dicom": 1703, "nifti": 1704, "manifest": 1705}
INPUTS = 10_000
TIMEOUT_S = 5.0
RESULTS = Path(__file__).parent / "results" / "fuzz.json"


def summarise(fmt: str, seed: int, outcomes: list[Outcome], wall_s: float,
              restarts: int = 0) -> dict[str, Any]:
    """The per-format result: counts by outcome, refusal types, timings, first failures."""
    kinds = Counter(o.kind for o in outcomes)
    times = sorted(o.seconds for o in outcomes if o.kind not in ("hang", "crash"))
    refused = Counter(o.error_type for o in outcomes if o.kind == "refused")
    failures = [o for o in outcomes if o.kind in FAILURES]
    return {
        "inputs": len(outcomes), "seed": seed,
        "tracebacks": kinds["traceback"], "hangs": kinds["hang"], "crashes": kinds["crash"],
        "leaks": kinds["leak"], "unlocated": kinds["unlocated"],
        "harness_errors": kinds["harness"],
        "outcomes": {k: kinds[k] for k in ("ok", "refused", *FAILURES)},
        "refused_by_type": dict(refused.most_common()),
        "wall_s": round(wall_s, 1),
        "input_s": {"median": round(statistics.median(times), 4) if times else None,
                    "p99": round(times[int(0.99 * (len(times) - 1))], 4) if times else None,
                    "max": round(times[-1], 3) if times else None},
        "worker_restarts": restarts,
        "failures": [o.to_json() for o in failures[:25]],
    }


def fuzz_format(fmt: str, seed: int, inputs: int, *, timeout_s: float = TIMEOUT_S,
                memory_mb: int = 2048, log: Any = None) -> dict[str, Any]:
    """Run ``inputs`` mutated inputs of ``fmt`` through an isolated worker; summarise."""
    fuzzer = IsolatedFuzzer(fmt, seed, timeout_s=timeout_s, memory_mb=memory_mb)
    started = time.perf_counter()
    step = max(1, inputs // 10)

    def progress(outcome: Outcome) -> None:
        if outcome.kind in FAILURES and log is not None:
            log.write(f"[{fmt}] input {outcome.index}: {outcome.kind} {outcome.error_type} "
                      f"at {outcome.where} ({outcome.mutation})\n")
        if log is not None and (outcome.index + 1) % step == 0:
            log.write(f"[{fmt}] {outcome.index + 1}/{inputs} "
                      f"({time.perf_counter() - started:.0f} s)\n")
            log.flush()

    outcomes = fuzzer.run(range(inputs), progress)
    return summarise(fmt, seed, outcomes, time.perf_counter() - started, fuzzer.restarts)


def _fuzz_all(formats: list[str], seeds: dict[str, int], inputs: int, jobs: int,
              log: Any) -> dict[str, dict[str, Any]]:
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {fmt: pool.submit(fuzz_format, fmt, seeds[fmt], inputs, log=log)
                   for fmt in formats}
        return {fmt: futures[fmt].result() for fmt in formats}


def _summary(by_format: dict[str, dict[str, Any]]) -> str:
    total = sum(r["inputs"] for r in by_format.values())
    bad = {k: sum(r[k] for r in by_format.values())
           for k in ("tracebacks", "hangs", "crashes", "leaks", "unlocated")}
    worst = max((r["input_s"]["max"] or 0.0) for r in by_format.values())
    inputs = {r["inputs"] for r in by_format.values()}
    per = f"{inputs.pop():,}" if len(inputs) == 1 else "varying"
    return (f"{len(by_format)} formats x {per} mutated inputs ({total:,}): "
            f"{bad['tracebacks']} tracebacks, {bad['hangs']} hangs, {bad['crashes']} crashes, "
            f"{bad['leaks']} value leaks, {bad['unlocated']} unlocated errors; slowest input "
            f"{worst:.2f} s (limit {TIMEOUT_S:g} s); seeds "
            + ", ".join(f"{f} {r['seed']}" for f, r in by_format.items()))


def run(quick: bool = False) -> dict[str, Any]:
    """``python -m benchmarks fuzz``: every format, 10,000 inputs each (300 with ``quick``)."""
    by_format = _fuzz_all(list(FORMATS), SEEDS, 300 if quick else INPUTS, 1, sys.stderr)
    return {"summary": _summary(by_format), "timeout_s": TIMEOUT_S, "formats": by_format}


def replay(fmt: str, seed: int, index: int, keep: Path | None) -> None:
    """Run one input in this process, uncaught, so its full traceback shows."""
    target = make_target(fmt)
    scratch = keep or Path(tempfile.mkdtemp(prefix="clinfuse-fuzz-replay-"))
    folder = scratch / "case"
    folder.mkdir(parents=True, exist_ok=True)
    description, thunk = target.case(case_rng(fmt, seed, index), folder)
    print(f"{fmt} seed {seed} input {index}: {description}\ninput files in {folder}")
    started = time.perf_counter()
    try:
        thunk()
    except target.accepted as exc:
        print(f"refused ({type(exc).__name__}): {exc}")
    else:
        print("ok")
    print(f"{time.perf_counter() - started:.3f} s")


def _write(by_format: dict[str, dict[str, Any]], started: float) -> None:
    from benchmarks.__main__ import BENCHMARKS, git_commit, machine, write_table

    merged = by_format
    if RESULTS.exists():  # formats run separately are merged into one result
        previous = json.loads(RESULTS.read_text())["result"]["formats"]
        merged = {f: by_format.get(f) or previous[f] for f in FORMATS
                  if f in by_format or f in previous}
    commit = git_commit()
    for entry in by_format.values():
        entry["commit"] = commit
    entry = {"benchmark": "fuzz", "title": BENCHMARKS["fuzz"][1], "quick": False,
             "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(),
             "commit": commit, "seconds": round(time.perf_counter() - started, 2),
             "result": {"summary": _summary(merged), "timeout_s": TIMEOUT_S,
                        "formats": merged}}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(entry, indent=2) + "\n")
    write_table()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fuzz_parsers",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=INPUTS, help="per format")
    parser.add_argument("--seed", type=int, help="one seed for every format "
                        "(default: a fixed seed per format, see SEEDS)")
    parser.add_argument("--formats", default=",".join(FORMATS),
                        help=f"comma-separated subset of {','.join(FORMATS)}")
    parser.add_argument("--jobs", type=int, default=1, help="formats fuzzed at once")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--replay", metavar="FORMAT:INDEX", help="run one input in-process")
    parser.add_argument("--keep", type=Path, help="with --replay: folder for the input files")
    args = parser.parse_args(argv)
    seeds = {f: args.seed if args.seed is not None else SEEDS[f] for f in FORMATS}
    if args.replay:
        fmt, _, index = args.replay.partition(":")
        replay(fmt, seeds[fmt], int(index), args.keep)
        return 0
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        parser.error(f"unknown format(s) {unknown}; choose from {list(FORMATS)}")
    started = time.perf_counter()
    by_format = _fuzz_all(formats, seeds, args.inputs, args.jobs, sys.stderr)
    print(json.dumps({"summary": _summary(by_format), "formats": by_format}, indent=2))
    if not args.no_write:
        _write(by_format, started)
    failed = sum(r[k] for r in by_format.values()
                 for k in ("tracebacks", "hangs", "crashes", "leaks", "unlocated",
                           "harness_errors"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
