"""Locate the shared test data (/work/shared/data), which never lives in the repo.

Tests that need it call :func:`shared_data_dir`: without the data they skip, and
under ``CI=true`` they fail, so CI cannot silently go green on nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

#: The repository sits beside ``shared/`` (``/work/main`` and ``/work/shared``).
DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data_dir(sub: str) -> Path:
    """``<shared data>/<sub>``; skips (or fails under CI=true) when it is absent."""
    root = Path(os.environ.get("CLINFUSE_SHARED_DATA", DEFAULT_ROOT))
    path = root / sub
    if not path.is_dir():
        message = f"shared data folder {path} is absent"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI=true: missing shared data is a failure)")
        pytest.skip(message)
    return path
