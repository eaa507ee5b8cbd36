"""``clinfuse evaluate --cv K``: the fused model and simple baselines in the same folds.

For each outer fold (:mod:`pipelines.cv_splits`: patient-grouped and label-stratified,
temporal, or external -- ``--train-manifest A --manifest B`` trains on cohort A and
tests on cohort B, the manifests stacked by :func:`stacked_manifest`):

1. The fused model is trained on the training rows by :func:`pipelines.training.train`,
   the code path of ``clinfuse train`` (its own validation split, image encoder, fusion
   head and calibration all inside the training rows). The training rows are handed to
   it as a manifest of their own (image and note paths made absolute).
2. It scores the test rows as ``clinfuse score`` would (:class:`LoadedModel`).
3. The baselines (:mod:`pipelines.baselines`) are fitted on the same training rows and
   score the same test rows. The tabular encoding (one-hot levels) is fitted on the
   training rows. The image probe reads the fold's trained image encoder's embedding of
   each image; where the fold's fused model has no image encoder (too few images), it
   reads label-free pooled statistics of the preprocessed image tensor instead.
   ``image_features`` in ``cv.json`` says which, per fold.

What no label has touched is computed once and shared by every fold through one cache:
the preprocessed image tensors and the sentence embeddings (MiniLM). TF-IDF
vocabularies, encoders, heads and calibrators are refitted per fold.

Metrics are computed on the pooled out-of-fold scores of all repeats by
:class:`audits.model_comparison.ModelComparison` (patient-bootstrap CIs, paired between
models; a patient's rows from every repeat move together). Only rows that every model
scored are compared (the fused model refuses out-of-population rows).

Outputs in ``out_dir``: ``oof_scores.csv`` (``example_id, patient_id, fold, repeat,
label`` and one column per model), ``cv.json`` and ``cv.html``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd
import torch
import yaml
from threadpoolctl import threadpool_limits

from audits._metrics import exact_metrics
from audits.model_comparison import ModelComparison
from models.artifact import generate_signing_key
from pipelines.baselines import (
    BASELINE_DESCRIPTIONS,
    available_baselines,
    baseline_frame,
    make_baseline,
)
from pipelines.cv_splits import (
    SPLITS,
    Fold,
    SplitError,
    external_fold,
    grouped_folds,
    temporal_folds,
)
from pipelines.imaging.volume import ImageError
from pipelines.manifest import RESERVED_COLUMNS, CohortManifest, read_manifest
from pipelines.model_inputs import (
    ImageTensors,
    ModelDataError,
    TabularEncoding,
    load_images,
    model_volume,
    preprocess_config,
    spatial_dims_of,
)
from pipelines.scoring import LoadedModel, load_model
from pipelines.training import DEFAULT_CONFIG, USER_ERRORS, load_config, train

__all__ = ["FUSED", "cross_validate", "main_evaluate_cv", "stacked_manifest"]

log = logging.getLogger(__name__)

FUSED = "fused"


def cross_validate(manifest_path: str | Path, out_dir: str | Path, *, k: int = 5,
                   repeats: int = 1, split: str = "grouped", seed: int = 0,
                   n_boot: int = 1000, config: dict[str, Any] | None = None,
                   device: str | None = None, cache_dir: str | Path | None = None,
                   train_manifest_path: str | Path | None = None) -> dict[str, Any]:
    """Run the cross-validation; writes ``oof_scores.csv``, ``cv.json``, ``cv.html``.

    Parameters
    ----------
    manifest_path : path
        A labelled cohort manifest.
    out_dir : path
        Created if needed.
    k, repeats : int
        Outer folds; repeats of the grouped split (seeds ``seed + r``).
    split : {"grouped", "temporal", "external"}
        "external": train on ``train_manifest_path``, test on ``manifest_path``
        (one fold; ``k`` is ignored).
    seed : int
        Seeds the splits, the baselines (``seed + repeat``) and the bootstrap.
    n_boot : int
        Patient-bootstrap replicates.
    config : dict, optional
        Overrides of the fused model's training config; its ``seed`` is raised by the
        repeat number in each repeat.
    device : str, optional
        The fused model's device.
    cache_dir : path, optional
        Image tensors and sentence embeddings; default a temporary folder.
    train_manifest_path : path, optional
        The training cohort of the external split.

    Returns
    -------
    dict
        What ``cv.json`` holds.
    """
    started = time.perf_counter()
    if split not in SPLITS:
        raise SplitError(f"--split must be one of {list(SPLITS)}, got {split!r}")
    if split != "grouped" and repeats != 1:
        raise SplitError(f"--split {split} is deterministic; use --repeats 1")
    if (split == "external") != (train_manifest_path is not None):
        raise SplitError("--train-manifest and the external split go together")
    overrides = dict(config or {})
    # The artifact's retrained no-image comparison model is for `clinfuse evaluate
    # --model`; the fold artifacts are discarded, so it would only cost time.
    overrides.setdefault("baseline_without_image", False)
    if device is not None:
        overrides["device"] = device
    manifest = read_manifest(manifest_path, strict=False)
    n_external_train = 0
    if train_manifest_path is not None:
        training = read_manifest(train_manifest_path, strict=False)
        n_external_train = len(training.frame)
        manifest = stacked_manifest(training, manifest)
    frame = manifest.frame
    y = frame["label"].to_numpy(int)
    pids = frame["patient_id"].astype(str).to_numpy()
    if len(np.unique(y)) < 2:
        raise ModelDataError(f"{manifest.path}: every label is {int(y[0])}; cross-validation "
                             "needs both classes")
    if split == "external":
        folds = [external_fold(pids, y, n_external_train)]
    elif split == "temporal":
        if "index_time" not in frame.columns:
            raise SplitError(f"{manifest.path}: --split temporal needs an index_time column")
        folds = temporal_folds(pids, frame["index_time"], y, k)
    else:
        folds = grouped_folds(pids, y, k, repeats=repeats, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="clinfuse-cv-") as tmp:
        work = Path(tmp)
        cache = Path(cache_dir) if cache_dir is not None else work / "cache"
        images, preprocess = _load_all_images(manifest, overrides, cache)
        notes = manifest.notes()
        has_notes = any(n is not None and n.strip() for n in notes)
        key_path = work / "cv.key"
        generate_signing_key(key_path)
        n_rows = len(frame)
        scores: dict[tuple[int, str], np.ndarray] = {}
        fold_records: list[dict[str, Any]] = []
        ran: list[str] | None = None
        skipped: dict[str, str] = {}
        for fold in folds:
            t0 = time.perf_counter()
            log.info("cv: repeat %d fold %d: training the fused model on %d rows (%d patients)",
                     fold.repeat + 1, fold.fold + 1, len(fold.train),
                     len(set(pids[fold.train])))
            model = _train_fold(manifest, fold, overrides, work, cache, key_path)
            fused_seconds = time.perf_counter() - t0
            fused = _score_fold(model, manifest, fold, cache)
            t1 = time.perf_counter()
            encoding = TabularEncoding.fit(manifest, fold.train)
            tab = encoding.transform(frame, str(manifest.path)) if encoding.columns else None
            img, img_source = _image_features(model, images, preprocess, n_rows)
            X = baseline_frame(tab, encoding.columns, notes if has_notes else None, img)
            if ran is None:
                ran, skipped = available_baselines(X)
            # One thread: on cohorts of hundreds of rows OpenMP's thread start-up and spin
            # waits dominate (HistGradientBoosting on 80 rows: 1.47 s with 2 threads on a
            # busy 2-core machine, 0.03 s with one; 5,000 rows take 0.35 s on one).
            with threadpool_limits(limits=1):
                for name in ran:
                    est = make_baseline(name, X.iloc[fold.train],
                                        random_state=seed + fold.repeat)
                    params = ({"groups": pids[fold.train]} if name == "stacked_late_fusion"
                              else {})
                    est.fit(X.iloc[fold.train], y[fold.train], **params)
                    column = scores.setdefault((fold.repeat, name), np.full(n_rows, np.nan))
                    column[fold.test] = est.predict_proba(X.iloc[fold.test])[:, 1]
            scores.setdefault((fold.repeat, FUSED), np.full(n_rows, np.nan))[fold.test] = fused
            fold_records.append({
                "repeat": fold.repeat, "fold": fold.fold, "seed": fold.seed,
                "n_train_rows": len(fold.train), "n_test_rows": len(fold.test),
                "n_train_patients": len(set(pids[fold.train])),
                "n_test_patients": len(set(pids[fold.test])),
                "n_test_events": int(y[fold.test].sum()),
                "n_fused_refused": int(np.isnan(fused).sum()),
                "image_features": img_source,
                "fused_seconds": round(fused_seconds, 1),
                "baselines_seconds": round(time.perf_counter() - t1, 1),
                **_time_range(frame, fold)})
            log.info("cv: repeat %d fold %d done in %.1f s (fused %.1f s)", fold.repeat + 1,
                     fold.fold + 1, time.perf_counter() - t0, fused_seconds)
    assert ran is not None
    models = [FUSED, *ran]
    oof = _oof_table(frame, folds, scores, models)
    oof.to_csv(out / "oof_scores.csv", index=False)
    result = _summarise(oof, models, n_boot=n_boot, seed=seed)
    result.update({
        "baselines": {b: BASELINE_DESCRIPTIONS[b] for b in ran},
        "skipped_baselines": skipped,
        "split": {"kind": split, "k": 1 if split == "external" else k,
                  "repeats": repeats if split == "grouped" else 1,
                  "seeds": sorted({f.seed for f in folds if f.seed is not None}),
                  "rule": _SPLIT_RULES[split]},
        "folds": fold_records,
        "manifest": {"name": manifest.path.name, "n_rows": n_rows,
                     "n_patients": len(set(pids)), "n_events": int(y.sum())},
        **({"external": {"train_manifest": Path(train_manifest_path).name,
                         "n_train_rows": n_external_train,
                         "n_test_rows": n_rows - n_external_train,
                         "n_test_rows_left_out_shared_patients":
                             n_rows - n_external_train - len(folds[0].test)}}
           if train_manifest_path is not None else {}),
        "fused_config_overrides": overrides,
        "wall_seconds": round(time.perf_counter() - started, 1),
    })
    result["comparison"] = result.pop("_comparison_provenance")
    comparison = result.pop("_comparison")
    (out / "cv.json").write_text(json.dumps(result, indent=2, default=_json_default))
    from pipelines.cv_report import write_cv_html

    write_cv_html(result, comparison, out / "cv.html")
    return result


_SPLIT_RULES = {
    "grouped": "StratifiedGroupKFold by patient, stratified by label, shuffled with "
               "random_state = seed + repeat",
    "temporal": "patients ordered by first index_time in K + 1 blocks; fold k trains on "
                "blocks < k (rows strictly before the test block's first index_time) and "
                "tests on block k",
    "external": "one fold: train on every row of --train-manifest, test on --manifest "
                "(test rows of a patient also in the training manifest left out)",
}


def stacked_manifest(train: CohortManifest, test: CohortManifest) -> CohortManifest:
    """The training rows, then the test rows, as one manifest (paths made absolute).

    The training manifest decides the columns and the sidecar: a feature column only
    the test manifest has is not used; one it lacks is refused, as scoring would.
    """
    missing = [c for c in train.feature_columns if c not in test.frame.columns]
    if missing:
        raise ModelDataError(f"{test.path}: lacks the training manifest's feature column(s) "
                             f"{missing[:10]}{' ...' if len(missing) > 10 else ''}")
    reserved = [c for c in test.frame.columns
                if c in RESERVED_COLUMNS and c not in train.frame.columns]
    columns = [*train.frame.columns, *reserved]
    parts = [_absolute_paths(m).reindex(columns=columns) for m in (train, test)]
    lines = [*(train.line_of(i) for i in range(len(train.frame))),
             *(test.line_of(i) for i in range(len(test.frame)))]
    return dataclasses.replace(train, path=test.path,
                               frame=pd.concat(parts, ignore_index=True), lines=lines,
                               warnings=[*train.warnings, *test.warnings])


def _absolute_paths(manifest: CohortManifest) -> pd.DataFrame:
    """The manifest's frame with image and note paths absolute (the manifest's own
    path may be relative to the working directory)."""
    part = manifest.frame.copy()
    root = manifest.root.resolve()
    for column in ("image", "note_path"):
        if column in part.columns:
            part[column] = [None if pd.isna(v) or not str(v).strip()
                            else str(root / str(v)) for v in part[column]]
    return part


def _time_range(frame: pd.DataFrame, fold: Fold) -> dict[str, Any]:
    if "index_time" not in frame.columns:
        return {}
    t = pd.to_datetime(frame["index_time"], utc=True, errors="coerce")
    return {"train_index_time_max": _iso(t.iloc[fold.train].max()),
            "test_index_time_min": _iso(t.iloc[fold.test].min())}


def _iso(value: Any) -> str | None:
    return None if pd.isna(value) else pd.Timestamp(value).isoformat()


def _image_config(overrides: dict[str, Any]) -> dict[str, Any]:
    return {**DEFAULT_CONFIG["image"], **(overrides.get("image") or {})}


def _load_all_images(manifest: CohortManifest, overrides: dict[str, Any], cache: Path
                     ) -> tuple[ImageTensors | None, dict[str, Any] | None]:
    """Every image preprocessed once (as training will), into the shared cache.

    An unusable image is dropped here, so the fold manifests carry the row without it.
    """
    paths = manifest.image_paths()
    rows = np.array([i for i, p in enumerate(paths) if p is not None], dtype=int)
    if not len(rows):
        return None, None
    icfg = _image_config(overrides)
    channels = int(icfg["channels"])
    dims = None
    for r in rows:
        try:
            path = paths[int(r)]
            assert path is not None
            dims = spatial_dims_of(model_volume(path, channels))
            break
        except ImageError:
            continue
    if dims is None:
        raise ModelDataError(f"{manifest.path}: none of the {len(rows)} images can be read")
    size = icfg["spatial_size"] if dims == 3 else icfg["spatial_size_2d"]
    pre = preprocess_config(dims, size, icfg["windows"], channels)
    workers = int(overrides.get("workers", DEFAULT_CONFIG["workers"]))
    images = load_images(manifest, rows, pre, dims, cache, workers=workers)
    return images, pre.to_dict()


def _fold_manifest(manifest: CohortManifest, rows: np.ndarray, folder: Path) -> Path:
    """The rows as a manifest of their own (Parquet keeps types), paths made absolute."""
    folder.mkdir(parents=True, exist_ok=True)
    part = _absolute_paths(manifest).iloc[rows].reset_index(drop=True)
    path = folder / "manifest.parquet"
    part.to_parquet(path, index=False)
    path.with_suffix(".yaml").write_text(yaml.safe_dump(manifest.sidecar, sort_keys=False))
    return path


def _train_fold(manifest: CohortManifest, fold: Fold, overrides: dict[str, Any], work: Path,
                cache: Path, key_path: Path) -> LoadedModel:
    folder = work / f"repeat{fold.repeat}-fold{fold.fold}"
    fold_manifest = _fold_manifest(manifest, fold.train, folder)
    cfg = dict(overrides)
    cfg["seed"] = int(cfg.get("seed", DEFAULT_CONFIG["seed"])) + fold.repeat
    model_dir = train(fold_manifest, folder / "model", config=cfg, signing_key=key_path,
                      cache_dir=cache, warn_small=False)
    return load_model(model_dir, trusted_keys=[key_path.with_name(key_path.name + ".pub")],
                      device=str(overrides.get("device", DEFAULT_CONFIG["device"])))


def _score_fold(model: LoadedModel, manifest: CohortManifest, fold: Fold, cache: Path
                ) -> np.ndarray:
    """The fused model's P(event) on the test rows; NaN where it refuses a row."""
    test = dataclasses.replace(manifest,
                               frame=manifest.frame.iloc[fold.test].reset_index(drop=True).copy(),
                               lines=[manifest.line_of(int(i)) for i in fold.test], warnings=[])
    inputs = model.inputs(test, cache)
    out = np.full(len(fold.test), np.nan)
    rows = np.flatnonzero(inputs.in_population)
    if len(rows):
        out[rows] = model.predict(inputs, rows)
    return out


