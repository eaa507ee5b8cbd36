"""``train`` ships a simpler fusion head when inner CV says the full one is worse (issue 18).

Tiny tabular + notes manifests (100 patients, one row each). In the "noise" cohort the
outcome depends on the note alone and the EHR branch is 150 columns of pure noise; the
fusion head's L2 is pinned small (``fusion.l2: [0.01]``), as an under-regularised
head would be, so the noisy EHR branch overfits. There ``auto`` must ship the notes-only
head, which then scores, explains and has a card through the normal paths; ``off`` must
keep the full head. In the "signal" cohort both modalities carry signal and the full
fusion must stay.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from models.fusion_simplify import _candidates
from models.model_card import build_model_card, render_markdown
from pipelines.explain import Explainer
from pipelines.manifest import read_manifest
from pipelines.scoring import load_model, score
from pipelines.training import TrainingError, train

CONFIG: dict[str, Any] = {"workers": 1, "device": "cpu", "notes": {"encoder": "tfidf"},
                          "tabular": {"learner": "linear"}, "fusion": {"l2": [0.01]}}
SIDECAR = ("sensitive: []\nfeature_source: manifest\noutcome:\n  name: x\n  definition: toy\n"
           "  horizon_days: 30\n  population: adults\n")


def _write(out: Path, *, ehr_signal: float, n_noise: int, seed: int, n: int = 100,
           note_signal: float = 1.5) -> Path:
    """Risk = ehr_signal * lactate + note_signal * (what the note says), plus n_noise noise
    columns."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    lactate, hidden = rng.normal(size=n), rng.normal(size=n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(ehr_signal * lactate + note_signal * hidden)))
         ).astype(int)
    rows = []
    for i in range(n):
        note = ("fever rigors confusion" if hidden[i] > 0.3 else
                "denies complaints" if hidden[i] < -0.3 else "seen today")
        row = {"patient_id": f"P{i:04d}", "label": int(y[i]),
               "index_time": "2024-01-01T00:00:00Z", "image": "", "note": note,
               "lactate": float(lactate[i])}
        row.update({f"x{j:03d}": float(v) for j, v in enumerate(rng.normal(size=n_noise))})
        rows.append(row)
    pd.DataFrame(rows).to_csv(out / "manifest.csv", index=False)
    (out / "manifest.yaml").write_text(SIDECAR)
    return out / "manifest.csv"


