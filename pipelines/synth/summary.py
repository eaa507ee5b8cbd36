"""CohortSummary: what ``generate_cohort`` reports."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["CohortSummary"]


@dataclass
class CohortSummary:
    """Size, speed, known-truth AUROCs and leakage checks of a written cohort.

    Attributes
    ----------
    bayes_auroc_observable : float
        AUROC against the recorded labels of P(event | the modalities written
        for each patient): the best any model of this data can do.
    oracle_auroc : dict
        AUROC of P(event | one modality as generated) for ``imaging``, ``ehr``,
        ``notes``, and of all three together for ``all`` (demographics in all).
    leakage : dict
        ``image_stat_auroc`` (lesion volume counted in the written pixels vs the
        label), ``image_stat_auroc_shuffled`` (same, pixels shuffled across
        patients: ~0.5), ``outcome_terms_in_notes`` / ``outcome_terms_in_dicom``
        (must be 0) and ``passed``.
    """

    n_patients: int
    seconds: float
    patients_per_s: float
    event_rate: float
    bayes_auroc_observable: float
    oracle_auroc: dict[str, float]
    outcome: dict[str, Any]
    leakage: dict[str, Any]
    out_dir: str = ""
    seed: int = 0
    bias: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    bytes_on_disk: int = 0
    demographics_auroc: float = float("nan")
    realism: str = "default"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_text(self) -> str:
        oracle = ", ".join(f"{k} {v:.3f}" for k, v in self.oracle_auroc.items())
        counts = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        leak = self.leakage
        if self.realism == "hard":
            return self._hard_text(oracle, counts)
        lines = [
            f"synthetic cohort: {self.n_patients} patients -> {self.out_dir} "
            f"(seed {self.seed}{', bias planted' if self.bias else ''})",
            f"  written in {self.seconds:.1f} s ({self.patients_per_s:.1f} patients/s), "
            f"{self.bytes_on_disk / 1e6:.1f} MB; {counts}",
            f"  outcome: {self.outcome['name']} = {self.outcome['definition']}; "
            f"event rate {self.event_rate:.3f}",
            f"  Bayes-optimal AUROC given the observed modalities: "
            f"{self.bayes_auroc_observable:.3f}",
            f"  oracle AUROC: {oracle} (demographics only {self.demographics_auroc:.3f})",
            f"  leakage: image statistic AUROC {leak['image_stat_auroc']:.3f}, pixels shuffled "
            f"{leak['image_stat_auroc_shuffled']:.3f}; outcome words in notes "
            f"{leak['outcome_terms_in_notes']}, in DICOM {leak['outcome_terms_in_dicom']} -> "
            f"{'passed' if leak['passed'] else 'FAILED'}",
        ]
        return "\n".join(lines)

    def _hard_text(self, oracle: str, counts: str) -> str:
        leak = self.leakage
        return "\n".join([
            f"synthetic cohort (--realism hard): {self.n_patients} patients -> {self.out_dir} "
            f"(seed {self.seed})",
            f"  written in {self.seconds:.1f} s ({self.patients_per_s:.1f} patients/s), "
            f"{self.bytes_on_disk / 1e6:.1f} MB; {counts}",
            f"  outcome: {self.outcome['name']} = {self.outcome['definition']}; "
            f"event rate {self.event_rate:.3f}",
            f"  Bayes-optimal AUROC given the observed modalities: "
            f"{self.bayes_auroc_observable:.3f} (of the latent signal before rendering, "
            "measurement noise, site offsets and JPEG compression: an upper bound on what a "
            "model of the written files can reach)",
            f"  oracle AUROC (latent signal): {oracle} (demographics only "
            f"{self.demographics_auroc:.3f})",
            f"  leakage: image texture statistic AUROC {leak['image_stat_auroc']:.3f}, pixels "
            f"shuffled {leak['image_stat_auroc_shuffled']:.3f}, lung mean intensity "
            f"{leak['image_mean_intensity_auroc']:.3f}; outcome words in notes "
            f"{leak['outcome_terms_in_notes']}, in image metadata "
            f"{leak['outcome_terms_in_dicom']} -> {'passed' if leak['passed'] else 'FAILED'}",
        ])

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
