"""Clinical notes -> sentences -> cached sentence embeddings -> one pooled note vector.

- :func:`split_sentences` turns a note into sentences (see its docstring for the
  rules); :func:`fit_to_window` cuts any sentence longer than the encoder's window
  into window-sized pieces with the encoder's own tokenizer.
- :class:`NoteEmbedder` embeds notes through a :class:`~models.note_encoder.NoteEncoder`,
  caching every sentence vector on disk under ``sha256(encoder name, sentence)``, so
  re-embedding a cohort only encodes sentences it has never seen.
- :func:`pool` (from :mod:`models.note_encoder`) is the mean over sentence
  embeddings; explanations occlude sentences by pooling a subset.
- :func:`is_negated` flags sentences whose finding is negated ("Denies chills.",
  "No shortness of breath."), NegEx-style; :func:`negation_pool` pools affirmed
  and negated sentences separately. A mean-pooled sentence encoder barely tells
  "Denies chills." from "Endorses chills.", so the fusion model reads notes through
  this split representation (``notes.pooling = "negation"``, the default).

Several notes per example: pass a list of notes. Their sentences are concatenated
in order (``NoteEmbedding.note_index`` says which note each came from) and pooled
together, so every sentence weighs the same whichever note it is in.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import sqlite3
from collections.abc import Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.negation import NEGATION_CUES, PSEUDO_NEGATIONS, is_negated
from models.note_encoder import NoteEncoder, TfidfNoteEncoder, pool

__all__ = [
    "NEGATION_CUES",
    "PSEUDO_NEGATIONS",
    "NoteEmbedder",
    "NoteEmbedding",
    "SentenceEmbeddingCache",
    "fit_note_encoder",
    "fit_to_window",
    "is_negated",
    "negation_pool",
    "pool",
    "split_sentences",
]

# ------------------------------------------------------------------ sentence split

# List markers at the start of a line: "* ", "- ", "• ", "1. ", "2) ", "(3) ", "a) ".
_BULLET = re.compile(r"^(?:[-*•·▪‣◦]|\(?\d{1,3}[.)]|\(?[a-z]\))\s+")
_MD_HEADER = re.compile(r"^#{1,6}\s+(.*?)\s*#*$")
# A section header opening a line: "HPI:", "PHYSICAL EXAM:", "Review of Systems:".
_CAPS_WORD = r"[A-Z&][A-Z0-9&/()'+-]*"
_CAPS_HEADER = re.compile(rf"^{_CAPS_WORD}(?:\s+{_CAPS_WORD}){{0,5}}\s*:(?=\s|$)")
_HEADER = re.compile(
    rf"^(?:{_CAPS_WORD}(?:\s+{_CAPS_WORD}){{0,5}}"
    r"|[A-Z][A-Za-z/&-]*(?:\s+(?:[A-Z][A-Za-z/&-]*|of|and|or|the|for|to|in)){0,3})"
    r"\s*:(?=\s|$)")
# An all-caps header inside a line ("... last visit PHYSICAL EXAM: Temp ..."); the
# leftmost match spans the whole header, so multi-word headers stay whole.
_INLINE_HEADER = re.compile(rf"(?<!\S)[A-Z]{{2}}[A-Z0-9&/()'+-]*(?:\s+{_CAPS_WORD}){{0,5}}:\s")
# Sentence-final punctuation, with closing quotes or brackets, before whitespace.
_END = re.compile(r"[.!?]+[\"')\]]*(?=\s)")
_LIST_MARKER_AHEAD = re.compile(r"\(?\d{1,3}[.)]\s")
# Never a sentence end: titles, "e.g.", "vs." and friends (lower-cased, no final dot).
_NO_SPLIT_AFTER = frozenset({
    "dr", "drs", "mr", "mrs", "ms", "prof", "st", "sr", "jr", "messrs",
    "e.g", "i.e", "eg", "ie", "vs", "viz", "cf", "approx", "fig", "figs", "ca", "incl",
    "y.o", "yo", "y/o",  # "67 y.o. M": age, then sex
})
_TITLES = frozenset({"dr", "drs", "mr", "mrs", "ms", "prof"})
_UPPER_DOTTED = re.compile(r"^(?:[A-Z]\.){2,}$")  # "U.S.": an acronym, not an end
_MIN_WRAP_WIDTH = 60


def _header_only(line: str) -> bool:
    match = _HEADER.match(line)
    return match is not None and not line[match.end():].strip()


def _starts_segment(line: str) -> bool:
    """A line that always starts a new segment: list item or all-caps/Markdown header.

    Title-case headers ("Eyes:") are left to the wrap test: a wrapped line may start
    with a capitalised word and a colon ("Head\\nCircumference: 18.5 in").
    """
    return bool(_BULLET.match(line) or _MD_HEADER.match(line) or _CAPS_HEADER.match(line))


def _segments(block: list[str], width: int) -> list[str]:
    """Undo hard wrapping inside one paragraph; return its logical lines.

    A newline is kept when the previous line ends in two spaces (a Markdown hard
    break), the next line is a list item or header, the previous line is a header
    alone, or the next line's first word would have fit on the previous line and
    starts with a capital or digit (so a wrapper did not put it there).
    """
    segments: list[str] = []
    current = block[0]
    for prev, line in itertools.pairwise(block):
        stripped = line.strip()
        first_word = stripped.split(maxsplit=1)[0]
        fits = len(prev.rstrip()) + 1 + len(first_word) <= width
        hard = (prev.endswith("  ") or _starts_segment(stripped) or _header_only(prev.strip())
                or _MD_HEADER.match(prev.strip()) is not None
                or (fits and not stripped[0].islower()))
        if hard:
            segments.append(current)
            current = line
        else:
            current = current.rstrip() + " " + stripped
    segments.append(current)
    return segments


def _token_before(text: str, pos: int) -> str:
    """The whitespace-delimited token ending at ``pos`` (exclusive), leading brackets off."""
    start = text.rfind(" ", 0, pos) + 1
    return text[start:pos].lstrip("([\"'")


def _is_boundary(segment: str, match: re.Match[str]) -> bool:
    """Whether the punctuation in ``match`` ends a sentence."""
    rest = segment[match.end():].lstrip()
    if not rest:
        return False
    nxt = rest[0]
    punct = match.group()
    if "!" in punct or "?" in punct:
        return not nxt.islower()
    if nxt.islower() or nxt in ",;:":
        return False
    token = _token_before(segment, match.start() + 1)  # includes the final dot
    word = token[:-1].lower()
    if word in _NO_SPLIT_AFTER or _UPPER_DOTTED.match(token):
        return False
    if re.fullmatch(r"\d{1,3}\.", token) and segment[:match.start() - len(token) + 1].strip() == "":
        return False  # "1." opening a list item
    if nxt.isdigit():
        # "0 ft. 31 in.", "No. 3", "approx. 5": a new sentence only at a list marker.
        return bool(_LIST_MARKER_AHEAD.match(rest)) and word != "no"
    if len(word) == 1 and word.isalpha():
        # An initial ("Dr. J. Smith", "J. R. Smith") only after a title or initial;
        # otherwise a sentence ending in a letter ("hepatitis C.", "vitamin D.").
        token_start = match.start() + 1 - len(token)
        before = _token_before(segment, len(segment[:token_start].rstrip()))
        before = before.rstrip(".").lower()
        if before in _TITLES or (len(before) == 1 and before.isalpha()):
            return False
    return True


def _split_segment(segment: str) -> list[str]:
    cuts = [m.start() for m in _INLINE_HEADER.finditer(segment) if m.start() > 0]
    parts = [segment[i:j] for i, j in zip([0, *cuts], [*cuts, len(segment)], strict=True)]
    pieces: list[str] = []
    for part in parts:
        start = 0
        for match in _END.finditer(part):
            if _is_boundary(part, match):
                pieces.append(part[start:match.end()])
                start = match.end()
        pieces.append(part[start:])
    return pieces


def _clean(sentence: str) -> str:
    sentence = re.sub(r"\s+", " ", sentence).strip()
    sentence = _BULLET.sub("", sentence, count=1)
    header = _MD_HEADER.match(sentence)
    return header.group(1) if header else sentence


def split_sentences(text: str) -> list[str]:
    """Split a clinical note into sentences.

    Rules, in order:

    - Blank lines end a paragraph. Inside a paragraph, hard wrapping is undone (see
      ``_segments``), while list items (``*``, ``-``, ``1.``, ``a)``), section
      headers (``HPI:``, ``PHYSICAL EXAM:``, ``# Chief Complaint``) and Markdown
      hard breaks start a new line of their own.
    - A header followed by text stays with its first sentence ("ALLERGIES: None.");
      a header alone is a sentence of its own, so no text is dropped.
    - Lines split at ``.``, ``!`` or ``?`` before a capital, a bracket or a list
      marker, but not after titles ("Dr.", "Mr."), "e.g.", "vs.", acronyms ("U.S."),
      initials after a title, before a lower-case word ("mg. daily", "b.i.d. with
      meals") or before a number ("0 ft. 31 in."). A dotted abbreviation before a
      capital does end a sentence ("He was n.p.o. He also had ...").
    - Negation cues are never split from their finding: "Denies chest pain." stays
      one sentence.
    - List markers and ``#`` are stripped, runs of whitespace collapse to one space,
      and pieces with no letter or digit are dropped.

    Long sentences are not cut here; see :func:`fit_to_window`.

    Examples
    --------
    >>> split_sentences("HPI: Seen by Dr. Smith. Denies chest pain.\\n"
    ...                 "Meds:\\n1. Metoprolol 25 mg p.o. b.i.d.")
    ['HPI: Seen by Dr. Smith.', 'Denies chest pain.', 'Meds:', 'Metoprolol 25 mg p.o. b.i.d.']
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
    sentences: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = [line for line in paragraph.split("\n") if line.strip()]
        if not lines:
            continue
        width = max(_MIN_WRAP_WIDTH, *(len(line.rstrip()) for line in lines))
        for segment in _segments(lines, width):
            for piece in _split_segment(segment.strip()):
                sentence = _clean(piece)
                if any(ch.isalnum() for ch in sentence):
                    sentences.append(sentence)
    return sentences


def fit_to_window(sentences: Iterable[str], encoder: NoteEncoder) -> list[str]:
    """Replace each sentence longer than the encoder's window by window-sized pieces.

    Pieces are cut with the encoder's own tokenizer at word boundaries and each has
    ``encoder.count_tokens(piece) <= encoder.max_tokens``, so nothing is truncated.
    """
    out: list[str] = []
    for sentence in sentences:
        # Cheap pre-check: a token covers at least one character in practice.
        if len(sentence) < encoder.max_tokens // 2 or \
                encoder.count_tokens(sentence) <= encoder.max_tokens:
            out.append(sentence)
        else:
            out.extend(encoder.tokenize_chunks(sentence, encoder.max_tokens))
    return out


def fit_note_encoder(encoder: NoteEncoder, train_notes: Iterable[str]) -> NoteEncoder:
    """Fit a trainable encoder (TF-IDF) on the sentences of the training notes only.

    Pretrained encoders are returned unchanged. Returns the encoder.
    """
    if isinstance(encoder, TfidfNoteEncoder):
        sentences = [s for note in train_notes for s in split_sentences(note)]
        encoder.fit(fit_to_window(sentences, encoder))
    return encoder


# ---------------------------------------------------------------------- negation

def negation_pool(sentence_embeddings: np.ndarray, negated: np.ndarray,
                  keep_mask: np.ndarray | None = None) -> np.ndarray:
    """``[sum affirmed, sum negated, n affirmed, n negated]``, shape ``(2 d + 2,)``.

    Sums, not means: each affirmed finding adds its own evidence, whatever else the
    notes say (a mean would let routine filler sentences dilute it). Occlusion works
    as with :func:`pool`: a sentence dropped by ``keep_mask`` leaves its pool and
    its count.

    Parameters
    ----------
    sentence_embeddings : ndarray of shape (n, d)
    negated : ndarray of bool, shape (n,)
        :func:`is_negated` of each sentence.
    keep_mask : ndarray of bool, shape (n,), optional
        Sentences to keep; all when omitted.
    """
    emb = np.asarray(sentence_embeddings)
    if emb.ndim != 2:
        raise ValueError(f"sentence_embeddings must be 2-D (n, d), got shape {emb.shape}")
    neg = np.asarray(negated)
    if neg.dtype != np.bool_ or neg.shape != (emb.shape[0],):
        raise ValueError(f"negated must be a bool array of shape ({emb.shape[0]},), got "
                         f"{neg.dtype} of shape {neg.shape}")
    keep = np.ones(emb.shape[0], dtype=bool) if keep_mask is None else np.asarray(keep_mask)
    if keep.dtype != np.bool_ or keep.shape != (emb.shape[0],):
        raise ValueError(f"keep_mask must be a bool array of shape ({emb.shape[0]},), got "
                         f"{keep.dtype} of shape {keep.shape}")
    affirmed, negative = keep & ~neg, keep & neg
    return np.concatenate([emb[affirmed].sum(axis=0, dtype=np.float64),
                           emb[negative].sum(axis=0, dtype=np.float64),
                           [affirmed.sum(), negative.sum()]]).astype(np.float32)


# ------------------------------------------------------------------------- cache


class SentenceEmbeddingCache:
    """On-disk map ``sha256(encoder name, sentence) -> float32 vector`` (SQLite).

    Each call opens its own short connection, so the cache is safe across threads,
    forked data-loader workers and concurrent processes (WAL journal, busy timeout).
    """

    _CHUNK = 500  # keys per SELECT: under SQLite's bound-parameter limit

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as conn, conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("CREATE TABLE IF NOT EXISTS sentence_embedding "
                         "(key BLOB PRIMARY KEY, dim INTEGER NOT NULL, vec BLOB NOT NULL)")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=60)

    @staticmethod
    def key(encoder_name: str, sentence: str) -> bytes:
        """The cache key; the NUL separator keeps (name, sentence) pairs unambiguous."""
        return hashlib.sha256(f"{encoder_name}\x00{sentence}".encode()).digest()

    def get_many(self, keys: Sequence[bytes], dim: int) -> dict[bytes, np.ndarray]:
        """Stored vectors for the keys that have one of dimension ``dim``."""
        found: dict[bytes, np.ndarray] = {}
        with closing(self._connect()) as conn:
            for i in range(0, len(keys), self._CHUNK):
                chunk = keys[i:i + self._CHUNK]
                rows = conn.execute(
                    "SELECT key, vec FROM sentence_embedding WHERE dim = ? AND key IN "
                    f"({','.join('?' * len(chunk))})", (dim, *chunk))
                for key, blob in rows:
                    if len(blob) == 4 * dim:  # a truncated row is a miss, not a crash
                        found[key] = np.frombuffer(blob, dtype=np.float32)
        return found

    def put_many(self, items: Iterable[tuple[bytes, np.ndarray]]) -> None:
        """Store vectors (float32); existing keys are left as they are."""
        rows = [(key, int(vec.shape[0]), np.ascontiguousarray(vec, dtype=np.float32).tobytes())
                for key, vec in items]
        with closing(self._connect()) as conn, conn:
            conn.executemany("INSERT OR IGNORE INTO sentence_embedding (key, dim, vec) "
                             "VALUES (?, ?, ?)", rows)

    def __len__(self) -> int:
        with closing(self._connect()) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM sentence_embedding").fetchone()[0])


# ---------------------------------------------------------------------- embedder


@dataclass(frozen=True)
class NoteEmbedding:
    """One example's notes as sentences and vectors.

    Attributes
    ----------
    sentences : list of str
        In note order, after splitting and window chunking.
    sentence_embeddings : ndarray of shape (n, d), float32
    note_index : ndarray of shape (n,), int
        Which of the example's notes each sentence came from.
    encoder_name : str
    pooled : ndarray of shape (d,), float32
        ``pool(sentence_embeddings)``: zeros when there is no sentence.
    negated : ndarray of shape (n,), bool
        :func:`is_negated` of each sentence.
    """

    sentences: list[str]
    sentence_embeddings: np.ndarray
    note_index: np.ndarray
    encoder_name: str
    pooled: np.ndarray = field(init=False)
    negated: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pooled", pool(self.sentence_embeddings))
        object.__setattr__(self, "negated",
                           np.array([is_negated(s) for s in self.sentences], dtype=bool))

    @property
    def is_empty(self) -> bool:
        """No sentence at all (missing or blank notes)."""
        return len(self.sentences) == 0

    def pool(self, keep_mask: np.ndarray | None = None) -> np.ndarray:
        """Pooled vector over the kept sentences only, without re-encoding."""
        return pool(self.sentence_embeddings, keep_mask)

    def pool_negation(self, keep_mask: np.ndarray | None = None) -> np.ndarray:
        """:func:`negation_pool` over the kept sentences only, without re-encoding."""
        return negation_pool(self.sentence_embeddings, self.negated, keep_mask)


Notes = str | Sequence[str]


class NoteEmbedder:
    """Embeds notes sentence by sentence, with an on-disk sentence cache.

    Parameters
    ----------
    encoder : NoteEncoder
        Already fitted when it is trainable (see :func:`fit_note_encoder`).
    cache_dir : Path or None, default None
        Where ``note_embeddings.sqlite`` lives; None disables caching across calls
        (repeated sentences within one call are still encoded once).
    encode_chunk : int, default 4096
        Uncached sentences are encoded and stored this many at a time, so a long run
        keeps its progress if interrupted and memory stays bounded.

    Examples
    --------
    >>> from models.note_encoder import TfidfNoteEncoder
    >>> enc = TfidfNoteEncoder(dim=4).fit(["no chest pain", "fever and chills", "cough"])
    >>> emb = NoteEmbedder(enc).embed("Denies chest pain. Has fever.")
    >>> emb.sentences, emb.sentence_embeddings.shape, emb.pooled.shape
    (['Denies chest pain.', 'Has fever.'], (2, 4), (4,))
    """

    CACHE_FILE = "note_embeddings.sqlite"

    def __init__(self, encoder: NoteEncoder, cache_dir: Path | None = None, *,
                 encode_chunk: int = 4096) -> None:
        if encode_chunk < 1:
            raise ValueError(f"encode_chunk must be >= 1, got {encode_chunk}")
        self.encoder = encoder
        self.cache_dir = cache_dir
        self.encode_chunk = encode_chunk
        self.cache = (SentenceEmbeddingCache(Path(cache_dir) / self.CACHE_FILE)
                      if cache_dir is not None else None)

    def sentences(self, notes: Notes) -> tuple[list[str], np.ndarray]:
        """Sentences of one example's notes, window-sized, and their note index."""
        note_list = [notes] if isinstance(notes, str) else list(notes)
        sentences: list[str] = []
        index: list[int] = []
        for i, note in enumerate(note_list):
            if not isinstance(note, str):
                raise TypeError(f"a note must be str, got {type(note).__name__} at position {i}")
            found = fit_to_window(split_sentences(note), self.encoder)
            sentences.extend(found)
            index.extend([i] * len(found))
        return sentences, np.asarray(index, dtype=np.int64)

    def embed(self, notes: Notes) -> NoteEmbedding:
        """Embed one example: a note, or a list of notes pooled together."""
        return self.embed_many([notes])[0]

    def embed_many(self, examples: Sequence[Notes]) -> list[NoteEmbedding]:
        """Embed many examples with one cache lookup and batched encoder calls."""
        if isinstance(examples, str):
            raise TypeError("embed_many takes a sequence of examples; use embed for one note")
        name = self.encoder.name
        split = [self.sentences(notes) for notes in examples]
        unique = list(dict.fromkeys(s for sentences, _ in split for s in sentences))
        vectors = self._vectors(name, unique)
        dim = self.encoder.dim
        out: list[NoteEmbedding] = []
        for sentences, index in split:
            emb = (np.stack([vectors[s] for s in sentences]) if sentences
                   else np.zeros((0, dim), dtype=np.float32))
            out.append(NoteEmbedding(sentences, emb, index, name))
        return out

    def _vectors(self, name: str, unique: list[str]) -> dict[str, np.ndarray]:
        """Vector for each distinct sentence: from the cache, else encoded and stored."""
        dim = self.encoder.dim
        keys = {s: SentenceEmbeddingCache.key(name, s) for s in unique}
        cached = self.cache.get_many(list(keys.values()), dim) if self.cache else {}
        vectors = {s: cached[k] for s, k in keys.items() if k in cached}
        missing = [s for s in unique if s not in vectors]
        for i in range(0, len(missing), self.encode_chunk):
            batch = missing[i:i + self.encode_chunk]
            emb = np.asarray(self.encoder.encode(batch), dtype=np.float32)
            if emb.shape != (len(batch), dim):
                raise ValueError(f"encoder {name!r} returned shape {emb.shape} for "
                                 f"{len(batch)} sentences, expected ({len(batch)}, {dim})")
            vectors.update(zip(batch, emb, strict=True))
            if self.cache is not None:
                self.cache.put_many((keys[s], v) for s, v in zip(batch, emb, strict=True))
        return vectors
