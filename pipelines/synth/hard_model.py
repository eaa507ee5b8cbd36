"""``--realism hard``: the latent model and its exact-on-the-latent posteriors.

Generative story, per patient (all draws from the patient's own seeded generator):

- demographics as in the default world (``age``, ``male``) and a **site** (hospital and
  its scanner and lab analysers), independent of everything else;
- **imaging**: ``z_img ~ N(0, 1)`` sets the amplitude of a reticular texture in the
  lung fields, ``texture_amplitude * exp(texture_log_scale * z_img)``. The texture has
  mean zero, so the lungs' mean intensity carries no signal;
- **EHR**: every DEFAULT_SPEC feature has a patient mean ``m = mu + sd * u`` on its
  transform scale, ``u ~ N(0, 1)`` independent across features; measurements are
  ``m + sd * noise * e`` plus the site's offset. Risk is non-linear in ``u``: linear in
  respiratory rate, SpO2 deficit and creatinine; U-shaped in temperature and WBC; a
  step at lactate > 2 mmol/L; and tachycardia that matters only with hypotension
  (``relu(u_hr) * relu(-u_sbp)``, a shock-index-like interaction). Glucose, sodium and
  haemoglobin are noise;
- **notes**: rare findings ``f_k ~ Bernoulli(p_k)`` (3-5 % each) with strong log-odds;
  a present finding is written in one of the patient's notes, an absent one is
  sometimes negated ("No mottling."), and most text is boilerplate;
- ``eta = intercept + demographics + coef_imaging z_img + S_ehr(u) + sum_k coef_k f_k``
  (the site has no effect on the outcome); the label is ``Bernoulli(sigmoid(eta))``.

Each modality's **latent signal** (``z_img``; the EHR means ``u``; the findings ``f``)
fixes its score exactly, so ``P(event | observed)`` integrates only the scores of what
is not observed: imaging by Gauss-Hermite quadrature, the findings by enumeration, each
EHR block by a fixed reference sample (seeded, so deterministic). These posteriors are
those of the latent signal *before* rendering, measurement noise, site offsets and JPEG
compression: the Bayes AUROC they give is an upper bound on what a model of the written
files can reach.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from pipelines.synth.model import EHRSignal, sigmoid

__all__ = [
    "EHR_BLOCKS",
    "HARD_EHR_SIGNALS",
    "HARD_FINDINGS",
    "HARD_SITES",
    "Finding",
    "HardEvidence",
    "HardModel",
    "Site",
    "hard_posteriors",
]

#: EHR risk blocks: terms sharing a feature are one block, integrated together when
#: any of its features is unobserved. Features outside every block are noise.
EHR_BLOCKS: dict[str, tuple[str, ...]] = {
    "vitals": ("heart_rate", "resp_rate", "sbp", "temperature", "spo2"),
    "lactate": ("lactate",),
    "creatinine": ("creatinine",),
    "wbc": ("wbc",),
}


@dataclass(frozen=True)
class Finding:
    """A rare note finding: present with ``prevalence``, adds ``coef`` to the log-odds."""

    name: str
    prevalence: float
    coef: float


@dataclass(frozen=True)
class Site:
    """A hospital: its share, scanner rendering and lab offsets (no effect on outcome).

    ``lab_offsets`` are ``(feature, offset)`` on the feature's transform scale: additive
    for identity features, log-multiplicative for log ones, on ``ln(100 - SpO2)`` for
    SpO2.
    """

    name: str
    share: float
    scanner: str
    blur_px: float  # detector blur at 256 px (softens the texture)
    gain: float
    offset: float
    gamma: float
    noise: float  # pixel noise sd, in 0-1 intensity units
    tint: tuple[float, float, float]  # RGB gains of colour exports
    lab_offsets: tuple[tuple[str, float], ...] = ()


# Measurement model (loading unused: the risk is in HardModel's EHR terms). Lactate is
# measured for more patients than in the default world, since its step effect is the
# point of the mode; measurement noise is small against the between-patient sd so the
# recorded course means recover the latent means well.
HARD_EHR_SIGNALS: tuple[EHRSignal, ...] = (
    EHRSignal("heart_rate", "identity", 88.0, 14.0, 0.0, 0.30, kind="vital"),
    EHRSignal("resp_rate", "identity", 18.0, 3.0, 0.0, 0.30, kind="vital"),
    EHRSignal("sbp", "identity", 124.0, 18.0, 0.0, 0.30, kind="vital"),
    EHRSignal("temperature", "identity", 37.0, 0.6, 0.0, 0.30, kind="vital"),
    EHRSignal("spo2", "deficit100", math.log(4.0), 0.4, 0.0, 0.30, kind="vital"),
    EHRSignal("lactate", "log", math.log(1.4), 0.4, 0.0, 0.25, p_absent=0.15),
    EHRSignal("wbc", "log", math.log(8.5), 0.35, 0.0, 0.25, p_absent=0.05),
    EHRSignal("creatinine", "log", math.log(1.0), 0.35, 0.0, 0.2, p_absent=0.05),
    EHRSignal("glucose", "log", math.log(120.0), 0.25, 0.0, 0.3, p_absent=0.1),
    EHRSignal("sodium", "identity", 139.0, 3.5, 0.0, 0.3, p_absent=0.05),
    EHRSignal("hemoglobin", "identity", 12.5, 1.8, 0.0, 0.2, p_absent=0.08),
)

HARD_FINDINGS: tuple[Finding, ...] = (
    Finding("new oxygen requirement", 0.04, 2.2),
    Finding("mottled skin", 0.03, 2.5),
    Finding("rapid response call", 0.03, 2.6),
    Finding("rigors", 0.05, 2.0),
    Finding("somnolence", 0.03, 2.4),
    Finding("low urine output", 0.04, 2.3),
)

HARD_SITES: tuple[Site, ...] = (
    Site("Site A", 0.40, "Vendor A DR", blur_px=0.6, gain=1.0, offset=0.0, gamma=1.0,
         noise=0.012, tint=(1.0, 1.0, 1.0)),
    Site("Site B", 0.35, "Vendor B CR", blur_px=1.0, gain=0.85, offset=0.06, gamma=1.15,
         noise=0.02, tint=(1.0, 0.97, 0.92),
         lab_offsets=(("temperature", 0.3), ("lactate", math.log(1.2)))),
    Site("Site C", 0.25, "Vendor C DR", blur_px=0.4, gain=1.1, offset=-0.03, gamma=0.9,
         noise=0.008, tint=(0.95, 0.98, 1.0),
         lab_offsets=(("spo2", math.log(1.3)), ("creatinine", math.log(0.9)))),
)


@dataclass(frozen=True)
class HardModel:
    """Settings of ``--realism hard``; fixed before any model is tuned on the data.

    Targets, on the latent signal: each modality alone 0.65-0.80, all together >= 0.85,
    event rate 10-20 % (measured values in docs/synthetic-cohort.md).
    """

    intercept: float = -4.3
    coef_age: float = 0.3  # per SD of age
    coef_male: float = 0.15
    age_mean: float = 63.0
    age_sd: float = 17.0
    coef_imaging: float = 1.25  # per SD of z_img
    texture_amplitude: float = 0.04  # texture sd at z_img = 0, 0-1 intensity units
    texture_log_scale: float = 0.45
    coef_resp_rate: float = 0.45  # per SD
    coef_spo2: float = 0.45  # per SD of ln(100 - SpO2)
    coef_temperature_u: float = 0.40  # times (u^2 - 1)
    coef_shock: float = 1.6  # times relu(u_hr) relu(-u_sbp)
    lactate_threshold: float = 2.0  # mmol/L, true mean
    coef_lactate_step: float = 1.4
    coef_creatinine: float = 0.35  # per SD of ln(creatinine)
    coef_wbc_u: float = 0.25  # times (u^2 - 1)
    ehr_signals: tuple[EHRSignal, ...] = HARD_EHR_SIGNALS
    findings: tuple[Finding, ...] = HARD_FINDINGS
    p_negated: float = 0.12  # an absent finding written as a negation
    sites: tuple[Site, ...] = HARD_SITES
    p_withhold_imaging: float = 0.20
    p_withhold_notes: float = 0.10
    p_withhold_ehr: float = 0.03
    image_size: int = 256
    jpeg_quality: int = 90
    quadrature_nodes: int = 32
    reference_draws: int = 1 << 16
    reference_nodes: int = 512
    reference_seed: int = 20240518
    bin_width: float = 0.01  # logit grid on which unobserved score sums are kept

    def signal(self, name: str) -> EHRSignal:
        for s in self.ehr_signals:
            if s.name == name:
                return s
        raise KeyError(f"no EHR signal named {name!r}")

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"no site named {name!r}")

    def demographic_logit(self, age: np.ndarray, male: np.ndarray) -> np.ndarray:
        age_z = (np.asarray(age, dtype=float) - self.age_mean) / self.age_sd
        return self.intercept + self.coef_age * age_z + self.coef_male * np.asarray(male, float)

    def texture(self, z_img: np.ndarray | float) -> np.ndarray:
        """Texture amplitude (sd, 0-1 intensity units) for ``z_img``."""
        return np.asarray(self.texture_amplitude * np.exp(self.texture_log_scale
                                                          * np.asarray(z_img, float)))

    def imaging_score(self, z_img: np.ndarray | float) -> np.ndarray:
        return np.asarray(self.coef_imaging * np.asarray(z_img, float))

    def ehr_scores(self, u: Mapping[str, np.ndarray | float]) -> dict[str, np.ndarray]:
        """Log-odds of each EHR block for standardised latent means ``u`` (by feature)."""
        def g(name: str) -> np.ndarray:
            return np.asarray(u[name], dtype=float)

        lac = self.signal("lactate")
        step_u = (math.log(self.lactate_threshold) - lac.mu) / lac.sd
        return {
            "vitals": (self.coef_resp_rate * g("resp_rate") + self.coef_spo2 * g("spo2")
                       + self.coef_temperature_u * (g("temperature") ** 2 - 1.0)
                       + self.coef_shock * np.maximum(g("heart_rate"), 0.0)
                       * np.maximum(-g("sbp"), 0.0)),
            "lactate": self.coef_lactate_step * (g("lactate") > step_u).astype(float),
            "creatinine": self.coef_creatinine * g("creatinine"),
            "wbc": self.coef_wbc_u * (g("wbc") ** 2 - 1.0),
        }

    def notes_score(self, findings: np.ndarray) -> np.ndarray:
        coef = np.array([f.coef for f in self.findings])
        return np.asarray(np.asarray(findings, float) @ coef)

    def components(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Prior (nodes, weights) of every score component: what integrating one out uses."""
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        nodes, weights = np.polynomial.hermite_e.hermegauss(self.quadrature_nodes)
        out["imaging"] = (self.coef_imaging * nodes, weights / weights.sum())
        rng = np.random.default_rng(self.reference_seed)
        draws = {s.name: rng.standard_normal(self.reference_draws) for s in self.ehr_signals}
        q = (np.arange(self.reference_nodes) + 0.5) / self.reference_nodes
        for block, scores in self.ehr_scores(draws).items():
            out[f"ehr:{block}"] = (np.quantile(scores, q),
                                   np.full(self.reference_nodes, 1.0 / self.reference_nodes))
        combos = np.array(list(itertools.product((0, 1), repeat=len(self.findings))), float)
        p = np.array([f.prevalence for f in self.findings])
        probs = np.prod(np.where(combos == 1, p, 1 - p), axis=1)
        out["notes"] = (self.notes_score(combos), probs)
        return out


