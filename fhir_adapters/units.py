"""UCUM unit conversion for the units clinical labs and vitals use.

Conversions between mass and substance concentration (glucose mg/dL <-> mmol/L)
need the analyte's molar mass, so callers pass it; without it such a pair is
incommensurable, and so is any pair of different dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass

from fhir_adapters.errors import Issue, UnitError

__all__ = ["UnitError", "canonical_unit", "convert", "is_known_unit"]


@dataclass(frozen=True)
class _Unit:
    dimension: str
    factor: float  # to the dimension's base unit
    offset: float = 0.0  # added after scaling (temperatures only)


# Base units: g/L, mol/L, eq/L, /L (counts), /min, mm[Hg], Cel, 1, kg, m, s, g/mol-free ratios.
_UNITS: dict[str, _Unit] = {
    # mass concentration
    "g/L": _Unit("mass/vol", 1.0),
    "g/dL": _Unit("mass/vol", 10.0),
    "mg/dL": _Unit("mass/vol", 1e-2),
    "mg/L": _Unit("mass/vol", 1e-3),
    "ug/L": _Unit("mass/vol", 1e-6),
    "ng/mL": _Unit("mass/vol", 1e-6),
    "pg/mL": _Unit("mass/vol", 1e-9),
    "ug/dL": _Unit("mass/vol", 1e-5),
    # substance concentration
    "mol/L": _Unit("subst/vol", 1.0),
    "mmol/L": _Unit("subst/vol", 1e-3),
    "umol/L": _Unit("subst/vol", 1e-6),
    "nmol/L": _Unit("subst/vol", 1e-9),
    # charge equivalents (converted to substance with the ion's valence)
    "meq/L": _Unit("eq/vol", 1e-3),
    "mEq/L": _Unit("eq/vol", 1e-3),
    # number concentration
    "10*3/uL": _Unit("count/vol", 1e9),
    "10*9/L": _Unit("count/vol", 1e9),
    "10*6/uL": _Unit("count/vol", 1e12),
    "10*12/L": _Unit("count/vol", 1e12),
    "/uL": _Unit("count/vol", 1e6),
    "/L": _Unit("count/vol", 1.0),
    # rates
    "/min": _Unit("rate", 1.0),
    "{beats}/min": _Unit("rate", 1.0),
    "{breaths}/min": _Unit("rate", 1.0),
    "/h": _Unit("rate", 1 / 60),
    # pressure
    "mm[Hg]": _Unit("pressure", 1.0),
    "kPa": _Unit("pressure", 7.500615),
    # temperature
    "Cel": _Unit("temperature", 1.0),
    "[degF]": _Unit("temperature", 5 / 9, -32 * 5 / 9),
    "K": _Unit("temperature", 1.0, -273.15),
    # ratios
    "%": _Unit("ratio", 1e-2),
    "1": _Unit("ratio", 1.0),
    # mass, length, time
    "kg": _Unit("mass", 1.0),
    "g": _Unit("mass", 1e-3),
    "[lb_av]": _Unit("mass", 0.45359237),
    "m": _Unit("length", 1.0),
    "cm": _Unit("length", 1e-2),
    "mm": _Unit("length", 1e-3),
    "[in_i]": _Unit("length", 0.0254),
    "kg/m2": _Unit("bmi", 1.0),
    "s": _Unit("time", 1.0),
    "min": _Unit("time", 60.0),
    "h": _Unit("time", 3600.0),
    "d": _Unit("time", 86400.0),
}

# Common non-UCUM spellings seen in HL7 v2 feeds and older FHIR servers.
_ALIASES: dict[str, str] = {
    "mg/dl": "mg/dL",
    "g/dl": "g/dL",
    "mmol/l": "mmol/L",
    "umol/l": "umol/L",
    "µmol/L": "umol/L",
    "meq/l": "mEq/L",
    "mmHg": "mm[Hg]",
    "mm hg": "mm[Hg]",
    "bpm": "/min",
    "beats/min": "/min",
    "breaths/min": "/min",
    "degC": "Cel",
    "°C": "Cel",
    "C": "Cel",
    "degF": "[degF]",
    "°F": "[degF]",
    "F": "[degF]",
    "K/uL": "10*3/uL",
    "x10E3/uL": "10*3/uL",
    "10^3/uL": "10*3/uL",
    "lb": "[lb_av]",
    "lbs": "[lb_av]",
    "in": "[in_i]",
    "kg/m^2": "kg/m2",
}


def canonical_unit(unit: str) -> str:
    """The UCUM code for ``unit``, resolving common non-UCUM spellings."""
    unit = unit.strip()
    if unit in _UNITS:
        return unit
    return _ALIASES.get(unit, _ALIASES.get(unit.lower(), unit))


def is_known_unit(unit: str) -> bool:
    return canonical_unit(unit) in _UNITS


def convert(
    value: float,
    from_unit: str,
    to_unit: str,
    *,
    molar_mass: float | None = None,
    valence: int | None = None,
    where: str | None = None,
) -> float:
    """Convert ``value`` from one UCUM unit to another.

    Parameters
    ----------
    molar_mass
        g/mol of the analyte; enables mass <-> substance concentration.
    valence
        Charge of the ion; enables mEq/L <-> mmol/L.
    where
        Location named in the error when the units are incommensurable.

    Raises
    ------
    UnitError
        When either unit is unknown or the two are incommensurable.
    """
    src_code, dst_code = canonical_unit(from_unit), canonical_unit(to_unit)
    if src_code == dst_code:
        return value
    src, dst = _UNITS.get(src_code), _UNITS.get(dst_code)
    if src is None or dst is None:
        unknown = from_unit if src is None else to_unit
        raise UnitError(Issue("value", f"unknown UCUM unit {unknown!r}", where))
    base = value * src.factor + src.offset
    base = _bridge(base, src.dimension, dst.dimension, molar_mass, valence, src_code, dst_code,
                   where)
    return (base - dst.offset) / dst.factor


def _bridge(
    base: float,
    src_dim: str,
    dst_dim: str,
    molar_mass: float | None,
    valence: int | None,
    src_code: str,
    dst_code: str,
    where: str | None,
) -> float:
    if src_dim == dst_dim:
        return base
    pair = (src_dim, dst_dim)
    if molar_mass is not None and pair == ("mass/vol", "subst/vol"):
        return base / molar_mass
    if molar_mass is not None and pair == ("subst/vol", "mass/vol"):
        return base * molar_mass
    if valence is not None and pair == ("eq/vol", "subst/vol"):
        return base / valence
    if valence is not None and pair == ("subst/vol", "eq/vol"):
        return base * valence
    hint = ""
    if {src_dim, dst_dim} == {"mass/vol", "subst/vol"}:
        hint = " (mass and substance concentration need the analyte's molar mass)"
    raise UnitError(
        Issue(
            "value",
            f"unit {src_code!r} ({src_dim}) cannot be converted to {dst_code!r} ({dst_dim}){hint}",
            where,
        )
    )
