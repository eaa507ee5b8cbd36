"""One ``--realism hard`` patient: the default world's record, the hard world's signal.

Demographics, timeline, conditions, medications and identifiers are drawn as in
:func:`pipelines.synth.patient.simulate_patient`; the latent signal, the measurements,
notes and the radiograph follow :mod:`pipelines.synth.hard_model`. The result is a
:class:`PatientSim`, so the FHIR, HL7 and manifest feature writers take it unchanged:
the manifest's tabular columns are computed from the same recorded values as the
Bundles (site offsets included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
from pydicom.uid import generate_uid

from pipelines.synth import codes
from pipelines.synth.codes import observation_codes
from pipelines.synth.hard_model import EHR_BLOCKS, HardModel, Site
from pipelines.synth.hard_notes import compose_hard_notes
from pipelines.synth.model import sigmoid
from pipelines.synth.patient import (
    ImagingSim,
    ObsSim,
    PatientSim,
    _minutes,
    _schedule,
    age_band,
    draw_person,
)
from pipelines.synth.radiograph import FORMAT_CYCLE, FORMAT_SUFFIX, RadiographSim, draw_radiograph

__all__ = ["HardPatientSim", "image_path", "simulate_hard_patient"]


@dataclass
class HardPatientSim(PatientSim):
    """A PatientSim plus the hard world's latent signal and radiograph."""

    site: str = ""
    u: dict[str, float] = field(default_factory=dict)  # standardised latent EHR means
    scores: dict[str, float] = field(default_factory=dict)  # log-odds per component
    observed: dict[str, bool] = field(default_factory=dict)  # component written?
    radiograph: RadiographSim | None = None


def image_path(p: PatientSim) -> str:
    """The radiograph's path relative to the cohort root."""
    assert isinstance(p, HardPatientSim) and p.radiograph is not None
    return f"images/{p.mrn}{FORMAT_SUFFIX[p.radiograph.fmt]}"


def _site(rng: np.random.Generator, sites: tuple[Site, ...]) -> Site:
    share = np.array([s.share for s in sites])
    return sites[int(rng.choice(len(sites), p=share / share.sum()))]


def simulate_hard_patient(i: int, mrn: str, seq: np.random.SeedSequence, model: HardModel, *,
                          seed: int) -> HardPatientSim:
    """Draw patient ``i`` from ``seq`` (its own child SeedSequence)."""
    data_seq, pixel_seq = seq.spawn(2)
    rng = np.random.default_rng(data_seq)

    person = draw_person(rng, model.age_mean, model.age_sd)
    sex, race, ethnicity, language = person.sex, person.race, person.ethnicity, person.language
    given, family, birth_date, age = person.given, person.family, person.birth_date, person.age
    index_time, admission, ed_arrival = person.index_time, person.admission, person.ed_arrival
    site = _site(rng, model.sites)

    # Latent signal and outcome.
    z_img = float(rng.standard_normal())
    u = {s.name: float(rng.standard_normal()) for s in model.ehr_signals}
    present = (rng.random(len(model.findings))
               < np.array([f.prevalence for f in model.findings])).astype(np.int8)
    male = 1.0 if sex == "male" else 0.0
    scores = {"imaging": float(model.imaging_score(z_img))}
    scores |= {f"ehr:{k}": float(v) for k, v in model.ehr_scores(u).items()}
    scores["notes"] = float(model.notes_score(present))
    eta = float(model.demographic_logit(np.array(age), np.array(male))) + sum(scores.values())
    p_true = float(sigmoid(np.array(eta)))
    label = int(rng.random() < p_true)
    event_type, event_time = "", None
    if label:
        event_type = "death" if rng.random() < 0.3 else "icu"
        event_time = index_time + _minutes(rng, 60, 30 * 24 * 60)
    withheld_imaging = bool(rng.random() < model.p_withhold_imaging)
    withheld_notes = bool(rng.random() < model.p_withhold_notes)
    withheld_ehr = bool(rng.random() < model.p_withhold_ehr)

    def uid(kind: str) -> str:
        return str(generate_uid(entropy_srcs=["clinfuse-synth-hard", str(seed), mrn, kind]))

    fmt = FORMAT_CYCLE[i % len(FORMAT_CYCLE)]
    radiograph = draw_radiograph(rng, float(model.texture(z_img)), site, fmt)
    imaging = ImagingSim(
        acquired=index_time - _minutes(rng, 2 * 60, 20 * 60), volume_ml=math.nan,
        semi_axes_mm=(math.nan, math.nan, math.nan), center_mm=(math.nan, math.nan, math.nan),
        lesion_hu=math.nan, study_uid=uid("study"), series_uid=uid("series"),
        frame_uid=uid("frame"), accession=f"ACC{int(rng.integers(10**7, 10**8))}",
        signed=False, compression="none", shuffled=False,
    )

    offsets = dict(site.lab_offsets)
    observations, measured = _measurements(rng, model, index_time, ed_arrival, admission, u,
                                           offsets)
    if withheld_ehr:
        observations = []
    observed = {"imaging": not withheld_imaging, "notes": not withheld_notes}
    observed |= {f"ehr:{b}": (not withheld_ehr) and all(f in measured for f in feats)
                 for b, feats in EHR_BLOCKS.items()}

    reason = codes.ADMISSION_REASONS[int(rng.integers(len(codes.ADMISSION_REASONS)))]
    n_notes = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    note_times = [admission + _minutes(rng, 60, 240)]
    note_times += [admission + timedelta(hours=24 * d) + _minutes(rng, 8 * 60, 14 * 60)
                   for d in range(1, n_notes)]
    notes = compose_hard_notes(rng, present.astype(bool), model.findings, note_times,
                               age=int(age), sex=sex, reason=reason[2],
                               p_negated=model.p_negated)
    if withheld_notes:
        notes = []

    conditions = [(code, display, index_time - timedelta(days=int(rng.integers(365, 15 * 365))))
                  for code, display, prevalence in codes.COMORBIDITIES
                  if rng.random() < prevalence]
    conditions.append((reason[0], reason[1], ed_arrival + _minutes(rng, 30, 90)))
    n_meds = int(rng.integers(0, 4))
    medications = [(*codes.HOME_MEDICATIONS[int(j)],
                    admission - timedelta(days=int(rng.integers(30, 700))))
                   for j in rng.choice(len(codes.HOME_MEDICATIONS), size=n_meds, replace=False)]
    hl7 = bool(rng.random() < 0.2)

    nan = math.nan
    return HardPatientSim(
        index=i, mrn=mrn, example_id=f"synth-{i:06d}", family=family, given=given, sex=sex,
        birth_date=birth_date, race=race, ethnicity=ethnicity, language=language,
        age_years=age, age_band=age_band(age), index_time=index_time, ed_arrival=ed_arrival,
        admission=admission, z_img=z_img, z_ehr=nan, z_note=nan, true_logit=eta,
        p_true=p_true, label=label, event_type=event_type, event_time=event_time,
        withheld_imaging=withheld_imaging, withheld_notes=withheld_notes,
        withheld_ehr=withheld_ehr, x_img=z_img, imaging=imaging, observations=observations,
        ehr_precision=nan, ehr_linear=nan, symptoms=present, notes=notes, reason=reason,
        conditions=conditions, medications=medications, hl7=hl7, pixel_seed=pixel_seq,
        lab_offsets=offsets, site=site.name, u=u, scores=scores, observed=observed,
        radiograph=radiograph,
    )


