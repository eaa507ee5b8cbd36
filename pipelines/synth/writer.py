"""Per-patient file writing, run in a process pool: FHIR Bundle, HL7 v2, DICOM series."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.synth.dicom_writer import dicom_text_values, write_series
from pipelines.synth.fhir_writer import bundle
from pipelines.synth.hl7_writer import messages
from pipelines.synth.leakage import outcome_terms
from pipelines.synth.patient import PatientSim
from pipelines.synth.phantom import lesion_volume_ml, render

__all__ = ["WriteJob", "WriteResult", "child_seed", "write_patient"]


@dataclass(frozen=True)
class WriteJob:
    patient: PatientSim
    out_dir: Path
    seed: int
    n_slices: int
    size: int


@dataclass(frozen=True)
class WriteResult:
    index: int
    image_stat_ml: float  # lesion volume counted in the written pixels; NaN without imaging
    dicom_outcome_terms: int
    files: int


def child_seed(seq: np.random.SeedSequence, j: int) -> np.random.SeedSequence:
    """The ``j``-th child of ``seq``, without mutating ``seq`` (unlike ``spawn``)."""
    return np.random.SeedSequence(seq.entropy, spawn_key=(*seq.spawn_key, j))


def write_patient(job: WriteJob) -> WriteResult:
    p, root = job.patient, job.out_dir
    doc = bundle(p, seed=job.seed, n_slices=job.n_slices)
    (root / "fhir" / f"{p.mrn}.json").write_text(
        json.dumps(doc, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    files = 1
    if p.hl7:
        (root / "hl7" / f"{p.mrn}.hl7").write_bytes("".join(messages(p)).encode("utf-8"))
        files += 1
    stat, hits = math.nan, 0
    if not p.withheld_imaging:
        noise = np.random.default_rng(child_seed(p.pixel_seed, 0))
        hu = render(p.imaging, noise, n_slices=job.n_slices, size=job.size)
        ds = write_series(root, p, hu, seed=job.seed,
                          shuffle_rng=np.random.default_rng(child_seed(p.pixel_seed, 1)))
        stat = lesion_volume_ml(hu, n_slices=job.n_slices, size=job.size)
        hits = len(outcome_terms(dicom_text_values(ds)))
        files += job.n_slices
    return WriteResult(p.index, stat, hits, files)
