"""The cohort manifest (``manifest.csv``/``.yaml``) and the truth (``truth.csv``/``.yaml``).

Manifest columns: ``example_id, patient_id, label, index_time, image, note``,
the sensitive columns ``sex, race, ethnicity, age_band``, then exactly
``DEFAULT_SPEC.column_names()``, computed by ``features.feature_row`` from the
generated numbers. Floats are written with 17 significant digits so that they
round-trip exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from pipelines.feature_spec import DEFAULT_SPEC, FeatureSpec
from pipelines.synth import codes
from pipelines.synth.cohort import SimulatedCohort
from pipelines.synth.dicom_writer import series_dir
from pipelines.synth.features import feature_row
from pipelines.synth.fhir_writer import iso
from pipelines.synth.patient import PatientSim

__all__ = ["SENSITIVE", "manifest_frame", "patients_frame", "truth_frame", "write_manifest",
           "write_truth"]

SENSITIVE = ["sex", "race", "ethnicity", "age_band"]
FLOAT_FORMAT = "%.17g"


def manifest_frame(cohort: SimulatedCohort, spec: FeatureSpec = DEFAULT_SPEC) -> pd.DataFrame:
    return patients_frame(cohort.patients, spec, lambda p: series_dir(p).as_posix())


def patients_frame(patients: Sequence[PatientSim], spec: FeatureSpec,
                   image: Callable[[PatientSim], str]) -> pd.DataFrame:
    """The manifest rows of ``patients``; ``image`` gives a written image's path."""
    rows = []
    for p in patients:
        rows.append({
            "example_id": p.example_id,
            "patient_id": p.patient_id,
            "label": p.label,
            "index_time": iso(p.index_time),
            "image": "" if p.withheld_imaging else image(p),
            "note": "\n\n".join(n.text for n in p.notes),
            "sex": p.sex, "race": p.race[1], "ethnicity": p.ethnicity[1],
            "age_band": p.age_band,
        })
    head = pd.DataFrame(rows)
    features = pd.DataFrame([feature_row(p, spec) for p in patients],
                            columns=spec.column_names(), dtype=float)
    return pd.concat([head, features], axis=1)


def write_manifest(out_dir: Path, cohort: SimulatedCohort, spec: FeatureSpec = DEFAULT_SPEC
                   ) -> pd.DataFrame:
    frame = manifest_frame(cohort, spec)
    frame.to_csv(out_dir / "manifest.csv", index=False, float_format=FLOAT_FORMAT)
    sidecar = {
        "sensitive": SENSITIVE,
        "categorical": SENSITIVE,
        "include_sensitive": False,
        "feature_source": "fhir-spec",
        "feature_spec_version": spec.version,
        "feature_columns": spec.column_names(),
        "outcome": codes.OUTCOME_DEFINITION,
        "patient_id": f"'{codes.MRN_SYSTEM}|<MRN>', as PatientRecord.patient_id spells it",
        "image": "DICOM series folder relative to this file; blank when imaging is withheld",
        "note": "the patient's notes before the index time, joined by a blank line",
        "generator": {"name": "clinfuse synth", "seed": cohort.seed, "bias": cohort.bias},
    }
    (out_dir / "manifest.yaml").write_text(yaml.safe_dump(sidecar, sort_keys=False))
    return frame


def truth_frame(cohort: SimulatedCohort) -> pd.DataFrame:
    post = cohort.posterior
    rows = []
    for i, p in enumerate(cohort.patients):
        rows.append({
            "patient_id": p.patient_id, "example_id": p.example_id,
            "index_time": iso(p.index_time), "p_true": p.p_true, "label": p.label,
            "event_type": p.event_type,
            "event_time": iso(p.event_time) if p.event_time else "",
            "sex": p.sex, "race": p.race[1], "ethnicity": p.ethnicity[1],
            "age_band": p.age_band, "age_years": p.age_years,
            "withheld_imaging": int(p.withheld_imaging), "withheld_notes": int(p.withheld_notes),
            "withheld_ehr": int(p.withheld_ehr),
            "bayes_posterior": post["bayes"][i],
            "oracle_imaging": post["imaging"][i], "oracle_ehr": post["ehr"][i],
            "oracle_notes": post["notes"][i], "oracle_all": post["all"][i],
            "posterior_demographics": post["demographics"][i],
            "z_img": p.z_img, "z_ehr": p.z_ehr, "z_note": p.z_note, "true_logit": p.true_logit,
            "x_img": p.x_img, "lesion_volume_ml": p.imaging.volume_ml,
            "hl7": int(p.hl7),
        })
    return pd.DataFrame(rows)