@dataclass
class HardEvidence:
    """Per patient: demographic logit, each component's latent score, which are observed."""

    demo_logit: np.ndarray  # (n,)
    scores: dict[str, np.ndarray]  # component -> (n,)
    observed: dict[str, np.ndarray]  # component -> (n,) bool, as written


def hard_posteriors(model: HardModel, ev: HardEvidence) -> dict[str, np.ndarray]:
    """P(event | latent signal of a set of modalities) per patient.

    Keys as in :func:`pipelines.synth.model.posteriors`: ``bayes`` (the modalities and
    lab blocks written for the patient), ``imaging``, ``ehr``, ``notes`` (that modality
    alone, withheld or not), ``all`` (every latent: the true probability) and
    ``demographics``. Age and sex are in every set.
    """
    comps = {name: _binned(nodes, weights, model.bin_width)
             for name, (nodes, weights) in model.components().items()}
    names = list(comps)
    n = len(ev.demo_logit)
    yes, no = np.ones(n, bool), np.zeros(n, bool)

    def only(prefix: str) -> dict[str, np.ndarray]:
        return {c: yes if c.split(":")[0] == prefix else no for c in names}

    sets = {
        "bayes": {c: ev.observed[c] for c in names},
        "imaging": only("imaging"), "ehr": only("ehr"), "notes": only("notes"),
        "all": dict.fromkeys(names, yes), "demographics": dict.fromkeys(names, no),
    }
    sums: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = {}
    return {key: _posterior(model, comps, sums, ev, masks) for key, masks in sets.items()}


