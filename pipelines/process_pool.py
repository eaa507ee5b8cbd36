"""Process pools whose workers never start as a fork of a process that runs torch.

Forking copies the parent's memory but not its threads. Once torch (or OpenMP, or
a BLAS) has started its intra-op thread pool, a forked child inherits that pool's
locks in whatever state the parent's threads left them, and the child's first
parallel op waits on them forever: ``clinfuse train`` hung this way after embedding
the notes, with both image workers in a futex wait. Every pool in the project is
made here, with the ``forkserver`` start method (a clean single-threaded server
process forks the workers) or, where the platform has none, ``spawn``.

Workers therefore import their function's module afresh: the function and its
arguments must be picklable and importable (module level, no lambdas), and state
a worker needs must be passed to it, not inherited.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.context import BaseContext
from typing import Any

__all__ = ["SAFE_START_METHOD", "process_pool", "safe_context"]

#: The start method every pool uses: safe after the parent has started threads.
SAFE_START_METHOD = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


def safe_context() -> BaseContext:
    """The multiprocessing context of :data:`SAFE_START_METHOD`."""
    return mp.get_context(SAFE_START_METHOD)


def process_pool(workers: int, *, initializer: Callable[..., Any] | None = None,
                 initargs: tuple[Any, ...] = ()) -> ProcessPoolExecutor:
    """A ``ProcessPoolExecutor`` of ``workers`` processes started safely (never forked).

    Parameters
    ----------
    workers : int
        Number of worker processes (at least 1).
    initializer, initargs
        As for ``ProcessPoolExecutor``; both must be picklable.
    """
    return ProcessPoolExecutor(max_workers=max(1, int(workers)), mp_context=safe_context(),
                               initializer=initializer, initargs=initargs)
