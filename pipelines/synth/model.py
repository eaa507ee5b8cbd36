"""The latent generative model of the synthetic cohort, and its exact posteriors.

Generative story, per patient (all draws from the patient's own seeded generator):

- hidden factors ``z_img, z_ehr, z_note ~ N(0, 1)``, independent;
- demographics: ``age ~ clip(N(63, 17), 18, 100)``, ``male ~ Bernoulli(0.48)``;
- true logit ``eta = b0 + a z_img + b z_ehr + c z_note + d (age - 63) / 17 + e male``;
  the recorded label is ``event ~ Bernoulli(sigmoid(eta))``;
- **imaging**: ``x_img = z_img + s_img * eps``; the lesion volume is
  ``V0 * exp(k * x_img)`` mL, so the volume read off the pixels reveals ``x_img``;
- **EHR**: each feature has a transform ``g = T(value)`` (identity, log, or
  ``log(100 - value)`` for SpO2) in which a measurement taken ``h`` hours before
  the index time is ``g = mu + sd * (l * w(h) * z_ehr + sqrt(1 - l^2) * u) + sd * tau * e``
  with a per-patient nuisance ``u ~ N(0, 1)``, measurement noise ``e ~ N(0, 1)`` and
  ``w(h) = 1 - trend * min(h, 96) / 96`` (the signal strengthens toward the index).
  Features with loading ``l = 0`` are pure noise;
- **notes**: symptom ``k`` is present with probability ``sigmoid(alpha_k + beta_k z_note)``;
  symptoms with ``beta_k = 0`` are noise.

Because the factors are independent a priori and each modality depends on its
own factor only, the posterior given any set of modalities factorises. Imaging
and EHR posteriors are Gaussian in closed form (the EHR one via Sherman-Morrison
on the equicorrelated covariance of a feature's measurements); the notes
posterior is computed on a grid. ``P(event | observed)`` is then
``E[sigmoid(eta)]`` under that posterior, by Gauss-Hermite quadrature over the
Gaussian part: deterministic, no Monte Carlo error. Demographics (age, sex)
are always recorded and enter every posterior. Rounding of recorded values to
their reporting precision is ignored (it is far below the measurement noise).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

__all__ = [
    "DEFAULT_EHR_SIGNALS",
    "DEFAULT_SYMPTOMS",
    "EHRSignal",
    "ModalityEvidence",
    "Symptom",
    "SynthModel",
    "posteriors",
    "sigmoid",
]

Transform = Literal["identity", "log", "deficit100"]


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


@dataclass(frozen=True)
class EHRSignal:
    """How one DEFAULT_SPEC feature depends on ``z_ehr`` (see the module docstring)."""

    name: str
    transform: Transform
    mu: float  # population mean of g
    sd: float  # between-patient sd of g
    loading: float  # correlation of the patient mean with z_ehr; 0 = noise feature
    noise: float  # measurement noise sd, as a fraction of sd
    p_absent: float = 0.0  # probability the patient never has it measured
    kind: Literal["vital", "lab"] = "lab"

    def to_latent(self, value: np.ndarray | float) -> np.ndarray:
        v = np.asarray(value, dtype=float)
        if self.transform == "log":
            return np.log(v)
        if self.transform == "deficit100":
            return np.log(100.0 - v)
        return v

    def from_latent(self, g: np.ndarray | float) -> np.ndarray:
        x = np.asarray(g, dtype=float)
        if self.transform == "log":
            return np.exp(x)
        if self.transform == "deficit100":
            return 100.0 - np.exp(x)
        return x


@dataclass(frozen=True)
class Symptom:
    """A symptom a note may report; present with ``sigmoid(alpha + beta z_note)``."""

    name: str
    alpha: float
    beta: float


DEFAULT_EHR_SIGNALS: tuple[EHRSignal, ...] = (
    EHRSignal("heart_rate", "identity", 86.0, 13.0, 0.55, 0.45, kind="vital"),
    EHRSignal("resp_rate", "identity", 18.0, 3.0, 0.55, 0.45, kind="vital"),
    EHRSignal("sbp", "identity", 126.0, 17.0, -0.45, 0.45, kind="vital"),
    EHRSignal("temperature", "identity", 37.0, 0.45, 0.0, 0.6, kind="vital"),
    EHRSignal("spo2", "deficit100", math.log(4.0), 0.4, 0.5, 0.45, kind="vital"),
    EHRSignal("lactate", "log", math.log(1.4), 0.4, 0.55, 0.35, p_absent=0.35),
    EHRSignal("wbc", "log", math.log(8.5), 0.35, 0.45, 0.3, p_absent=0.08),
    EHRSignal("creatinine", "log", math.log(1.0), 0.35, 0.4, 0.25, p_absent=0.08),
    EHRSignal("glucose", "log", math.log(120.0), 0.25, 0.0, 0.3, p_absent=0.1),
    EHRSignal("sodium", "identity", 139.0, 3.5, 0.0, 0.4, p_absent=0.08),
    EHRSignal("hemoglobin", "identity", 12.5, 1.8, 0.0, 0.25, p_absent=0.1),
)

DEFAULT_SYMPTOMS: tuple[Symptom, ...] = (
    Symptom("shortness of breath", -1.1, 1.5),
    Symptom("confusion", -2.0, 1.5),
    Symptom("chills", -1.5, 1.3),
    Symptom("poor oral intake", -1.2, 1.3),
    Symptom("lightheadedness", -1.6, 1.3),
    Symptom("chest pain", -1.5, 0.0),
    Symptom("headache", -1.4, 0.0),
    Symptom("nausea", -1.2, 0.0),
)


@dataclass(frozen=True)
class SynthModel:
    """Coefficients of the generative model; the defaults meet the AUROC targets.

    Targets (N = 1000): each modality alone 0.65-0.80, all together >= 0.85,
    event rate 10-20 %.
    """

    intercept: float = -4.1
    coef_imaging: float = 2.0
    coef_ehr: float = 2.0
    coef_notes: float = 2.0
    coef_age: float = 0.3  # per SD of age
    coef_male: float = 0.15
    age_mean: float = 63.0
    age_sd: float = 17.0
    imaging_noise: float = 0.55  # s_img
    lesion_median_ml: float = 20.0  # V0
    lesion_log_scale: float = 0.6  # k
    trend: float = 0.4
    horizon_hours: float = 96.0
    ehr_signals: tuple[EHRSignal, ...] = DEFAULT_EHR_SIGNALS
    symptoms: tuple[Symptom, ...] = DEFAULT_SYMPTOMS
    p_withhold_imaging: float = 0.20
    p_withhold_notes: float = 0.10
    p_withhold_ehr: float = 0.03
    # --bias: (a) imaging withheld more often for these groups; (b) a lab offset.
    bias_imaging_withheld: tuple[float, float] = (0.45, 0.15)  # (target groups, others)
    bias_imaging_groups: tuple[str, ...] = ("race:Black or African American",
                                            "ethnicity:Hispanic or Latino")
    bias_lab: str = "lactate"
    bias_lab_group: str = "race:Black or African American"
    bias_lab_log_offset: float = 0.35  # recorded = true x exp(0.35), i.e. +42 %
    grid: tuple[float, float, int] = (-6.0, 6.0, 161)
    quadrature_nodes: int = 24
    extra: dict[str, float] = field(default_factory=dict)

    def signal(self, name: str) -> EHRSignal:
        for s in self.ehr_signals:
            if s.name == name:
                return s
        raise KeyError(f"no EHR signal named {name!r}; known: {[s.name for s in self.ehr_signals]}")

    def demographic_logit(self, age: np.ndarray, male: np.ndarray) -> np.ndarray:
        """Intercept plus the always-recorded age and sex terms."""
        age_z = (np.asarray(age, dtype=float) - self.age_mean) / self.age_sd
        return self.intercept + self.coef_age * age_z + self.coef_male * np.asarray(male, float)

    def true_logit(self, z_img: np.ndarray, z_ehr: np.ndarray, z_note: np.ndarray,
                   age: np.ndarray, male: np.ndarray) -> np.ndarray:
        return (self.demographic_logit(age, male) + self.coef_imaging * np.asarray(z_img)
                + self.coef_ehr * np.asarray(z_ehr) + self.coef_notes * np.asarray(z_note))

    def trend_weight(self, hours_before: np.ndarray) -> np.ndarray:
        h = np.clip(np.asarray(hours_before, dtype=float), 0.0, self.horizon_hours)
        return 1.0 - self.trend * h / self.horizon_hours

    def lesion_volume(self, x_img: np.ndarray | float) -> np.ndarray:
        """Lesion volume in mL for the imaging statistic ``x_img``."""
        return np.asarray(self.lesion_median_ml * np.exp(self.lesion_log_scale
                                                         * np.asarray(x_img, float)))

    def imaging_statistic(self, volume_ml: np.ndarray | float) -> np.ndarray:
        """Invert the lesion volume to ``x_img``."""
        return np.log(np.asarray(volume_ml, float) / self.lesion_median_ml) / self.lesion_log_scale

    def ehr_evidence(self, series: Mapping[str, tuple[np.ndarray, np.ndarray]]
                     ) -> tuple[float, float]:
        """Gaussian likelihood of ``z_ehr``, ``exp(-P z^2 / 2 + h z)``, from measurements.

        ``series`` maps a feature name to (hours before the index, g values) of
        the recorded pre-index measurements (any known measurement offset
        already removed). Returns ``(P, h)``.
        """
        precision, linear = 0.0, 0.0
        for sig in self.ehr_signals:
            if sig.loading == 0.0 or sig.name not in series:
                continue
            hours, g = series[sig.name]
            n = len(g)
            if n == 0:
                continue
            b = sig.sd * sig.loading * self.trend_weight(hours)
            r = np.asarray(g, float) - sig.mu
            var_m = sig.sd**2 * (1.0 - sig.loading**2)
            var_e = (sig.sd * sig.noise) ** 2
            gamma = var_m / (var_e + n * var_m)
            sb, sr = b.sum(), r.sum()
            precision += float((b @ b - gamma * sb * sb) / var_e)
            linear += float((b @ r - gamma * sb * sr) / var_e)
        return precision, linear


@dataclass
class ModalityEvidence:
    """What each patient's modalities say about the hidden factors (cohort arrays).

    ``x_img``, ``ehr_precision``/``ehr_linear`` and ``symptoms`` hold the evidence
    as generated, whether or not the modality was then withheld; the
    ``*_observed`` masks say which reached the written data.
    """

    demo_logit: np.ndarray  # (n,)
    x_img: np.ndarray  # (n,)
    ehr_precision: np.ndarray  # (n,)
    ehr_linear: np.ndarray  # (n,)
    symptoms: np.ndarray  # (n, K) of 0/1
    imaging_observed: np.ndarray  # (n,) bool
    ehr_observed: np.ndarray
    notes_observed: np.ndarray


def posteriors(model: SynthModel, ev: ModalityEvidence) -> dict[str, np.ndarray]:
    """P(event | evidence) per patient under several information sets.

    Returns a dict of (n,) arrays: ``bayes`` (the modalities actually observed),
    ``imaging``, ``ehr``, ``notes`` (that modality alone, as generated, withheld
    or not), ``all`` (all three as generated) and ``demographics`` (none). Every
    set includes the always-recorded age and sex.
    """
    n = len(ev.demo_logit)
    yes, no = np.ones(n, bool), np.zeros(n, bool)
    sets = {
        "bayes": (ev.imaging_observed, ev.ehr_observed, ev.notes_observed),
        "imaging": (yes, no, no),
        "ehr": (no, yes, no),
        "notes": (no, no, yes),
        "all": (yes, yes, yes),
        "demographics": (no, no, no),
    }
    return {name: _event_probability(model, ev, *masks) for name, masks in sets.items()}


def _event_probability(model: SynthModel, ev: ModalityEvidence, img: np.ndarray,
                       ehr: np.ndarray, notes: np.ndarray) -> np.ndarray:
    s2 = model.imaging_noise**2
    m_img = np.where(img, ev.x_img / (1.0 + s2), 0.0)
    v_img = np.where(img, s2 / (1.0 + s2), 1.0)
    post_prec = 1.0 + np.where(ehr, ev.ehr_precision, 0.0)
    m_ehr = np.where(ehr, ev.ehr_linear, 0.0) / post_prec
    v_ehr = 1.0 / post_prec
    mean_g = ev.demo_logit + model.coef_imaging * m_img + model.coef_ehr * m_ehr
    sd_g = np.sqrt(model.coef_imaging**2 * v_img + model.coef_ehr**2 * v_ehr)

    lo, hi, num = model.grid
    grid = np.linspace(lo, hi, num)
    log_w = -0.5 * grid**2  # prior, up to a constant
    alpha = np.array([s.alpha for s in model.symptoms])
    beta = np.array([s.beta for s in model.symptoms])
    logits = alpha[:, None] + beta[:, None] * grid[None, :]  # (K, G)
    log_p, log_q = -np.logaddexp(0.0, -logits), -np.logaddexp(0.0, logits)
    x = ev.symptoms.astype(float)
    loglik = x @ log_p + (1.0 - x) @ log_q  # (n, G)
    log_post = log_w[None, :] + np.where(notes[:, None], loglik, 0.0)
    log_post -= log_post.max(axis=1, keepdims=True)
    w = np.exp(log_post)
    w /= w.sum(axis=1, keepdims=True)

    nodes, weights = np.polynomial.hermite_e.hermegauss(model.quadrature_nodes)
    weights = weights / weights.sum()
    out = np.empty(len(mean_g))
    for start in range(0, len(mean_g), 256):
        sl = slice(start, start + 256)
        eta = (mean_g[sl, None, None] + model.coef_notes * grid[None, :, None]
               + sd_g[sl, None, None] * nodes[None, None, :])
        inner = sigmoid(eta) @ weights  # (b, G)
        out[sl] = (inner * w[sl]).sum(axis=1)
    return out
