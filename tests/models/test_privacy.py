"""Hashed membership, overlap refusal, background summaries, identifier scans."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.artifact import save_artifact
from models.privacy import (
    PatientOverlapError,
    check_disjoint,
    hashed_ids,
    membership_fingerprint,
    new_salt,
    scan_for_identifiers,
    summarise_background,
)
from tests.models.artifact_fakes import fake_config, fake_tensors

SALT = b"0123456789abcdef-test-salt"
MRNS = ["MRN-884201", "MRN-884202", "MRN-884203"]


def test_hashed_ids_are_keyed_and_stable() -> None:
    a = hashed_ids(MRNS, SALT)
    assert a == hashed_ids(MRNS, SALT)
    assert len(set(a)) == 3 and all(len(h) == 64 for h in a)
    assert hashed_ids(MRNS, new_salt()) != a
    with pytest.raises(ValueError, match="salt has 4 bytes"):
        hashed_ids(MRNS, b"salt")


def test_check_disjoint() -> None:
    train, test = hashed_ids(MRNS[:2], SALT), hashed_ids(MRNS[1:], SALT)
    with pytest.raises(PatientOverlapError, match=r"1 patient\(s\) are in both train and test"):
        check_disjoint(train, test)
    check_disjoint(train[:1], test)


def test_membership_fingerprint_without_identifiers(tmp_path: Path) -> None:
    membership = membership_fingerprint(MRNS[:2] * 3, MRNS[2:], SALT)
    assert membership["n_train_patients"] == 2 and membership["n_test_patients"] == 1
    with pytest.raises(PatientOverlapError):
        membership_fingerprint(MRNS, MRNS[:1], SALT)

    X = np.random.default_rng(0).normal(size=(60, 3))
    art = save_artifact(tmp_path / "m", config=fake_config(), tensors=fake_tensors(),
                        documents={"training_data": {"membership": membership},
                                   "shap_background": {"centroids": summarise_background(X, 4)}},
                        signing_key=None)
    scan_for_identifiers(art, MRNS)
    (art / "config.json").write_text('{"note": "mrn-884203"}')  # a leak, in another case
    with pytest.raises(AssertionError, match=r"config\.json contains identifiers\[2\]"):
        scan_for_identifiers(art, MRNS)


def test_summarise_background_has_no_raw_rows() -> None:
    rng = np.random.default_rng(1)
    X = np.vstack([rng.normal(loc=c, size=(20, 4)) for c in (0.0, 5.0, 10.0)])
    X = np.vstack([X, [[100.0, 100.0, 100.0, 100.0]]])  # an outlier patient
    centroids = summarise_background(X, k=16, seed=0, min_cluster_size=5)
    assert centroids.shape[1] == 4 and 1 <= centroids.shape[0] <= 12
    distances = np.abs(X[:, None, :] - centroids[None, :, :]).sum(axis=2)
    assert distances.min() > 1e-6  # the outlier is averaged with others, not stored alone
    np.testing.assert_array_equal(centroids, summarise_background(X, k=16, seed=0))
    with_nan = np.zeros((5, 4))
    with_nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="1 NaN/inf values; impute first"):
        summarise_background(with_nan)
    with pytest.raises(ValueError, match="X has 3 rows"):
        summarise_background(X[:3])
