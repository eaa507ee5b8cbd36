"""The notes learner, chosen by inner cross-validation: MiniLM pooling or negation-marked TF-IDF.

Issue 18: a pretrained sentence encoder blurs a rare, decisive phrase into the mean
of everything else a note says, while a bag of n-grams keeps it as its own term but
knows nothing beyond the training notes. So the training split decides, by
patient-grouped inner K-fold, between two note representations:

- **minilm** (the incumbent): ``all-MiniLM-L6-v2`` sentence embeddings, pooled
  with negation pooling (affirmed and negated sentences summed apart, plus counts);
- **tfidf**: TF-IDF uni- and bigrams and TruncatedSVD
  (:class:`models.note_encoder.TfidfNoteEncoder`) with **negation marks**: every
  word of a sentence that :func:`models.negation.is_negated` flags becomes its own
  ``neg_`` token, so "No chest pain." and "Severe chest pain." share no term, and
  the sentence vectors are mean-pooled;
- **tfidf-lr**: a supervised sentence scorer
  (:class:`models.note_scorer.TfidfLrNoteScorer`): negation-marked sparse TF-IDF
  uni- and bigrams and a logistic regression on the notes, split back into one
  score per sentence, negation-pooled into 4 columns (summed affirmed scores,
  summed negated scores, the counts). Its training rows' vectors are out-of-fold
  (cross-fitted by patient), so the note head sees honest scores.

The encoders never see a label, and they are fitted once -- the TF-IDF vocabulary
and SVD on the training split's note sentences -- never per inner fold: the inner
CV compares the **note head** (:class:`models.fusion.FusionRiskModel` with
``modalities=("note",)`` and the fusion config's settings, its L2 strength chosen
on a patient-grouped 20 % part of each inner training part) on the two candidates'
pooled vectors of the training rows that have a note. Each candidate is scored on
the held-out inner fold by **log-loss** of the head's logit (a proper score that
uses every row; the fusion head consumes that logit, so its scale matters).

Rule: the incumbent stays unless a challenger's out-of-fold log-loss is lower by
more than one patient-clustered standard error of the paired per-row difference
(``z > 1``); of several challengers that pass, the one with the lowest log-loss.
Too few patients of a class for two inner folds: the incumbent, with
the reason recorded. ``learner="minilm"``, ``"tfidf"`` or ``"tfidf-lr"`` forces a
candidate and skips the CV. When MiniLM is not installed, "auto" compares TF-IDF
(the incumbent then) with tfidf-lr and the record says why
(:func:`models.note_encoder.load_note_encoder`'s fallback semantics: under
``CI=true`` that is an error before this module is reached).

This module sees only matrices: :meth:`NoteLearner.fit` takes each candidate's
pooled vectors, so the choice is testable without encoders. Embedding the notes
both ways is :func:`pipelines.note_choice.choose_notes`. The choice is recorded in
the artifact config (``note_learner``) and the model card (:func:`describe_choice`).

Cost: one note head per candidate per inner fold, on pooled vectors (a few seconds on a
few-hundred-patient training split), plus embedding the training notes with both
encoders (MiniLM's sentence vectors are cached on disk and reused for the chosen
one). Measured numbers: ``docs/note-learner.md``.

Examples
--------
>>> rng = np.random.default_rng(0)
>>> X = rng.normal(size=(40, 3)).astype("float32")
>>> y = np.arange(40) % 2
>>> nl = NoteLearner(learner="minilm").fit({"minilm": X}, y, np.arange(40))
>>> nl.learner_, nl.record_["folds"]
('minilm', None)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.model_selection import StratifiedGroupKFold

from models.inner_cv import clustered_se, inner_split, log_loss_rows

__all__ = ["CANDIDATES", "INCUMBENT", "LEARNERS", "NoteLearner", "describe_choice"]

log = logging.getLogger(__name__)

LEARNERS: tuple[str, ...] = ("auto", "minilm", "tfidf", "tfidf-lr")
#: The candidates in the order they are scored; the incumbent first (when it is given;
#: else the first given one is the incumbent).
CANDIDATES: tuple[str, ...] = ("minilm", "tfidf", "tfidf-lr")
INCUMBENT = "minilm"

#: How the model card names each candidate.
_NAMES = {"minilm": "MiniLM sentence embeddings (negation pooling)",
          "tfidf": "negation-marked TF-IDF + SVD (mean pooling)",
          "tfidf-lr": "negation-marked TF-IDF + logistic-regression sentence scores "
                      "(negation pooling, out-of-fold on the training rows)"}
_SHORT = {"minilm": "MiniLM", "tfidf": "TF-IDF", "tfidf-lr": "TF-IDF-LR"}


def _clustered_z(diff: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    """(mean, z) of a per-row difference, its SE clustered by patient."""
    mean, se = float(diff.mean()), clustered_se(diff, groups)
    return mean, (mean / se if se > 0 else 0.0)


class NoteLearner(BaseEstimator):  # type: ignore[misc]
    """Chooses the note representation by inner CV of the note head.

    Parameters
    ----------
    learner : {"auto", "minilm", "tfidf", "tfidf-lr"}, default="auto"
        "auto": inner CV decides (see the module docstring); a candidate's name forces it.
    folds : int, default=5
        Inner folds (fewer when the rows have fewer patients of a class).
    random_state : int, default=0
        Seeds the inner folds, the inner early-stopping splits and the note heads.
    head_params : dict, optional
        Keyword arguments of the note head's ``FusionRiskModel`` (the fusion config:
        L2 grid, solver, hidden...); ``modalities`` and ``device`` are set here.

    Attributes
    ----------
    learner_ : str
        "minilm", "tfidf" or "tfidf-lr".
    record_ : dict
        The choice: requested, rule, incumbent, folds, per-fold log-loss of each
        candidate, their means, each challenger's paired improvement and z
        (``improvement_by``, ``z_by``; ``improvement`` and ``z`` are the chosen
        challenger's, else the best challenger's), reason (when no CV ran), seconds.
    oof_logit_ : dict of str to ndarray
        Each candidate's out-of-fold note-head logit of the fitted rows (empty when no
        CV ran).
    """

    _z_threshold: ClassVar[float] = 1.0

    def __init__(self, *, learner: str = "auto", folds: int = 5, random_state: int = 0,
                 head_params: Mapping[str, Any] | None = None) -> None:
        self.learner = learner
        self.folds = folds
        self.random_state = random_state
        self.head_params = head_params

    def fit(self, candidates: Mapping[str, np.ndarray], y: np.ndarray, groups: np.ndarray, *,
            unavailable: Mapping[str, str] | None = None) -> NoteLearner:
        """Choose on the rows given; returns self.

        Parameters
        ----------
        candidates : mapping of str to ndarray of shape (n, d_c)
            Each candidate's pooled note vectors of the same n training rows (rows with
            a note). A forced choice needs none; "auto" scores every one given (two at
            least), the incumbent "minilm" when given, else the first given.
        y : ndarray of shape (n,)
        groups : ndarray of shape (n,)
            Patient ids: inner folds never split a patient.
        unavailable : mapping of str to str, optional
            Why a candidate is missing (e.g. MiniLM not installed); recorded.
        """
        if self.learner not in LEARNERS:
            raise ValueError(f"notes encoder must be one of {list(LEARNERS)}, got "
                             f"{self.learner!r}")
        started = time.perf_counter()
        y = np.asarray(y, dtype=int)
        groups = np.asarray(groups)
        unknown = set(candidates) - set(CANDIDATES)
        if unknown:
            raise ValueError(f"unknown note candidates {sorted(unknown)}; expected a subset "
                             f"of {list(CANDIDATES)}")
        X = {c: np.asarray(v, dtype=np.float32) for c, v in candidates.items()}
        for c, v in X.items():
            if v.ndim != 2 or len(v) != len(y):
                raise ValueError(f"candidate {c!r} has shape {v.shape}; expected ({len(y)}, d)")
        if len(groups) != len(y):
            raise ValueError(f"groups has {len(groups)} rows, y has {len(y)}")
        self.oof_logit_: dict[str, np.ndarray] = {}
        given = [c for c in CANDIDATES if c in X]
        incumbent = INCUMBENT if INCUMBENT in X or not given else given[0]
        challengers = [c for c in given if c != incumbent]
        record: dict[str, Any] = {
            "requested": self.learner, "metric": "log_loss", "incumbent": incumbent,
            "rule": f"a challenger ({', '.join(challengers) or 'none'}) replaces {incumbent} "
                    f"when the note head's inner out-of-fold log-loss on it is lower by "
                    f"z > {self._z_threshold:g} patient-clustered standard errors of the "
                    "paired per-row difference (of several, the lowest log-loss); else "
                    f"{incumbent}",
            "random_state": int(self.random_state), "n_rows": len(y),
            "n_patients": len(set(groups.tolist()))}
        if unavailable:
            record["unavailable"] = dict(unavailable)

        def done(learner: str, reason: str) -> NoteLearner:
            self.learner_ = learner
            self.record_ = {**record, "learner": learner, "folds": None, "reason": reason,
                            "seconds": round(time.perf_counter() - started, 2)}
            log.info("note learner: %s (%s)", learner, reason)
            return self

        if self.learner != "auto":
            return done(self.learner, "set by the configuration")
        if len(given) < 2:
            chosen = given[0] if given else INCUMBENT
            missing = [c for c in CANDIDATES if c not in X]
            told = [c for c in missing if c in (unavailable or {})] or missing
            why = "; ".join(f"{c}: {(unavailable or {}).get(c, 'not given')}" for c in told)
            return done(chosen, f"only {chosen} could be scored ({why})")
        k = int(min(self.folds, *(len(set(groups[y == c].tolist())) for c in (0, 1))))
        if k < 2:
            log.warning("note learner: too few patients per class for inner CV; %s is used",
                        incumbent)
            return done(incumbent, "too few patients of a class for inner CV")
        oof = {c: np.zeros(len(y)) for c in given}
        per_fold = []
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=self.random_state)
        for f, (tr, te) in enumerate(splitter.split(np.zeros(len(y)), y, groups)):
            fit, stop = inner_split(y[tr], groups[tr], self.random_state + 1 + f)
            fit, stop = tr[fit], tr[stop]
            for c in given:
                oof[c][te] = self._fit_head(X[c], y, fit, stop).predict_logit(
                    {"note": X[c][te]}, calibrated=False)
            per_fold.append({"fold": f, "n_rows": len(te),
                             "n_patients": len(set(groups[te].tolist())),
                             **{c: float(log_loss_rows(y[te], oof[c][te]).mean())
                                for c in given}})
        loss = {c: log_loss_rows(y, oof[c]) for c in given}
        paired = {c: _clustered_z(loss[incumbent] - loss[c], groups) for c in challengers}
        passing = [c for c in challengers if paired[c][1] > self._z_threshold]
        self.learner_ = (min(passing, key=lambda c: float(loss[c].mean())) if passing
                         else incumbent)
        shown = self.learner_ if passing else max(challengers, key=lambda c: paired[c][1])
        self.oof_logit_ = oof
        self.record_ = {**record, "learner": self.learner_, "auto_choice": self.learner_,
                        "folds": k, "per_fold": per_fold,
                        **{c: float(loss[c].mean()) for c in given},
                        "improvement": paired[shown][0], "z": paired[shown][1],
                        "improvement_by": {c: paired[c][0] for c in challengers},
                        "z_by": {c: paired[c][1] for c in challengers},
                        "seconds": round(time.perf_counter() - started, 2)}
        log.info("note learner: %s (inner %d-fold note-head log-loss: %s; z: %s)",
                 self.learner_, k, ", ".join(f"{c} {self.record_[c]:.4f}" for c in given),
                 ", ".join(f"{c} {paired[c][1]:.2f}" for c in challengers))
        return self

    def _fit_head(self, X: np.ndarray, y: np.ndarray, fit: np.ndarray, stop: np.ndarray
                  ) -> Any:
        from models.fusion import FusionRiskModel

        params = {"seed": self.random_state, **(self.head_params or {}),
                  "modalities": ("note",), "device": "cpu"}
        return FusionRiskModel(**params).fit({"note": X[fit]}, y[fit],
                                             X_val={"note": X[stop]}, y_val=y[stop])


def describe_choice(record: Mapping[str, Any] | None) -> str:
    """One sentence for the model card."""
    if not record:
        return "Notes: no note-learner choice recorded."
    name = _NAMES.get(str(record.get("learner")), str(record.get("learner")))
    if record.get("folds") is None:
        return f"Notes: {name} ({record.get('reason') or 'set by the configuration'})."
    scored = [c for c in CANDIDATES if c in record]
    if scored != ["minilm", "tfidf"]:
        inc = str(record.get("incumbent", scored[0] if scored else INCUMBENT))
        losses = ", ".join(f"{_SHORT.get(c, c)} {record[c]:.4f}" for c in scored)
        zs = ", ".join(f"{_SHORT.get(c, c)} {z:.2f}"
                       for c, z in (record.get("z_by") or {}).items())
        fold_text = ", ".join("/".join(f"{f[c]:.3f}" for c in scored)
                              for f in record.get("per_fold", []))
        return (f"Notes: {name}, chosen by patient-grouped inner {record['folds']}-fold "
                f"cross-validation of the note head on the training split's notes: "
                f"out-of-fold log-loss {losses} (z against {_SHORT.get(inc, inc)}: {zs}; a "
                f"challenger needs z > 1, the lowest log-loss of those that pass wins; per "
                f"fold {'/'.join(_SHORT.get(c, c) for c in scored)}: {fold_text}).")
    fold_text = ", ".join(f"{f['minilm']:.3f}/{f['tfidf']:.3f}"
                          for f in record.get("per_fold", []))
    return (f"Notes: {name}, chosen by patient-grouped inner {record['folds']}-fold "
            f"cross-validation of the note head on the training split's notes (encoders "
            f"fitted once, without labels): out-of-fold log-loss MiniLM "
            f"{record['minilm']:.4f} vs TF-IDF {record['tfidf']:.4f} (z = {record['z']:.2f}; "
            f"TF-IDF needs z > 1; per fold MiniLM/TF-IDF: {fold_text}).")
