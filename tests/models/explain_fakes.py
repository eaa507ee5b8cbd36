"""Tiny fitted fusion models for the explanation tests (seconds to fit)."""

from __future__ import annotations

import numpy as np

from models.fusion import FusionRiskModel


def small_fusion(*, hidden: int = 0, d_ehr: int = 5, d_note: int = 6, n: int = 400,
                 seed: int = 0, calibration: str = "temperature"
                 ) -> tuple[FusionRiskModel, dict[str, np.ndarray], np.ndarray]:
    """(fitted and calibrated model, X, mask): ehr carries most signal, image some, note none."""
    rng = np.random.default_rng(seed)
    X = {"image": rng.normal(size=(n, 1)).astype("float32"),
         "ehr": rng.normal(size=(n, d_ehr)).astype("float32"),
         "note": rng.normal(size=(n, d_note)).astype("float32")}
    logit = 1.5 * X["ehr"][:, 0] - 1.0 * X["ehr"][:, 1] + 0.7 * X["image"][:, 0] - 0.5
    if hidden:
        logit = logit + 0.8 * X["ehr"][:, 0] * X["ehr"][:, 1]
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    mask = rng.random((n, 3)) > 0.2
    model = FusionRiskModel(modalities=("image", "ehr", "note"), hidden=hidden, max_epochs=60,
                            patience=60, device="cpu", seed=seed, calibration=calibration)
    model.fit(X, y, mask, X_val=X, y_val=y, mask_val=mask)
    model.calibrate(X, y, mask)
    return model, X, mask
