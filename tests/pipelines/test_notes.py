"""Notes pipeline: sentence splitting on tricky and real notes, windowing, cache, pooling."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from models.note_encoder import TfidfNoteEncoder
from pipelines.notes import (
    NoteEmbedder,
    SentenceEmbeddingCache,
    fit_note_encoder,
    fit_to_window,
    is_negated,
    negation_pool,
    pool,
    split_sentences,
)
from tests.shared_data import shared_data_dir


class HashEncoder:
    """Deterministic fake encoder: a vector from each sentence's hash; counts calls."""

    def __init__(self, name: str = "hash-v1", dim: int = 8, max_tokens: int = 6) -> None:
        self.name = name
        self.dim = dim
        self.max_tokens = max_tokens
        self.calls: list[list[str]] = []

    def encode(self, sentences: Sequence[str]) -> np.ndarray:
        self.calls.append(list(sentences))
        out = np.zeros((len(sentences), self.dim), dtype=np.float32)
        for i, s in enumerate(sentences):
            seed = int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "little")
            out[i] = np.random.default_rng(seed).normal(size=self.dim)
        return out

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def tokenize_chunks(self, text: str, max_tokens: int) -> list[str]:
        words = text.split()
        return [" ".join(words[i:i + max_tokens]) for i in range(0, len(words), max_tokens)]

    @property
    def encoded(self) -> int:
        return sum(len(c) for c in self.calls)


# ------------------------------------------------------------------ splitting

TRICKY = """HPI: 67 y.o. M seen by Dr. J. Smith vs. Dr. Jones on 3/4. Pt denies chest pain. \
No fever, chills. Hx of hepatitis C. He takes ASA 81 mg. daily and metoprolol 25 mg b.i.d. \
Lisinopril was stopped.
Plan:
1. Continue ASA.
2. F/u in 2 wks. Call if worse!
- Labs: Na 140, K 4.1.
# Medications
amoxicillin 500 mg oral tablet
Pt lives in the U.S. Army base. Wt approx. 80 kg."""


def test_split_handles_abbreviations_lists_headers_and_negation() -> None:
    assert split_sentences(TRICKY) == [
        "HPI: 67 y.o. M seen by Dr. J. Smith vs. Dr. Jones on 3/4.",
        "Pt denies chest pain.",
        "No fever, chills.",
        "Hx of hepatitis C.",
        "He takes ASA 81 mg. daily and metoprolol 25 mg b.i.d.",
        "Lisinopril was stopped.",
        "Plan:",
        "Continue ASA.",
        "F/u in 2 wks.",
        "Call if worse!",
        "Labs: Na 140, K 4.1.",
        "Medications",
        "amoxicillin 500 mg oral tablet",
        "Pt lives in the U.S. Army base.",
        "Wt approx. 80 kg.",
    ]


def test_split_undoes_hard_wrapping_but_keeps_real_line_breaks() -> None:
    wrapped = ("HOSPITAL COURSE: He had an NG tube in and was n.p.o. He remained n.p.o. for\n"
               "three days. Over the past year, this has caused him an increasing number of\n"
               "problems. Denies chest pain when he eats.\n"
               "OBJECTIVE:  \n"
               "Vitals: Weight was 130 pounds and blood pressure 124/78.  \n"
               "Neck: Supple without adenopathy.\n\n"
               "ASSESSMENT: Allergic rhinitis.   PLAN: Zyrtec.\n"
               "* Pain in chest described as tightness, heavy pressure.\n"
               "Lisinopril 10 mg daily\n"
               "Metformin 500 mg\n"
               "\t\n"
               "----\n")
    assert split_sentences(wrapped) == [
        "HOSPITAL COURSE: He had an NG tube in and was n.p.o.",
        "He remained n.p.o. for three days.",
        "Over the past year, this has caused him an increasing number of problems.",
        "Denies chest pain when he eats.",
        "OBJECTIVE:",
        "Vitals: Weight was 130 pounds and blood pressure 124/78.",
        "Neck: Supple without adenopathy.",
        "ASSESSMENT: Allergic rhinitis.",
        "PLAN: Zyrtec.",
        "Pain in chest described as tightness, heavy pressure.",
        "Lisinopril 10 mg daily",
        "Metformin 500 mg",
    ]


