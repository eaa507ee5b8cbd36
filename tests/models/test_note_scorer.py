"""The supervised sentence scorer (note learner candidate "tfidf-lr").

Sentence scores add up to the note logit; negated and affirmed mentions share no
feature; training notes get out-of-fold scores from models that never saw their
patient; the state round-trips and a tampered state is refused.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from models.negation import is_negated
from models.note_encoder import NoteEncoder
from models.note_scorer import TfidfLrNoteScorer
from pipelines.notes import negation_pool

FILLER = ["Patient seen on the ward today.", "Vital signs reviewed.", "Tolerating diet.",
          "Family at the bedside.", "Ambulating with assistance.", "Medications reconciled."]


def _corpus(n: int = 120, seed: int = 0) -> tuple[list[list[str]], np.ndarray, np.ndarray]:
    """Two notes per patient; events mention chest pain (affirmed), non-events deny it."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    groups = np.arange(n) // 2
    notes: list[list[str]] = []
    for i in range(n):
        sentences = list(rng.choice(FILLER, 3, replace=False))
        if y[i] == 1 and rng.random() < 0.7:
            sentences.append("Reports chest pain.")
        elif rng.random() < 0.5:
            sentences.append("Denies chest pain.")
        notes.append(sentences)
    return notes, y, groups


@pytest.fixture(scope="module")
def fitted() -> tuple[TfidfLrNoteScorer, list[list[str]], np.ndarray, np.ndarray]:
    notes, y, groups = _corpus()
    return TfidfLrNoteScorer(folds=4).fit(notes, y, groups), notes, y, groups


def test_sentence_scores_add_up_to_the_note_logit(fitted: tuple) -> None:
    scorer, notes, _, _ = fitted
    as_encoder: object = scorer  # the NoteEncoder protocol, checked at run time
    assert isinstance(as_encoder, NoteEncoder) and scorer.dim == 1
    assert scorer.C_ in (0.3, 1.0, 3.0) and set(scorer.cv_log_loss_) == {0.3, 1.0, 3.0}
    logits = scorer.model_.decision_function(scorer.note_vectors(notes))
    assert isinstance(scorer.model_, LogisticRegression)
    for i in (0, 7, 33):
        emb = scorer.encode(notes[i])
        assert emb.shape == (len(notes[i]), 1) and emb.dtype == np.float32
        pooled = negation_pool(emb, np.array([is_negated(s) for s in notes[i]]))
        assert pooled.shape == (4,)
        assert pooled[0] + pooled[1] + scorer.intercept_ == pytest.approx(logits[i], abs=1e-5)
        assert pooled[2] + pooled[3] == len(notes[i])
    np.testing.assert_allclose(scorer.decision_function(notes), logits, atol=1e-9)
    # The label sits in the chest-pain sentences: the affirmed one scores far higher.
    affirmed, negated = scorer.encode(["Reports chest pain.", "Denies chest pain."])[:, 0]
    assert affirmed > 3.0 and affirmed - negated > 3.0  # measured 4.69 and 0.15
    assert scorer.encode(["zzz qqq"])[0, 0] == 0.0


def test_negated_and_affirmed_mentions_share_no_feature(fitted: tuple) -> None:
    scorer = fitted[0]
    x = scorer.sentence_features(["Reports chest pain.", "Denies chest pain."])
    aff, neg = set(x[0].indices.tolist()), set(x[1].indices.tolist())
    assert aff and neg and not aff & neg
    vocab = scorer.vectorizer_.vocabulary_
    assert {"chest pain", "neg_chest neg_pain"} <= set(vocab) and "denies chest" not in vocab
    # Each sentence row is l2-normalised before notes sum them.
    np.testing.assert_allclose(np.sqrt(x.multiply(x).sum(axis=1)).A.ravel(), [1.0, 1.0])


def test_out_of_fold_scores_come_from_a_fold_without_the_patient(fitted: tuple) -> None:
    scorer, notes, y, groups = fitted
    oof = scorer.oof_sentence_scores()
    assert len(oof) == len(notes) and scorer.folds_ == 4
    # A patient's notes are all held out by the same fold.
    for g in np.unique(groups):
        assert len(set(scorer.fold_[groups == g].tolist())) == 1
    in_sample = [scorer.encode(s) for s in notes]
    assert max(float(np.abs(a - b).max()) for a, b in zip(oof, in_sample, strict=True)) > 0.05
    # Refit fold 2 by hand: same C, the notes outside fold 2 only.
    f = 2
    train = np.flatnonzero(scorer.fold_ != f)
    vectors = scorer.note_vectors(notes)
    lr = LogisticRegression(C=scorer.C_, max_iter=5000, tol=1e-6).fit(vectors[train], y[train])
    held = np.flatnonzero(scorer.fold_ == f)
    assert not set(groups[held].tolist()) & set(groups[train].tolist())
    for i in held[:5]:
        by_hand = scorer.sentence_features(notes[i]) @ lr.coef_[0]
        np.testing.assert_allclose(oof[i][:, 0], by_hand, atol=1e-4)
        # OOF note logit = the fold model's decision function.
        assert float(oof[i].sum()) + scorer.fold_intercept_[f] == pytest.approx(
            float(lr.decision_function(vectors[i])[0]), abs=1e-4)


def test_state_round_trip_and_tampering_refused(fitted: tuple) -> None:
    scorer, notes, _, _ = fitted
    state = scorer.get_state()
    back = TfidfLrNoteScorer.from_state(state)
    assert back.name == scorer.name and back.name.startswith("tfidf-lr-")
    np.testing.assert_array_equal(back.encode(notes[3]), scorer.encode(notes[3]))
    bad = dict(state, coef=state["coef"] * 1.01)
    with pytest.raises(ValueError, match=r"fingerprint .* does not match"):
        TfidfLrNoteScorer.from_state(bad)
    with pytest.raises(ValueError, match=r"lacks \['coef'\]"):
        TfidfLrNoteScorer.from_state({k: v for k, v in state.items() if k != "coef"})
    # A different fit has a different name (the sentence cache keys on it).
    other = TfidfLrNoteScorer(Cs=(1.0,), folds=3).fit(*_corpus(seed=1))
    assert other.name != scorer.name and other.C_ == 1.0


def test_fit_refuses_what_it_cannot_cross_fit() -> None:
    notes, y, _ = _corpus(20)
    with pytest.raises(ValueError, match="two patients of each class"):
        TfidfLrNoteScorer().fit(notes, y, np.zeros(20))
    with pytest.raises(ValueError, match="both classes"):
        TfidfLrNoteScorer().fit(notes, np.zeros(20), np.arange(20))
