"""Fusion head, calibration, tabular preprocessing and the image encoder on toy tensors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from models.calibration import (
    IsotonicCalibration,
    PlattScaling,
    TemperatureScaling,
    calibrator_from_dict,
    make_calibrator,
)
from models.fusion import FusionRiskModel
from models.image_encoder import ImageEncoder, build_network, count_parameters
from models.tabular import TabularPreprocessor


def _ece(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    idx = np.minimum((p * bins).astype(int), bins - 1)
    return float(sum(abs(p[idx == b].mean() - y[idx == b].mean()) * (idx == b).mean()
                     for b in range(bins) if (idx == b).any()))


def _toy(n: int, seed: int, shared: bool = False) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 3))
    if shared:  # image and ehr are noisy copies of one latent: joint training halves each
        z[:, 1] = z[:, 0]
    X = {"image": (z[:, :1] + 0.3 * rng.normal(size=(n, 1))).astype(np.float32),
         "ehr": np.hstack([z[:, 1:2] + 0.3 * rng.normal(size=(n, 1)),
                           rng.normal(size=(n, 3))]).astype(np.float32),
         "note": np.hstack([z[:, 2:3], rng.normal(size=(n, 4))]).astype(np.float32)}
    logit = 1.5 * z[:, 0] + (0 if shared else 1.5 * z[:, 1]) + 1.5 * z[:, 2] - 1.5
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    return X, y


FAST = {"max_epochs": 60, "patience": 10, "batch_size": 512, "hidden": 8, "device": "cpu"}


@pytest.fixture(scope="module")
def fitted() -> tuple[FusionRiskModel, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    X, y = _toy(1500, 0)
    mask = np.random.default_rng(1).random((1500, 3)) > 0.25
    Xv, yv = _toy(600, 2)
    mv = np.random.default_rng(3).random((600, 3)) > 0.25
    model = FusionRiskModel(**FAST).fit(X, y, mask, X_val=Xv, y_val=yv, mask_val=mv)
    model.calibrate(Xv, yv, mv)
    return model, Xv, yv, mv


def test_mask_selects_modalities(fitted: tuple) -> None:
    model, X, _, _ = fitted
    n = len(next(iter(X.values())))
    alone = model.per_modality_logits(X, np.ones((n, 3), bool))
    for j in range(3):
        only = np.zeros((n, 3), bool)
        only[:, j] = True
        # The fused model with every other modality masked is that modality's logit.
        np.testing.assert_allclose(model.predict_logit(X, only), alone[:, j], atol=1e-5)
    none = model.predict_logit(X, np.zeros((n, 3), bool))
    assert np.ptp(none) < 1e-9  # nothing present: the (calibrated) bias for everyone
    # Absent inputs are ignored, NaN included.
    X_nan = dict(X, image=np.full_like(X["image"], np.nan))
    mask = np.ones((n, 3), bool)
    mask[:, 0] = False
    np.testing.assert_allclose(model.predict_logit(X_nan, mask), model.predict_logit(X, mask))
    assert np.isnan(model.per_modality_logits(X_nan, mask)[:, 0]).all()


def test_fused_beats_single_modalities(fitted: tuple) -> None:
    from sklearn.metrics import roc_auc_score

    model, X, y, mask = fitted
    fused = roc_auc_score(y, model.predict_proba(X, mask)[:, 1])
    full = np.ones_like(mask)
    singles = [roc_auc_score(y, model.per_modality_logits(X, full)[:, j]) for j in range(3)]
    assert fused > max(singles) + 0.03, (fused, singles)


def test_state_round_trip_through_json(fitted: tuple) -> None:
    model, X, _, mask = fitted
    config, state = model.to_state()
    # Artifacts store config as JSON, possibly with sorted keys.
    config = json.loads(json.dumps(config, sort_keys=True))
    again = FusionRiskModel.from_state(config, state)
    np.testing.assert_allclose(again.predict_proba(X, mask), model.predict_proba(X, mask),
                               atol=1e-7)


def test_modality_dropout_calibrates_single_modalities() -> None:
    X, y = _toy(3000, 4, shared=True)
    Xv, yv = _toy(1000, 5, shared=True)
    full, fullv = np.ones((3000, 3), bool), np.ones((1000, 3), bool)
    only = np.zeros((1000, 3), bool)
    only[:, 0] = True

    def fit(dropout: float) -> tuple[float, float]:
        m = FusionRiskModel(modality_dropout=dropout, **FAST).fit(
            X, y, full, X_val=Xv, y_val=yv, mask_val=fullv)
        p = np.clip(m.predict_proba(Xv, only)[:, 1], 1e-6, 1 - 1e-6)
        loss = float(-np.mean(yv * np.log(p) + (1 - yv) * np.log(1 - p)))
        return loss, float(m.contributions(Xv, fullv)[:, 0].std())

    # Without dropout the image branch only ever shares credit with ehr (same latent),
    # so alone it is under-confident; dropout trains the image-only subset too, which
    # makes its contribution larger and its image-only risk better (deterministic seed).
    loss_plain, scale_plain = fit(0.0)
    loss_drop, scale_drop = fit(0.5)
    assert scale_drop > scale_plain * 1.05, (scale_drop, scale_plain)
    assert loss_drop < loss_plain, (loss_drop, loss_plain)


def test_bad_inputs_are_refused(fitted: tuple) -> None:
    model, X, _, _ = fitted
    with pytest.raises(ValueError, match="mask must have shape"):
        model.predict_proba(X, np.ones((3, 3), bool))
    with pytest.raises(ValueError, match="one class"):
        FusionRiskModel(**FAST).fit(X, np.zeros(600), X_val=X, y_val=np.zeros(600))
    with pytest.raises(ValueError, match="non-finite"):
        model.predict_proba(dict(X, ehr=np.full_like(X["ehr"], np.nan)))


def test_calibration_reduces_ece_on_a_miscalibrated_toy() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-(z - 1)))).astype(int)
    raw = 3.0 * (z - 1)  # over-confident by a factor of 3
    p_raw = 1 / (1 + np.exp(-raw))
    for cal in (TemperatureScaling(), IsotonicCalibration()):
        cal.fit(raw[:2000], y[:2000])
        p = cal.predict_proba(raw[2000:])
        assert _ece(y[2000:], p) < _ece(y[2000:], p_raw[2000:]) / 3
        again = calibrator_from_dict(json.loads(json.dumps(cal.to_dict())))
        np.testing.assert_allclose(again.predict_proba(raw[:50]), cal.predict_proba(raw[:50]))
    assert TemperatureScaling().fit(raw, y).temperature_ == pytest.approx(3.0, rel=0.1)


def test_platt_recovers_slope_and_intercept_and_round_trips() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(size=6000)
    y = (rng.random(6000) < 1 / (1 + np.exp(-(0.5 * z - 1.0)))).astype(int)
    cal = PlattScaling().fit(z, y)
    assert cal.slope_ == pytest.approx(0.5, abs=0.08)
    assert cal.intercept_ == pytest.approx(-1.0, abs=0.1)
    assert cal.pattern_offsets_ == {}
    again = calibrator_from_dict(json.loads(json.dumps(cal.to_dict())))
    np.testing.assert_allclose(again.predict_proba(z[:50]), cal.predict_proba(z[:50]))
    with pytest.raises(ValueError, match="pattern_prior_sd"):
        PlattScaling(pattern_prior_sd=0.0).fit(z, y)


def test_per_pattern_intercepts_fix_a_shifted_pattern_and_shrink_rare_ones() -> None:
    rng = np.random.default_rng(2)
    n = 6000
    z = rng.normal(size=n)
    patterns = np.where(rng.random(n) < 0.3, "ehr+note", "image+ehr+note")
    patterns[:30] = "note"  # rare: its offset must stay near the shared map
    shift = np.where(patterns == "ehr+note", 0.8, 0.0)  # under-predicted by 0.8 logit
    y = (rng.random(n) < 1 / (1 + np.exp(-(z + shift)))).astype(int)
    shared = PlattScaling().fit(z, y, patterns)
    per = make_calibrator("platt-pattern").fit(z, y, patterns)
    assert isinstance(per, PlattScaling) and per.per_pattern
    offsets = per.pattern_offsets_
    assert offsets["ehr+note"] - offsets["image+ehr+note"] == pytest.approx(0.8, abs=0.15)
    assert abs(offsets["note"]) < 0.3
    sel = patterns == "ehr+note"
    assert _ece(y[sel], per.predict_proba(z, patterns)[sel]) < \
        _ece(y[sel], shared.predict_proba(z, patterns)[sel]) / 2
    again = calibrator_from_dict(json.loads(json.dumps(per.to_dict())))
    np.testing.assert_allclose(again.transform(z[:50], patterns[:50]),
                               per.transform(z[:50], patterns[:50]))
    # Without patterns (or an unseen one) no offset applies.
    np.testing.assert_allclose(per.transform(z[:5]), per.slope_ * z[:5] + per.intercept_)


def test_lbfgs_fusion_is_deterministic_and_calibrated_per_pattern() -> None:
    X, y = _toy(3000, 5)
    Xv, yv = _toy(1500, 6)
    rng = np.random.default_rng(7)
    mask = np.ones((3000, 3), bool)
    mask[rng.random(3000) < 0.3, 0] = False  # imaging missing for ~30 %
    mask_v = np.ones((1500, 3), bool)
    mask_v[rng.random(1500) < 0.3, 0] = False
    kw = {"device": "cpu", "l2": [0.003, 0.03], "modality_dropout": 0.15}
    a = FusionRiskModel(**kw).fit(X, y, mask, X_val=Xv, y_val=yv, mask_val=mask_v)
    b = FusionRiskModel(**kw).fit(X, y, mask, X_val=Xv, y_val=yv, mask_val=mask_v)
    np.testing.assert_array_equal(a.predict_logit(Xv, mask_v), b.predict_logit(Xv, mask_v))
    assert set(a.l2_by_modality_) == {"image", "ehr", "note"}
    a.calibrate(Xv, yv, mask_v)
    assert isinstance(a.calibrator_, PlattScaling) and a.calibrator_.per_pattern
    # Every pattern reachable by masking gets an offset, rare or absent ones included.
    assert {"ehr+note", "image+ehr+note", "note", "image"} <= set(a.calibrator_.pattern_offsets_)
    Xt, yt = _toy(4000, 8)
    p = a.predict_proba(Xt, np.ones((4000, 3), bool))[:, 1]
    assert _ece(yt, p) < 0.05  # 10-bin ECE of 4,000 calibrated rows is ~0.02 by noise alone
    alone = a.per_modality_logits(Xt, np.ones((4000, 3), bool))
    only_note = np.zeros((4000, 3), bool)
    only_note[:, 2] = True
    np.testing.assert_allclose(alone[:, 2], a.predict_logit(Xt, only_note), atol=1e-5)
    cfg, state = a.to_state()
    again = FusionRiskModel.from_state(json.loads(json.dumps(cfg)), state)
    np.testing.assert_allclose(again.predict_proba(Xt, mask=None),
                               a.predict_proba(Xt, mask=None), atol=1e-6)
    with pytest.raises(ValueError, match="linear branches only"):
        FusionRiskModel(solver="lbfgs", hidden=4, device="cpu").fit(X, y, X_val=Xv, y_val=yv)


def test_tabular_preprocessor_imputes_and_flags() -> None:
    train = np.array([[1.0, np.nan, 5.0], [3.0, 2.0, 5.0], [5.0, 4.0, 5.0]])
    prep = TabularPreprocessor().fit(train)
    out = prep.transform(np.array([[np.nan, np.nan, 1e9]]))
    assert out.shape == (1, 4)  # 3 scaled + an indicator for the one column ever missing
    assert out[0, 0] == pytest.approx(0.0)  # median 3 = mean 3
    assert out[0, 2] == pytest.approx(5.0)  # clipped, constant column scale 1
    assert list(out[0, 3:]) == [1.0]  # column 0 had no gap in training: no indicator
    again = TabularPreprocessor.from_tensors(prep.to_tensors())
    np.testing.assert_array_equal(again.transform(train), prep.transform(train))


def test_compact_image_network_is_small() -> None:
    net = build_network("compact", spatial_dims=3)
    assert count_parameters(net) <= 1_000_000
    emb, logit = net(torch.zeros(2, 1, 64, 64, 32))
    assert emb.shape == (2, 64) and logit.shape == (2,)
    emb2, _ = build_network("compact", spatial_dims=2, embedding_dim=96)(torch.zeros(2, 1, 32, 32))
    assert emb2.shape == (2, 96)
    with pytest.raises(ValueError, match="Unrecognised image network"):
        build_network("resnet9000", spatial_dims=3)
    with pytest.raises(ValueError, match="never downloaded"):
        build_network("compact", spatial_dims=3, pretrained_path="/nonexistent/weights.pt")


@pytest.mark.parametrize("network", ["burden", "threshold"])
def test_tiny_image_networks_embed_2d_and_3d(network: str) -> None:
    net = build_network(network, spatial_dims=3, embedding_dim=16)
    assert count_parameters(net) <= 1_000
    emb, logit = net(torch.zeros(2, 1, 64, 64, 32))
    assert emb.shape == (2, 16) and logit.shape == (2,)
    emb2, _ = build_network(network, spatial_dims=2, embedding_dim=8)(torch.zeros(2, 1, 32, 32))
    assert emb2.shape == (2, 8)


def test_threshold_image_network_counts_voxels_above_its_thresholds() -> None:
    net = build_network("threshold", spatial_dims=3, embedding_dim=16)
    # Before any training, a map's log fraction grows with the bright volume, whatever
    # its brightness above the threshold: twice the bright voxels adds log 2.
    x = torch.full((3, 1, 16, 16, 8), 0.25)
    x[0, :, :4, :4, :4] = 0.55
    x[1, :, :8, :4, :4] = 0.55
    x[2, :, :8, :4, :4] = 0.75
    with torch.no_grad():
        frac = torch.sigmoid(net.backbone.voxel(x)).flatten(2).mean(dim=2)
    k = 3  # threshold (3 + 0.5) / 8 = 0.4375, between tissue (0.25) and lesion (0.55)
    ratio = torch.log(frac[1, k] / frac[0, k])
    assert abs(float(ratio) - math.log(2)) < 0.05
    assert abs(float(frac[2, k] / frac[1, k]) - 1) < 0.05


@pytest.mark.parametrize("network", ["threshold", "burden", "compact"])
def test_image_encoder_learns_a_brightness_signal(network: str) -> None:
    gen = torch.Generator().manual_seed(0)
    n = 160
    y = (torch.rand(n, generator=gen) < 0.4).long()
    x = torch.rand(n, 1, 16, 16, 8, generator=gen) * 0.2
    x[:, :, 4:10, 4:10, 2:6] += 0.6 * y.view(n, 1, 1, 1, 1)  # a "lesion" in positives
    enc = ImageEncoder(network=network, max_epochs=6, patience=3, batch_size=16, device="cpu",
                       seed=0)
    enc.fit(x[:120].half(), y[:120].numpy(), x[120:].half(), y[120:].numpy())
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y[120:].numpy(), enc.predict_logit(x[120:])) > 0.9
    config, state = enc.to_state()
    again = ImageEncoder.from_state(json.loads(json.dumps(config)), state)
    np.testing.assert_allclose(again.embed(x[:4]), enc.embed(x[:4]), atol=1e-6)


def _one_factor(n: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """24 noisy readings of one severity factor, plus an age column with its own effect."""
    rng = np.random.default_rng(seed)
    severity, age = rng.normal(size=n), rng.normal(size=n)
    loading = np.linspace(0.3, 0.8, 24) * np.where(np.arange(24) % 3 == 0, -1, 1)
    readings = severity[:, None] * loading + 0.8 * rng.normal(size=(n, 24))
    logit = 1.6 * severity + 0.5 * age - 1.8
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    return {"ehr": np.column_stack([age, readings]).astype(np.float32)}, y


def test_reduced_rank_block_keeps_its_weights_on_its_principal_direction() -> None:
    X, y = _one_factor(240, 11)
    Xv, yv = _one_factor(240, 12)
    block = list(range(1, 25))
    kw = {"modalities": ("ehr",), "device": "cpu", "l2": [0.001], "modality_dropout": 0.0}
    reduced = FusionRiskModel(rank={"ehr": [(block, 1)]}, **kw).fit(X, y, X_val=Xv, y_val=yv)
    free = FusionRiskModel(**kw).fit(X, y, X_val=Xv, y_val=yv)

    branch = reduced.net_.branches["ehr"]
    weight = branch.linear.weight.detach().numpy()[0]
    z = (X["ehr"] - branch.shift.numpy()) / branch.scale.numpy()
    top = np.linalg.svd(z[:, block], full_matrices=False)[2][0]
    # The block's 24 weights are one multiple of its first principal direction ...
    np.testing.assert_allclose(weight[block], (weight[block] @ top) * top, atol=1e-5)
    # ... and age, outside every block, keeps a free weight of its own.
    assert weight[0] > 0.2
    # The reduced branch is a plain linear term: predictions need no basis at scoring time.
    cfg, state = reduced.to_state()
    again = FusionRiskModel.from_state(json.loads(json.dumps(cfg)), state)
    Xt, yt = _one_factor(6000, 13)
    np.testing.assert_allclose(again.predict_logit(Xt, calibrated=False),
                               reduced.predict_logit(Xt, calibrated=False), atol=1e-5)
    # 25 free weights from 240 rows overfit the noise in 24 readings; 2 do not.
    auc_reduced = roc_auc_score(yt, reduced.predict_logit(Xt))
    auc_free = roc_auc_score(yt, free.predict_logit(Xt))
    assert auc_reduced > auc_free + 0.005, (auc_reduced, auc_free)


@pytest.mark.parametrize(("rank", "kw", "message"), [
    ({"ehr": [([1, 2], 1), ([2, 3], 1)]}, {}, "in no other block"),
    ({"ehr": [([1, 99], 1)]}, {}, "in no other block"),
    ({"ehr": [([1, 2], 0)]}, {}, "k >= 1"),
    ({"note": [([1, 2], 1)]}, {}, "not fitted"),
    ({"ehr": [([1, 2], 1)]}, {"hidden": 4}, "needs solver 'lbfgs'"),
])
def test_bad_rank_blocks_are_refused(rank: dict, kw: dict, message: str) -> None:
    X, y = _one_factor(120, 14)
    model = FusionRiskModel(modalities=("ehr",), device="cpu", rank=rank, **kw)
    with pytest.raises(ValueError, match=message):
        model.fit(X, y, X_val=X, y_val=y)
