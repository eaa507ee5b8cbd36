"""One synthetic patient: every number the writers need, drawn from the patient's own seed.

``simulate_patient`` draws the hidden factors, demographics, timeline, EHR
measurements (in the units they are written in, already rounded to their
reporting precision), symptoms and notes, the lesion geometry, and the outcome.
It writes nothing; the writers and the feature computation read the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Literal

import numpy as np
from pydicom.uid import generate_uid

from fhir_adapters.record import age_band as record_age_band
from pipelines.synth import codes
from pipelines.synth.codes import ObservationCode, observation_codes
from pipelines.synth.model import SynthModel, sigmoid
from pipelines.synth.notes import NoteSim, compose_notes

__all__ = ["ImagingSim", "ObsSim", "PatientSim", "age_band", "simulate_patient"]

EPOCH = datetime(2023, 1, 1, tzinfo=UTC)
_GIVEN = {"female": ("Maria", "Jennifer", "Linda", "Susan", "Aisha", "Mei", "Rosa", "Fatima",
                     "Emily", "Grace"),
          "male": ("James", "Robert", "Carlos", "Wei", "Ahmed", "David", "Joseph", "Luis",
                   "Daniel", "Samuel")}
_FAMILY = ("Smith", "Johnson", "Garcia", "Nguyen", "Brown", "Lee", "Martinez", "Okafor",
           "Patel", "Kowalski", "Rossi", "Haddad")


@dataclass(frozen=True)
class ObsSim:
    """One measurement as written: ``value`` in ``code.unit``; ``spec_value`` in the spec unit."""

    feature: str
    code: ObservationCode
    value: float
    spec_value: float
    time: datetime
    offset_s: int  # seconds from the index time; <= 0 is visible as of the index


@dataclass(frozen=True)
class ImagingSim:
    acquired: datetime
    volume_ml: float
    semi_axes_mm: tuple[float, float, float]
    center_mm: tuple[float, float, float]
    lesion_hu: float
    study_uid: str
    series_uid: str
    frame_uid: str
    accession: str
    signed: bool  # int16 with intercept 0, else uint16 12-bit with intercept -1024
    compression: Literal["none", "rle", "jpegls"]
    shuffled: bool  # InstanceNumber shuffled (positions still right)


@dataclass
class PatientSim:
    index: int
    mrn: str
    example_id: str
    family: str
    given: str
    sex: Literal["male", "female"]
    birth_date: date
    race: tuple[str, str]
    ethnicity: tuple[str, str]
    language: tuple[str, str]
    age_years: float
    age_band: str
    index_time: datetime
    ed_arrival: datetime
    admission: datetime
    z_img: float
    z_ehr: float
    z_note: float
    true_logit: float
    p_true: float
    label: int
    event_type: str  # "death", "icu" or ""
    event_time: datetime | None
    withheld_imaging: bool
    withheld_notes: bool
    withheld_ehr: bool
    x_img: float
    imaging: ImagingSim
    observations: list[ObsSim]  # as written (empty pre-index part when EHR withheld)
    ehr_precision: float
    ehr_linear: float
    symptoms: np.ndarray
    notes: list[NoteSim]  # as written (empty when withheld)
    reason: tuple[str, str, str]
    conditions: list[tuple[str, str, datetime]]
    medications: list[tuple[str, str, datetime]]
    hl7: bool
    pixel_seed: np.random.SeedSequence
    lab_offsets: dict[str, float] = field(default_factory=dict)

    @property
    def patient_id(self) -> str:
        """The business key as ``PatientRecord.patient_id`` spells it."""
        return f"{codes.MRN_SYSTEM}|{self.mrn}"

    @property
    def groups(self) -> set[str]:
        return {f"race:{self.race[1]}", f"ethnicity:{self.ethnicity[1]}", f"sex:{self.sex}"}


def age_band(age: float) -> str:
    """The cohort's age band (its patients are adults, so never 0-17)."""
    return record_age_band(age) or ""


def _pick(rng: np.random.Generator, table: tuple[tuple[str, str, float], ...]) -> tuple[str, str]:
    p = np.array([row[2] for row in table])
    row = table[int(rng.choice(len(table), p=p / p.sum()))]
    return row[0], row[1]


def _minutes(rng: np.random.Generator, lo: int, hi: int) -> timedelta:
    return timedelta(minutes=int(rng.integers(lo, hi)))


@dataclass(frozen=True)
class Person:
    """A synthetic patient's demographics and admission timeline, before any signal."""

    sex: Literal["male", "female"]
    race: tuple[str, str]
    ethnicity: tuple[str, str]
    language: tuple[str, str]
    given: str
    family: str
    index_time: datetime
    admission: datetime
    ed_arrival: datetime
    birth_date: date
    age: float


