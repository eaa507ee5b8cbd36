"""``clinfuse synth``: a synthetic multimodal cohort with known truth.

``generate_cohort`` draws patients from a latent generative model
(:mod:`pipelines.synth.model`), writes FHIR Bundles, HL7 v2 messages, DICOM CT
series and notes, a cohort manifest whose tabular columns are exactly the EHR
feature builder's, and the truth (labels, true probabilities, Bayes and oracle
posteriors, which features carry signal, the planted biases).

Modules: ``codes`` (terminology, outcome definition), ``model`` (generative model
and exact posteriors), ``patient`` (one patient's numbers), ``cohort`` (the
whole cohort, no files), ``notes``, ``phantom`` (CT volume), ``dicom_writer``,
``fhir_writer``, ``hl7_writer``, ``features`` (spec features from the generated
numbers), ``manifest`` (manifest and truth files), ``leakage``, ``writer``
(per-patient file writing) and ``summary``. ``--realism hard`` (``hard``,
``hard_model``, ``hard_patient``, ``hard_notes``, ``radiograph``) writes a harder
world: 2-D radiographs whose signal is texture, non-linear EHR effects, rare note
phrases and site effects.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from pipelines.process_pool import process_pool
from pipelines.synth.codes import OUTCOME_DEFINITION
from pipelines.synth.cohort import SimulatedCohort, simulate_cohort
from pipelines.synth.leakage import auroc, outcome_terms, shuffled_auroc
from pipelines.synth.manifest import write_manifest, write_truth
from pipelines.synth.model import SynthModel
from pipelines.synth.summary import CohortSummary
from pipelines.synth.writer import WriteJob, WriteResult, write_patient

__all__ = ["OUTCOME_DEFINITION", "REALISMS", "CohortSummary", "SimulatedCohort", "SynthModel",
           "generate_cohort", "simulate_cohort"]

#: ``clinfuse synth --realism``: the default world, or the hard one (pipelines.synth.hard).
REALISMS = ("default", "hard")

log = logging.getLogger(__name__)


def generate_cohort(n_patients: int, out_dir: Path, *, seed: int = 0, bias: bool = False,
                    n_slices: int = 32, size: int | None = None, workers: int = 2,
                    progress: bool = False, model: SynthModel | None = None,
                    realism: str = "default") -> CohortSummary:
    """Write a synthetic cohort of ``n_patients`` into ``out_dir`` and summarise it.

    Parameters
    ----------
    n_patients : int
        Number of patients (one example each).
    out_dir : Path
        Created if needed; ``fhir/``, ``hl7/``, ``dicom/``, ``manifest.csv``/``.yaml``
        and ``truth.csv``/``.yaml`` are written into it.
    seed : int, default=0
        Same seed, same bytes in every file.
    bias : bool, default=False
        Plant the disparities listed in ``truth.yaml`` (imaging withheld more
        often for Black or Hispanic patients; lactate recorded 42 % high for
        Black patients).
    n_slices, size : int, default=32, 64
        CT slices per series and in-plane matrix size; with ``realism="hard"``,
        ``n_slices`` is unused and ``size`` is the radiograph's (default 256).
    workers : int, default=2
        Processes writing files; 1 writes in this process.
    progress : bool, default=False
        Show a progress bar on stderr.
    model : SynthModel, optional
        Generative model coefficients; the default meets the AUROC targets.
    realism : {"default", "hard"}
        ``"hard"`` writes the world of :mod:`pipelines.synth.hard` (2-D radiographs
        with a texture signal, non-linear EHR effects, rare note phrases, site
        effects); ``bias`` and ``model`` apply to the default world only.

    Returns
    -------
    CohortSummary
    """
    if realism not in REALISMS:
        raise ValueError(f"realism must be one of {list(REALISMS)}, got {realism!r}")
    if realism == "hard":
        if bias:
            raise ValueError("--bias plants its disparities in the default world only; "
                             "use it without --realism hard")
        from pipelines.synth.hard import generate_hard_cohort

        return generate_hard_cohort(n_patients, Path(out_dir), seed=seed,
                                    size=256 if size is None else size, workers=workers,
                                    progress=progress)
    size = 64 if size is None else size
    for name, value in (("n_patients", n_patients), ("n_slices", n_slices), ("size", size),
                        ("workers", workers)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    for sub in ("fhir", "hl7", "dicom"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    cohort = simulate_cohort(n_patients, seed=seed, bias=bias, model=model)
    jobs = [WriteJob(p, out_dir, seed, n_slices, size) for p in cohort.patients]
    results = sorted(_run(jobs, workers, progress), key=lambda r: r.index)

    labels = cohort.labels
    post = cohort.posterior
    oracle = {k: auroc(labels, post[k]) for k in ("imaging", "ehr", "notes", "all")}
    stats = np.array([r.image_stat_ml for r in results])
    imaged = ~np.isnan(stats)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2**31 - 2,)))
    note_hits = outcome_terms(n.text for p in cohort.patients for n in p.notes)
    dicom_hits = sum(r.dicom_outcome_terms for r in results)
    img_auc = auroc(labels[imaged], stats[imaged])
    shuffled = shuffled_auroc(labels[imaged], stats[imaged], rng)
    leakage = {
        "image_stat_auroc": img_auc,
        "image_stat_auroc_shuffled": shuffled,
        "outcome_terms_in_notes": len(note_hits),
        "outcome_terms_in_dicom": dicom_hits,
        "passed": bool(not note_hits and dicom_hits == 0
                       and (math.isnan(shuffled) or abs(shuffled - 0.5) < 0.05)),
    }
    bayes_auc = auroc(labels, post["bayes"])
    demographics_auc = auroc(labels, post["demographics"])
    metrics = {"bayes_auroc_observable": bayes_auc, "oracle_auroc": oracle,
               "demographics_auroc": demographics_auc, "event_rate": float(labels.mean()),
               "leakage": leakage}
    write_manifest(out_dir, cohort)
    write_truth(out_dir, cohort, metrics)
    seconds = time.perf_counter() - started
    counts = {"fhir": n_patients, "hl7": sum(p.hl7 for p in cohort.patients),
              "dicom_series": int(imaged.sum()),
              "dicom_files": int(sum(r.files for r in results) - n_patients
                                 - sum(p.hl7 for p in cohort.patients))}
    return CohortSummary(
        n_patients=n_patients, seconds=seconds, patients_per_s=n_patients / seconds,
        event_rate=float(labels.mean()),
        bayes_auroc_observable=bayes_auc, oracle_auroc=oracle,
        outcome=dict(OUTCOME_DEFINITION), leakage=leakage, out_dir=str(out_dir), seed=seed,
        bias=bias, counts=counts, bytes_on_disk=_disk_bytes(out_dir),
        demographics_auroc=demographics_auc,
    )


def _run(jobs: list[WriteJob], workers: int, progress: bool) -> Iterator[WriteResult]:
    results: Iterable[WriteResult]
    if workers == 1 or len(jobs) < 4:
        results = map(write_patient, jobs)
        yield from _progress(results, len(jobs), progress)
        return
    chunk = max(1, len(jobs) // (workers * 8))
    with process_pool(workers) as pool:
        results = pool.map(write_patient, jobs, chunksize=chunk)
        yield from _progress(results, len(jobs), progress)


def _progress(results: Iterable[WriteResult], total: int, show: bool) -> Iterable[WriteResult]:
    if not show:
        return results
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return results
    return tqdm(results, total=total, desc="synth", unit="patient")


def _disk_bytes(root: Path) -> int:
    total = 0
    for folder, _, files in os.walk(root):
        total += sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    return total
