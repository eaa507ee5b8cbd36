"""The cohort manifest: the research import format (CSV or Parquet + YAML sidecar).

One row per example. Reserved columns: ``example_id`` (optional, defaults to the
row number), ``patient_id``, ``label`` (0/1), ``index_time`` (optional),
``image`` (path relative to the manifest), ``note`` or ``note_path``. Every other
column is a tabular feature. A blank cell means the modality is missing. The
sidecar ``<name>.yaml`` names the ``sensitive`` and ``categorical`` columns;
sensitive columns are kept for audits and left out of the features unless
``include_sensitive`` is set. See docs/manifest.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from fhir_adapters.errors import Issue

__all__ = ["RESERVED_COLUMNS", "CohortManifest", "ManifestError", "read_manifest"]

RESERVED_COLUMNS = ("example_id", "patient_id", "label", "index_time", "image", "note",
                    "note_path")
REQUIRED_COLUMNS = ("patient_id", "label")


class ManifestError(ValueError):
    """A manifest that cannot be used; names the file, column and rows, never values."""


@dataclass
class CohortManifest:
    """A read, validated manifest."""

    path: Path
    frame: pd.DataFrame
    sensitive: list[str] = field(default_factory=list)
    categorical: list[str] = field(default_factory=list)
    include_sensitive: bool = False
    sidecar: dict[str, Any] = field(default_factory=dict)
    #: File line of each row (rows may have been dropped); None: row i is on line i + 2.
    lines: list[int] | None = None
    #: Located, value-free notices of dropped rows and nulled cells (pipelines.manifest_rows).
    warnings: list[Issue] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return self.path.parent

    def line_of(self, row: int) -> int:
        """The file line of row ``row`` (by position), as a spreadsheet numbers it."""
        return self.lines[row] if self.lines is not None else int(row) + 2

    @property
    def feature_columns(self) -> list[str]:
        """Tabular feature columns, in file order; sensitive ones only if asked for."""
        skip = set(RESERVED_COLUMNS)
        if not self.include_sensitive:
            skip |= set(self.sensitive)
        return [c for c in self.frame.columns if c not in skip]

    @property
    def outcome(self) -> dict[str, Any] | None:
        outcome = self.sidecar.get("outcome")
        return dict(outcome) if isinstance(outcome, dict) else None

    def features(self) -> pd.DataFrame:
        return self.frame[self.feature_columns]

    def image_paths(self) -> list[Path | None]:
        """Absolute image paths per row; None where imaging is missing."""
        if "image" not in self.frame:
            return [None] * len(self.frame)
        return [None if _blank(v) else (self.root / str(v)) for v in self.frame["image"]]

    def notes(self) -> list[str | None]:
        """Note text per row, read from ``note`` or ``note_path``; None where missing."""
        out: list[str | None] = [None] * len(self.frame)
        if "note" in self.frame:
            out = [None if _blank(v) else str(v) for v in self.frame["note"]]
        if "note_path" in self.frame:
            for i, v in enumerate(self.frame["note_path"]):
                if out[i] is None and not _blank(v):
                    out[i] = _read_note(self.root / str(v), f"{self.path}: column "
                                        f"'note_path' on line {self.line_of(i)}")
        return out

    def modalities_present(self) -> pd.DataFrame:
        """Boolean table: which modality each example has."""
        feats = self.features()
        has_ehr = feats.notna().any(axis=1) if len(feats.columns) else pd.Series(
            False, index=self.frame.index)
        return pd.DataFrame({
            "image": [p is not None for p in self.image_paths()],
            "note": [n is not None for n in self.notes()],
            "ehr": has_ehr.to_list(),
        }, index=self.frame.index)


def _read_note(path: Path, where: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{where} names a file that is not UTF-8 text (invalid byte at "
                            f"offset {exc.start})") from None
    except OSError as exc:
        raise ManifestError(f"{where} names a file that cannot be read "
                            f"({exc.strerror or type(exc).__name__})") from None
    except ValueError:  # a NUL character in the path
        raise ManifestError(f"{where} is not a usable file path") from None


def _exists(path: Path) -> bool:
    """Path.exists, False for names the OS refuses (too long, a NUL character)."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _blank(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and pd.isna(value):
        return True
    return isinstance(value, str) and not value.strip()


def read_manifest(
    path: str | Path,
    *,
    sensitive: Sequence[str] | None = None,
    categorical: Sequence[str] | None = None,
    include_sensitive: bool | None = None,
    check_files: bool = True,
    strict: bool = True,
) -> CohortManifest:
    """Read and validate a cohort manifest. Keyword arguments override the sidecar.

    With ``strict=False`` (what ``clinfuse train``, ``score`` and ``evaluate`` use) a bad
    row is dropped and a bad cell nulled, each with a located warning in ``warnings``
    (:mod:`pipelines.manifest_rows`); only a manifest unusable as a whole is refused.

    Raises
    ------
    ManifestError
        Unreadable table or sidecar, missing required columns, or no usable row; when
        ``strict``, also labels other than 0/1, bad index times, duplicate example ids,
        non-numeric feature values, or image/note paths that don't exist.
    """
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"{path}: no such manifest")
    frame = _read_table(path)
    sidecar = _read_sidecar(path)
    manifest = CohortManifest(
        path=path,
        frame=frame,
        sensitive=list(sensitive if sensitive is not None else sidecar.get("sensitive") or []),
        categorical=list(categorical if categorical is not None
                         else sidecar.get("categorical") or []),
        include_sensitive=bool(include_sensitive if include_sensitive is not None
                               else sidecar.get("include_sensitive", False)),
        sidecar=sidecar,
    )
    if not strict:
        _tolerate(manifest, check_files=check_files)
    _validate(manifest, check_files=check_files)
    return manifest


