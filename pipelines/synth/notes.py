"""Clinical note text: symptom sentences (affirmed or negated) among neutral filler.

A present symptom is affirmed in one of the patient's notes; an absent one is
negated ("Denies chills.", "No shortness of breath.") half the time and not
mentioned otherwise, so negation handling matters to a note reader. No phrase
names the outcome (see ``codes.OUTCOME_TERMS``; the tests grep for them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from pipelines.synth.model import Symptom

__all__ = ["NOTE_TYPES", "PHRASES", "NoteSim", "compose_notes"]

#: symptom -> (affirming sentences, negating sentences)
PHRASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "shortness of breath": (
        ("Reports shortness of breath.", "Short of breath with minimal exertion."),
        ("Denies shortness of breath.", "No shortness of breath."),
    ),
    "confusion": (
        ("Family reports new confusion.", "Confused this morning, oriented to self only."),
        ("No confusion; alert and oriented.", "Denies confusion."),
    ),
    "chills": (
        ("Reports shaking chills overnight.", "Endorses chills."),
        ("Denies chills.", "No chills or rigors."),
    ),
    "poor oral intake": (
        ("Poor oral intake, eating less than a quarter of meals.", "Poor oral intake."),
        ("No poor oral intake reported.", "Denies poor oral intake."),
    ),
    "lightheadedness": (
        ("Reports lightheadedness on standing.", "Endorses lightheadedness."),
        ("Denies lightheadedness.", "No lightheadedness."),
    ),
    "chest pain": (
        ("Reports intermittent chest pain.", "Endorses chest pain at rest."),
        ("Denies chest pain.", "No chest pain."),
    ),
    "headache": (
        ("Reports a mild headache.", "Endorses headache."),
        ("Denies headache.", "No headache."),
    ),
    "nausea": (
        ("Reports nausea after meals.", "Endorses nausea."),
        ("Denies nausea or vomiting.", "No nausea."),
    ),
}

FILLER: tuple[str, ...] = (
    "Patient seen and examined at the bedside.",
    "Vital signs and nursing notes reviewed.",
    "Medications reconciled.",
    "Plan discussed with the patient.",
    "Continue current management.",
    "Ambulating in the hallway with a walker.",
    "Skin warm and dry.",
    "Peripheral IV in place.",
    "Pain controlled on the current regimen.",
    "Sleeping adequately.",
    "Labs reviewed with the team.",
)

#: (LOINC, display): the first note is the admission H&P, the rest progress notes.
NOTE_TYPES: tuple[tuple[str, str], ...] = (("34117-2", "History and physical note"),
                                           ("11506-3", "Progress note"))


@dataclass(frozen=True)
class NoteSim:
    loinc: str
    display: str
    time: datetime
    text: str


def scatter_phrases(rng: np.random.Generator, bodies: list[list[str]], present: np.ndarray,
                    names: Sequence[str],
                    phrases: Mapping[str, tuple[Sequence[str], Sequence[str]]],
                    *, p_negated: float) -> None:
    """Put an affirming phrase of each present item, or with ``p_negated`` a negating one of
    an absent item, into a random note's body (in place; one fixed draw order)."""
    n_notes = len(bodies)
    for k, name in enumerate(names):
        affirm, negate = phrases[name]
        if present[k]:
            bodies[int(rng.integers(n_notes))].append(affirm[int(rng.integers(len(affirm)))])
        elif rng.random() < p_negated:
            bodies[int(rng.integers(n_notes))].append(negate[int(rng.integers(len(negate)))])


def compose_notes(rng: np.random.Generator, present: np.ndarray, symptoms: Sequence[Symptom],
                  times: Sequence[datetime], *, age: int, sex: str, reason: str
                  ) -> list[NoteSim]:
    """Write ``len(times)`` notes expressing the symptom indicators ``present``."""
    n_notes = len(times)
    if n_notes == 0:
        return []
    bodies: list[list[str]] = [[] for _ in range(n_notes)]
    scatter_phrases(rng, bodies, present, [s.name for s in symptoms], PHRASES, p_negated=0.5)
    person = "man" if sex == "male" else "woman"
    notes = []
    for i, when in enumerate(times):
        loinc, display = NOTE_TYPES[0 if i == 0 else 1]
        filler = [FILLER[j] for j in rng.choice(len(FILLER), size=3, replace=False)]
        order = rng.permutation(len(bodies[i]))
        subjective = " ".join(bodies[i][j] for j in order) or "No new complaints."
        if i == 0:
            header = "History and physical"
            opening = f"{age}-year-old {person} admitted with {reason}."
        else:
            header = f"Progress note, hospital day {i + 1}"
            opening = f"Follow-up of {reason}."
        lines = [header, opening, f"Subjective: {subjective}", f"Plan: {' '.join(filler)}"]
        notes.append(NoteSim(loinc, display, when, "\n".join(lines)))
    return notes