def test_split_inline_headers_and_units() -> None:
    text = ("REVIEW OF SYSTEMS: No change since last visit PHYSICAL EXAM: Temp: 97.6 "
            "Height: 0 ft. 31 in. Weight: 28 lbs. BMI: 20")
    assert split_sentences(text) == [
        "REVIEW OF SYSTEMS: No change since last visit",
        "PHYSICAL EXAM: Temp: 97.6 Height: 0 ft. 31 in.",
        "Weight: 28 lbs.",
        "BMI: 20",
    ]
    assert split_sentences("") == [] and split_sentences(" \n\n * \n") == []


def test_split_real_curated_notes() -> None:
    curated = shared_data_dir("notes") / "curated"
    rhinitis = split_sentences((curated / "allergic-rhinitis.txt").read_text())
    assert len(rhinitis) == 26
    assert rhinitis[0] == ("SUBJECTIVE: This 23-year-old white female presents with "
                           "complaint of allergies.")
    assert rhinitis[11:13] == ["OBJECTIVE:", "Vitals: Weight was 130 pounds and blood "
                               "pressure 124/78."]
    assert rhinitis[-1] == "A prescription was written as well."

    discharge = split_sentences((curated / "discharge-summary-10.txt").read_text())
    assert len(discharge) == 41
    assert discharge[0] == ("ADMITTING DIAGNOSES: Hiatal hernia, gastroesophageal reflux "
                            "disease reflux.")
    assert "He had an NG tube in and was n.p.o." in discharge
    assert "He remained n.p.o. for three days." in discharge
    assert discharge[9].startswith("HOSPITAL COURSE: Mr. A was admitted to the adolescent")

    exam = split_sentences((curated / "1-year-old-exam-hp.txt").read_text())
    assert len(exam) == 61
    assert "ALLERGIES: No known medical allergies." in exam
    assert "TEST & X-RAY RESULTS: Hb: 12 g/dl." in exam


def test_split_real_synthetic_note_with_markdown() -> None:
    synthetic = shared_data_dir("notes") / "synthetic"
    sentences = split_sentences(
        (synthetic / "13d7f763-ca16-76f5-ceae-6317aea0c44b.txt").read_text())
    assert sentences[:5] == ["2021-05-17", "Chief Complaint", "No complaints.",
                             "History of Present Illness",
                             "Alex454 is a 1 year-old non-hispanic white male."]
    assert sentences[12:14] == ["Medications", "amoxicillin 500 mg oral tablet; "
                                "acetaminophen 160 mg chewable tablet"]


_LIST_MARKER = re.compile(r"(?:^|(?<=\s))(?:\(?\d{1,3}[.)]|\(?[a-z]\))(?=\s|$)", re.M)


def _content(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "", _LIST_MARKER.sub("", text))


def test_split_never_drops_text_from_any_shared_note() -> None:
    notes = sorted(shared_data_dir("notes").glob("*/*.txt"))
    assert len(notes) >= 300
    for path in notes:
        text = path.read_text()
        sentences = split_sentences(text)
        assert all(s and s == s.strip() and "\n" not in s for s in sentences), path.name
        # Only list markers are removed: every letter and digit survives, in order.
        assert _content("\n".join(sentences)) == _content(text), path.name


# ------------------------------------------------------------------ windowing


def test_fit_to_window_chunks_only_long_sentences() -> None:
    encoder = HashEncoder(max_tokens=3)
    long = "one two three four five six seven"
    out = fit_to_window(["short one", long], encoder)
    # The cheap length pre-check never skips a sentence that is over the window.
    assert out == ["short one", "one two three", "four five six", "seven"]
    tfidf = TfidfNoteEncoder(max_tokens=4)
    pieces = fit_to_window([long + " eight nine"], tfidf)
    assert all(tfidf.count_tokens(p) <= 4 for p in pieces) and len(pieces) == 3


