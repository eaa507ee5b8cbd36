"""Outer splits of ``clinfuse evaluate --cv``: patient-grouped folds, by label or by time.

Two schemes; in both a patient's rows are all on one side of every split.

``grouped`` (default)
    scikit-learn's ``StratifiedGroupKFold`` (shuffled, ``random_state`` given): K folds
    of patients with about the same event rate each. ``repeats`` R draws R such
    partitions from seeds ``seed, seed + 1, ...``; within a repeat every row is in
    exactly one test fold.

``temporal``
    How a hospital validates: train on the past, test on what came after. Patients are
    ordered by their first ``index_time`` and cut into K + 1 blocks of about equal
    patient count (forward chaining, an expanding window). Fold k (1..K) tests on
    block k and trains on blocks 0..k-1, keeping only training rows whose index time
    is strictly before the earliest index time of the test block, so every test index
    time comes after every training index time even when a patient has several rows.
    Block 0 is only ever training data, so about K/(K + 1) of the patients get an
    out-of-fold score. The split is deterministic: one repeat.

``external``
    Train on one cohort, test on another (``--train-manifest``): a fresh cohort, a
    later period or another site. The two manifests are stacked, training rows first;
    one fold trains on the first and tests on the second. A patient in both is kept
    on the training side only (:func:`external_fold` drops their test rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

__all__ = ["SPLITS", "Fold", "SplitError", "external_fold", "grouped_folds", "temporal_folds"]

SplitKind = Literal["grouped", "temporal", "external"]
SPLITS: tuple[SplitKind, ...] = ("grouped", "temporal", "external")


class SplitError(ValueError):
    """The cohort cannot be split as asked; the message says why."""


@dataclass(frozen=True)
class Fold:
    """One outer split: row indices into the manifest."""

    repeat: int
    fold: int
    train: np.ndarray
    test: np.ndarray
    seed: int | None = None  # the partition's random_state (grouped only)


def grouped_folds(patient_ids: np.ndarray, y: np.ndarray, k: int, *, repeats: int = 1,
                  seed: int = 0) -> list[Fold]:
    """K patient-grouped, label-stratified folds, ``repeats`` times with seeds seed + r."""
    if k < 2:
        raise SplitError(f"--cv needs at least 2 folds, got {k}")
    if repeats < 1:
        raise SplitError(f"--repeats must be at least 1, got {repeats}")
    pids = np.asarray(patient_ids).astype(str)
    y = np.asarray(y).astype(int)
    for label in (0, 1):
        n = len(set(pids[y == label]))
        if n < k:
            raise SplitError(f"{k} folds need at least {k} patients with label {label}; "
                             f"the cohort has {n}")
    folds = []
    for r in range(repeats):
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed + r)
        for f, (train, test) in enumerate(splitter.split(np.zeros(len(y)), y, groups=pids)):
            folds.append(Fold(r, f, np.sort(train), np.sort(test), seed + r))
    return folds


def temporal_folds(patient_ids: np.ndarray, index_time: pd.Series | np.ndarray, y: np.ndarray,
                   k: int) -> list[Fold]:
    """K forward-chaining folds over K + 1 blocks of patients ordered by first index time."""
    if k < 1:
        raise SplitError(f"--cv needs at least 1 fold with --split temporal, got {k}")
    pids = np.asarray(patient_ids).astype(str)
    times = pd.to_datetime(pd.Series(np.asarray(index_time)), utc=True, errors="coerce")
    if times.isna().any():
        raise SplitError(f"--split temporal needs an index_time on every row; "
                         f"{int(times.isna().sum())} row(s) have none")
    y = np.asarray(y).astype(int)
    t = times.dt.tz_localize(None).to_numpy().astype("datetime64[ns]").view(np.int64)
    first = pd.Series(t).groupby(pids).min()
    # Ties broken by patient id, so the order does not depend on row order.
    order = sorted(first.index, key=lambda p: (int(first[p]), p))
    if len(order) < k + 1:
        raise SplitError(f"--split temporal with {k} folds needs at least {k + 1} patients")
    blocks = np.array_split(np.asarray(order, dtype=object), k + 1)
    block_of = {p: b for b, members in enumerate(blocks) for p in members}
    row_block = np.array([block_of[p] for p in pids])
    folds = []
    for f in range(1, k + 1):
        test = np.flatnonzero(row_block == f)
        cutoff = t[test].min()
        train = np.flatnonzero((row_block < f) & (t < cutoff))
        for name, rows in (("training", train), ("test", test)):
            if len(np.unique(y[rows])) < 2:
                raise SplitError(f"--split temporal: the {name} rows of fold {f} have one "
                                 f"class only; use fewer folds")
        folds.append(Fold(0, f - 1, train, test))
    return folds


def external_fold(patient_ids: np.ndarray, y: np.ndarray, n_train: int) -> Fold:
    """One fold over stacked manifests: rows ``< n_train`` train, the rest test.

    Test rows of a patient who is also in the training rows are left out of the test
    side, so no patient is on both sides.
    """
    pids = np.asarray(patient_ids).astype(str)
    y = np.asarray(y).astype(int)
    train = np.arange(n_train)
    seen = set(pids[train])
    test = np.array([i for i in range(n_train, len(pids)) if pids[i] not in seen], dtype=int)
    for name, rows in (("training", train), ("test", test)):
        if len(rows) == 0 or len(np.unique(y[rows])) < 2:
            raise SplitError(f"the {name} manifest needs rows of both labels"
                             + ("" if len(rows) or name == "training" else
                                " (every test patient is also in the training manifest)"))
    return Fold(0, 0, train, test)
