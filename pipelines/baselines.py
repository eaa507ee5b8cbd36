"""The simple models a researcher would try first, as scikit-learn estimators.

``clinfuse evaluate --cv`` fits each of them in the same training folds as the fused
model and scores the same test rows, so "does fusion pay?" is answered on one footing.
Every baseline takes one :class:`pandas.DataFrame` built by :func:`baseline_frame`:
tabular columns ``tab::<name>`` (numbers, NaN missing; categoricals one-hot), the note
text in ``note`` ("" when there is none) and image features ``img::<i>`` (NaN without
an image). Each selects its own columns, so they stack.

Settings are scikit-learn's defaults unless a comment says why (L2 logistic regression
with C = 1, max_iter raised so it converges; TF-IDF over words and word pairs seen in at
least 2 notes, sublinear counts). Nothing here was tuned on the synthetic cohorts.

=========================  ==================================================================
name                       model
=========================  ==================================================================
``tabular_lr``             median imputation + missing indicators + scaling, logistic
                           regression
``tabular_hgb``            ``HistGradientBoostingClassifier`` (missing values native)
``notes_tfidf_lr``         TF-IDF of the note, logistic regression
``early_fusion_lr``        one logistic regression over the tabular block and the TF-IDF
``image_probe_lr``         the image features (median imputation + missing indicator +
                           scaling), logistic regression
``stacked_late_fusion``    a logistic regression on the inner out-of-fold logits of the
                           single-modality baselines, fitted inside the training fold
                           (inner folds grouped by patient)
=========================  ==================================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

__all__ = ["BASELINES", "BASELINE_DESCRIPTIONS", "StackedLateFusion", "available_baselines",
           "baseline_frame", "make_baseline"]

TAB, IMG, NOTE = "tab::", "img::", "note"

BASELINES = ("tabular_lr", "tabular_hgb", "notes_tfidf_lr", "early_fusion_lr",
             "image_probe_lr", "stacked_late_fusion")
#: What the stacked late fusion combines (the single-modality baselines).
STACKED_FROM = ("tabular_lr", "tabular_hgb", "notes_tfidf_lr", "image_probe_lr")

BASELINE_DESCRIPTIONS = {
    "tabular_lr": "tabular columns: median imputation + missing indicators + scaling, "
                  "logistic regression (L2, C=1)",
    "tabular_hgb": "tabular columns: scikit-learn HistGradientBoostingClassifier (defaults)",
    "notes_tfidf_lr": "notes: TF-IDF (words and word pairs, min_df 2, sublinear tf), "
                      "logistic regression (L2, C=1)",
    "early_fusion_lr": "one logistic regression (L2, C=1) over the tabular block and the "
                       "notes' TF-IDF together",
    "image_probe_lr": "image features (see image_features) with median imputation + "
                      "missing indicator + scaling, logistic regression (L2, C=1)",
    "stacked_late_fusion": "logistic regression on the inner out-of-fold logits of the "
                           "single-modality baselines (5 patient-grouped inner folds)",
}


def baseline_frame(tabular: np.ndarray | None, tabular_names: Sequence[str],
                   notes: Sequence[str | None] | None, image: np.ndarray | None) -> pd.DataFrame:
    """The one input table of every baseline (see the module docstring)."""
    parts: dict[str, Any] = {}
    if tabular is not None:
        for j, name in enumerate(tabular_names):
            parts[f"{TAB}{name}"] = np.asarray(tabular[:, j], dtype=float)
    if notes is not None:
        parts[NOTE] = ["" if n is None else str(n) for n in notes]
    if image is not None:
        for j in range(image.shape[1]):
            parts[f"{IMG}{j}"] = np.asarray(image[:, j], dtype=float)
    return pd.DataFrame(parts)


def _columns(X: pd.DataFrame, prefix: str) -> list[str]:
    return [c for c in X.columns if c.startswith(prefix)]


def available_baselines(X: pd.DataFrame) -> tuple[list[str], dict[str, str]]:
    """(the baselines this table supports, {skipped baseline: why})."""
    has_tab = bool(_columns(X, TAB))
    has_note = NOTE in X.columns and bool((X[NOTE].str.strip() != "").any())
    has_img = bool(_columns(X, IMG))
    skipped: dict[str, str] = {}
    if not has_tab:
        skipped |= {"tabular_lr": "no tabular column", "tabular_hgb": "no tabular column"}
    if not has_note:
        skipped["notes_tfidf_lr"] = "no notes"
    if not (has_tab and has_note):
        skipped["early_fusion_lr"] = "needs both tabular columns and notes"
    if not has_img:
        skipped["image_probe_lr"] = "no images"
    singles = [b for b in STACKED_FROM if b not in skipped]
    if len(singles) < 2:
        skipped["stacked_late_fusion"] = "fewer than two single-modality baselines"
    return [b for b in BASELINES if b not in skipped], skipped


def _lr(random_state: int) -> LogisticRegression:
    # max_iter: lbfgs on a few thousand TF-IDF columns needs more than the default 100.
    return LogisticRegression(C=1.0, max_iter=5000, random_state=random_state)


def _dense_block() -> Pipeline:
    # keep_empty_features: a column empty in one training fold still exists at test time.
    return Pipeline([("impute", SimpleImputer(strategy="median", add_indicator=True,
                                              keep_empty_features=True)),
                     ("scale", StandardScaler())])


def _tfidf() -> TfidfVectorizer:
    return TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True,
                           strip_accents="unicode")


def make_baseline(name: str, X: pd.DataFrame, *, random_state: int = 0,
                  inner_folds: int = 5) -> BaseEstimator:
    """An unfitted baseline for the columns of ``X``."""
    tab, img = _columns(X, TAB), _columns(X, IMG)
    if name == "tabular_lr":
        cols = ColumnTransformer([("tab", _dense_block(), tab)])
        return Pipeline([("columns", cols), ("lr", _lr(random_state))])
    if name == "tabular_hgb":
        cols = ColumnTransformer([("tab", "passthrough", tab)])
        return Pipeline([("columns", cols),
                         ("hgb", HistGradientBoostingClassifier(random_state=random_state))])
    if name == "notes_tfidf_lr":
        cols = ColumnTransformer([("note", _tfidf(), NOTE)])
        return Pipeline([("columns", cols), ("lr", _lr(random_state))])
    if name == "early_fusion_lr":
        cols = ColumnTransformer([("tab", _dense_block(), tab), ("note", _tfidf(), NOTE)])
        return Pipeline([("columns", cols), ("lr", _lr(random_state))])
    if name == "image_probe_lr":
        cols = ColumnTransformer([("img", _dense_block(), img)])
        return Pipeline([("columns", cols), ("lr", _lr(random_state))])
    if name == "stacked_late_fusion":
        ok, _ = available_baselines(X)
        members = [(b, make_baseline(b, X, random_state=random_state))
                   for b in STACKED_FROM if b in ok]
        return StackedLateFusion(estimators=members, inner_folds=inner_folds,
                                 random_state=random_state)
    raise ValueError(f"unknown baseline {name!r}; expected one of {list(BASELINES)}")


class StackedLateFusion(ClassifierMixin, BaseEstimator):
    """Late fusion of fitted baselines: a logistic regression on their logits.

    ``fit`` splits its rows into ``inner_folds`` patient-grouped, label-stratified folds
    (fewer when a class has fewer patients), gets each member's out-of-fold logit, fits
    the combiner on those, then refits every member on all rows. Nothing outside the
    rows given to ``fit`` is touched.

    Parameters
    ----------
    estimators : list of (name, estimator)
    inner_folds : int, default=5
    random_state : int, default=0

    Attributes
    ----------
    estimators_ : list of (name, fitted estimator)
    combiner_ : LogisticRegression
    classes_ : ndarray
    """

    def __init__(self, *, estimators: list[tuple[str, BaseEstimator]], inner_folds: int = 5,
                 random_state: int = 0) -> None:
        self.estimators = estimators
        self.inner_folds = inner_folds
        self.random_state = random_state

    def fit(self, X: pd.DataFrame, y: np.ndarray, groups: np.ndarray | None = None
            ) -> StackedLateFusion:
        y = np.asarray(y).astype(int)
        groups = np.arange(len(y)) if groups is None else np.asarray(groups)
        per_class = min(len(set(groups[y == c])) for c in (0, 1))
        k = max(2, min(int(self.inner_folds), per_class))
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True,
                                        random_state=self.random_state)
        Z = np.zeros((len(y), len(self.estimators)))
        for inner_train, inner_test in splitter.split(np.zeros(len(y)), y, groups=groups):
            for j, (_, est) in enumerate(self.estimators):
                model = clone(est).fit(X.iloc[inner_train], y[inner_train])
                Z[inner_test, j] = _logit(model, X.iloc[inner_test])
        self.combiner_ = _lr(int(self.random_state)).fit(Z, y)
        self.estimators_ = [(name, clone(est).fit(X, y)) for name, est in self.estimators]
        self.classes_ = self.combiner_.classes_
        return self

    def _stack(self, X: pd.DataFrame) -> np.ndarray:
        check_is_fitted(self, "combiner_")
        return np.column_stack([_logit(est, X) for _, est in self.estimators_])

    def decision_function(self, X: pd.DataFrame) -> np.ndarray:
        return np.asarray(self.combiner_.decision_function(self._stack(X)))

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        return np.asarray(self.combiner_.predict_proba(self._stack(X)))

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        return np.asarray(self.combiner_.predict(self._stack(X)))


def _logit(model: Any, X: pd.DataFrame) -> np.ndarray:
    """A fitted classifier's log-odds of class 1 (from its probabilities, clipped)."""
    p = np.clip(model.predict_proba(X)[:, 1], 1e-6, 1 - 1e-6)
    return np.asarray(np.log(p) - np.log1p(-p))