# ------------------------------------------------------------------ embedding


def test_embed_pools_sentences_and_exposes_them() -> None:
    encoder = HashEncoder()
    emb = NoteEmbedder(encoder).embed("Denies chest pain. Has fever. Denies chest pain.")
    assert emb.sentences == ["Denies chest pain.", "Has fever.", "Denies chest pain."]
    assert emb.sentence_embeddings.shape == (3, 8)
    assert encoder.calls == [["Denies chest pain.", "Has fever."]]  # duplicates encoded once
    np.testing.assert_allclose(emb.pooled, emb.sentence_embeddings.mean(axis=0), rtol=1e-6)
    keep = np.array([False, True, True])
    np.testing.assert_allclose(emb.pool(keep), emb.sentence_embeddings[1:].mean(axis=0),
                               rtol=1e-6)
    np.testing.assert_array_equal(emb.pool(keep), pool(emb.sentence_embeddings, keep))
    assert emb.encoder_name == "hash-v1" and not emb.is_empty


def test_embed_several_notes_concatenates_them() -> None:
    embedder = NoteEmbedder(HashEncoder())
    emb = embedder.embed(["Note one. Still one.", "", "Note three."])
    assert emb.sentences == ["Note one.", "Still one.", "Note three."]
    assert emb.note_index.tolist() == [0, 0, 2]
    empty = embedder.embed(["", "  \n"])
    assert empty.is_empty and empty.sentence_embeddings.shape == (0, 8)
    assert empty.pooled.shape == (8,) and not empty.pooled.any()
    with pytest.raises(TypeError, match="position 1"):
        embedder.embed(["ok", None])  # type: ignore[list-item]


def test_embed_many_batches_and_matches_embed() -> None:
    encoder = HashEncoder()
    embedder = NoteEmbedder(encoder, encode_chunk=2)
    texts = ["A one. A two.", "B one. A two.", "C one words are many here now."]
    many = embedder.embed_many(texts)
    # 5 distinct pieces (the last sentence is chunked to the 6-token window), in chunks of 2.
    assert [len(c) for c in encoder.calls] == [2, 2, 1]
    assert many[2].sentences == ["C one words are many here", "now."]
    for text, emb in zip(texts, many, strict=True):
        np.testing.assert_array_equal(emb.sentence_embeddings,
                                      NoteEmbedder(HashEncoder()).embed(text).sentence_embeddings)
    with pytest.raises(TypeError, match="embed_many takes a sequence"):
        embedder.embed_many("one note")


def test_cache_hit_never_calls_the_encoder(tmp_path: Path) -> None:
    encoder = HashEncoder()
    texts = ["Denies chest pain. Has fever.", "No known allergies."]
    first = NoteEmbedder(encoder, cache_dir=tmp_path).embed_many(texts)
    assert encoder.encoded == 3
    # A fresh embedder on the same directory (another process, say) hits the cache.
    second = NoteEmbedder(encoder, cache_dir=tmp_path).embed_many(texts)
    assert encoder.encoded == 3
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a.sentence_embeddings, b.sentence_embeddings)
    # Only the new sentence is encoded.
    NoteEmbedder(encoder, cache_dir=tmp_path).embed("Has fever. Cough.")
    assert encoder.calls[-1] == ["Cough."]
    assert len(SentenceEmbeddingCache(tmp_path / NoteEmbedder.CACHE_FILE)) == 4


def test_cache_is_keyed_by_encoder_name_and_dim(tmp_path: Path) -> None:
    NoteEmbedder(HashEncoder("hash-v1"), cache_dir=tmp_path).embed("Has fever.")
    other = HashEncoder("hash-v2")
    NoteEmbedder(other, cache_dir=tmp_path).embed("Has fever.")
    assert other.encoded == 1  # another encoder's vectors are never reused
    key = SentenceEmbeddingCache.key("hash-v1", "Has fever.")
    assert key == hashlib.sha256(b"hash-v1\x00Has fever.").digest()
    cache = SentenceEmbeddingCache(tmp_path / NoteEmbedder.CACHE_FILE)
    assert set(cache.get_many([key], 8)) == {key}
    assert cache.get_many([key], 16) == {}


