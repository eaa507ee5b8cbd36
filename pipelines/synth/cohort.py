"""Draw a whole cohort (no files) and its posteriors: the known truth.

``simulate_cohort`` is deterministic in ``seed``: patient ``i`` draws from the
``i``-th child of ``SeedSequence(seed)``, so a patient's data does not depend on
the cohort size or on which worker writes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.synth.model import ModalityEvidence, SynthModel, posteriors
from pipelines.synth.patient import PatientSim, simulate_patient

__all__ = ["SimulatedCohort", "simulate_cohort"]


@dataclass
class SimulatedCohort:
    """Patients plus their posteriors (see ``model.posteriors`` for the keys)."""

    seed: int
    bias: bool
    model: SynthModel
    patients: list[PatientSim]
    posterior: dict[str, np.ndarray]

    @property
    def labels(self) -> np.ndarray:
        return np.array([p.label for p in self.patients])


def _mrns(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2**31 - 1,)))
    numbers = rng.choice(9 * 10**7, size=n, replace=False) + 10**7
    return [f"MRN{int(v):08d}" for v in numbers]


def simulate_cohort(n_patients: int, *, seed: int = 0, bias: bool = False,
                    model: SynthModel | None = None) -> SimulatedCohort:
    """Draw ``n_patients`` patients and compute every posterior."""
    if n_patients <= 0:
        raise ValueError(f"n_patients must be positive, got {n_patients}")
    model = model or SynthModel()
    children = np.random.SeedSequence(seed).spawn(n_patients)
    patients = [simulate_patient(i, mrn, children[i], model, seed=seed, bias=bias)
                for i, mrn in enumerate(_mrns(seed, n_patients))]
    return SimulatedCohort(seed, bias, model, patients,
                           posteriors(model, evidence(model, patients)))


def evidence(model: SynthModel, patients: list[PatientSim]) -> ModalityEvidence:
    return ModalityEvidence(
        demo_logit=model.demographic_logit(np.array([p.age_years for p in patients]),
                                           np.array([p.sex == "male" for p in patients])),
        x_img=np.array([p.x_img for p in patients]),
        ehr_precision=np.array([p.ehr_precision for p in patients]),
        ehr_linear=np.array([p.ehr_linear for p in patients]),
        symptoms=np.array([p.symptoms for p in patients]).reshape(len(patients),
                                                                  len(model.symptoms)),
        imaging_observed=np.array([not p.withheld_imaging for p in patients]),
        ehr_observed=np.array([not p.withheld_ehr for p in patients]),
        notes_observed=np.array([not p.withheld_notes for p in patients]),
    )