# A distribution on the grid k * bin_width: (first k, dense weights).
_Binned = tuple[int, np.ndarray]


def _binned(nodes: np.ndarray, weights: np.ndarray, width: float) -> _Binned:
    k = np.round(np.asarray(nodes) / width).astype(np.int64)
    dense = np.bincount(k - k.min(), weights=weights)
    return int(k.min()), dense / dense.sum()


def _posterior(model: HardModel, comps: dict[str, _Binned],
               sums: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]], ev: HardEvidence,
               masks: dict[str, np.ndarray]) -> np.ndarray:
    names = list(comps)
    seen = np.stack([np.asarray(masks[c], bool) for c in names], axis=1)  # (n, C)
    known = ev.demo_logit + sum(np.where(seen[:, j], ev.scores[c], 0.0)
                                for j, c in enumerate(names))
    out = np.empty(len(known))
    patterns, which = np.unique(seen, axis=0, return_inverse=True)
    for k, pattern in enumerate(patterns):
        rows = np.flatnonzero(which.ravel() == k)
        hidden = tuple(c for j, c in enumerate(names) if not pattern[j])
        if hidden not in sums:
            sums[hidden] = _sum_of(hidden, comps, model.bin_width)
        nodes, weights = sums[hidden]
        # P is a smooth, increasing function of the known log-odds: evaluated on a fine
        # grid and interpolated when that is cheaper than every row.
        grid = np.arange(known[rows].min() - 0.01, known[rows].max() + 0.02, 0.005)
        at = grid if len(grid) < len(rows) else known[rows]
        values = np.concatenate([sigmoid(at[i:i + 256, None] + nodes[None, :]) @ weights
                                 for i in range(0, len(at), 256)])
        out[rows] = np.interp(known[rows], grid, values) if at is grid else values
    return out


def _sum_of(hidden: tuple[str, ...], comps: dict[str, _Binned], width: float
            ) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, weights) of the sum of the ``hidden`` components' scores."""
    first, dense = 0, np.ones(1)
    for c in hidden:
        k, w = comps[c]
        first, dense = first + k, np.convolve(dense, w)
    keep = dense > 1e-12
    nodes = (first + np.flatnonzero(keep)) * width
    return nodes, dense[keep] / dense[keep].sum()
