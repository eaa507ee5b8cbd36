"""Which note sentences may be shown or cited as evidence: boilerplate and negation rules.

Sentence occlusion (:mod:`pipelines.note_attribution`) gives every sentence an
attribution, but not every sentence is evidence a clinician should be shown:

- **Boilerplate** -- template sentences shared by most notes of the training cohort
  ("Plan discussed with the patient.", "Labs reviewed with the team.") -- say nothing
  about this patient. With sum pooling (negation pooling) every extra sentence moves
  the note vector, so occlusion can rank them first. :class:`BoilerplateSentences`
  learns them at fit time (document frequency above ``max_df`` of the training
  notes) and stores them in the model artifact; they are never highlighted nor cited.
  They still enter the pooled note vector (the fusion model was trained on it), so
  the model's risk is unchanged; only what is shown as evidence changes.
- **Negation** is a hard rule: a sentence :func:`models.negation.is_negated` flags is
  never risk-raising evidence and never cited in the rationale, whatever its score.
  The flag the embedding carries and the detector are both consulted, so a stale or
  missing flag cannot let a negated sentence through.

:func:`select_evidence` is the single place that applies both rules; the
attribution's highlights and the rationale's cited sentences come from it only.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted

from models.negation import is_negated
from pipelines.notes import _HEADER, split_sentences

__all__ = ["BoilerplateSentences", "EvidenceSelection", "normalise_sentence",
           "select_evidence"]

_SPACE = re.compile(r"\s+")


def normalise_sentence(sentence: str) -> str:
    """Case- and whitespace-insensitive form used to match template sentences.

    A leading section header is dropped ("Plan: Labs reviewed with the team." is the
    template "Labs reviewed with the team."): the splitter keeps a header with its
    first sentence, so the same template would otherwise count apart under each one.
    """
    text = _SPACE.sub(" ", sentence).strip()
    header = _HEADER.match(text)
    if header is not None and text[header.end():].strip():
        text = text[header.end():].strip()
    return text.lower()


class BoilerplateSentences(BaseEstimator):  # type: ignore[misc]
    """Sentences present in more than ``max_df`` of the training notes (template text).

    Parameters
    ----------
    max_df : float, default 0.25
        A sentence found (after :func:`normalise_sentence`) in more than this share of
        the training examples' notes is boilerplate. Clinical findings are rarely
        written word for word in a quarter of all notes; template sentences are.
    min_notes : int, default 20
        Below this many non-empty notes no sentence is called boilerplate (the
        frequencies would mean little).
    min_rate_ratio : float, default 0.5
        With labels given to :meth:`fit`, a frequent sentence is boilerplate only if it
        is about as common in the notes of events as of non-events (the smaller of the
        two rates at least this share of the larger): template text is written
        whatever the outcome, while a frequent finding that tracks the outcome
        ("Reports chest pain." in most events' notes) is evidence, not boilerplate.

    Attributes
    ----------
    sentences_ : frozenset of str
        The normalised boilerplate sentences.
    n_notes_ : int
        Non-empty training notes counted.
    df_threshold_ : int
        The learned count: a sentence in more than this many notes is boilerplate.
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "max_df": [Interval(Real, 0, 1, closed="neither")],
        "min_notes": [Interval(Integral, 1, None, closed="left")],
        "min_rate_ratio": [Interval(Real, 0, 1, closed="both")],
    }

    def __init__(self, *, max_df: float = 0.25, min_notes: int = 20,
                 min_rate_ratio: float = 0.5) -> None:
        self.max_df = max_df
        self.min_notes = min_notes
        self.min_rate_ratio = min_rate_ratio

    def fit(self, notes: Iterable[str | Sequence[str] | None], y: Any = None
            ) -> BoilerplateSentences:
        """Count, per example, which distinct sentences its notes contain.

        ``y`` (optional, 0/1 per example): see ``min_rate_ratio``.
        """
        self._validate_params()
        notes = list(notes)
        labels = None if y is None else np.asarray(y, dtype=int).ravel()
        if labels is not None and len(labels) != len(notes):
            raise ValueError(f"BoilerplateSentences.fit got {len(notes)} notes and "
                             f"{len(labels)} labels; expected one label per note")
        df: Counter[str] = Counter()
        by_class: dict[int, Counter[str]] = {0: Counter(), 1: Counter()}
        n_class = {0: 0, 1: 0}
        n = 0
        for i, example in enumerate(notes):
            texts = [example] if isinstance(example, str) else list(example or [])
            found = {normalise_sentence(s) for t in texts if isinstance(t, str)
                     for s in split_sentences(t)}
            if found:
                n += 1
                df.update(found)
                if labels is not None:
                    c = int(labels[i] == 1)
                    by_class[c].update(found)
                    n_class[c] += 1
        self.n_notes_ = n
        self.df_threshold_ = math.floor(self.max_df * n)
        frequent = [s for s, c in df.items() if c > self.df_threshold_]
        if labels is not None and min(n_class.values()) > 0:
            frequent = [s for s in frequent if self._outcome_blind(
                by_class[1][s] / n_class[1], by_class[0][s] / n_class[0])]
        self.sentences_ = frozenset(frequent) if n >= self.min_notes else frozenset()
        return self

    def _outcome_blind(self, rate_events: float, rate_others: float) -> bool:
        return min(rate_events, rate_others) >= self.min_rate_ratio * max(rate_events,
                                                                           rate_others)

    def is_boilerplate(self, sentence: str) -> bool:
        check_is_fitted(self, "sentences_")
        return normalise_sentence(sentence) in self.sentences_

    def to_document(self) -> dict[str, Any]:
        """JSON document for the model artifact (``note_boilerplate.json``)."""
        check_is_fitted(self, "sentences_")
        return {"max_df": float(self.max_df), "min_notes": int(self.min_notes),
                "min_rate_ratio": float(self.min_rate_ratio),
                "n_notes": int(self.n_notes_), "df_threshold": int(self.df_threshold_),
                "sentences": sorted(self.sentences_)}

    @classmethod
    def from_document(cls, doc: Mapping[str, Any] | None) -> BoilerplateSentences | None:
        """Rebuild from :meth:`to_document`; None for artifacts saved before it existed
        (they keep the old behaviour: no sentence is treated as boilerplate)."""
        if doc is None:
            return None
        if not isinstance(doc.get("sentences"), list):
            raise ValueError("note_boilerplate document has no 'sentences' list")
        est = cls(max_df=float(doc["max_df"]), min_notes=int(doc["min_notes"]),
                  min_rate_ratio=float(doc.get("min_rate_ratio", 0.5)))
        est.n_notes_ = int(doc["n_notes"])
        est.df_threshold_ = int(doc["df_threshold"])
        est.sentences_ = frozenset(normalise_sentence(str(s)) for s in doc["sentences"])
        return est


