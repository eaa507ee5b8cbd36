"""The ingest policy for manifest rows: the smallest bad element goes, with a located warning.

A manifest is refused whole only when it is unusable as a whole (unreadable table,
missing required columns, a bad sidecar, a feature column with no number in it: an
undeclared categorical). Below that:

- a row without a usable identity or outcome is dropped: blank ``patient_id``, a
  ``label`` other than 0/1, an ``index_time`` that is not ISO 8601 (the as-of time
  decides what data may be used, so guessing it could leak), or an ``example_id``
  seen on an earlier line;
- a cell the example can live without is nulled, making that input missing: a
  non-numeric value in a numeric feature column, an ``image`` or ``note_path`` naming
  a file that does not exist.

Each is an :class:`~fhir_adapters.errors.Issue` (severity warning) naming the file,
line and column, never the value. ``read_manifest(strict=True)`` refuses instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from fhir_adapters.errors import Issue

__all__ = ["tolerate_rows"]

log = logging.getLogger(__name__)


def _issue(where: str, line: int, column: str, what: str) -> Issue:
    return Issue(code="value", severity="warning", expression=f"line {line}, column "
                 f"'{column}'", diagnostics=f"{where}: line {line}, column '{column}': {what}")


def tolerate_rows(frame: pd.DataFrame, where: str, numeric_columns: list[str], root: Path,
                  exists: Callable[[Path], bool], blank: Callable[[object], bool]
                  ) -> tuple[pd.DataFrame, list[int], list[Issue]]:
    """(the frame without bad rows and with bad cells nulled, file line of each kept row,
    warnings). ``numeric_columns`` are the feature columns meant to hold numbers."""
    lines = np.arange(len(frame)) + 2  # the header is line 1
    issues: list[Issue] = []
    drop = np.zeros(len(frame), dtype=bool)

    def rows(mask: np.ndarray, column: str, what: str) -> None:
        for i in np.flatnonzero(mask & ~drop):
            issues.append(_issue(where, int(lines[i]), column, what + "; the row is dropped"))
        drop[:] |= mask

    rows(frame["patient_id"].isna().to_numpy(), "patient_id", "blank")
    labels = pd.to_numeric(frame["label"], errors="coerce")
    rows((~labels.isin([0, 1])).to_numpy(), "label", "not 0 or 1")
    if "index_time" in frame.columns:
        times = pd.to_datetime(frame["index_time"], utc=True, errors="coerce", format="ISO8601")
        rows((times.isna() & frame["index_time"].notna()).to_numpy(), "index_time",
             "not an ISO 8601 time")
    if "example_id" in frame.columns:
        ids = frame["example_id"].astype(str)
        rows((ids.duplicated() & ~pd.Series(drop, index=frame.index)).to_numpy(),
             "example_id", "repeats an earlier line's example_id")

    for column in numeric_columns:
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = (values.isna() & frame[column].notna()).to_numpy() & ~drop
        if bad.any() and values.notna().any():  # all text: an undeclared categorical
            for i in np.flatnonzero(bad):
                issues.append(_issue(where, int(lines[i]), column,
                                     "not a number; the value is treated as missing"))
            frame.loc[frame.index[bad], column] = np.nan
    for column in ("image", "note_path"):
        if column not in frame.columns:
            continue
        absent = np.array([not blank(v) and not exists(root / str(v))
                           for v in frame[column]], dtype=bool) & ~drop
        for i in np.flatnonzero(absent):
            issues.append(_issue(where, int(lines[i]), column, "names a file that does not "
                                 "exist; the row is used without it"))
        if absent.any():
            frame[column] = frame[column].astype(object)
            frame.loc[frame.index[absent], column] = None
    for issue in issues:
        log.warning("%s", issue.diagnostics)
    kept = frame.loc[~drop].reset_index(drop=True) if drop.any() else frame
    return kept, [int(v) for v in lines[~drop]], issues