def draw_person(rng: np.random.Generator, age_mean: float, age_sd: float) -> Person:
    """Demographics and timeline, drawn in one fixed order so a seed gives the same cohort."""
    sex: Literal["male", "female"] = "male" if rng.random() < 0.48 else "female"
    race, ethnicity = _pick(rng, codes.RACES), _pick(rng, codes.ETHNICITIES)
    spanish = ethnicity[0] == "2135-2" and rng.random() < 0.5
    language = ("es", "Spanish") if spanish else ("en-US", "English (United States)")
    given = f"{_GIVEN[sex][int(rng.integers(10))]}{int(rng.integers(10, 1000))}"
    family = f"{_FAMILY[int(rng.integers(len(_FAMILY)))]}{int(rng.integers(10, 1000))}"
    index_time = EPOCH + timedelta(minutes=int(rng.integers(0, 365 * 24 * 60)))
    admission = index_time - timedelta(hours=72)
    ed_arrival = admission - _minutes(rng, 2 * 60, 12 * 60)
    age_raw = float(np.clip(rng.normal(age_mean, age_sd), 18.5, 100.0))
    birth_date = index_time.date() - timedelta(days=int(age_raw * 365.25))
    age = (index_time.date() - birth_date).days / 365.25
    return Person(sex, race, ethnicity, language, given, family, index_time, admission,
                  ed_arrival, birth_date, age)


