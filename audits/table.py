"""Read and check a score table (``clinfuse score`` output) before any arithmetic.

Every problem raises :class:`AuditInputError` with what was found and how to
fix it, so a compliance officer never sees a traceback or a silent NaN.
"""

from __future__ import annotations

import getpass
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["MODALITY_COLUMNS", "AuditInputError", "ScoreTable", "load_score_table",
           "read_sidecar_sensitive"]

#: Boolean availability columns and the modality name each stands for.
MODALITY_COLUMNS = {"has_image": "imaging", "has_ehr": "EHR", "has_note": "notes"}
_REQUIRED = ("patient_id", "score", "label")
_MODALITY_TOKENS = {"has_image": "image", "has_ehr": "ehr", "has_note": "note"}


class AuditInputError(ValueError):
    """The score table cannot be audited as given; the message says how to fix it."""


@dataclass
class ScoreTable:
    """A checked score table plus what the report must record about it."""

    data: pd.DataFrame  # refusals removed; score float, label int
    sensitive: list[str]
    threshold: float
    threshold_source: str
    modalities: list[str]  # availability columns present (keys of MODALITY_COLUMNS)
    fingerprint: str | None = None  # sha256 of the file read
    source: str | None = None
    n_refused: int = 0
    model_version: list[str] = field(default_factory=list)
    window: tuple[str | None, str | None] = (None, None)
    run_by: str = ""


