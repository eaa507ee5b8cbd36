"""Embed the notes with the candidate encoders and let :mod:`models.note_learner` choose.

``train`` calls :func:`choose_notes` once, after the split: the TF-IDF candidate is
fitted on the training split's note sentences (no labels), the supervised
"tfidf-lr" scorer (:class:`models.note_scorer.TfidfLrNoteScorer`) on the training
notes and labels, with patient-grouped cross-fitted (out-of-fold) sentence scores of
those notes; every candidate gives pooled vectors of the training rows that have a
note (tfidf-lr its out-of-fold ones), the note learner compares the note head on them
by inner patient-grouped CV, and the chosen encoder embeds every row (MiniLM's
sentence vectors come from the on-disk cache the second time). When tfidf-lr is
chosen, the training rows keep their out-of-fold vectors, so the fusion head is fitted
on honest note scores (as ``train`` does with the boosted trees' out-of-fold EHR
logit); every other row gets the scorer fitted on all training notes. Forced choices
(``notes.encoder: minilm``, ``tfidf`` or ``tfidf-lr``) build one encoder and skip the CV.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.note_encoder import NoteEncoder, TfidfNoteEncoder, load_note_encoder
from models.note_learner import LEARNERS, NoteLearner
from models.note_scorer import TfidfLrNoteScorer
from pipelines.model_inputs import NOTE_POOLINGS, embed_notes, note_input_dim
from pipelines.notes import NoteEmbedder, NoteEmbedding, fit_note_encoder

__all__ = ["NoteChoice", "choose_notes", "resolve_pooling"]

log = logging.getLogger(__name__)


@dataclass
class NoteChoice:
    """What ``train`` needs from the notes: the encoder, its pooling and the note input."""

    encoder: NoteEncoder
    pooling: str
    X: np.ndarray  # (n, width) pooled note vectors of every row
    present: np.ndarray  # (n,) bool: the row has a note with a sentence
    learner: NoteLearner
    #: Rows whose ``X`` is out-of-fold (tfidf-lr's training rows); empty otherwise.
    oof_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def record(self) -> dict[str, Any]:
        return dict(self.learner.record_)


def resolve_pooling(pooling: str, encoder: NoteEncoder) -> str:
    """``"auto"``: mean for TF-IDF + SVD (its n-grams carry negation), negation pooling
    otherwise (MiniLM; the tfidf-lr scores, whose sums then add up to the note logit)."""
    if pooling == "auto":
        return "mean" if isinstance(encoder, TfidfNoteEncoder) else "negation"
    if pooling not in NOTE_POOLINGS:
        raise ValueError(f"notes pooling must be 'auto' or one of {list(NOTE_POOLINGS)}, got "
                         f"{pooling!r}")
    return pooling


def choose_notes(notes: Sequence[str | None], y: np.ndarray, groups: np.ndarray,
                 train_rows: np.ndarray, *, notes_cfg: Mapping[str, Any],
                 head_params: Mapping[str, Any], random_state: int,
                 cache_dir: Path | None) -> NoteChoice:
    """Choose and apply the note representation; see the module docstring.

    Parameters
    ----------
    notes : sequence of str or None
        Every row's note text.
    y, groups : ndarray of shape (n,)
        Labels and patient ids of every row; only ``train_rows`` are used to choose.
    notes_cfg : mapping
        The training config's ``notes`` section: ``encoder`` ("auto", "minilm",
        "tfidf", "tfidf-lr"), ``pooling``, ``inner_folds`` (also the scorer's
        cross-fitting folds), ``negation_marks``.
    head_params : mapping
        The note head's ``FusionRiskModel`` settings (the fusion config).
    cache_dir : Path or None
        Sentence-embedding cache folder.

    Raises
    ------
    ValueError
        An unknown encoder or pooling name.
    """
    requested = str(notes_cfg.get("encoder", "auto"))
    if requested not in LEARNERS:
        raise ValueError(f"notes.encoder must be one of {list(LEARNERS)}, got {requested!r}")
    started = time.perf_counter()
    train_notes = [n for n in (notes[int(i)] for i in train_rows) if n]
    encoders: dict[str, NoteEncoder] = {}
    unavailable: dict[str, str] = {}
    learner = requested
    folds = int(notes_cfg.get("inner_folds", 5))
    if requested in ("auto", "minilm"):
        # load_note_encoder's fallback: a warning and TF-IDF, or an error under CI=true.
        minilm = load_note_encoder("minilm")
        if isinstance(minilm, TfidfNoteEncoder):  # the fallback: MiniLM is not installed
            unavailable["minilm"] = "the MiniLM note encoder is not installed"
            if requested == "minilm":
                learner = "tfidf"
        else:
            encoders["minilm"] = minilm
    if requested in ("auto", "tfidf") or learner == "tfidf":
        tfidf = TfidfNoteEncoder(negation_marks=bool(notes_cfg.get("negation_marks", True)),
                                 random_state=random_state)
        encoders["tfidf"] = fit_note_encoder(tfidf, train_notes)
    pooling_cfg = str(notes_cfg.get("pooling", "auto"))
    oof: tuple[np.ndarray, np.ndarray] | None = None  # (training-row positions, vectors)
    if requested in ("auto", "tfidf-lr"):
        scorer = TfidfLrNoteScorer(folds=max(folds, 2), random_state=random_state)
        try:
            oof = _fit_scorer(scorer, notes, y, groups, train_rows,
                              resolve_pooling(pooling_cfg, scorer))
        except ValueError as exc:
            if requested == "tfidf-lr":
                raise ValueError(f"the tfidf-lr note scorer: {exc}") from None
            unavailable["tfidf-lr"] = f"the tfidf-lr note scorer could not be fitted ({exc})"
        else:
            encoders["tfidf-lr"] = scorer
    pooling = {c: resolve_pooling(pooling_cfg, e) for c, e in encoders.items()}
    embedders = {c: NoteEmbedder(e, cache_dir) for c, e in encoders.items()}
    if learner == "auto" and len(encoders) < 2:
        learner = next(iter(encoders))

    note_learner = NoteLearner(learner=learner, folds=folds, random_state=random_state,
                               head_params=head_params)
    if learner == "auto":
        train_notes_all = [notes[int(i)] for i in train_rows]
        pooled: dict[str, np.ndarray] = {}
        have = np.ones(len(train_rows), dtype=bool)
        for c, embedder in embedders.items():
            if c == "tfidf-lr":  # out-of-fold: the head must see honest scores
                assert oof is not None
                pooled[c] = np.zeros((len(train_rows), oof[1].shape[1]), dtype=np.float32)
                pooled[c][oof[0]] = oof[1]
                present = np.zeros(len(train_rows), dtype=bool)
                present[oof[0]] = True
            else:
                pooled[c], present = embed_notes(embedder, train_notes_all, pooling[c])
            have &= present
        rows = np.asarray(train_rows)[have]
        note_learner.fit({c: v[have] for c, v in pooled.items()}, y[rows], groups[rows],
                         unavailable=unavailable)
    else:
        note_learner.fit({}, y[train_rows], groups[train_rows], unavailable=unavailable)
        if unavailable and requested != learner:
            note_learner.record_["reason"] = (
                "; ".join(unavailable.values())
                + f"; {'TF-IDF' if learner == 'tfidf' else learner} is the only candidate")
    note_learner.record_["requested"] = requested
    chosen = note_learner.learner_
    X, present = embed_notes(embedders[chosen], notes, pooling[chosen])
    oof_rows = np.zeros(0, dtype=np.int64)
    if chosen == "tfidf-lr":
        assert oof is not None
        oof_rows = np.asarray(train_rows, dtype=np.int64)[oof[0]]
        X[oof_rows] = oof[1]
        note_learner.record_["training_rows_input"] = (
            f"out-of-fold sentence scores ({scorer.folds_} patient-grouped folds, "
            f"C = {scorer.C_:g} of {[float(c) for c in scorer.Cs]} by their log-loss)")
    note_learner.record_.update(pooling=pooling[chosen], encoder=encoders[chosen].name,
                                seconds_total=round(time.perf_counter() - started, 2))
    log.info("notes: %d of %d examples embedded with %s (%s pooling)", int(present.sum()),
             len(notes), encoders[chosen].name, pooling[chosen])
    return NoteChoice(encoders[chosen], pooling[chosen], X, present, note_learner, oof_rows)


def _fit_scorer(scorer: TfidfLrNoteScorer, notes: Sequence[str | None], y: np.ndarray,
                groups: np.ndarray, train_rows: np.ndarray, pooling: str
                ) -> tuple[np.ndarray, np.ndarray]:
    """Fit the scorer on the training notes; (positions in ``train_rows`` of the notes
    with a sentence, their out-of-fold pooled vectors)."""
    splitter = NoteEmbedder(scorer)  # sentences only: the same lists the embedder scores
    at: list[int] = []
    split: list[tuple[list[str], np.ndarray]] = []
    for j, i in enumerate(train_rows):
        note = notes[int(i)]
        if note is not None and note.strip():
            sentences, index = splitter.sentences(note)
            if sentences:
                at.append(j)
                split.append((sentences, index))
    rows = np.asarray(train_rows)[at]
    scorer.fit([s for s, _ in split], y[rows], groups[rows])
    out = np.zeros((len(at), note_input_dim(scorer.dim, pooling)), dtype=np.float32)
    for k, ((sentences, index), scores) in enumerate(
            zip(split, scorer.oof_sentence_scores(), strict=True)):
        e = NoteEmbedding(sentences, scores, index, scorer.name)
        out[k] = e.pooled if pooling == "mean" else e.pool_negation()
    return np.asarray(at, dtype=np.int64), out