@pytest.fixture(scope="module")
def noise(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("simplify_noise")
    manifest = _write(root / "cohort", ehr_signal=0.0, n_noise=150, seed=1)
    caplog_records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = caplog_records.append  # type: ignore[method-assign]
    logging.getLogger("pipelines.training").addHandler(handler)
    try:
        model = train(manifest, root / "model", config=CONFIG, cache_dir=root / "cache",
                      warn_small=False)
    finally:
        logging.getLogger("pipelines.training").removeHandler(handler)
    return {"root": root, "model": model, "manifest": manifest,
            "key": root / "model.key.pub", "log": [r.getMessage() for r in caplog_records]}


def test_noise_branch_is_dropped_and_the_artifact_works_unchanged(noise: dict[str, Any]
                                                                  ) -> None:
    m = load_model(noise["model"], trusted_keys=[noise["key"]], device="cpu")
    assert m.config["input_modalities"] == ["note"] and m.modalities == ("note",)
    rec = m.config["fusion_simplification"]
    assert rec["chosen"] == rec["auto_choice"] == "note" and rec["mode"] == "auto"
    by_key = {r["key"]: r for r in rec["candidates"]}
    assert set(by_key) == {"full", "ehr", "note"}
    # The rule, re-derived from the recorded numbers: the shipped head's inner log-loss
    # is lower than the full head's by more than one SE of the paired difference.
    shipped, full = by_key["note"], by_key["full"]
    assert shipped["improvement_over_full"] == pytest.approx(
        full["log_loss"] - shipped["log_loss"], abs=1e-9)
    assert shipped["improvement_over_full"] > shipped["se"] > 0
    assert any(line.startswith("fusion: Shipped: notes only; the full EHR + notes fusion "
                               "was behind by") for line in noise["log"]), noise["log"]
    # Scoring goes through the normal path and ignores the dropped EHR input: scrambling
    # every EHR column leaves every score unchanged.
    root = noise["root"]
    table = score(noise["model"], noise["manifest"], root / "scores.csv",
                  trusted_keys=[noise["key"]], device="cpu", cache_dir=root / "cache")
    frame = pd.read_csv(noise["manifest"])
    cols = [c for c in frame.columns if c == "lactate" or c.startswith("x")]
    frame[cols] = np.random.default_rng(5).permutation(frame[cols].to_numpy())
    scrambled = root / "scrambled"
    scrambled.mkdir()
    frame.to_csv(scrambled / "manifest.csv", index=False)
    (scrambled / "manifest.yaml").write_text(SIDECAR)
    again = score(noise["model"], scrambled / "manifest.csv", root / "scores2.csv",
                  trusted_keys=[noise["key"]], device="cpu", cache_dir=root / "cache2")
    assert table["score"].notna().all()
    np.testing.assert_allclose(table["score"], again["score"])
    assert table["score"].std() > 0.01  # and the notes do move it
    doc = Explainer(m, root / "cache").explain_row(read_manifest(noise["manifest"]), 3)
    assert doc["ehr"] is None and doc["notes"] is not None


def test_model_card_states_the_simplification(noise: dict[str, Any]) -> None:
    m = load_model(noise["model"], trusted_keys=[noise["key"]], device="cpu")
    card = build_model_card(m.artifact)
    assert card["baseline_comparison"]["chosen"] == "note"
    text = render_markdown(card)
    section = text.split("## Baseline comparison", 1)[1].split("\n## ", 1)[0]
    assert "Shipped: notes only; the full EHR + notes fusion was behind by" in section
    assert "inner 3-fold cross-validation" in section
    assert "| notes only (shipped) |" in section and "| EHR only |" in section


def test_simplify_off_keeps_the_full_fusion(noise: dict[str, Any], tmp_path: Path) -> None:
    model = train(noise["manifest"], tmp_path / "model",
                  config={**CONFIG, "fusion": {**CONFIG["fusion"], "simplify": "off"}},
                  cache_dir=tmp_path / "cache", warn_small=False)
    m = load_model(model, trusted_keys=[tmp_path / "model.key.pub"], device="cpu")
    assert m.config["input_modalities"] == ["ehr", "note"]
    rec = m.config["fusion_simplification"]
    assert rec["mode"] == "off" and rec["chosen"] == "full" and rec["auto_choice"] == "note"
    assert "fusion.simplify is off" in rec["summary"]


def test_full_fusion_stays_when_every_modality_carries_signal(tmp_path: Path) -> None:
    manifest = _write(tmp_path / "cohort", ehr_signal=1.5, n_noise=0, seed=0)
    model = train(manifest, tmp_path / "model", config=CONFIG, cache_dir=tmp_path / "cache",
                  warn_small=False)
    m = load_model(model, trusted_keys=[tmp_path / "model.key.pub"], device="cpu")
    assert m.config["input_modalities"] == ["ehr", "note"]
    rec = m.config["fusion_simplification"]
    assert rec["chosen"] == "full" and all(r["z"] <= 1.0 for r in rec["candidates"])
    full = rec["candidates"][0]
    assert full["key"] == "full" and all(full["log_loss"] < r["log_loss"]
                                         for r in rec["candidates"][1:])


def test_bad_simplify_value_is_a_training_error(noise: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"fusion\.simplify must be 'auto' or 'off'"):
        train(noise["manifest"], tmp_path / "model",
              config={**CONFIG, "fusion": {"simplify": "yes"}}, warn_small=False)


def test_candidates_linear_head_only_when_not_linear_and_no_imaging_subset_in_sample() -> None:
    keys = [c["key"] for c in _candidates(["image", "ehr", "note"], hidden=0)]
    assert keys == ["full", "image+ehr", "image+note", "ehr+note", "image", "ehr", "note"]
    assert [c["key"] for c in _candidates(["ehr", "note"], hidden=16)][-1] == "linear"
    # An in-sample image logit would flatter subsets that keep imaging: none compete.
    keys = [c["key"] for c in _candidates(["image", "ehr", "note"], 0, image_in_sample=True)]
    assert keys == ["full", "ehr+note", "ehr", "note"]


def test_a_candidate_no_better_than_the_base_rate_is_not_shipped(tmp_path: Path) -> None:
    """Nothing carries signal: the overfitting full head loses to a near-constant simpler
    head, which is still not shipped, because it does not beat the base rate either."""
    manifest = _write(tmp_path / "cohort", ehr_signal=0.0, n_noise=150, seed=1,
                      note_signal=0.0)
    model = train(manifest, tmp_path / "model", config=CONFIG, cache_dir=tmp_path / "cache",
                  warn_small=False)
    m = load_model(model, trusted_keys=[tmp_path / "model.key.pub"], device="cpu")
    rec = m.config["fusion_simplification"]
    best = min(rec["candidates"][1:], key=lambda r: r["log_loss"])
    assert best["z"] > 1.0 >= best["z_over_base_rate"], rec["candidates"]
    assert rec["chosen"] == rec["auto_choice"] == "full"
    assert m.config["input_modalities"] == ["ehr", "note"]
    assert "not ahead of the base rate" in rec["summary"]
    # The base rate is each inner fold's training event rate: about the label entropy.
    ybar = pd.read_csv(manifest)["label"].mean()
    entropy = -(ybar * np.log(ybar) + (1 - ybar) * np.log(1 - ybar))
    assert rec["base_rate_log_loss"] == pytest.approx(entropy, abs=0.01)