@dataclass(frozen=True)
class EvidenceSelection:
    highlights: list[Any]  # shown, by absolute attribution
    raising: list[Any]  # citable as raising the risk, strongest first
    lowering: list[Any]  # citable as lowering the risk, strongest first
    suppressed: list[Any]  # negated sentences that raised the logit: never evidence
    boilerplate: list[Any]  # template sentences: never evidence


def select_evidence(items: Sequence[Any], *, boilerplate: BoilerplateSentences | None = None,
                    top: int = 3, eps: float = 1e-9) -> EvidenceSelection:
    """Apply the boilerplate and negation rules; the only selector of shown/cited sentences.

    A sentence is negated if its own flag says so *or* the detector does. Negated
    sentences are never cited; one that lowers the risk may still be highlighted (it
    is evidence against, not for, the finding). Boilerplate is neither.
    """
    ranked = sorted(items, key=lambda s: -abs(s.logit))

    def negated(s: Any) -> bool:
        return bool(s.negated) or is_negated(s.sentence)

    def template(s: Any) -> bool:
        return boilerplate is not None and boilerplate.is_boilerplate(s.sentence)

    plate = [s for s in ranked if template(s)]
    rest = [s for s in ranked if not template(s)]
    suppressed = [s for s in rest if negated(s) and s.logit > 0]
    shown = [s for s in rest if not (negated(s) and s.logit > 0) and abs(s.logit) > eps]
    raising = [s for s in rest if not negated(s) and s.logit > eps]
    lowering = [s for s in rest if not negated(s) and s.logit < -eps]
    return EvidenceSelection(shown[:top], raising[:top], lowering[:top], suppressed, plate)
