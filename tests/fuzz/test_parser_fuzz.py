"""The parser fuzzer in the suite: a few hundred mutated inputs per format, fixed seeds.

The same harness as ``python -m benchmarks fuzz`` (10,000 per format, results in
benchmarks/results/fuzz.json): inputs are mutated shared samples, run in a bounded
worker process; any traceback, hang (5 s), crash, unlocated error or leaked patient
value fails the test, naming the input and how to replay it.
"""

from __future__ import annotations

import functools
import os
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.fuzz_isolation import IsolatedFuzzer
from benchmarks.fuzz_mutations import MARKER
from benchmarks.fuzz_parsers import SEEDS
from benchmarks.fuzz_targets import FAILURES, FORMATS, Outcome, Target, case_rng, make_target
from benchmarks.fuzz_targets import run_case as run_fuzz_case
from pipelines.imaging.volume import ImageError
from tests.shared_data import shared_data_dir

INPUTS = 250
SHARED = {"fhir": "fhir", "hl7v2": "hl7v2", "dicom": "dicom", "nifti": "nifti"}


def describe(fmt: str, failures: list[Outcome]) -> str:
    first = failures[0]
    return (f"{len(failures)} failing input(s); first: input {first.index} {first.kind} "
            f"{first.error_type} at {first.where} ({first.mutation}); replay with "
            f"python -m benchmarks.fuzz_parsers --replay {fmt}:{first.index}")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_mutated_inputs_give_no_traceback_or_hang(fmt: str) -> None:
    if fmt in SHARED:
        shared_data_dir(SHARED[fmt])
    fuzzer = IsolatedFuzzer(fmt, SEEDS[fmt], timeout_s=5.0)
    outcomes = fuzzer.run(range(INPUTS))
    failures = [o for o in outcomes if o.kind in FAILURES]
    assert not failures, describe(fmt, failures)
    kinds = Counter(o.kind for o in outcomes)
    # Both paths ran: mutants the reader took and mutants it refused.
    assert kinds["ok"] >= INPUTS // 10 and kinds["refused"] >= INPUTS // 10, kinds


# --------------------------------------------------------------------------- hypothesis


@functools.cache
def prepared(fmt: str) -> Target:
    return make_target(fmt)


@pytest.mark.parametrize("fmt", ["fhir", "hl7v2", "manifest"])
def test_mutations_driven_by_hypothesis(fmt: str) -> None:
    """The pure-Python readers in-process, with hypothesis drawing every mutation choice
    (``st.randoms``), so a failure shrinks to the fewest, simplest mutations."""
    if fmt in SHARED:
        shared_data_dir(SHARED[fmt])
    target = prepared(fmt)

    @settings(max_examples=60, derandomize=True, deadline=5_000, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(rng=st.randoms(use_true_random=False))
    def check(rng: random.Random) -> None:
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch)
            description, thunk = target.case(rng, folder)
            try:
                texts = thunk()
            except target.accepted as exc:
                assert MARKER not in str(exc), description
                assert target.located(exc, folder), (description, str(exc))
            else:
                assert not [t for t in texts if MARKER in t], description

    check()


# --------------------------------------------------------------------------- the harness


class Scripted(Target):
    """A target whose behaviour per input follows the input's own generator."""

    name = "scripted"
    BEHAVIOURS = ("ok", "refused", "traceback", "leak", "unlocated", "hang", "crash")

    def prepare(self) -> None:
        self.accepted = (ImageError,)

    @classmethod
    def behaviour(cls, rng: random.Random) -> str:
        return cls.BEHAVIOURS[rng.randrange(len(cls.BEHAVIOURS))]

    def case(self, rng: random.Random, folder: Path):  # type: ignore[no-untyped-def]
        what = self.behaviour(rng)

        def act() -> list[str]:
            if what == "refused":
                raise ImageError("not a volume", source=str(folder / "x.dcm"))
            if what == "traceback":
                raise KeyError("Rows")
            if what == "leak":
                raise ImageError(f"PatientName {MARKER}", source=str(folder))
            if what == "unlocated":
                raise ImageError("not a volume")
            if what == "hang":
                time.sleep(60)
            if what == "crash":
                os._exit(3)
            return []

        return what, act


SCRIPTED = f"{__name__}:Scripted"


def test_harness_classifies_each_outcome_and_survives_hangs_and_crashes() -> None:
    seed, count = 7, 16
    expected = [Scripted.behaviour(case_rng(SCRIPTED, seed, i)) for i in range(count)]
    assert {"hang", "crash", "ok", "traceback"} <= set(expected)  # the seed covers them
    fuzzer = IsolatedFuzzer(SCRIPTED, seed, timeout_s=1.0)
    outcomes = fuzzer.run(range(count))
    assert [o.kind for o in outcomes] == expected
    assert fuzzer.restarts == expected.count("hang") + expected.count("crash")
    traceback = next(o for o in outcomes if o.kind == "traceback")
    assert traceback.error_type == "KeyError" and "test_parser_fuzz.py" in str(traceback.where)
    crash = next(o for o in outcomes if o.kind == "crash")
    assert crash.error_type == "worker exit code 3"
    leak = next(o for o in outcomes if o.kind == "leak")
    assert MARKER not in str(leak.where) and "<MARKER>" in str(leak.where)


def test_same_seed_and_index_give_the_same_input() -> None:
    shared_data_dir("hl7v2")
    target = prepared("hl7v2")
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        first = run_fuzz_case(target, "hl7v2", 1702, 11, Path(a))
        second = run_fuzz_case(target, "hl7v2", 1702, 11, Path(b))
        other = run_fuzz_case(target, "hl7v2", 1702, 12, Path(b))
    assert first.mutation == second.mutation and first.kind == second.kind
    assert other.mutation != first.mutation
