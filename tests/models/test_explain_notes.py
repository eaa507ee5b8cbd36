"""Sentence occlusion at the pooling step; negated findings are never positive evidence."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from models.note_encoder import pool
from pipelines.note_attribution import attribute_sentences, negation_flags
from tests.models.explain_fakes import small_fusion


@dataclass
class FakeEmbedding:
    sentences: list[str]
    sentence_embeddings: np.ndarray
    note_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))

    def pool(self, keep_mask: np.ndarray | None = None) -> np.ndarray:
        return pool(self.sentence_embeddings, keep_mask)


def test_occlusion_equals_rescoring_without_the_sentence() -> None:
    model, X, mask = small_fusion(d_note=6)
    rng = np.random.default_rng(3)
    sentences = ["Reports shortness of breath.", "Denies chest pain.", "Eating well.",
                 "No fever."]
    emb = FakeEmbedding(sentences, rng.normal(size=(4, 6)).astype("float32"),
                        np.zeros(4, dtype=int))
    i = int(np.flatnonzero(mask.all(axis=1))[0])
    one = {m: v[i:i + 1] for m, v in X.items()}
    one["note"] = emb.pool()[None]
    res = attribute_sentences(model, one, mask[i], emb)
    full = model.predict_logit(one, mask[i:i + 1])[0]
    for s in res.sentences:
        keep = np.ones(4, dtype=bool)
        keep[s.index] = False
        without = model.predict_logit({**one, "note": emb.pool(keep)[None]}, mask[i:i + 1])[0]
        assert abs(s.logit - (full - without)) < 1e-6
    assert [s.negated for s in res.sentences] == [False, True, False, True]
    assert not any(s.negated and s.logit > 0 for s in res.highlights)
    assert {s.index for s in res.suppressed} == {s.index for s in res.sentences
                                                 if s.negated and s.logit > 0}


def test_stale_embeddings_are_refused() -> None:
    model, X, mask = small_fusion(d_note=6)
    emb = FakeEmbedding(["A."], np.ones((1, 6), dtype="float32"), np.zeros(1, dtype=int))
    i = int(np.flatnonzero(mask.all(axis=1))[0])
    with pytest.raises(ValueError, match="do not rebuild"):
        attribute_sentences(model, {m: v[i:i + 1] for m, v in X.items()}, mask[i], emb)


def test_negation_flags_fall_back_to_the_notes_detector() -> None:
    emb = FakeEmbedding(["Denies chills.", "Reports chills.", "No change in cough."],
                        np.zeros((3, 2), dtype="float32"))
    assert negation_flags(emb).tolist() == [True, False, False]
