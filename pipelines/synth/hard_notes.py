"""``--realism hard`` notes: boilerplate, with the signal in a few rare phrases.

Most of every note is template text and common complaints that carry no signal
(affirmed or denied at random). A rare finding (``HardModel.findings``, 3-5 % of
patients each) is written in one of the patient's notes in one of a few wordings;
an absent finding is written negated for ``p_negated`` of patients ("No mottling."),
sharing its key words with the affirmed phrase, and carries no risk. No phrase names
the outcome (``codes.OUTCOME_TERMS``; the tests grep for them).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import numpy as np

from pipelines.synth.hard_model import Finding
from pipelines.synth.notes import FILLER, NOTE_TYPES, NoteSim, scatter_phrases

__all__ = ["BOILERPLATE", "FINDING_PHRASES", "compose_hard_notes"]

#: finding -> (affirming wordings, negating wordings)
FINDING_PHRASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "new oxygen requirement": (
        ("New oxygen requirement overnight, now on 4 L nasal cannula.",
         "Desaturated on room air; new oxygen requirement."),
        ("No new oxygen requirement.", "Remains on room air without oxygen requirement."),
    ),
    "mottled skin": (
        ("Mottled skin over both knees.", "Extremities cool with mottled skin."),
        ("No mottled skin.", "Skin without mottling."),
    ),
    "rapid response call": (
        ("Rapid response call overnight for hypotension.",
         "Rapid response call placed by nursing this morning."),
        ("No rapid response call since admission.", "No rapid response call overnight."),
    ),
    "rigors": (
        ("Rigors overnight with temperature spike.", "Witnessed rigors this morning."),
        ("No rigors.", "Denies rigors."),
    ),
    "somnolence": (
        ("Increasing somnolence, hard to rouse.", "New somnolence noted by family."),
        ("No somnolence; easily rousable.", "Denies somnolence."),
    ),
    "low urine output": (
        ("Low urine output, under 20 mL/h since evening.",
         "Low urine output despite fluids."),
        ("No low urine output; voiding well.", "Urine output adequate, not low."),
    ),
}

#: (affirmed, denied) common complaints: present or absent at random, no signal.
BOILERPLATE: tuple[tuple[str, str], ...] = (
    ("Reports mild chest wall pain.", "Denies chest pain."),
    ("Reports a mild headache.", "Denies headache."),
    ("Endorses nausea after meals.", "No nausea."),
    ("Reports a dry cough.", "No cough."),
    ("Endorses lower back pain.", "Denies back pain."),
    ("Reports poor sleep on the ward.", "Sleeping adequately."),
)

_EXAM: tuple[str, ...] = (
    "Lungs with scattered crackles at the bases.", "Heart regular rate and rhythm.",
    "Abdomen soft, non-tender.", "No peripheral edema.", "Alert and conversant.",
    "Mucous membranes moist.", "Lungs clear to auscultation.", "Trace ankle edema.",
)


def compose_hard_notes(rng: np.random.Generator, present: np.ndarray,
                       findings: Sequence[Finding], times: Sequence[datetime], *,
                       age: int, sex: str, reason: str, p_negated: float) -> list[NoteSim]:
    """Write ``len(times)`` notes expressing the finding indicators ``present``."""
    n_notes = len(times)
    if n_notes == 0:
        return []
    bodies: list[list[str]] = [[] for _ in range(n_notes)]
    scatter_phrases(rng, bodies, present, [f.name for f in findings], FINDING_PHRASES,
                    p_negated=p_negated)
    for affirmed, denied in BOILERPLATE:
        if rng.random() < 0.5:
            bodies[int(rng.integers(n_notes))].append(affirmed if rng.random() < 0.4 else denied)
    person = "man" if sex == "male" else "woman"
    notes = []
    for i, when in enumerate(times):
        loinc, display = NOTE_TYPES[0 if i == 0 else 1]
        exam = [_EXAM[j] for j in rng.choice(len(_EXAM), size=3, replace=False)]
        plan = [FILLER[j] for j in rng.choice(len(FILLER), size=4, replace=False)]
        order = rng.permutation(len(bodies[i]))
        subjective = " ".join(bodies[i][j] for j in order) or "No new complaints."
        if i == 0:
            header = "History and physical"
            opening = f"{age}-year-old {person} admitted with {reason}."
        else:
            header = f"Progress note, hospital day {i + 1}"
            opening = f"Follow-up of {reason}. Seen on morning rounds."
        lines = [header, opening, f"Subjective: {subjective}", f"Exam: {' '.join(exam)}",
                 f"Plan: {' '.join(plan)}"]
        notes.append(NoteSim(loinc, display, when, "\n".join(lines)))
    return notes
