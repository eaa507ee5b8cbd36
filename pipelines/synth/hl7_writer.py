"""HL7 v2.5.1 messages for a patient: ADT^A01, ORU^R01 per measurement time, MDM^T02 per note.

Segments end with CR; messages follow one another in one file. PID-3 is
``MRN^^^SYNTHHOSP&<oid>&ISO^MR``, the same identifier as the FHIR Patient.
The observations and notes are the ones in the patient's FHIR Bundle, with
the same decimal strings and UCUM units.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime

from pipelines.feature_spec import DEFAULT_SPEC
from pipelines.synth import codes
from pipelines.synth.patient import ObsSim, PatientSim

__all__ = ["escape", "messages", "ts"]

_SENDER = "CLINFUSE_SYNTH|SYNTHHOSP|CLINFUSE|CLINFUSE"
_RANGES = {f.name: (f.reference_low, f.reference_high, f.unit) for f in DEFAULT_SPEC.features}


def ts(when: datetime) -> str:
    """HL7 DTM with seconds and an explicit UTC offset."""
    return when.strftime("%Y%m%d%H%M%S") + "+0000"


def escape(text: str) -> str:
    """Escape HL7 delimiters in free text (|^~\\&)."""
    out = text.replace("\\", "\\E\\")
    for char, esc in (("|", "\\F\\"), ("^", "\\S\\"), ("~", "\\R\\"), ("&", "\\T\\")):
        out = out.replace(char, esc)
    return out


def _segment(*fields: str) -> str:
    return "|".join(fields)


def _msh(p: PatientSim, when: datetime, kind: str, control: str) -> str:
    return f"MSH|^~\\&|{_SENDER}|{ts(when)}||{kind}|{control}|P|2.5.1"


def _pid(p: PatientSim) -> str:
    cx = f"{p.mrn}^^^{codes.MRN_AUTHORITY}&{codes.MRN_OID}&ISO^MR"
    race = f"{p.race[0]}^{p.race[1]}^CDCREC"
    ethnicity = f"{p.ethnicity[0]}^{p.ethnicity[1]}^CDCREC"
    fields = ["PID", "1", "", cx, "", f"{p.family}^{p.given}", "",
              p.birth_date.strftime("%Y%m%d"), "M" if p.sex == "male" else "F", "", race]
    fields += [""] * 11 + [ethnicity]  # PID-11 .. PID-21 empty, PID-22 ethnicity
    return _segment(*fields)


def _pv1(p: PatientSim) -> str:
    fields = ["PV1", "1", "I", "MED^101^A"] + [""] * 15 + [f"V{p.mrn[3:]}"]
    fields += [""] * 24 + [ts(p.admission)]  # PV1-19 visit number, PV1-44 admit time
    return _segment(*fields)


def _number(value: float) -> str:
    return repr(float(value))


def _obx(k: int, obs: ObsSim) -> str:
    code = obs.code
    ref = ""
    low, high, unit = _RANGES[obs.feature]
    if code.unit == unit and low is not None and high is not None:
        ref = f"{low:g}-{high:g}"
    return _segment("OBX", str(k), "NM", f"{code.loinc}^{code.display}^LN", "",
                    _number(obs.value), f"{code.unit}^{code.unit}^UCUM", ref, "", "", "", "F",
                    "", "", ts(obs.time))


def messages(p: PatientSim) -> list[str]:
    """The patient's messages, each a CR-terminated string of CR-separated segments."""
    out: list[list[str]] = []
    n = 0

    def control() -> str:
        nonlocal n
        n += 1
        return f"{p.mrn}-{n:04d}"

    out.append([_msh(p, p.admission, "ADT^A01^ADT_A01", control()),
                f"EVN|A01|{ts(p.admission)}", _pid(p), _pv1(p)])
    by_time: dict[datetime, list[ObsSim]] = defaultdict(list)
    for obs in p.observations:
        by_time[obs.time].append(obs)
    for when in sorted(by_time):
        group = by_time[when]
        kind = "vital-signs" if group[0].code.category == "vital-signs" else "laboratory"
        panel = ("85353-1^Vital signs panel^LN" if kind == "vital-signs"
                 else "24323-8^Comprehensive metabolic panel^LN")
        segs = [_msh(p, when, "ORU^R01^ORU_R01", control()), _pid(p), _pv1(p),
                _segment("OBR", "1", "", f"F{p.mrn[3:]}{n:04d}", panel, "", "", ts(when))]
        segs += [_obx(k + 1, obs) for k, obs in enumerate(group)]
        out.append(segs)
    for note in p.notes:
        segs = [_msh(p, note.time, "MDM^T02^MDM_T02", control()), f"EVN|T02|{ts(note.time)}",
                _pid(p), _pv1(p),
                _segment("TXA", "1", "PN", "TX", ts(note.time), "", "", "", "", "", "", "",
                         f"DOC{p.mrn[3:]}{n:04d}", "", "", "", "", "AU")]
        for k, line in enumerate(note.text.split("\n")):
            segs.append(_segment("OBX", str(k + 1), "TX", f"{note.loinc}^{note.display}^LN", "",
                                 escape(line), "", "", "", "", "", "F", "", "", ts(note.time)))
        out.append(segs)
    return ["\r".join(segs) + "\r" for segs in out]
