"""A supervised sentence scorer for notes: negation-marked TF-IDF + logistic regression.

The note learner's third candidate, ``"tfidf-lr"`` (:mod:`models.note_learner`). The
two unsupervised candidates hand the fusion note branch hundreds of dense columns,
which it standardises and penalises as one wide branch, so the evidence in a few
rare phrases is lost. This one hands it a **score**: a logistic regression fitted on
the training notes' sparse TF-IDF vectors, split back into per-sentence scores.

- Each sentence is a TF-IDF row (uni- and bigrams, ``min_df=2``, sublinear tf, l2
  row norm) of its words, every word of a negated sentence marked ``neg_``
  (:func:`models.note_encoder.mark_negated`), so "No chest pain." and "Severe chest
  pain." share no feature.
- A note's vector is the **sum** of its sentences' rows; an L2 logistic regression
  is fitted on the note vectors, its ``C`` chosen from ``Cs`` by patient-grouped
  K-fold log-loss.
- A sentence's score is ``coef_ . x_s`` (no intercept), so a note's logit is the
  sum of its sentence scores plus ``intercept_``. :meth:`encode` returns these
  scores as 1-d "embeddings": negation pooling of them
  (:func:`pipelines.notes.negation_pool`, 4 columns: summed affirmed scores, summed
  negated scores, the two counts) carries the note logit split by negation, and
  sentence occlusion (:mod:`pipelines.note_attribution`) works unchanged.
- The training notes' honest scores come from the K cross-fitted models
  (:meth:`TfidfLrNoteScorer.oof_sentence_scores`): each note scored by weights that
  never saw its patient, as the fusion head must be trained on out-of-fold inputs
  (in-sample scores of a fitted text model are over-confident).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Sequence
from numbers import Integral
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted

from models.inner_cv import log_loss_rows
from models.note_encoder import (
    _WORD,
    MINILM_MAX_TOKENS,
    _chunk_by_tokens,
    mark_negated,
    new_tfidf_vectorizer,
)

__all__ = ["TfidfLrNoteScorer"]


class TfidfLrNoteScorer(BaseEstimator):  # type: ignore[misc]
    """Negation-marked sentence TF-IDF + note-level logistic regression; 1-d sentence scores.

    Implements :class:`models.note_encoder.NoteEncoder` with ``dim == 1``.

    Parameters
    ----------
    Cs : tuple of float, default (0.3, 1.0, 3.0)
        Inverse L2 strengths tried; the best by patient-grouped K-fold log-loss is used.
        One value: no choice (the folds still give the out-of-fold scores).
    folds : int, default 5
        K of the patient-grouped folds (fewer when a class has fewer patients).
    ngram_range : tuple of int, default (1, 2)
    min_df : int, default 2
        In sentences.
    max_features : int or None, default 200000
    max_tokens : int, default 256
        Window in word tokens (as TF-IDF's), so sentence lists match the other encoders'.
    random_state : int, default 0
        Seeds the folds.

    Attributes
    ----------
    vectorizer_ : TfidfVectorizer
    coef_ : ndarray of shape (n_terms,), float64
    intercept_ : float
    C_ : float
        The chosen C.
    cv_log_loss_ : dict of float to float
        Out-of-fold log-loss of each C (empty when no folds could be made).
    folds_ : int
    fold_ : ndarray of shape (n_notes,), int
        Which fold held out each training note.
    fold_coef_ : ndarray of shape (folds_, n_terms)
    fold_intercept_ : ndarray of shape (folds_,)
    fingerprint_ : str
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "Cs": [tuple, list],
        "folds": [Interval(Integral, 2, None, closed="left")],
        "ngram_range": [tuple],
        "min_df": [Interval(Integral, 1, None, closed="left")],
        "max_features": [Interval(Integral, 1, None, closed="left"), None],
        "max_tokens": [Interval(Integral, 2, None, closed="left")],
        "random_state": [Interval(Integral, 0, None, closed="left"), None],
    }

    NEGATION_PREFIX: ClassVar[str] = "neg_"
    dim: int = 1

    def __init__(self, *, Cs: Sequence[float] = (0.3, 1.0, 3.0), folds: int = 5,
                 ngram_range: tuple[int, int] = (1, 2), min_df: int = 2,
                 max_features: int | None = 200_000, max_tokens: int = MINILM_MAX_TOKENS,
                 random_state: int = 0) -> None:
        self.Cs = Cs
        self.folds = folds
        self.ngram_range = ngram_range
        self.min_df = min_df
        self.max_features = max_features
        self.max_tokens = max_tokens
        self.random_state = random_state

    # ------------------------------------------------------------------ features

    def _new_vectorizer(self) -> TfidfVectorizer:
        return new_tfidf_vectorizer(tuple(self.ngram_range), self.min_df, self.max_features,
                                    dtype=np.float64)

    def sentence_features(self, sentences: Sequence[str]) -> sp.csr_matrix:
        """Negation-marked, l2-normalised TF-IDF rows of sentences, ``(n, n_terms)``."""
        check_is_fitted(self, "vectorizer_")
        return sp.csr_matrix(self.vectorizer_.transform(
            mark_negated(sentences, self.NEGATION_PREFIX)))

    @staticmethod
    def _sum_matrix(notes_sentences: Sequence[Sequence[str]]) -> sp.csr_matrix:
        """(n_notes, n_sentences) 0/1 matrix: which note each flattened sentence is in."""
        lengths = np.array([len(s) for s in notes_sentences], dtype=np.int64)
        rows = np.repeat(np.arange(len(lengths)), lengths)
        return sp.csr_matrix((np.ones(len(rows)), (rows, np.arange(len(rows)))),
                             shape=(len(lengths), int(lengths.sum())))

    def note_vectors(self, notes_sentences: Sequence[Sequence[str]]) -> sp.csr_matrix:
        """Each note's vector: the sum of its sentences' TF-IDF rows."""
        flat = [s for sentences in notes_sentences for s in sentences]
        return sp.csr_matrix(self._sum_matrix(notes_sentences) @ self.sentence_features(flat))

    # ----------------------------------------------------------------------- fit

    def _lr(self, C: float) -> LogisticRegression:
        return LogisticRegression(C=float(C), max_iter=5000, tol=1e-6)

    def fit(self, notes_sentences: Sequence[Sequence[str]], y: Any,
            groups: Any) -> TfidfLrNoteScorer:
        """Fit on the training notes (one list of sentences per note); returns self.

        Raises
        ------
        ValueError
            No term, one class, or too few patients of a class for two folds.
        """
        self._validate_params()
        y = np.asarray(y, dtype=int)
        groups = np.asarray(groups)
        if len(notes_sentences) != len(y) or len(groups) != len(y):
            raise ValueError(f"{len(notes_sentences)} notes, {len(y)} labels and "
                             f"{len(groups)} groups; expected one of each per note")
        if not self.Cs or any(float(c) <= 0 for c in self.Cs):
            raise ValueError(f"Cs must be positive numbers, got {self.Cs!r}")
        if set(np.unique(y).tolist()) != {0, 1}:
            raise ValueError("TfidfLrNoteScorer.fit needs notes of both classes")
        flat = [s for sentences in notes_sentences for s in sentences]
        vectorizer = self._new_vectorizer()
        try:
            vectorizer.fit(mark_negated(flat, self.NEGATION_PREFIX))
        except ValueError as err:  # sklearn's empty vocabulary / min_df errors
            raise ValueError(f"TfidfLrNoteScorer.fit found no terms in {len(flat)} "
                             f"sentence(s): {err}") from err
        self.vectorizer_ = vectorizer
        sent = self.sentence_features(flat)
        notes = sp.csr_matrix(self._sum_matrix(notes_sentences) @ sent)
        k = int(min(self.folds, *(len(set(groups[y == c].tolist())) for c in (0, 1))))
        if k < 2:
            raise ValueError("TfidfLrNoteScorer.fit needs two patients of each class for "
                             "out-of-fold scores")
        splits = list(StratifiedGroupKFold(n_splits=k, shuffle=True,
                                           random_state=self.random_state)
                      .split(np.zeros(len(y)), y, groups))
        fold = np.empty(len(y), dtype=np.int64)
        for f, (_, te) in enumerate(splits):
            fold[te] = f
        losses: dict[float, float] = {}
        fits: dict[float, list[LogisticRegression]] = {}
        for C in (float(c) for c in self.Cs):
            oof = np.zeros(len(y))
            fits[C] = []
            for tr, te in splits:
                lr = self._lr(C).fit(notes[tr], y[tr])
                oof[te] = lr.decision_function(notes[te])
                fits[C].append(lr)
            losses[C] = float(log_loss_rows(y, oof).mean())
        best = min(losses, key=lambda c: (losses[c], c))
        final = self._lr(best).fit(notes, y)
        self.model_ = final
        self.coef_ = np.asarray(final.coef_[0], dtype=np.float64)
        self.intercept_ = float(final.intercept_[0])
        self.C_ = best
        self.cv_log_loss_ = losses
        self.folds_ = k
        self.fold_ = fold
        self.fold_coef_ = np.stack([np.asarray(m.coef_[0], dtype=np.float64)
                                    for m in fits[best]])
        self.fold_intercept_ = np.array([float(m.intercept_[0]) for m in fits[best]])
        # Out-of-fold sentence scores of the training notes, in their sentence order.
        sentence_fold = np.repeat(fold, [len(s) for s in notes_sentences])
        scores = np.zeros(sent.shape[0])
        for f in range(k):
            at = np.flatnonzero(sentence_fold == f)
            scores[at] = sent[at] @ self.fold_coef_[f]
        bounds = np.cumsum([0] + [len(s) for s in notes_sentences])
        self.oof_scores_ = [scores[a:b].astype(np.float32).reshape(-1, 1)
                            for a, b in itertools.pairwise(bounds)]
        self.fingerprint_ = self._fingerprint()
        return self

    def oof_sentence_scores(self) -> list[np.ndarray]:
        """The training notes' sentence scores by the fold models that never saw their
        patient: one ``(n_sentences, 1)`` float32 array per note given to :meth:`fit`."""
        check_is_fitted(self, "oof_scores_")
        return [s.copy() for s in self.oof_scores_]

    # -------------------------------------------------------------------- encode

    def encode(self, sentences: Sequence[str]) -> np.ndarray:
        """Each sentence's score ``coef_ . x_s``, float32 of shape ``(n, 1)``;
        0 for a sentence with no known term."""
        check_is_fitted(self, "coef_")
        if len(sentences) == 0:
            return np.zeros((0, 1), dtype=np.float32)
        return np.asarray(self.sentence_features(sentences) @ self.coef_,
                          dtype=np.float64).astype(np.float32).reshape(-1, 1)

    transform = encode

    def decision_function(self, notes_sentences: Sequence[Sequence[str]]) -> np.ndarray:
        """Note logits: ``note_vectors @ coef_ + intercept_`` (sum of sentence scores)."""
        check_is_fitted(self, "coef_")
        return np.asarray(self.note_vectors(notes_sentences) @ self.coef_).ravel() + \
            self.intercept_

    def count_tokens(self, text: str) -> int:
        """Word and punctuation tokens (no special tokens)."""
        return len(_WORD.findall(text))

    def tokenize_chunks(self, text: str, max_tokens: int | None = None) -> list[str]:
        """Pieces of ``text`` of at most ``max_tokens`` word tokens."""
        max_tokens = self.max_tokens if max_tokens is None else max_tokens
        offsets = [m.span() for m in _WORD.finditer(text)]
        return _chunk_by_tokens(text, offsets, list(range(len(offsets))), max_tokens)

    # ------------------------------------------------------------ name and state

    def _params(self) -> dict[str, Any]:
        return dict(self.get_params(), Cs=[float(c) for c in self.Cs],
                    ngram_range=list(self.ngram_range))

    def _fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(json.dumps(self._params(), sort_keys=True).encode())
        vocab = sorted(self.vectorizer_.vocabulary_.items(), key=lambda kv: kv[1])
        digest.update("\n".join(term for term, _ in vocab).encode())
        digest.update(np.asarray(self.vectorizer_.idf_, dtype=np.float64).tobytes())
        digest.update(np.asarray(self.coef_, dtype=np.float64).tobytes())
        digest.update(np.float64(self.intercept_).tobytes())
        return digest.hexdigest()[:16]

    @property
    def name(self) -> str:
        """``tfidf-lr-<fingerprint>``; only defined once fitted."""
        check_is_fitted(self, "fingerprint_")
        return f"tfidf-lr-{self.fingerprint_}"

    def get_state(self) -> dict[str, np.ndarray]:
        """Fitted state as plain arrays (params, vocabulary, idf, coef, intercept,
        fingerprint); the cross-fitted fold models are not kept."""
        check_is_fitted(self, "coef_")
        vocab = sorted(self.vectorizer_.vocabulary_.items(), key=lambda kv: kv[1])
        return {
            "params": np.array(json.dumps(self._params(), sort_keys=True)),
            "vocabulary": np.array([term for term, _ in vocab], dtype=str),
            "idf": np.asarray(self.vectorizer_.idf_, dtype=np.float64),
            "coef": np.asarray(self.coef_, dtype=np.float64),
            "intercept": np.array(self.intercept_, dtype=np.float64),
            "fingerprint": np.array(self.fingerprint_),
        }

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray] | Any) -> TfidfLrNoteScorer:
        """Rebuild from :meth:`get_state`; a fingerprint that does not match the contents
        (corrupted or edited state) is refused."""
        missing = {"params", "vocabulary", "idf", "coef", "intercept", "fingerprint"} - \
            set(state)
        if missing:
            raise ValueError(f"TfidfLrNoteScorer state lacks {sorted(missing)}")
        params = json.loads(str(np.asarray(state["params"])[()]))
        params["ngram_range"] = tuple(params["ngram_range"])
        params["Cs"] = tuple(params["Cs"])
        enc = cls(**params)
        vectorizer = enc._new_vectorizer()
        vectorizer.vocabulary_ = {str(t): i for i, t in enumerate(state["vocabulary"])}
        vectorizer.idf_ = np.asarray(state["idf"], dtype=np.float64)
        enc.vectorizer_ = vectorizer
        enc.coef_ = np.asarray(state["coef"], dtype=np.float64).ravel()
        enc.intercept_ = float(np.asarray(state["intercept"], dtype=np.float64).reshape(-1)[0])
        if len(enc.coef_) != len(vectorizer.vocabulary_) or \
                not math.isfinite(enc.intercept_):
            raise ValueError(f"TfidfLrNoteScorer state has {len(enc.coef_)} weights for "
                             f"{len(vectorizer.vocabulary_)} terms")
        enc.fingerprint_ = enc._fingerprint()
        expected = str(np.asarray(state["fingerprint"])[()])
        if enc.fingerprint_ != expected:
            raise ValueError(f"TfidfLrNoteScorer state fingerprint {expected} does not match "
                             f"its contents ({enc.fingerprint_}); the artifact is corrupted")
        return enc