def read_sidecar_sensitive(path: str | Path) -> list[str]:
    """The ``sensitive: [...]`` list of a manifest sidecar YAML."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise AuditInputError(f"cannot read manifest sidecar {path}: {exc}") from exc
    sensitive = data.get("sensitive") if isinstance(data, dict) else None
    if not isinstance(sensitive, list) or not all(isinstance(s, str) for s in sensitive):
        raise AuditInputError(f"manifest sidecar {path} has no 'sensitive: [...]' list of "
                              f"column names; pass --sensitive sex,race,... instead")
    return list(sensitive)


def _bool_column(values: pd.Series, name: str) -> pd.Series:
    if values.dtype == bool:
        return values
    mapped = values.astype(str).str.strip().str.lower().map(
        {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False})
    if mapped.isna().any():
        bad = values[mapped.isna()].iloc[0]
        raise AuditInputError(f"column {name!r} must be true/false, found {bad!r}")
    return mapped.astype(bool)


def load_score_table(source: str | Path | pd.DataFrame, *,
                     sensitive: Sequence[str] | None = None,
                     threshold: float | str = "threshold",
                     window: tuple[Any, Any] | None = None,
                     max_levels: int = 50,
                     run_by: str | None = None) -> ScoreTable:
    """Read ``source`` (CSV path or DataFrame) and check it.

    Parameters
    ----------
    sensitive : list of str, optional
        Sensitive attribute columns; if omitted, the usual ones present
        (sex, race, ethnicity, age_band, language, payer) are used.
    threshold : float or str, default "threshold"
        The decision threshold, or the column holding it (one value throughout).
    window : (start, end), optional
        Keep rows whose ``index_time`` lies in ``[start, end)``.
    max_levels : int, default 50
        More levels than this in one attribute is refused (free text or an id).

    Raises
    ------
    AuditInputError
        Missing column, scores outside [0, 1], labels not 0/1, empty window,
        an attribute with too many levels, or an unusable threshold.
    """
    fingerprint = None
    where = "the score table"
    if isinstance(source, pd.DataFrame):
        df = source.copy()
        # An in-memory table has no file bytes; its fingerprint hashes the column names
        # and pandas' per-row hashes (fast even for a million rows), so a report built
        # from it can still be tied to its data.
        digest = hashlib.sha256("\x1f".join(map(str, df.columns)).encode())
        try:
            digest.update(pd.util.hash_pandas_object(df, index=False).to_numpy().tobytes())
            fingerprint = digest.hexdigest()
            where = "in-memory table (sha256 of column names and pandas row hashes)"
        except TypeError:  # unhashable cells (lists, dicts): report no fingerprint
            fingerprint = None
    else:
        path = Path(source)
        where = str(path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise AuditInputError(f"cannot read scores file {path}: {exc.strerror}") from exc
        fingerprint = hashlib.sha256(raw).hexdigest()
        try:
            df = pd.read_csv(path, low_memory=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise AuditInputError(f"{path} is not a readable CSV score table: {exc}") from exc
    if sensitive is None:
        sensitive = [c for c in ("sex", "race", "ethnicity", "age_band", "language", "payer")
                     if c in df.columns]
        if not sensitive:
            raise AuditInputError(f"{where} has no sensitive attribute columns; pass "
                                  f"--sensitive or a manifest sidecar with 'sensitive: [...]'")
    sensitive = list(dict.fromkeys(sensitive))
    need = [*_REQUIRED, *sensitive]
    if isinstance(threshold, str):
        need.append(threshold)
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise AuditInputError(f"{where} is missing column(s) {missing}; it has "
                              f"{list(df.columns)}")

    n_refused = 0
    if "refusal" in df.columns:
        refused = df["refusal"].notna() & (df["refusal"].astype(str).str.strip() != "")
        n_refused = int(refused.sum())
        df = df.loc[~refused]
    if window is not None:
        if "index_time" not in df.columns:
            raise AuditInputError(f"a window was requested but {where} has no index_time")
        t = pd.to_datetime(df["index_time"], utc=True, errors="coerce", format="mixed")
        lo, hi = (pd.Timestamp(w, tz="UTC") if w is not None and pd.Timestamp(w).tzinfo is None
                  else (pd.Timestamp(w) if w is not None else None) for w in window)
        keep = pd.Series(True, index=df.index)
        if lo is not None:
            keep &= t >= lo
        if hi is not None:
            keep &= t < hi
        df = df.loc[keep]
    if df.empty:
        span = f" in the window {window[0]} to {window[1]}" if window is not None else ""
        extra = f" ({n_refused} refused rows removed)" if n_refused else ""
        raise AuditInputError(f"no scored rows{span} in {where}{extra}: nothing to audit")

    score = pd.to_numeric(df["score"], errors="coerce")
    if score.isna().any():
        raise AuditInputError(f"{int(score.isna().sum())} row(s) of {where} have no numeric "
                              f"score (first: {df['score'][score.isna()].iloc[0]!r}); remove "
                              f"them or mark them in a 'refusal' column")
    bad = (score < 0) | (score > 1)
    if bad.any():
        raise AuditInputError(f"{int(bad.sum())} score(s) in {where} lie outside [0, 1] "
                              f"(range {score.min():.4g} to {score.max():.4g}); the audit "
                              f"needs probabilities, not logits or percentages")
    label = pd.to_numeric(df["label"], errors="coerce")
    if not label.isin([0, 1]).all():
        found = sorted(map(str, pd.unique(df["label"][~label.isin([0, 1])])))[:5]
        raise AuditInputError(f"labels in {where} must be 0 or 1, found {found}")
    for col in sensitive:
        levels = df[col].fillna("(missing)").astype(str).nunique()
        if levels > max_levels:
            raise AuditInputError(
                f"sensitive attribute {col!r} has {levels} levels (the limit is {max_levels}): "
                f"probably free text or an identifier. Audit a coarser grouping (e.g. "
                f"bands or categories) or raise max_levels")

    if isinstance(threshold, str):
        values = pd.to_numeric(df[threshold], errors="coerce").dropna().unique()
        if values.size != 1:
            raise AuditInputError(f"threshold column {threshold!r} must hold one value, found "
                                  f"{sorted(values.tolist())[:5]}; pass the threshold to "
                                  f"audit as a number")
        t_value, t_source = float(values[0]), f"column {threshold}"
    else:
        t_value, t_source = float(threshold), "given"
    if not 0.0 < t_value <= 1.0:
        raise AuditInputError(f"decision threshold must lie in (0, 1], got {t_value}")

    out = pd.DataFrame({"patient_id": df["patient_id"].astype(str).to_numpy(),
                        "score": score.to_numpy(float), "label": label.to_numpy(int)})
    for col in sensitive:
        out[col] = df[col].fillna("(missing)").astype(str).to_numpy()
    modalities = [c for c in MODALITY_COLUMNS if c in df.columns]
    for col in modalities:
        out[col] = _bool_column(df[col], col).to_numpy()
    if not modalities and "modalities" in df.columns:
        tokens = df["modalities"].fillna("").astype(str).str.split("+")
        for col, tok in _MODALITY_TOKENS.items():
            out[col] = tokens.map(lambda parts, t=tok: t in parts).to_numpy(bool)
        modalities = list(_MODALITY_TOKENS)
    versions = (sorted(map(str, df["model_version"].dropna().unique()))
                if "model_version" in df.columns else [])
    seen: tuple[str | None, str | None] = (None, None)
    if "index_time" in df.columns:
        t = pd.to_datetime(df["index_time"], utc=True, errors="coerce", format="mixed")
        if t.notna().any():
            seen = (t.min().isoformat(), t.max().isoformat())
    return ScoreTable(data=out.reset_index(drop=True), sensitive=sensitive, threshold=t_value,
                      threshold_source=t_source, modalities=modalities,
                      fingerprint=fingerprint, source=None if fingerprint is None else where,
                      n_refused=n_refused, model_version=versions, window=seen,
                      run_by=run_by or _os_user())


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        return "unknown"


def codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(levels, integer code per row)."""
    levels, inverse = np.unique(values, return_inverse=True)
    return levels, inverse