def _image_features(model: LoadedModel, images: ImageTensors | None,
                    preprocess: dict[str, Any] | None, n_rows: int
                    ) -> tuple[np.ndarray | None, str | None]:
    """(n_rows, d) image features, NaN without an image, and what they are."""
    if images is None or not len(images.keys):
        return None, None
    if model.image is not None and model.preprocess is not None and \
            model.preprocess.to_dict() == preprocess:
        feats = np.hstack([enc.embed(images.tensors, device=model.device)
                           for enc in model.image])
        source = (f"the fold's image encoder embedding ({model.image[0].network_name_}, "
                  f"{feats.shape[1]} features)")
    else:
        feats = tensor_statistics(images.tensors)
        source = (f"pooled image-tensor statistics ({feats.shape[1]} features; the fold's "
                  "fused model has no image encoder)")
    out = np.full((n_rows, feats.shape[1]), np.nan)
    out[images.rows] = feats
    return out, source


def tensor_statistics(tensors: torch.Tensor) -> np.ndarray:
    """Label-free summaries of each preprocessed image, per channel: mean, SD, the 10th,
    25th, 50th, 75th and 90th percentiles and the fractions above 0.25, 0.5 and 0.75."""
    x = tensors.float().reshape(tensors.shape[0], tensors.shape[1], -1).numpy()
    q = np.quantile(x, [0.1, 0.25, 0.5, 0.75, 0.9], axis=2).transpose(1, 2, 0)
    parts = [x.mean(axis=2)[..., None], x.std(axis=2)[..., None], q,
             *((x > t).mean(axis=2)[..., None] for t in (0.25, 0.5, 0.75))]
    return np.concatenate(parts, axis=2).reshape(len(x), -1)