def write_truth(out_dir: Path, cohort: SimulatedCohort, metrics: dict[str, Any]) -> None:
    truth_frame(cohort).to_csv(out_dir / "truth.csv", index=False, float_format=FLOAT_FORMAT)
    m = cohort.model
    ehr = {s.name: {"loading": s.loading, "transform": s.transform,
                    "role": "signal" if s.loading else "noise",
                    "p_absent": s.p_absent} for s in m.ehr_signals}
    notes = {s.name: {"alpha": s.alpha, "beta": s.beta, "role": "signal" if s.beta else "noise"}
             for s in m.symptoms}
    data: dict[str, Any] = {
        "outcome": codes.OUTCOME_DEFINITION,
        "seed": cohort.seed,
        "bias": cohort.bias,
        "model": {
            "true_logit": "intercept + coef_imaging z_img + coef_ehr z_ehr + coef_notes z_note "
                          "+ coef_age (age - age_mean) / age_sd + coef_male male",
            **{f.name: getattr(m, f.name) for f in dataclasses.fields(m)
               if isinstance(getattr(m, f.name), int | float) and not isinstance(
                   getattr(m, f.name), bool)},
        },
        "signal": {
            "imaging": {"role": "signal", "carrier": "lesion volume (mL) of the bright ellipsoid",
                        "statistic": "x_img = z_img + imaging_noise * eps; volume = "
                                     "lesion_median_ml * exp(lesion_log_scale * x_img)"},
            "ehr": ehr,
            "notes": notes,
            "conditions": "noise", "medications": "noise", "admission_reason": "noise",
            "dicom_tags": "noise (no tag depends on the outcome)",
        },
        "missingness": {
            "mechanism": "MCAR" if not cohort.bias else "MCAR except the planted bias",
            "imaging_withheld": m.p_withhold_imaging, "notes_withheld": m.p_withhold_notes,
            "ehr_withheld": m.p_withhold_ehr,
            "labs_absent": {s.name: s.p_absent for s in m.ehr_signals if s.p_absent},
        },
        "planted_bias": _bias(cohort),
        "metrics": metrics,
        "posteriors": {
            "bayes_posterior": "P(event | demographics and the modalities written for the "
                               "patient), exact (closed-form Gaussian + grid + Gauss-Hermite)",
            "oracle_<modality>": "P(event | demographics and that modality as generated, "
                                 "even when withheld)",
            "oracle_all": "P(event | demographics and all three modalities as generated)",
        },
    }
    (out_dir / "truth.yaml").write_text(yaml.safe_dump(_plain(data), sort_keys=False))


def _bias(cohort: SimulatedCohort) -> list[dict[str, Any]]:
    if not cohort.bias:
        return []
    m = cohort.model
    return [
        {"kind": "imaging missingness",
         "groups": list(m.bias_imaging_groups),
         "p_withheld_in_groups": m.bias_imaging_withheld[0],
         "p_withheld_otherwise": m.bias_imaging_withheld[1]},
        {"kind": "measurement offset", "feature": m.bias_lab, "group": m.bias_lab_group,
         "recorded": f"true value x {float(np.exp(m.bias_lab_log_offset)):.4f}",
         "log_offset": m.bias_lab_log_offset,
         "effect": "risk is overestimated for the group by a model that ignores the offset"},
    ]


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
