"""Keeping patient identifiers and raw training rows out of model artifacts.

* :func:`hashed_ids` / :func:`membership_fingerprint` record which patients
  were in train and test as keyed hashes (HMAC-SHA256). The salt is a secret
  kept by the training site, never written to the artifact: without it, the
  hashes cannot be matched against a list of medical record numbers.
* :func:`check_disjoint` refuses a split where a patient is in both train and test.
* :func:`summarise_background` stores k-means centroids instead of training rows
  for the SHAP background, and makes every centroid an average of several patients.
* :func:`scan_for_identifiers` is the test-side check that none of that leaked.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.cluster import KMeans

__all__ = [
    "PatientOverlapError",
    "check_disjoint",
    "hashed_ids",
    "membership_fingerprint",
    "new_salt",
    "scan_for_identifiers",
    "summarise_background",
]

_MIN_SALT_BYTES = 16


class PatientOverlapError(ValueError):
    """A patient is in both the training and the test set (leakage)."""


def new_salt() -> bytes:
    """A fresh 32-byte random salt for :func:`hashed_ids`; store it as a site secret."""
    return secrets.token_bytes(32)


def hashed_ids(ids: Iterable[object], salt: bytes | str) -> list[str]:
    """HMAC-SHA256 of each id (as ``str``) under ``salt``, hex, in input order.

    A plain hash of an MRN is reversible by hashing every possible MRN; the keyed
    hash is not, as long as ``salt`` stays secret. Use the same salt for train and
    test of one model so that :func:`check_disjoint` can compare them.
    """
    key = salt.encode("utf-8") if isinstance(salt, str) else bytes(salt)
    if len(key) < _MIN_SALT_BYTES:
        raise ValueError(f"salt has {len(key)} bytes; use at least {_MIN_SALT_BYTES} "
                         "random bytes (models.privacy.new_salt())")
    return [hmac.new(key, str(i).encode("utf-8"), hashlib.sha256).hexdigest() for i in ids]


def check_disjoint(train_hashed: Iterable[str], test_hashed: Iterable[str]) -> None:
    """Raise :class:`PatientOverlapError` when a hashed patient id is in both sets."""
    overlap = sorted(set(train_hashed) & set(test_hashed))
    if overlap:
        # Hashes, not identifiers: safe to show a prefix so the split can be debugged.
        shown = ", ".join(h[:12] for h in overlap[:3])
        raise PatientOverlapError(
            f"{len(overlap)} patient(s) are in both train and test (hashed ids {shown}"
            f"{', ...' if len(overlap) > 3 else ''}); split by patient, not by example")


def membership_fingerprint(train_ids: Iterable[object], test_ids: Iterable[object],
                           salt: bytes | str) -> dict[str, Any]:
    """The train/test membership part of a training-data fingerprint document.

    Hashes are de-duplicated and sorted so the record reveals neither example
    counts per patient nor row order. Raises :class:`PatientOverlapError` on overlap.
    """
    train = sorted(set(hashed_ids(train_ids, salt)))
    test = sorted(set(hashed_ids(test_ids, salt)))
    check_disjoint(train, test)
    return {
        "id_hash": "hmac-sha256",
        "n_train_patients": len(train),
        "n_test_patients": len(test),
        "train_patients": train,
        "test_patients": test,
    }


def summarise_background(X: np.ndarray, k: int = 16, *, seed: int = 0,
                         min_cluster_size: int = 5) -> np.ndarray:
    """At most ``k`` k-means centroids of ``X`` (rows = examples), for a SHAP background.

    A centroid of a one-patient cluster *is* that patient's row, so ``k`` is
    lowered until every cluster holds at least ``min_cluster_size`` rows.
    ``X`` must be in the model's input space, already imputed (no NaN).

    Raises
    ------
    ValueError
        ``X`` not 2-D, containing NaN/inf, or with fewer than ``min_cluster_size`` rows.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (examples x features), got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError(f"X has {int((~np.isfinite(X)).sum())} NaN/inf values; impute first "
                         "so the background is in the model's input space")
    if k < 1 or min_cluster_size < 1:
        raise ValueError(f"k and min_cluster_size must be >= 1, got {k}, {min_cluster_size}")
    n = X.shape[0]
    if n < min_cluster_size:
        raise ValueError(f"X has {n} rows; at least min_cluster_size={min_cluster_size} are "
                         "needed so no centroid is a single patient's row")
    n_clusters = min(k, n // min_cluster_size)
    while True:
        km = KMeans(n_clusters=n_clusters, random_state=seed, n_init=4).fit(X)
        sizes = np.bincount(km.labels_, minlength=n_clusters)
        if sizes.min() >= min_cluster_size or n_clusters == 1:
            centroids: np.ndarray = km.cluster_centers_
            return centroids
        # Jump straight to the number of clusters that were big enough, rather than
        # refitting once per step.
        n_clusters = max(1, min(n_clusters - 1, int((sizes >= min_cluster_size).sum())))


def scan_for_identifiers(artifact_dir: Path, identifiers: Sequence[str]) -> None:
    """Assert that no identifier string occurs in any file under ``artifact_dir``.

    Looks for the UTF-8 bytes and the JSON-escaped form, case-insensitively.
    Very short identifiers can match by chance inside binary weights: use
    realistic ones (MRNs, names, accession numbers).

    Raises
    ------
    AssertionError
        Naming the file and the identifier's position in ``identifiers``.
    """
    needles = []
    for i, ident in enumerate(identifiers):
        if not ident:
            raise ValueError(f"identifiers[{i}] is empty")
        forms = {ident.lower().encode("utf-8"), json.dumps(ident.lower())[1:-1].encode()}
        needles.append((i, forms))
    hits = []
    for path in sorted(p for p in Path(artifact_dir).rglob("*") if p.is_file()):
        data = path.read_bytes().lower()
        for i, forms in needles:
            if any(f in data for f in forms):
                hits.append(f"{path.relative_to(artifact_dir)} contains identifiers[{i}]")
    if hits:
        raise AssertionError("identifiers found in artifact: " + "; ".join(hits))