def _oof_table(frame: pd.DataFrame, folds: Sequence[Fold],
               scores: dict[tuple[int, str], np.ndarray], models: Sequence[str]
               ) -> pd.DataFrame:
    parts = []
    for fold in folds:
        part = pd.DataFrame({"example_id": frame["example_id"].iloc[fold.test].to_numpy(),
                             "patient_id": frame["patient_id"].iloc[fold.test].to_numpy(),
                             "fold": fold.fold, "repeat": fold.repeat,
                             "label": frame["label"].iloc[fold.test].to_numpy(int)})
        for m in models:
            part[m] = scores[(fold.repeat, m)][fold.test]
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def _summarise(oof: pd.DataFrame, models: Sequence[str], *, n_boot: int, seed: int
               ) -> dict[str, Any]:
    scored = oof[list(models)].notna().all(axis=1).to_numpy()
    rows = oof[scored]
    y = rows["label"].to_numpy(int)
    comparison = ModelComparison(y, {m: rows[m].to_numpy(float) for m in models},
                                 rows["patient_id"].astype(str).to_numpy(), n_boot=n_boot,
                                 seed=seed)
    baselines = [m for m in models if m != FUSED]
    best = max(baselines, key=lambda m: comparison.points[m]["auroc"]) if baselines else None
    per_repeat: dict[str, list[float | None]] = {m: [] for m in models}
    for _, part in rows.groupby("repeat", sort=True):
        yy = part["label"].to_numpy(int)
        for m in models:
            value = (exact_metrics(part[m].to_numpy(float), yy, 0.5)["auroc"]
                     if len(np.unique(yy)) == 2 else float("nan"))
            per_repeat[m].append(value if np.isfinite(value) else None)
    return {
        "models": {m: comparison.model_dict(m) for m in models},
        "best_baseline": best,
        "fused_minus_best": (comparison.difference(FUSED, best, "auroc").to_dict()
                             if best is not None else None),
        "auroc_per_repeat": per_repeat,
        "n_scored_rows": int(scored.sum()),
        "n_rows_not_scored_by_every_model": int((~scored).sum()),
        "_comparison_provenance": comparison.provenance(),
        "_comparison": comparison,
    }


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def main_evaluate_cv(manifest: str | Path, out_dir: str | Path, *, k: int, repeats: int = 1,
                     split: str = "grouped", n_boot: int = 1000, seed: int = 0,
                     config_path: str | Path | None = None, device: str | None = None,
                     cache_dir: str | Path | None = None, stderr: TextIO | None = None,
                     train_manifest: str | Path | None = None) -> int:
    """CLI body of ``clinfuse evaluate --cv``: 0 on success, 1 with a one-line reason."""
    stream = stderr if stderr is not None else sys.stderr
    try:
        result = cross_validate(manifest, out_dir, k=k, repeats=repeats, split=split,
                                seed=seed, n_boot=n_boot, config=load_config(config_path),
                                device=device, cache_dir=cache_dir,
                                train_manifest_path=train_manifest)
    except (*USER_ERRORS, ModelDataError, ValueError) as exc:
        stream.write(f"clinfuse evaluate: {exc}\n")
        return 1
    fused = result["models"][FUSED]
    best = result["best_baseline"]
    line = f"clinfuse evaluate: fused AUROC {_num(fused['auroc'])}"
    if best is not None:
        diff = result["fused_minus_best"]
        line += (f", best baseline {best} {_num(result['models'][best]['auroc'])}, fused - "
                 f"best {_num(diff['estimate'], True)} [{_num(diff['ci'][0], True)}, "
                 f"{_num(diff['ci'][1], True)}]")
    stream.write(f"{line}; wrote {Path(out_dir) / 'cv.html'} in {result['wall_seconds']} s\n")
    return 0


def _num(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


