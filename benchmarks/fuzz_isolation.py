"""Run fuzz cases in a separate, bounded worker process, many inputs per process.

Decoders (pydicom's pixel plugins, openjpeg, gzip, nibabel) can loop or allocate
without bound on hostile input, and a hang or a segfault must not take the run with it.
One worker process (``forkserver`` start method: safe when the parent already has
threads) loads the target's seeds once and then runs inputs one at a time, in-process,
under an address-space limit (``RLIMIT_AS``). The parent hands it one index at a time
and waits at most ``timeout_s`` for the answer: an overrun is a ``hang``, a worker that
dies is a ``crash``; either way the worker is replaced and the run goes on with the next
index. Inputs are generated inside the worker from ``(format, seed, index)``, so only
integers and small outcome records cross the pipe.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import resource
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from benchmarks.fuzz_targets import Outcome, make_target, run_case

__all__ = ["IsolatedFuzzer"]

_START_TIMEOUT_S = 120.0
# Imported once by the fork server, so a worker replaced after a hang starts in a moment.
_PRELOAD = ["benchmarks.fuzz_targets", "pydicom", "nibabel", "pandas", "yaml",
            "fhir_adapters.sources", "fhir_adapters.hl7v2", "pipelines.imaging.convert",
            "pipelines.manifest"]


def _address_space_mb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) // 1024
    return 0


def _worker(conn: Connection, fmt: str, seed: int, memory_mb: int) -> None:
    # Library warnings, log lines and C decoders' complaints on stderr ("Corrupt JPEG
    # data") about bad input are expected by the thousand here.
    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    target = make_target(fmt)
    # The bound is on top of what the loaded libraries already map.
    limit = (_address_space_mb() + memory_mb) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    with tempfile.TemporaryDirectory(prefix=f"clinfuse-fuzz-{fmt}-") as scratch:
        conn.send(("ready", None))
        while True:
            index = conn.recv()
            if index is None:
                break
            outcome = run_case(target, fmt, seed, index, Path(scratch),
                               on_start=lambda what: conn.send(("start", what)))
            conn.send(("done", outcome))
    conn.close()


class IsolatedFuzzer:
    """One format's inputs through a bounded worker process, restarted after a hang or crash.

    Parameters
    ----------
    fmt : str
        One of :data:`benchmarks.fuzz_targets.FORMATS`.
    seed : int
        With the index, determines every input.
    timeout_s : float, default 5.0
        Per input; an overrun is a hang.
    memory_mb : int, default 2048
        Address space the worker may map beyond what its imports took.
    """

    def __init__(self, fmt: str, seed: int, *, timeout_s: float = 5.0,
                 memory_mb: int = 2048) -> None:
        self.fmt = fmt
        self.seed = seed
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.restarts = 0
        self._ctx = mp.get_context("forkserver")
        self._ctx.set_forkserver_preload(_PRELOAD)  # no effect once the server runs
        self._process: Any = None
        self._conn: Connection | None = None

    def _start(self) -> Connection:
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(target=_worker, args=(child, self.fmt, self.seed,
                                                          self.memory_mb), daemon=True)
        process.start()
        child.close()
        if not parent.poll(_START_TIMEOUT_S):
            process.kill()
            raise RuntimeError(f"fuzz worker for {self.fmt} did not start")
        try:
            kind, _ = parent.recv()
        except EOFError:
            raise RuntimeError(f"fuzz worker for {self.fmt} died while loading its seeds "
                               f"(exit code {process.exitcode})") from None
        assert kind == "ready"
        self._process, self._conn = process, parent
        return parent

    def _stop(self, kill: bool) -> None:
        if self._process is None:
            return
        if kill:
            self._process.kill()
        elif self._conn is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self._conn.send(None)
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        if self._conn is not None:
            self._conn.close()
        self._process, self._conn = None, None

    def run_one(self, index: int) -> Outcome:
        """Input ``index`` in the worker (started if needed); a hang or crash replaces it."""
        conn = self._conn or self._start()
        conn.send(index)
        description = "(not generated)"
        started = time.perf_counter()
        deadline = started + self.timeout_s
        try:
            while True:
                if not conn.poll(max(0.0, deadline - time.perf_counter())):
                    self._stop(kill=True)
                    self.restarts += 1
                    return Outcome(index, "hang", description, None,
                                   f"no answer within {self.timeout_s:g} s",
                                   time.perf_counter() - started)
                kind, payload = conn.recv()
                if kind == "start":
                    description = payload
                    # Generating the input is not the reader's time.
                    deadline = time.perf_counter() + self.timeout_s
                    continue
                outcome: Outcome = payload
                return outcome
        except (EOFError, ConnectionResetError):
            code = None
            if self._process is not None:
                self._process.join(timeout=5)
                code = self._process.exitcode
            self._stop(kill=True)
            self.restarts += 1
            return Outcome(index, "crash", description, f"worker exit code {code}",
                           None, time.perf_counter() - started)

    def run(self, indices: Iterable[int],
            progress: Callable[[Outcome], None] | None = None) -> list[Outcome]:
        """Outcomes of every index, in order; the worker is shut down at the end."""
        outcomes = []
        try:
            for index in indices:
                outcome = self.run_one(index)
                outcomes.append(outcome)
                if progress is not None:
                    progress(outcome)
        finally:
            self._stop(kill=False)
        return outcomes