def test_encoder_returning_the_wrong_shape_is_an_error() -> None:
    class Broken(HashEncoder):
        def encode(self, sentences: Sequence[str]) -> np.ndarray:
            return np.zeros((len(sentences), 3), dtype=np.float32)

    with pytest.raises(ValueError, match=r"returned shape \(1, 3\).*expected \(1, 8\)"):
        NoteEmbedder(Broken()).embed("Has fever.")


def test_tfidf_end_to_end_fits_on_training_notes_only(tmp_path: Path) -> None:
    train = ["Denies chest pain. No fever.", "Severe chest pain radiating to the arm.",
             "Cough and fever for two days. Denies chills."]
    encoder = fit_note_encoder(TfidfNoteEncoder(dim=16), train)
    assert isinstance(encoder, TfidfNoteEncoder)
    assert set(encoder.vectorizer_.vocabulary_) >= {"denies", "chest pain", "no fever"}
    embedder = NoteEmbedder(encoder, cache_dir=tmp_path)
    emb = embedder.embed("HPI: Denies chest pain.\nPLAN: Fever workup.")
    assert emb.sentences == ["HPI: Denies chest pain.", "PLAN: Fever workup."]
    assert emb.sentence_embeddings.shape == (2, 16) and emb.encoder_name == encoder.name
    # A pretrained encoder is left as it is.
    fake = HashEncoder()
    assert fit_note_encoder(fake, train) is fake and fake.calls == []


@pytest.mark.parametrize("sentence", [
    "Denies chills.", "No shortness of breath.", "No chills or rigors.",
    "No confusion; alert and oriented.", "Denies nausea or vomiting.",
    "No poor oral intake reported.", "Subjective: Denies lightheadedness.",
    "Patient denied any chest pain.", "Negative for fever.", "Without dysuria.",
    "She does not report headache.", "No evidence of pneumonia on imaging.",
])
def test_negated_findings(sentence: str) -> None:
    assert is_negated(sentence)


@pytest.mark.parametrize("sentence", [
    "Reports shaking chills overnight.", "Short of breath with minimal exertion.",
    "Confused this morning, oriented to self only.", "Poor oral intake.",
    "Family reports new confusion.", "Endorses chest pain at rest.",
    "Subjective: Reports nausea after meals.", "No change in cough since admission.",
    "Ambulating without difficulty.", "Gram negative rods in blood cultures.",
    "Notable for diffuse wheeze.", "Nothing by mouth after midnight is advised.",
])
def test_affirmed_findings_and_pseudo_negations(sentence: str) -> None:
    assert not is_negated(sentence)


def test_negation_pool_sums_each_side_and_occludes() -> None:
    emb = NoteEmbedder(HashEncoder()).embed(
        "Reports chills. Denies chest pain. Poor oral intake. No nausea.")
    assert emb.negated.tolist() == [False, True, False, True]
    out = emb.pool_negation()
    e = emb.sentence_embeddings
    assert out.shape == (2 * 8 + 2,)
    np.testing.assert_allclose(out[:8], e[0] + e[2], rtol=1e-6)
    np.testing.assert_allclose(out[8:16], e[1] + e[3], rtol=1e-6)
    assert out[16:].tolist() == [2.0, 2.0]
    keep = np.array([True, True, False, True])  # occlude "Poor oral intake."
    np.testing.assert_allclose(emb.pool_negation(keep)[:8], e[0], rtol=1e-6)
    assert emb.pool_negation(keep)[16:].tolist() == [1.0, 2.0]
    empty = negation_pool(np.zeros((0, 8), np.float32), np.zeros(0, bool))
    assert empty.shape == (18,) and not empty.any()
    with pytest.raises(ValueError, match="negated must be a bool array"):
        negation_pool(e, np.zeros(4, int))