def simulate_patient(i: int, mrn: str, seq: np.random.SeedSequence, model: SynthModel, *,
                     seed: int, bias: bool) -> PatientSim:
    """Draw patient ``i`` from ``seq`` (its own child SeedSequence)."""
    data_seq, pixel_seq = seq.spawn(2)
    rng = np.random.default_rng(data_seq)

    # Demographics and timeline.
    person = draw_person(rng, model.age_mean, model.age_sd)
    sex, race, ethnicity, language = person.sex, person.race, person.ethnicity, person.language
    given, family, birth_date, age = person.given, person.family, person.birth_date, person.age
    index_time, admission, ed_arrival = person.index_time, person.admission, person.ed_arrival

    # Hidden factors and outcome.
    z_img, z_ehr, z_note = (float(v) for v in rng.standard_normal(3))
    male = 1.0 if sex == "male" else 0.0
    eta = float(model.true_logit(np.array(z_img), np.array(z_ehr), np.array(z_note),
                                 np.array(age), np.array(male)))
    p_true = float(sigmoid(np.array(eta)))
    label = int(rng.random() < p_true)
    event_type, event_time = "", None
    if label:
        event_type = "death" if rng.random() < 0.3 else "icu"
        event_time = index_time + _minutes(rng, 60, 30 * 24 * 60)

    groups = {f"race:{race[1]}", f"ethnicity:{ethnicity[1]}"}
    if bias:
        target = any(g in groups for g in model.bias_imaging_groups)
        p_img = model.bias_imaging_withheld[0 if target else 1]
    else:
        p_img = model.p_withhold_imaging
    withheld_imaging = bool(rng.random() < p_img)
    withheld_notes = bool(rng.random() < model.p_withhold_notes)
    withheld_ehr = bool(rng.random() < model.p_withhold_ehr)

    # Imaging: the lesion volume carries x_img.
    x_img = z_img + model.imaging_noise * float(rng.standard_normal())
    volume = float(model.lesion_volume(x_img))
    radius = (3.0 * volume * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
    ratios = np.exp(rng.normal(0.0, 0.15, 3))
    ratios /= np.prod(ratios) ** (1.0 / 3.0)
    side = 1.0 if rng.random() < 0.5 else -1.0
    center = (side * 65.0 + float(rng.uniform(-12, 12)), float(rng.uniform(-25, 15)),
              float(rng.uniform(-35, 35)))
    compression: Literal["none", "rle", "jpegls"] = "none"
    signed = bool(rng.random() < 0.3)
    if not signed and rng.random() < 0.14:
        compression = "rle" if rng.random() < 0.5 else "jpegls"

    def uid(kind: str) -> str:
        return str(generate_uid(entropy_srcs=["clinfuse-synth", str(seed), mrn, kind]))

    imaging = ImagingSim(
        acquired=index_time - _minutes(rng, 2 * 60, 20 * 60),
        volume_ml=volume,
        semi_axes_mm=(float(radius * ratios[0]), float(radius * ratios[1]),
                      float(radius * ratios[2])),
        center_mm=center,
        lesion_hu=float(rng.uniform(45.0, 80.0)),
        study_uid=uid("study"), series_uid=uid("series"), frame_uid=uid("frame"),
        accession=f"ACC{int(rng.integers(10**7, 10**8))}",
        signed=signed, compression=compression, shuffled=bool(rng.random() < 0.15),
    )

    # EHR measurements.
    offsets = {}
    if bias and model.bias_lab_group in groups:
        offsets[model.bias_lab] = model.bias_lab_log_offset
    observations, series = _measurements(rng, model, index_time, ed_arrival, admission, z_ehr,
                                         offsets)
    precision, linear = model.ehr_evidence(series)
    if withheld_ehr:
        observations = []

    # Symptoms and notes.
    alpha = np.array([s.alpha for s in model.symptoms])
    beta = np.array([s.beta for s in model.symptoms])
    symptoms = (rng.random(len(alpha)) < sigmoid(alpha + beta * z_note)).astype(np.int8)
    reason = codes.ADMISSION_REASONS[int(rng.integers(len(codes.ADMISSION_REASONS)))]
    n_notes = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    note_times = [admission + _minutes(rng, 60, 240)]
    note_times += [admission + timedelta(hours=24 * d) + _minutes(rng, 8 * 60, 14 * 60)
                   for d in range(1, n_notes)]
    notes = compose_notes(rng, symptoms.astype(bool), model.symptoms, note_times,
                          age=int(age), sex=sex, reason=reason[2])
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

    return PatientSim(
        index=i, mrn=mrn, example_id=f"synth-{i:06d}", family=family, given=given, sex=sex,
        birth_date=birth_date, race=race, ethnicity=ethnicity, language=language,
        age_years=age, age_band=age_band(age), index_time=index_time, ed_arrival=ed_arrival,
        admission=admission, z_img=z_img, z_ehr=z_ehr, z_note=z_note, true_logit=eta,
        p_true=p_true, label=label, event_type=event_type, event_time=event_time,
        withheld_imaging=withheld_imaging, withheld_notes=withheld_notes,
        withheld_ehr=withheld_ehr, x_img=x_img, imaging=imaging, observations=observations,
        ehr_precision=precision, ehr_linear=linear, symptoms=symptoms, notes=notes,
        reason=reason, conditions=conditions, medications=medications, hl7=hl7,
        pixel_seed=pixel_seq, lab_offsets=offsets,
    )


def _schedule(rng: np.random.Generator, index_time: datetime, ed_arrival: datetime,
              admission: datetime) -> tuple[list[datetime], list[datetime]]:
    """Vital-sign times (every 3-6 h) and daily lab times, all at or before the index."""
    vitals, t = [], ed_arrival
    while t <= index_time:
        vitals.append(t)
        t += _minutes(rng, 180, 360)
    if rng.random() < 0.1:  # exactly on the 24 h window edge: in the 72 h window only
        vitals.append(index_time - timedelta(hours=24))
    if rng.random() < 0.1:  # exactly at the index time: visible
        vitals.append(index_time)
    labs = [ed_arrival + _minutes(rng, 10, 60)]
    labs += [admission + timedelta(hours=24 * d) - _minutes(rng, 30, 300) for d in (1, 2, 3)]
    return sorted(set(vitals)), labs


def _measurements(rng: np.random.Generator, model: SynthModel, index_time: datetime,
                  ed_arrival: datetime, admission: datetime, z_ehr: float,
                  offsets: dict[str, float]
                  ) -> tuple[list[ObsSim], dict[str, tuple[np.ndarray, np.ndarray]]]:
    vital_times, lab_times = _schedule(rng, index_time, ed_arrival, admission)
    post_times = []
    if rng.random() < 0.6:
        count = int(rng.integers(1, 4))
        post_times = [index_time + _minutes(rng, 1, 48 * 60) for _ in range(count)]
        if rng.random() < 0.15:
            post_times.append(index_time + timedelta(minutes=1))
        post_times = sorted(set(post_times))
    out: list[ObsSim] = []
    series: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for sig in model.ehr_signals:
        options = observation_codes(sig.name)
        if rng.random() < sig.p_absent:
            continue
        if sig.kind == "vital":
            times = [t for t in vital_times if sig.name != "temperature" or rng.random() < 0.8]
        elif rng.random() < 0.12:
            times = lab_times[:1]  # only the ED draw, > 72 h before the index
        else:
            keep = 0.5 if sig.name == "lactate" else 0.9
            times = lab_times[:1] + [t for t in lab_times[1:] if rng.random() < keep]
        later = [t for t in post_times if rng.random() < 0.5]
        all_times = times + later
        if not all_times:
            continue
        offset_s = np.array([int((t - index_time).total_seconds()) for t in all_times])
        hours_before = -offset_s / 3600.0
        u = float(rng.standard_normal())
        e = rng.standard_normal(len(all_times))
        g = (sig.mu + sig.sd * (sig.loading * model.trend_weight(hours_before) * z_ehr
                                + math.sqrt(1.0 - sig.loading**2) * u)
             + sig.sd * sig.noise * e + offsets.get(sig.name, 0.0))
        spec_true = sig.from_latent(g)
        pre_h, pre_g = [], []
        for k, when in enumerate(all_times):
            code = options[0] if len(options) == 1 or rng.random() < 0.7 else options[1]
            step = 10.0 ** -code.decimals
            value = round(code.from_spec(float(spec_true[k])), code.decimals)
            if sig.transform == "log":
                value = max(value, step)
            elif sig.transform == "deficit100":
                value = min(value, round(100.0 - step, code.decimals))
            value = float(value) + 0.0
            spec_value = code.to_spec(value)
            out.append(ObsSim(sig.name, code, value, spec_value, when, int(offset_s[k])))
            if offset_s[k] <= 0:
                pre_h.append(hours_before[k])
                pre_g.append(float(sig.to_latent(spec_value)) - offsets.get(sig.name, 0.0))
        if pre_g:
            series[sig.name] = (np.array(pre_h), np.array(pre_g))
    return out, series