def _measurements(rng: np.random.Generator, model: HardModel, index_time: datetime,
                  ed_arrival: datetime, admission: datetime, u: dict[str, float],
                  offsets: dict[str, float]) -> tuple[list[ObsSim], set[str]]:
    """Recorded measurements (site offsets in), and the features measured before the index.

    As the default world's schedule and codings, but each feature scatters around the
    patient's constant latent mean (no trend) and every vital is recorded at least once.
    """
    vital_times, lab_times = _schedule(rng, index_time, ed_arrival, admission)
    post_times: list[datetime] = []
    if rng.random() < 0.6:
        count = int(rng.integers(1, 4))
        post_times = sorted({index_time + _minutes(rng, 1, 48 * 60) for _ in range(count)})
    out: list[ObsSim] = []
    measured: set[str] = set()
    for sig in model.ehr_signals:
        options = observation_codes(sig.name)
        if rng.random() < sig.p_absent:
            continue
        if sig.kind == "vital":
            times = [t for t in vital_times if sig.name != "temperature" or rng.random() < 0.8]
            times = times or vital_times[:1]
        elif rng.random() < 0.12:
            times = lab_times[:1]
        else:
            keep = 0.6 if sig.name == "lactate" else 0.9
            times = lab_times[:1] + [t for t in lab_times[1:] if rng.random() < keep]
        all_times = times + [t for t in post_times if rng.random() < 0.5]
        e = rng.standard_normal(len(all_times))
        g = sig.mu + sig.sd * (u[sig.name] + sig.noise * e) + offsets.get(sig.name, 0.0)
        spec_true = sig.from_latent(g)
        for k, when in enumerate(all_times):
            code = options[0] if len(options) == 1 or rng.random() < 0.7 else options[1]
            step = 10.0 ** -code.decimals
            value = round(code.from_spec(float(spec_true[k])), code.decimals)
            if sig.transform == "log":
                value = max(value, step)
            elif sig.transform == "deficit100":
                value = min(value, round(100.0 - step, code.decimals))
            value = float(value) + 0.0
            offset_s = int((when - index_time).total_seconds())
            out.append(ObsSim(sig.name, code, value, code.to_spec(value), when, offset_s))
            if offset_s <= 0:
                measured.add(sig.name)
    return out, measured
