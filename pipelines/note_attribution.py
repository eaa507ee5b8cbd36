"""Sentence-level note attribution by occlusion at the pooling step.

Each sentence's attribution is the change in the fused calibrated logit when that
sentence alone is dropped from its pool: ``logit(all) - logit(all but i)``. The
sentence vectors come from the note cache (:class:`pipelines.notes.NoteEmbedding`),
so nothing is re-encoded; all ``n`` occlusions are one batched model call.

The pooled note vector is rebuilt the way the model reads notes: the plain mean
(``pool``) when the model's note input has the encoder's dimension, or the
affirmed/negated split (``pool_negation``, ``2 d + 2``) otherwise. The rebuilt
vector is checked against the model input before anything is attributed.

Which sentences are shown and cited is decided by
:func:`pipelines.note_evidence.select_evidence` alone: negated findings ("Denies
chest pain.") are never shown as evidence *for* risk nor cited (a negated sentence
that raises the logit is reported in ``suppressed``), and template sentences of the
training cohort (the artifact's fitted :class:`~pipelines.note_evidence.BoilerplateSentences`)
are never shown nor cited (``boilerplate``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines.note_evidence import BoilerplateSentences, select_evidence

__all__ = ["NoteAttribution", "SentenceAttribution", "attribute_sentences", "negation_flags"]

# Fallback cue list for when pipelines.notes has no negation detector (NegEx, abridged).
_FALLBACK_NEGATION = re.compile(
    r"\b(?:no|not|denies|denied|without|negative\s+for|never|absence\s+of|free\s+of|"
    r"ruled\s+out|no\s+evidence\s+of|none)\b", re.IGNORECASE)
_FALLBACK_PSEUDO = re.compile(r"\b(?:no\s+change|no\s+increase|no\s+further|not\s+only|"
                              r"without\s+difficulty|gram\s+negative)\b", re.IGNORECASE)


def _fallback_is_negated(sentence: str) -> bool:
    return _FALLBACK_NEGATION.search(_FALLBACK_PSEUDO.sub(" ", sentence)) is not None


def negation_flags(embedding: Any) -> np.ndarray:
    """Per-sentence negation: the embedding's own flags, else ``pipelines.notes.is_negated``,
    else this module's cue check."""
    flags = getattr(embedding, "negated", None)
    if flags is not None and len(flags) == len(embedding.sentences):
        return np.asarray(flags, dtype=bool)
    from pipelines import notes

    detector: Callable[[str], bool] = getattr(notes, "is_negated", _fallback_is_negated)
    return np.array([detector(s) for s in embedding.sentences], dtype=bool)


@dataclass(frozen=True)
class SentenceAttribution:
    index: int
    sentence: str
    note_index: int
    negated: bool
    logit: float  # calibrated-logit change when the sentence is dropped (positive: raises risk)
    points: float

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class NoteAttribution:
    """All sentences' attributions, plus the highlights a clinician is shown."""

    sentences: list[SentenceAttribution]
    highlights: list[SentenceAttribution] = field(default_factory=list)
    suppressed: list[SentenceAttribution] = field(default_factory=list)
    pooling: str = "mean"
    #: Citable in the rationale (never negated, never boilerplate), strongest first.
    raising: list[SentenceAttribution] = field(default_factory=list)
    lowering: list[SentenceAttribution] = field(default_factory=list)
    boilerplate: list[SentenceAttribution] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"pooling": self.pooling,
                "method": "sentence occlusion at the pooling step (cached embeddings)",
                "highlights": [s.to_dict() for s in self.highlights],
                "citable_raising": [s.to_dict() for s in self.raising],
                "citable_lowering": [s.to_dict() for s in self.lowering],
                "negated_not_shown_as_evidence": [s.to_dict() for s in self.suppressed],
                "boilerplate_not_shown_as_evidence": [s.to_dict() for s in self.boilerplate],
                "sentences": [s.to_dict() for s in self.sentences]}


def _vector(embedding: Any, keep: np.ndarray, dim: int) -> tuple[np.ndarray, str]:
    d = int(np.asarray(embedding.sentence_embeddings).shape[1])
    if dim == d:
        return np.asarray(embedding.pool(keep), dtype=np.float32), "mean"
    if dim == 2 * d + 2 and hasattr(embedding, "pool_negation"):
        return np.asarray(embedding.pool_negation(keep), dtype=np.float32), "negation"
    raise ValueError(f"the model's note input has {dim} dimensions; sentence embeddings have "
                     f"{d}, and no known pooling maps one to the other")


def attribute_sentences(model: Any, X: Mapping[str, np.ndarray], mask: np.ndarray,
                        embedding: Any, *, top: int = 3,
                        to_points: Callable[[np.ndarray], np.ndarray] | None = None,
                        atol: float = 1e-4,
                        boilerplate: BoilerplateSentences | None = None) -> NoteAttribution:
    """Occlude each sentence of one example's notes; see the module docstring.

    Parameters
    ----------
    model : FusionRiskModel
    X, mask : the example's model inputs ``(1, d_m)`` and availability ``(M,)``.
    embedding : NoteEmbedding
        The example's cached sentences and vectors.
    top : int, default 3
        Highlights: at most ``top`` sentences, by absolute attribution.
    to_points : callable, optional
        Logit attributions -> percentage points (default: zeros).
    atol : float
        How far the rebuilt pooled vector may be from ``X["note"]``.
    boilerplate : BoilerplateSentences, optional
        The artifact's fitted template sentences; never shown nor cited. None (an
        artifact saved before it existed): no sentence is treated as boilerplate.
    """
    mods = tuple(model.modalities_)
    row_mask = np.asarray(mask, dtype=bool).reshape(1, -1)
    n = len(embedding.sentences)
    if "note" not in mods or not row_mask[0, mods.index("note")] or n == 0:
        return NoteAttribution([])
    dim = int(np.asarray(X["note"]).shape[1])
    full, pooling = _vector(embedding, np.ones(n, dtype=bool), dim)
    if not np.allclose(full, np.asarray(X["note"])[0], atol=atol, rtol=1e-4):
        raise ValueError("the cached sentence embeddings do not rebuild the model's note "
                         "input; re-embed the note with the model's encoder")
    rows = [full]
    for i in range(n):
        keep = np.ones(n, dtype=bool)
        keep[i] = False
        rows.append(_vector(embedding, keep, dim)[0])
    batch = {m: np.repeat(np.asarray(v)[:1], n + 1, axis=0) for m, v in X.items() if m in mods}
    batch["note"] = np.stack(rows)
    masks = np.repeat(row_mask, n + 1, axis=0)
    if n == 1:  # dropping the only sentence leaves no note: the modality is absent
        masks[1, mods.index("note")] = False
    logits = np.asarray(model.predict_logit(batch, masks, calibrated=True))
    deltas = logits[0] - logits[1:]
    points = to_points(deltas) if to_points is not None else np.zeros(n)
    negated = negation_flags(embedding)
    note_index = np.asarray(getattr(embedding, "note_index", np.zeros(n, dtype=int)))
    items = [SentenceAttribution(i, embedding.sentences[i], int(note_index[i]),
                                 bool(negated[i]), float(deltas[i]), float(points[i]))
             for i in range(n)]
    chosen = select_evidence(items, boilerplate=boilerplate, top=top)
    return NoteAttribution(items, chosen.highlights, chosen.suppressed, pooling,
                           chosen.raising, chosen.lowering, chosen.boilerplate)
