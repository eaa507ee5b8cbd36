"""Embed the notes with the candidate encoders and let :mod:`models.note_learner` choose.

``train`` calls :func:`choose_notes` once, after the split: the TF-IDF candidate is
fitted on the training split's note sentences (no labels), both candidates embed the
training rows that have a note, the note learner compares the note head on them by
inner patient-grouped CV, and the chosen encoder embeds every row (MiniLM's sentence
vectors come from the on-disk cache the second time). Forced choices
(``notes.encoder: minilm`` or ``tfidf``) build one encoder and skip the CV.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.note_encoder import NoteEncoder, TfidfNoteEncoder, load_note_encoder
from models.note_learner import LEARNERS, NoteLearner
from pipelines.model_inputs import NOTE_POOLINGS, embed_notes
from pipelines.notes import NoteEmbedder, fit_note_encoder

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

    @property
    def record(self) -> dict[str, Any]:
        return dict(self.learner.record_)


def resolve_pooling(pooling: str, encoder: NoteEncoder) -> str:
    """``"auto"``: mean for TF-IDF (its n-grams carry negation), negation pooling otherwise."""
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
        "tfidf"), ``pooling``, ``inner_folds``, ``negation_marks``.
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
    if requested in ("auto", "minilm"):
        # load_note_encoder's fallback: a warning and TF-IDF, or an error under CI=true.
        minilm = load_note_encoder("minilm")
        if isinstance(minilm, TfidfNoteEncoder):  # the fallback: MiniLM is not installed
            unavailable["minilm"] = "the MiniLM note encoder is not installed"
            learner = "tfidf"
        else:
            encoders["minilm"] = minilm
    if requested in ("auto", "tfidf") or "minilm" in unavailable:
        tfidf = TfidfNoteEncoder(negation_marks=bool(notes_cfg.get("negation_marks", True)),
                                 random_state=random_state)
        encoders["tfidf"] = fit_note_encoder(tfidf, train_notes)
    pooling_cfg = str(notes_cfg.get("pooling", "auto"))
    pooling = {c: resolve_pooling(pooling_cfg, e) for c, e in encoders.items()}
    embedders = {c: NoteEmbedder(e, cache_dir) for c, e in encoders.items()}

    note_learner = NoteLearner(learner=learner, folds=int(notes_cfg.get("inner_folds", 5)),
                               random_state=random_state, head_params=head_params)
    if learner == "auto" and len(encoders) == 2:
        train_notes_all = [notes[int(i)] for i in train_rows]
        pooled: dict[str, np.ndarray] = {}
        have = np.ones(len(train_rows), dtype=bool)
        for c, embedder in embedders.items():
            pooled[c], present = embed_notes(embedder, train_notes_all, pooling[c])
            have &= present
        rows = np.asarray(train_rows)[have]
        note_learner.fit({c: v[have] for c, v in pooled.items()}, y[rows], groups[rows],
                         unavailable=unavailable)
    else:
        note_learner.fit({}, y[train_rows], groups[train_rows], unavailable=unavailable)
        if "minilm" in unavailable:
            note_learner.record_["reason"] = (
                f"{unavailable['minilm']}; TF-IDF is the only candidate")
    note_learner.record_["requested"] = requested
    chosen = note_learner.learner_
    X, present = embed_notes(embedders[chosen], notes, pooling[chosen])
    note_learner.record_.update(pooling=pooling[chosen], encoder=encoders[chosen].name,
                                seconds_total=round(time.perf_counter() - started, 2))
    log.info("notes: %d of %d examples embedded with %s (%s pooling)", int(present.sum()),
             len(notes), encoders[chosen].name, pooling[chosen])
    return NoteChoice(encoders[chosen], pooling[chosen], X, present, note_learner)