def _tolerate(m: CohortManifest, *, check_files: bool) -> None:
    """Drop bad rows and null bad cells, with warnings; refuse if no row survives."""
    from pipelines.manifest_rows import tolerate_rows

    missing = [c for c in REQUIRED_COLUMNS if c not in m.frame.columns]
    if missing:
        raise ManifestError(f"{m.path}: missing required column(s) {missing}")
    numeric = [c for c in m.feature_columns if c not in m.categorical and c not in m.sensitive]
    frame, lines, issues = tolerate_rows(m.frame, str(m.path), numeric, m.root,
                                         _exists if check_files else (lambda _: True), _blank)
    if frame.empty:
        raise ManifestError(f"{m.path}: no usable row ({len(issues)} problem(s); first: "
                            f"{issues[0].diagnostics.removeprefix(f'{m.path}: ')})")
    m.frame, m.lines, m.warnings = frame, lines, issues


def _read_table(path: Path) -> pd.DataFrame:
    try:
        if path.suffix.lower() in {".parquet", ".pq"}:
            frame = pd.read_parquet(path)
        else:
            with warnings.catch_warnings():
                # Rows longer than the header: pandas would otherwise drop their extra cells
                # (index_col=False) or silently shift every column onto the row index.
                warnings.simplefilter("error", pd.errors.ParserWarning)
                frame = pd.read_csv(path, dtype={"example_id": str, "patient_id": str,
                                                 "image": str, "note": str, "note_path": str},
                                    keep_default_na=True, index_col=False)
    except pd.errors.ParserWarning:
        raise ManifestError(f"{path}: rows have more cells than the header") from None
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise ManifestError(f"{path}: not a readable CSV/Parquet table ({type(exc).__name__})"
                            ) from None
    if frame.empty:
        raise ManifestError(f"{path}: the manifest has no rows")
    return frame


def _read_sidecar(path: Path) -> dict[str, Any]:
    sidecar = path.with_suffix(".yaml")
    if not sidecar.exists():
        return {}
    try:
        data = yaml.safe_load(sidecar.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{sidecar}: invalid YAML ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{sidecar}: expected a mapping at the top level")
    for key in ("sensitive", "categorical"):
        value = data.get(key)
        if value is not None and not (isinstance(value, list) and
                                      all(isinstance(v, str) for v in value)):
            raise ManifestError(f"{sidecar}: '{key}' must be a list of column names")
    if not isinstance(data.get("include_sensitive", False), bool):
        raise ManifestError(f"{sidecar}: 'include_sensitive' must be true or false")
    return data


def _rows(mask: pd.Series) -> str:
    # Row numbers as a spreadsheet shows them (header is line 1), first few only; by
    # position, since the index need not be 0..n-1.
    lines = [str(int(i) + 2) for i in np.flatnonzero(mask.to_numpy())[:5]]
    more = "" if mask.sum() <= 5 else f" and {int(mask.sum()) - 5} more"
    return ", ".join(lines) + more


def _validate(m: CohortManifest, *, check_files: bool) -> None:
    frame, where = m.frame, str(m.path)
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ManifestError(f"{where}: missing required column(s) {missing}")
    if "example_id" not in frame.columns:
        frame.insert(0, "example_id", [str(i) for i in range(len(frame))])
    frame["example_id"] = frame["example_id"].astype(str)
    if frame["example_id"].duplicated().any():
        raise ManifestError(f"{where}: duplicate example_id on line(s) "
                            f"{_rows(frame['example_id'].duplicated())}")
    if frame["patient_id"].isna().any():
        raise ManifestError(f"{where}: blank patient_id on line(s) "
                            f"{_rows(frame['patient_id'].isna())}")
    frame["patient_id"] = frame["patient_id"].astype(str)
    labels = pd.to_numeric(frame["label"], errors="coerce")
    bad = ~labels.isin([0, 1])
    if bad.any():
        raise ManifestError(f"{where}: column 'label' must be 0 or 1; line(s) {_rows(bad)} "
                            "are not")
    frame["label"] = labels.astype(int)
    if "index_time" in frame.columns:
        times = pd.to_datetime(frame["index_time"], utc=True, errors="coerce", format="ISO8601")
        bad = times.isna() & frame["index_time"].notna()
        if bad.any():
            raise ManifestError(f"{where}: column 'index_time' is not an ISO 8601 time on "
                                f"line(s) {_rows(bad)}")
        frame["index_time"] = times
    unknown = [c for c in (*m.sensitive, *m.categorical) if c not in frame.columns]
    if unknown:
        raise ManifestError(f"{where}: sensitive/categorical column(s) {unknown} are not in "
                            "the manifest")
    for column in m.feature_columns:
        if column in m.categorical or column in m.sensitive:
            continue  # group attributes are categorical by nature
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = values.isna() & frame[column].notna()
        if bad.any():
            raise ManifestError(
                f"{where}: feature column {column!r} has non-numeric values on line(s) "
                f"{_rows(bad)}; list it under 'categorical' in the sidecar if it is one")
        frame[column] = values
    if check_files:
        for column in ("image", "note_path"):
            if column not in frame.columns:
                continue
            absent = pd.Series([not _blank(v) and not _exists(m.root / str(v))
                                for v in frame[column]], index=frame.index)
            if absent.any():
                raise ManifestError(f"{where}: column {column!r} names files that don't exist "
                                    f"on line(s) {_rows(absent)}")
