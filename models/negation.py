"""NegEx-style negation detection for clinical sentences.

Shared by the notes pipeline (:mod:`pipelines.notes` re-exports :func:`is_negated`,
which pools negated sentences apart and keeps them out of explanation highlights)
and the TF-IDF note encoder (:class:`models.note_encoder.TfidfNoteEncoder` with
``negation_marks=True`` prefixes every word of a negated sentence, so "No chest
pain." and "Severe chest pain." share no term). One detector, so a sentence the
explanation treats as negated is the sentence the encoder marked.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["NEGATION_CUES", "PSEUDO_NEGATIONS", "is_negated"]

#: NegEx-style negation cues (Chapman et al. 2001, abridged): a cue before the
#: finding negates the rest of the sentence.
NEGATION_CUES: tuple[str, ...] = (
    "no", "not", "denies", "denied", "deny", "denying", "without", "negative for",
    "never", "absence of", "free of", "rules out", "ruled out", "no evidence of",
    "no signs of", "no sign of", "resolved", "none",
)
#: Pseudo-negations: contain a cue but negate nothing ("no change in", "not only").
PSEUDO_NEGATIONS: tuple[str, ...] = (
    "no change", "no increase", "no further", "not only", "not certain if",
    "not necessarily", "without difficulty", "gram negative", "no interval change",
)


def _phrase_pattern(phrases: Sequence[str]) -> re.Pattern[str]:
    alternatives = sorted((re.escape(p).replace(r"\ ", r"\s+") for p in phrases), key=len,
                          reverse=True)
    return re.compile(rf"\b(?:{'|'.join(alternatives)})\b", re.IGNORECASE)


_NEGATION = _phrase_pattern(NEGATION_CUES)
_PSEUDO = _phrase_pattern(PSEUDO_NEGATIONS)


def is_negated(sentence: str) -> bool:
    """Whether ``sentence`` negates its finding (NegEx-style cue detection).

    A negation cue ("no", "denies", "without", "negative for", ...) anywhere in the
    sentence negates it, unless the cue is part of a pseudo-negation ("no change",
    "not only"). Section headers ("Subjective: Denies chills.") do not matter.

    Examples
    --------
    >>> [is_negated(s) for s in ("Denies chills.", "No shortness of breath.",
    ...                          "Reports shaking chills overnight.", "No change in cough.")]
    [True, True, False, False]
    """
    return _NEGATION.search(_PSEUDO.sub(" ", sentence)) is not None
