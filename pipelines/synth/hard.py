"""``clinfuse synth --realism hard``: the cohort, its files and its known truth.

Same layout as the default world (``fhir/``, ``hl7/``, ``manifest.csv``/``.yaml``,
``truth.csv``/``.yaml``) except that imaging is one 2-D chest-radiograph-like picture
per patient under ``images/`` (PNG or JPEG, :data:`radiograph.FORMAT_CYCLE`) instead
of a DICOM CT series, and the manifest has a ``site`` column (an audit group, listed as
sensitive and categorical in the sidecar, so not a model feature by default).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from pipelines.feature_spec import DEFAULT_SPEC
from pipelines.process_pool import process_pool
from pipelines.synth import codes
from pipelines.synth.cohort import _mrns
from pipelines.synth.fhir_writer import bundle, iso
from pipelines.synth.hard_model import EHR_BLOCKS, HardEvidence, HardModel, hard_posteriors
from pipelines.synth.hard_patient import HardPatientSim, image_path, simulate_hard_patient
from pipelines.synth.hl7_writer import messages
from pipelines.synth.leakage import auroc, outcome_terms, shuffled_auroc
from pipelines.synth.manifest import FLOAT_FORMAT, SENSITIVE, _plain, patients_frame
from pipelines.synth.radiograph import encode, image_metadata, render, texture_statistic
from pipelines.synth.summary import CohortSummary
from pipelines.synth.writer import child_seed

__all__ = ["HardCohort", "generate_hard_cohort", "simulate_hard_cohort", "write_hard_patient"]

UPPER_BOUND_NOTE = ("latent signal before rendering, measurement noise, site offsets and "
                    "JPEG compression: an upper bound")


@dataclass
class HardCohort:
    """Patients plus their posteriors (keys as ``model.posteriors``)."""

    seed: int
    model: HardModel
    patients: list[HardPatientSim]
    posterior: dict[str, np.ndarray]

    @property
    def labels(self) -> np.ndarray:
        return np.array([p.label for p in self.patients])


def simulate_hard_cohort(n_patients: int, *, seed: int = 0,
                         model: HardModel | None = None) -> HardCohort:
    """Draw ``n_patients`` hard-world patients and every posterior; writes nothing."""
    if n_patients <= 0:
        raise ValueError(f"n_patients must be positive, got {n_patients}")
    model = model or HardModel()
    children = np.random.SeedSequence(seed).spawn(n_patients)
    patients = [simulate_hard_patient(i, mrn, children[i], model, seed=seed)
                for i, mrn in enumerate(_mrns(seed, n_patients))]
    return HardCohort(seed, model, patients, hard_posteriors(model, evidence(model, patients)))


def evidence(model: HardModel, patients: list[HardPatientSim]) -> HardEvidence:
    names = list(patients[0].scores)
    return HardEvidence(
        demo_logit=model.demographic_logit(np.array([p.age_years for p in patients]),
                                           np.array([p.sex == "male" for p in patients])),
        scores={c: np.array([p.scores[c] for p in patients]) for c in names},
        observed={c: np.array([p.observed[c] for p in patients]) for c in names},
    )


@dataclass(frozen=True)
class HardWriteJob:
    patient: HardPatientSim
    out_dir: Path
    seed: int
    size: int
    quality: int


@dataclass(frozen=True)
class HardWriteResult:
    index: int
    texture_stat: float  # NaN without imaging
    mean_intensity: float
    metadata_outcome_terms: int
    files: int


def write_hard_patient(job: HardWriteJob) -> HardWriteResult:
    """FHIR Bundle, HL7 v2 (some patients) and the radiograph of one patient."""
    import json

    from PIL import Image

    p, root = job.patient, job.out_dir
    doc = bundle(p, seed=job.seed, n_slices=1)
    (root / "fhir" / f"{p.mrn}.json").write_text(
        json.dumps(doc, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    files = 1
    if p.hl7:
        (root / "hl7" / f"{p.mrn}.hl7").write_bytes("".join(messages(p)).encode("utf-8"))
        files += 1
    stat, mean, hits = math.nan, math.nan, 0
    if not p.withheld_imaging and p.radiograph is not None:
        grey = render(p.radiograph, np.random.default_rng(child_seed(p.pixel_seed, 0)), job.size)
        path = root / image_path(p)
        encode(grey, p.radiograph, path, quality=job.quality)
        with Image.open(path) as written:  # the statistic of what a reader gets back
            stat, mean = texture_statistic(np.asarray(written.convert("L")))
        hits = len(outcome_terms(image_metadata(p.radiograph).values()))
        files += 1
    return HardWriteResult(p.index, stat, mean, hits, files)


def generate_hard_cohort(n_patients: int, out_dir: Path, *, seed: int = 0, size: int = 256,
                         workers: int = 2, progress: bool = False,
                         model: HardModel | None = None) -> CohortSummary:
    """Write a ``--realism hard`` cohort into ``out_dir`` and summarise it."""
    for name, value in (("n_patients", n_patients), ("size", size), ("workers", workers)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if size < 64:
        raise ValueError(f"size must be at least 64 pixels for a radiograph, got {size}")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    for sub in ("fhir", "hl7", "images"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    cohort = simulate_hard_cohort(n_patients, seed=seed, model=model)
    jobs = [HardWriteJob(p, out_dir, seed, size, cohort.model.jpeg_quality)
            for p in cohort.patients]
    results = sorted(_run(jobs, workers, progress), key=lambda r: r.index)

    labels, post = cohort.labels, cohort.posterior
    oracle = {k: auroc(labels, post[k]) for k in ("imaging", "ehr", "notes", "all")}
    stats = np.array([r.texture_stat for r in results])
    means = np.array([r.mean_intensity for r in results])
    imaged = ~np.isnan(stats)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2**31 - 2,)))
    note_hits = outcome_terms(n.text for p in cohort.patients for n in p.notes)
    meta_hits = sum(r.metadata_outcome_terms for r in results)
    shuffled = shuffled_auroc(labels[imaged], stats[imaged], rng)
    leakage = {
        "image_stat_auroc": auroc(labels[imaged], stats[imaged]),
        "image_stat_auroc_shuffled": shuffled,
        "image_mean_intensity_auroc": auroc(labels[imaged], means[imaged]),
        "outcome_terms_in_notes": len(note_hits),
        "outcome_terms_in_dicom": meta_hits,
        "passed": bool(not note_hits and meta_hits == 0
                       and (math.isnan(shuffled) or abs(shuffled - 0.5) < 0.05)),
    }
    bayes_auc = auroc(labels, post["bayes"])
    demographics_auc = auroc(labels, post["demographics"])
    metrics = {"realism": "hard", "bayes_auroc_observable": bayes_auc,
               "bayes_auroc_note": UPPER_BOUND_NOTE, "oracle_auroc": oracle,
               "demographics_auroc": demographics_auc, "event_rate": float(labels.mean()),
               "leakage": leakage}
    write_hard_manifest(out_dir, cohort)
    write_hard_truth(out_dir, cohort, metrics)
    seconds = time.perf_counter() - started
    formats = pd.Series([p.radiograph.fmt for p in cohort.patients
                         if p.radiograph is not None and not p.withheld_imaging])
    counts = {"fhir": n_patients, "hl7": sum(p.hl7 for p in cohort.patients),
              "images": int(imaged.sum()),
              **{f"images_{k}": int(v) for k, v in formats.value_counts().sort_index().items()}}
    return CohortSummary(
        n_patients=n_patients, seconds=seconds, patients_per_s=n_patients / seconds,
        event_rate=float(labels.mean()), bayes_auroc_observable=bayes_auc,
        oracle_auroc=oracle, outcome=dict(codes.OUTCOME_DEFINITION), leakage=leakage,
        out_dir=str(out_dir), seed=seed, bias=False, counts=counts,
        bytes_on_disk=_disk_bytes(out_dir), demographics_auroc=demographics_auc,
        realism="hard",
    )


def _run(jobs: list[HardWriteJob], workers: int, progress: bool) -> Iterator[HardWriteResult]:
    results: Iterable[HardWriteResult]
    if workers == 1 or len(jobs) < 4:
        yield from _progress(map(write_hard_patient, jobs), len(jobs), progress)
        return
    chunk = max(1, len(jobs) // (workers * 8))
    with process_pool(workers) as pool:
        results = pool.map(write_hard_patient, jobs, chunksize=chunk)
        yield from _progress(results, len(jobs), progress)


def _progress(results: Iterable[HardWriteResult], total: int, show: bool
              ) -> Iterable[HardWriteResult]:
    if not show:
        return results
    from tqdm import tqdm

    return tqdm(results, total=total, desc="synth (hard)", unit="patient")


def _disk_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def hard_manifest_frame(cohort: HardCohort) -> pd.DataFrame:
    frame = patients_frame(cohort.patients, DEFAULT_SPEC, image_path)
    frame.insert(list(frame.columns).index("age_band") + 1, "site",
                 [p.site for p in cohort.patients])
    return frame


def write_hard_manifest(out_dir: Path, cohort: HardCohort) -> pd.DataFrame:
    frame = hard_manifest_frame(cohort)
    frame.to_csv(out_dir / "manifest.csv", index=False, float_format=FLOAT_FORMAT)
    groups = [*SENSITIVE, "site"]
    sidecar = {
        "sensitive": groups,
        "categorical": groups,
        "include_sensitive": False,
        "feature_source": "fhir-spec",
        "feature_spec_version": DEFAULT_SPEC.version,
        "feature_columns": DEFAULT_SPEC.column_names(),
        "outcome": codes.OUTCOME_DEFINITION,
        "patient_id": f"'{codes.MRN_SYSTEM}|<MRN>', as PatientRecord.patient_id spells it",
        "image": "chest radiograph (PNG or JPEG) relative to this file; blank when imaging "
                 "is withheld",
        "note": "the patient's notes before the index time, joined by a blank line",
        "site": "hospital (scanner and lab analysers); an audit group, not a feature unless "
                "include_sensitive is set; it shifts image intensity and some lab values, "
                "not the outcome",
        "generator": {"name": "clinfuse synth", "seed": cohort.seed, "bias": False,
                      "realism": "hard"},
    }
    (out_dir / "manifest.yaml").write_text(yaml.safe_dump(sidecar, sort_keys=False))
    return frame


def hard_truth_frame(cohort: HardCohort) -> pd.DataFrame:
    post = cohort.posterior
    rows = []
    for i, p in enumerate(cohort.patients):
        r = p.radiograph
        rows.append({
            "patient_id": p.patient_id, "example_id": p.example_id,
            "index_time": iso(p.index_time), "p_true": p.p_true, "label": p.label,
            "event_type": p.event_type,
            "event_time": iso(p.event_time) if p.event_time else "",
            "sex": p.sex, "race": p.race[1], "ethnicity": p.ethnicity[1],
            "age_band": p.age_band, "age_years": p.age_years, "site": p.site,
            "withheld_imaging": int(p.withheld_imaging), "withheld_notes": int(p.withheld_notes),
            "withheld_ehr": int(p.withheld_ehr),
            "bayes_posterior": post["bayes"][i],
            "oracle_imaging": post["imaging"][i], "oracle_ehr": post["ehr"][i],
            "oracle_notes": post["notes"][i], "oracle_all": post["all"][i],
            "posterior_demographics": post["demographics"][i],
            "true_logit": p.true_logit, "z_img": p.z_img,
            "texture_amplitude": r.texture if r is not None else math.nan,
            "image_format": r.fmt if r is not None and not p.withheld_imaging else "",
            **{f"score_{k.replace(':', '_')}": v for k, v in p.scores.items()},
            **{f"u_{k}": v for k, v in p.u.items()},
            **{f"finding_{f.name.replace(' ', '_')}": int(p.symptoms[k])
               for k, f in enumerate(cohort.model.findings)},
            "hl7": int(p.hl7),
        })
    return pd.DataFrame(rows)


def write_hard_truth(out_dir: Path, cohort: HardCohort, metrics: dict[str, Any]) -> None:
    hard_truth_frame(cohort).to_csv(out_dir / "truth.csv", index=False,
                                    float_format=FLOAT_FORMAT)
    m = cohort.model
    settings = {f.name: getattr(m, f.name) for f in dataclasses.fields(m)
                if isinstance(getattr(m, f.name), int | float)
                and not isinstance(getattr(m, f.name), bool)}
    in_block = {f for feats in EHR_BLOCKS.values() for f in feats}
    data: dict[str, Any] = {
        "outcome": codes.OUTCOME_DEFINITION,
        "seed": cohort.seed,
        "realism": "hard",
        "model": {
            "true_logit": "intercept + coef_age (age - age_mean) / age_sd + coef_male male "
                          "+ coef_imaging z_img + S_ehr(u) + sum_k coef_k finding_k",
            "S_ehr": "coef_resp_rate u_resp_rate + coef_spo2 u_spo2 + coef_temperature_u "
                     "(u_temperature^2 - 1) + coef_shock relu(u_heart_rate) relu(-u_sbp) + "
                     "coef_lactate_step [lactate > lactate_threshold] + coef_creatinine "
                     "u_creatinine + coef_wbc_u (u_wbc^2 - 1)",
            **settings,
        },
        "signal": {
            "imaging": {"role": "signal", "carrier": "amplitude of a zero-mean reticular "
                        "texture in the lung fields (not a bright region, not mean intensity)",
                        "statistic": "texture_amplitude * exp(texture_log_scale * z_img)"},
            "ehr": {s.name: {"role": "signal" if s.name in in_block else "noise",
                             "transform": s.transform, "mu": s.mu, "sd": s.sd,
                             "measurement_noise": s.noise, "p_absent": s.p_absent}
                    for s in m.ehr_signals},
            "notes": {f.name: {"prevalence": f.prevalence, "coef": f.coef, "role": "signal"}
                      for f in m.findings} | {"negated findings and boilerplate": "noise"},
            "site": "no effect on the outcome; shifts image rendering and lab offsets",
            "conditions": "noise", "medications": "noise", "admission_reason": "noise",
        },
        "sites": [dataclasses.asdict(s) for s in m.sites],
        "missingness": {"mechanism": "MCAR",
                        "imaging_withheld": m.p_withhold_imaging,
                        "notes_withheld": m.p_withhold_notes,
                        "ehr_withheld": m.p_withhold_ehr,
                        "labs_absent": {s.name: s.p_absent for s in m.ehr_signals
                                        if s.p_absent}},
        "planted_bias": [],
        "metrics": metrics,
        "posteriors": {
            "note": "every posterior is of the latent signal (" + UPPER_BOUND_NOTE + ")",
            "bayes_posterior": "P(event | demographics and the latent signal of the "
                               "modalities (and lab blocks) written for the patient)",
            "oracle_<modality>": "P(event | demographics and that modality's latent signal, "
                                 "even when withheld)",
            "oracle_all": "P(event | every latent) = p_true",
        },
    }
    (out_dir / "truth.yaml").write_text(yaml.safe_dump(_plain(data), sort_keys=False))
