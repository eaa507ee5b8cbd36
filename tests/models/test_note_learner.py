"""The notes learner choice (issue 18), on injected pooled vectors: TF-IDF wins only by z > 1.

A rare phrase carries the label. In the "tfidf" matrix it is its own column (a
negation-marked bag of n-grams keeps a rare term apart); in the "minilm" matrix it
is blurred into a direction the filler sentences also move (mean of sentence
vectors). Auto must pick TF-IDF there, and keep MiniLM when both carry the same
information.
"""

from __future__ import annotations

import numpy as np
import pytest

from models.note_learner import CANDIDATES, NoteLearner, describe_choice

HEAD = {"l2": [0.01, 0.1, 1.0], "solver": "lbfgs"}


def _corpus(n_patients: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Two notes per patient; 25 % carry the rare phrase, and then the label is 1 (90 %)."""
    rng = np.random.default_rng(seed)
    n = 2 * n_patients
    groups = np.arange(n) // 2
    phrase = rng.random(n) < 0.25
    y = np.where(phrase, rng.random(n) < 0.9, rng.random(n) < 0.2).astype(int)
    filler = rng.normal(size=(n, 8))
    tfidf = np.column_stack([phrase * 1.0, filler * 0.1]).astype(np.float32)
    # MiniLM: the phrase moves the pooled vector a little, along a direction the filler
    # sentences spread over ten times as much.
    minilm = (filler + 0.15 * phrase[:, None]).astype(np.float32)
    return {"minilm": minilm, "tfidf": tfidf}, y, groups


def test_auto_picks_tfidf_when_the_label_sits_in_a_rare_phrase_minilm_blurs() -> None:
    X, y, groups = _corpus(150, 0)
    learner = NoteLearner(folds=3, random_state=0, head_params=HEAD).fit(X, y, groups)
    rec = learner.record_
    assert learner.learner_ == "tfidf" and rec["auto_choice"] == "tfidf"
    assert rec["requested"] == "auto" and rec["folds"] == 3 and rec["incumbent"] == "minilm"
    assert rec["tfidf"] < rec["minilm"] - 0.05 and rec["z"] > 3
    assert rec["improvement"] == pytest.approx(rec["minilm"] - rec["tfidf"])
    assert len(rec["per_fold"]) == 3 and sum(f["n_rows"] for f in rec["per_fold"]) == 300
    assert rec["n_rows"] == 300 and rec["n_patients"] == 150 and rec["seconds"] >= 0
    # Out-of-fold logits of every row, for each candidate.
    assert set(learner.oof_logit_) == set(CANDIDATES) - {"tfidf-lr"}
    assert all(v.shape == (300,) for v in learner.oof_logit_.values())
    # Inner folds never split a patient: both notes of a patient are in one fold, so
    # the per-fold patient counts add up to the patients.
    assert sum(f["n_patients"] for f in rec["per_fold"]) == 150


def test_auto_keeps_minilm_when_both_carry_the_same_information() -> None:
    X, y, groups = _corpus(150, 1)
    same = {"minilm": X["tfidf"], "tfidf": X["tfidf"].copy()}
    learner = NoteLearner(folds=3, random_state=0, head_params=HEAD).fit(same, y, groups)
    rec = learner.record_
    assert learner.learner_ == "minilm" and rec["auto_choice"] == "minilm"
    # Identical inputs, folds and seeds: identical heads, a zero difference, z = 0.
    assert rec["minilm"] == rec["tfidf"] and rec["improvement"] == 0.0 and rec["z"] == 0.0


def test_a_small_gain_under_one_standard_error_keeps_the_incumbent() -> None:
    X, y, groups = _corpus(150, 2)
    # A TF-IDF matrix whose phrase column is mostly noise: a slightly lower log-loss
    # (0.6525 against 0.6592), but under one patient-clustered SE (z 0.79).
    rng = np.random.default_rng(0)
    noisy = np.column_stack([X["tfidf"][:, 0] * 0.35 + rng.normal(size=len(y)),
                             rng.normal(size=(len(y), 4))]).astype(np.float32)
    learner = NoteLearner(folds=3, random_state=0, head_params=HEAD).fit(
        {"minilm": X["minilm"], "tfidf": noisy}, y, groups)
    rec = learner.record_
    assert rec["tfidf"] < rec["minilm"] and 0 < rec["z"] <= 1
    assert learner.learner_ == "minilm"


def test_too_few_patients_of_a_class_keeps_minilm_with_a_reason() -> None:
    X, y, groups = _corpus(20, 0)
    y = np.zeros_like(y)
    y[:2] = 1  # one patient with events
    learner = NoteLearner(random_state=0, head_params=HEAD).fit(X, y, groups)
    assert learner.learner_ == "minilm" and learner.record_["folds"] is None
    assert learner.record_["reason"] == "too few patients of a class for inner CV"
    assert learner.oof_logit_ == {}
    assert describe_choice(learner.record_) == (
        "Notes: MiniLM sentence embeddings (negation pooling) (too few patients of a class "
        "for inner CV).")


def test_forced_choices_skip_the_cross_validation() -> None:
    X, y, groups = _corpus(60, 0)
    learner = NoteLearner(learner="tfidf", head_params=HEAD).fit({}, y, groups)
    assert learner.learner_ == "tfidf" and learner.record_["folds"] is None
    assert learner.record_["reason"] == "set by the configuration"
    assert "per_fold" not in learner.record_ and "z" not in learner.record_
    # MiniLM missing under auto: TF-IDF, and the record says why.
    missing = NoteLearner(random_state=0, head_params=HEAD).fit(
        {"tfidf": X["tfidf"]}, y, groups, unavailable={"minilm": "not installed"})
    assert missing.learner_ == "tfidf"
    assert missing.record_["reason"] == "only tfidf could be scored (minilm: not installed)"
    assert missing.record_["unavailable"] == {"minilm": "not installed"}


def test_bad_inputs_are_refused() -> None:
    X, y, groups = _corpus(30, 0)
    with pytest.raises(ValueError, match="must be one of"):
        NoteLearner(learner="bert").fit(X, y, groups)
    with pytest.raises(ValueError, match="unknown note candidates"):
        NoteLearner().fit({"bow": X["tfidf"]}, y, groups)
    with pytest.raises(ValueError, match="has shape"):
        NoteLearner().fit({"minilm": X["minilm"][:5], "tfidf": X["tfidf"]}, y, groups)


def test_model_card_sentence_names_the_choice_and_both_log_losses() -> None:
    record = {"learner": "tfidf", "requested": "auto", "folds": 3, "minilm": 0.61234,
              "tfidf": 0.55871, "z": 2.345,
              "per_fold": [{"minilm": 0.6, "tfidf": 0.55}, {"minilm": 0.62, "tfidf": 0.56},
                           {"minilm": 0.617, "tfidf": 0.567}]}
    assert describe_choice(record) == (
        "Notes: negation-marked TF-IDF + SVD (mean pooling), chosen by patient-grouped inner "
        "3-fold cross-validation of the note head on the training split's notes (encoders "
        "fitted once, without labels): out-of-fold log-loss MiniLM 0.6123 vs TF-IDF 0.5587 "
        "(z = 2.35; TF-IDF needs z > 1; per fold MiniLM/TF-IDF: 0.600/0.550, 0.620/0.560, "
        "0.617/0.567).")
    assert describe_choice(None) == "Notes: no note-learner choice recorded."


def test_three_candidates_the_best_challenger_that_passes_wins() -> None:
    X, y, groups = _corpus(150, 0)
    rng = np.random.default_rng(5)
    # "tfidf-lr": the phrase's score, with less filler noise than "tfidf" (4 columns).
    score = np.column_stack([X["tfidf"][:, 0] * 3.0, rng.normal(size=len(y)) * 0.01,
                             np.full(len(y), 4.0), np.zeros(len(y))]).astype(np.float32)
    three = {**X, "tfidf-lr": score}
    learner = NoteLearner(folds=3, random_state=0, head_params=HEAD).fit(three, y, groups)
    rec = learner.record_
    assert rec["incumbent"] == "minilm" and set(rec["z_by"]) == {"tfidf", "tfidf-lr"}
    assert all(z > 1 for z in rec["z_by"].values())
    best = min(("tfidf", "tfidf-lr"), key=lambda c: rec[c])
    assert learner.learner_ == best and rec["z"] == rec["z_by"][best]
    assert set(learner.oof_logit_) == set(CANDIDATES)
    # A challenger that does not pass loses even when another passes: make tfidf-lr noise.
    noise = {**X, "tfidf-lr": rng.normal(size=(len(y), 4)).astype(np.float32)}
    rec2 = NoteLearner(folds=3, random_state=0, head_params=HEAD).fit(noise, y, groups).record_
    assert rec2["learner"] == "tfidf" and rec2["z_by"]["tfidf-lr"] <= 1 < rec2["z_by"]["tfidf"]
    # Without MiniLM, TF-IDF is the incumbent of the other two.
    rec3 = NoteLearner(folds=3, random_state=0, head_params=HEAD).fit(
        {"tfidf": X["tfidf"], "tfidf-lr": noise["tfidf-lr"]}, y, groups).record_
    assert rec3["incumbent"] == "tfidf" and rec3["learner"] == "tfidf"
    assert list(rec3["z_by"]) == ["tfidf-lr"] and rec3["z_by"]["tfidf-lr"] < 0
    text = describe_choice({**rec, "learner": "tfidf-lr"})
    assert text.startswith("Notes: negation-marked TF-IDF + logistic-regression sentence "
                           "scores (negation pooling, out-of-fold on the training rows), "
                           "chosen by patient-grouped inner 3-fold")
    assert f"out-of-fold log-loss MiniLM {rec['minilm']:.4f}, TF-IDF {rec['tfidf']:.4f}, " \
        f"TF-IDF-LR {rec['tfidf-lr']:.4f} (z against MiniLM: TF-IDF " in text
