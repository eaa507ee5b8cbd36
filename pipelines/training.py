"""Train the late-fusion risk model from a cohort manifest into a signed artifact.

Steps (all seeded):

1. Read the manifest; split patients (grouped, stratified by label) into train
   and validation, and optionally a separate calibration split.
2. Tabular: one-hot levels, imputation, missing indicators and scaling, all fitted
   on the training split only.
3. Notes: pooled sentence embeddings, MiniLM or negation-marked TF-IDF (fitted on
   the training notes only), chosen by inner CV of the note head
   (:mod:`models.note_learner`). The artifact records which encoder and the choice.
4. Images, stage 1: the image encoder trains on the training split's images via
   its auxiliary head (early stopping on validation images); then it is frozen and
   every series is embedded once (cached per series key and encoder hash). With
   ``image.head_refit="joint"`` (default) the auxiliary head is then refitted as the
   image branch of a fusion fit on the whole embedding beside the other modalities,
   and its logit is the image's fusion input.
5. Stage 2: the fusion model trains on the training split with modality dropout,
   its L2 strengths chosen on validation. With a FHIR-spec EHR table, each statistic's
   columns across vitals and labs (and their missing indicators) are one block whose
   weights lie in its top ``fusion.ehr_rank`` principal directions on the training rows.
6. Calibration (Platt with per-missingness-pattern intercepts by default;
   temperature and isotonic remain options) on the validation split, or on a
   separate patient-grouped calibration split (``calibration_split="separate"``);
   metrics on the validation split.
7. The artifact: config (outcome, population, feature source, thresholds,
   preprocessing), weights, scaler, calibration, metrics and a training-data
   fingerprint (keyed hashes of patient ids, counts, label rate, manifest sha256).
   No raw rows and no identifiers.

Signing: pass ``signing_key`` (a PEM path). Without one a key pair is generated
beside the artifact as ``<out>.key``/``<out>.key.pub`` -- **demo only**: a real
deployment signs with a key the service was configured to trust. The keyed-hash
salt for patient ids is a site secret kept beside the artifact as ``<out>.salt``
(never inside it); evaluation uses it to check train/test patient overlap.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import yaml
from sklearn.model_selection import StratifiedGroupKFold

from models.artifact import ArtifactError, generate_signing_key, load_signing_key, save_artifact
from models.fusion import MODALITIES, Branch, FusionRiskModel
from models.fusion_crossfit import crossfit_head
from models.fusion_simplify import compare_fusion_heads
from models.image_encoder import ImageEncoder
from models.note_encoder import NoteEncoderUnavailableError, TfidfNoteEncoder
from models.note_scorer import TfidfLrNoteScorer
from models.privacy import PatientOverlapError, hashed_ids, new_salt
from models.tabular import TabularPreprocessor
from models.tabular_learner import TabularLearner
from pipelines.evaluation import auprc, auroc, brier_score, expected_calibration_error
from pipelines.feature_spec import DEFAULT_SPEC, FeatureSpec
from pipelines.image_choice import choose_image_network
from pipelines.imaging.volume import ImageError
from pipelines.manifest import CohortManifest, ManifestError, read_manifest
from pipelines.model_inputs import (
    DEFAULT_WINDOWS,
    ImageTensors,
    ModelDataError,
    TabularEncoding,
    encoder_hash,
    image_logits,
    load_images,
    modality_mask,
    model_volume,
    preprocess_config,
    spatial_dims_of,
)
from pipelines.note_choice import NoteChoice, choose_notes
from pipelines.note_evidence import BoilerplateSentences

__all__ = ["DEFAULT_CONFIG", "MODEL_FORMAT", "TrainingError", "main_train", "train"]

log = logging.getLogger(__name__)

#: The layout of this package's model config inside the artifact; scoring refuses others.
MODEL_FORMAT = "clinfuse-late-fusion/1"

#: Below this many patients ``train`` points to ``clinfuse evaluate --cv`` (issue 18).
SMALL_COHORT_PATIENTS = 500

DEFAULT_CONFIG: dict[str, Any] = {
    "model_name": "clinfuse-late-fusion",
    "model_version": "1.0.0",
    "seed": 0,
    "device": "auto",
    "val_fraction": 0.2,
    # The fusion head is a convex fit (solver "lbfgs") that uses the validation split
    # only to pick per-branch L2 strengths from a short grid, so calibrating on that
    # split costs little optimism; carving out a separate one ("separate") costs
    # training rows and leaves the rarer missingness patterns a few dozen patients.
    # Measured at train 1,000 / eval 2,000 (seeds 21/22): "validation" AUROC 0.800,
    # ECE 0.019 (per pattern 0.024/0.030); "separate" 0.784, 0.040 (0.027/0.054).
    "calibration_split": "validation",  # or "separate": carve it out of the training split
    "calibration_fraction": 0.15,
    # Platt slope and intercept plus a shrunk intercept offset per missingness pattern
    # (models.calibration.PlattScaling); "platt", "temperature" and "isotonic" remain.
    "calibration": "platt-pattern",
    "decision_thresholds": {"high_risk": 0.3, "moderate_risk": 0.1},
    "progress": False,
    "workers": 2,
    "image": {
        "network": "auto", "embedding_dim": 16, "max_epochs": 6, "patience": 3,
        "batch_size": 32, "lr": 2e-3, "weight_decay": 1e-4, "augment": True,
        # 2-D: a radiograph's fine texture (interstitial lines a few pixels wide at 256)
        # is averaged away at 64x64. --realism hard, train 2,000 (seed 0), compact CNN:
        # validation AUROC of the image logit 0.609 at 64, 0.689 at 128, 0.619 at 224
        # (six epochs underfit there); image stage 10 s / 19 s / 139 s on 2 cores.
        # Pretrained backbones were trained at 224: set [224, 224] with pretrained_path.
        "spatial_size": [64, 64, 32], "spatial_size_2d": [128, 128],
        "windows": DEFAULT_WINDOWS, "pretrained_path": None, "min_images": 20,
        # "auto" (pipelines.image_choice): the pretrained backbone of
        # pretrained_architecture when pretrained_path (a local state dict, never
        # downloaded; docs/image-weights.md) is given, frozen with a linear probe unless
        # finetune; else a small CNN from scratch, with a warning. Never "threshold" or
        # "burden" (tuned to the synthetic lesion) unless named, as the synth recipe does.
        "pretrained_architecture": "densenet121", "finetune": False,
        "crossfit_folds": 1,
        # Input channels: 1 takes colour images as BT.601 luma, 3 takes them as RGB
        # (grey replicated); pipelines.imaging.colour.
        "channels": 1,
        # "joint": after stage 1, the encoder's auxiliary head is refitted as the image
        # branch of a fusion model fed the whole embedding alongside the other
        # modalities, so the head weighs the embedding's features adjusted for what EHR
        # and notes already say; the fusion input stays the (new) auxiliary logit.
        # "none" keeps the head stage 1 learned from the images alone. With the
        # "threshold" network, train 2,000 / eval 5,000: fused AUROC +0.003 to +0.009 per
        # seed pair over the previous default (docs/evaluation).
        "head_refit": "joint",
    },
    "fusion": {
        "hidden": 0, "dropout": 0.2, "modality_dropout": 0.15, "lr": 1e-2,
        "weight_decay": 1e-2, "l2": [0.003, 0.01, 0.03, 0.1, 0.3], "l2_dim_power": 0.5,
        "max_epochs": 300, "min_epochs": 20, "patience": 50, "batch_size": 256,
        # "auto": the exact full-batch fit (L-BFGS) for linear branches; AdamW with
        # early stopping only when hidden > 0. At train 1,000 / eval 2,000 the exact fit
        # gave fused AUROC 0.799 against AdamW's 0.766 on the same inputs.
        "solver": "auto",
        # FHIR-spec EHR columns: each statistic's columns across vitals and labs (every
        # course mean, every trend, every count) and the missing indicators are each one
        # block whose weights lie in its top-k principal directions on the training rows
        # (principal-component regression; age keeps its own weight); null: a free weight
        # per column. Train 2,000 / eval 5,000, seed pairs 0 and 3, the fusion head alone
        # refitted: fused AUROC 0.830 -> 0.835 and 0.829 -> 0.837 (k = 1: 0.835, 0.839;
        # k = 3: 0.833, 0.836). Manifest-column models keep a weight per column.
        "ehr_rank": 2,
        # "auto" (models.fusion_simplify): patient-grouped inner CV on the training rows
        # compares this head with modality subsets of it (and a linear head when hidden >
        # 0) and ships a simpler one only when its inner log-loss is lower by more than
        # one patient-clustered SE of the paired difference; "off" records, never ships.
        "simplify": "auto", "simplify_folds": 3,
        # Cohorts under this many patients (models.fusion_crossfit): the head is fitted on
        # the training and validation splits together, its shared L2 chosen by grouped
        # K-fold CV (one-SE rule) and its calibration fitted on the out-of-fold logits,
        # instead of both on a validation split of a few dozen patients. 0 (default):
        # never; opt in with e.g. 500 (SMALL_COHORT_PATIENTS). Not the default: on the
        # 200-patient hard cohorts (evaluate --cv 5, seeds 200-204) it raised the pooled
        # out-of-fold AUROC from 0.495 to 0.529 (still 0.06 behind the best baseline),
        # but on the default synth world's 200-patient test cohort it lowered the fused
        # AUROC on 300 fresh patients from 0.705 to 0.617 (docs/evaluation/hard-world).
        # Its L2 grid reaches two decades below fusion.l2's: scored by recalibrated
        # log-loss, a lightly penalised head (scikit-learn's C = 1 on ~160 rows is about
        # 3e-4 here) can win where it ranks patients better.
        "crossfit_below": 0, "crossfit_folds": 5,
        "crossfit_l2": [0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3],
        # Its calibration: a temperature alone. An intercept per missingness pattern rests
        # on a handful of events each here, and such rates run against held-out labels
        # (models.fusion_crossfit); 200-patient hard cohorts, 5 seeds, replayed heads:
        # pooled out-of-fold AUROC 0.529 with "temperature", 0.479 "platt-pattern".
        "crossfit_calibration": "temperature",
        # "one-se": the strongest L2 within one SE of the best; "best": the best.
        # crossfit_bias_penalty: the branch biases get the L2 too (FusionRiskModel.bias_l2).
        "crossfit_rule": "one-se", "crossfit_bias_penalty": True,
    },
    # The EHR branch's learner (models.tabular_learner): "auto" picks the linear head or
    # gradient-boosted trees (fixed conservative settings) by patient-grouped inner CV
    # log-loss on the training split; "linear" or "gbm" force one.
    "tabular": {"learner": "auto", "inner_folds": 5},
    # The notes learner (models.note_learner): "auto" keeps MiniLM sentence embeddings
    # unless negation-marked TF-IDF + SVD or the tfidf-lr sentence scorer (supervised,
    # out-of-fold on the training rows) gives the note head a lower inner out-of-fold
    # log-loss by z > 1 patient-clustered SEs (patient-grouped inner CV on the training
    # split; the best passing one); "minilm", "tfidf" or "tfidf-lr" force one.
    # pooling "auto": negation pooling for sentence encoders (MiniLM barely tells
    # "Denies chills." from "Endorses chills."), mean for TF-IDF, whose marked n-grams
    # ("neg_chills") already carry the negation.
    "notes": {"encoder": "auto", "pooling": "auto", "inner_folds": 5,
              "negation_marks": True},
    "baseline_without_image": True,
}



class TrainingError(ValueError):
    """Training cannot go ahead with this data or config; the message says why."""


def _merge(base: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in (override or {}).items():
        if k not in out:
            raise TrainingError(f"unknown config key {k!r}; known keys: {sorted(out)}")
        if isinstance(out[k], dict) and isinstance(v, dict) and k not in (
                "decision_thresholds", "windows"):
            for kk in v:
                if kk not in out[k]:
                    raise TrainingError(f"unknown config key {k}.{kk}; known: {sorted(out[k])}")
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def split_patients(patient_ids: np.ndarray, y: np.ndarray, fraction: float, seed: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(rest, held-out) row indices: grouped by patient, stratified by label."""
    if not 0.0 < fraction < 0.5:
        raise TrainingError(f"split fraction must be in (0, 0.5), got {fraction}")
    n_splits = max(2, round(1.0 / fraction))
    n_pos_patients = len(set(patient_ids[y == 1]))
    if n_pos_patients < n_splits or len(set(patient_ids[y == 0])) < n_splits:
        raise TrainingError(f"too few patients per class to split off {fraction:.0%} "
                            f"({n_pos_patients} patient(s) with events)")
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    rest, held = next(folds.split(np.zeros(len(y)), y, groups=patient_ids))
    return np.sort(rest), np.sort(held)


def min_age_of(outcome: dict[str, Any] | None) -> float | None:
    """The population's minimum age: ``min_age_years`` or "age >= N" in the population text."""
    if not outcome:
        return None
    if outcome.get("min_age_years") is not None:
        return float(outcome["min_age_years"])
    match = re.search(r"age\s*(>=|≥|>)\s*(\d+(?:\.\d+)?)", str(outcome.get("population", "")))
    if match:
        return float(match.group(2)) + (1.0 if match.group(1) == ">" else 0.0)
    if re.search(r"\badults?\b", str(outcome.get("population", "")), re.IGNORECASE):
        return 18.0
    return None


def _seed_everything(seed: int) -> None:
    np.random.seed(seed % 2**32)  # legacy global RNG, for any library that still reads it
    torch.manual_seed(seed)


def _metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float | None]:
    if len(np.unique(y)) < 2:
        return {"auroc": None, "auprc": None, "brier": brier_score(y, p),
                "ece": expected_calibration_error(y, p)}
    return {"auroc": auroc(y, p), "auprc": auprc(y, p), "brier": brier_score(y, p),
            "ece": expected_calibration_error(y, p)}


def _auroc_any(y: np.ndarray, score: np.ndarray) -> float:
    """AUROC of any real-valued score (logits included)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def train(manifest_path: str | Path, out_dir: str | Path, *,
          config: dict[str, Any] | None = None, signing_key: str | Path | None = None,
          cache_dir: str | Path | None = None, warn_small: bool = True) -> Path:
    """Train the late-fusion model on a manifest and write a signed artifact to ``out_dir``.

    Parameters
    ----------
    manifest_path : path
        Cohort manifest (CSV/Parquet + sidecar).
    out_dir : path
        The artifact directory; must not exist (artifacts are immutable).
    config : dict, optional
        Overrides of :data:`DEFAULT_CONFIG` (nested dicts merge one level).
    signing_key : path, optional
        Ed25519 PEM private key. Without one, a demo key is generated as ``<out>.key``.
    cache_dir : path, optional
        Image tensor, embedding and sentence caches; default ``<out>.cache``.
    warn_small : bool, default=True
        Warn (one log line) when the cohort has fewer than :data:`SMALL_COHORT_PATIENTS`
        patients; ``evaluate --cv`` turns it off for its training folds.

    Returns
    -------
    Path
        The artifact directory.

    Raises
    ------
    ManifestError, ModelDataError, TrainingError, ArtifactError
        Unusable data or config, each with a message that names the problem.
    """
    started = time.perf_counter()
    cfg = _merge(DEFAULT_CONFIG, config)
    if cfg["image"]["head_refit"] not in ("joint", "none"):
        # Checked before stage 1, which takes minutes, rather than after it.
        raise TrainingError(f"image.head_refit must be 'joint' or 'none', got "
                            f"{cfg['image']['head_refit']!r}")
    if cfg["fusion"]["simplify"] not in ("auto", "off"):
        raise TrainingError(f"fusion.simplify must be 'auto' or 'off', got "
                            f"{cfg['fusion']['simplify']!r}")
    seed = int(cfg["seed"])
    _seed_everything(seed)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise TrainingError(f"{out_dir} already exists; write the new model to a new directory")
    cache = Path(cache_dir) if cache_dir is not None else out_dir.with_name(out_dir.name +
                                                                            ".cache")
    manifest = read_manifest(manifest_path, strict=False)
    frame = manifest.frame
    y = frame["label"].to_numpy(int)
    pids = frame["patient_id"].astype(str).to_numpy()
    if warn_small and len(set(pids)) < SMALL_COHORT_PATIENTS:
        # A 20 % validation split of a small cohort is too noisy to show whether fusion
        # beats a logistic regression; cross-validation with baselines can.
        log.warning("%d patients (under %d): one validation split says little here; run "
                    "`clinfuse evaluate --cv 5 --manifest %s --out DIR` to compare the fused "
                    "model with simple baselines in the same folds", len(set(pids)),
                    SMALL_COHORT_PATIENTS, manifest.path)
    if len(np.unique(y)) < 2:
        raise TrainingError(f"{manifest.path}: every label is {int(y[0])}; training needs "
                            "examples of both classes")
    rest, val = split_patients(pids, y, float(cfg["val_fraction"]), seed)
    if cfg["calibration_split"] == "separate":
        sub_train, cal_sub = split_patients(pids[rest], y[rest],
                                            float(cfg["calibration_fraction"]), seed + 1)
        train_rows, cal_rows = rest[sub_train], rest[cal_sub]
    elif cfg["calibration_split"] == "validation":
        train_rows, cal_rows = rest, val
    else:
        raise TrainingError(f"calibration_split must be 'validation' or 'separate', got "
                            f"{cfg['calibration_split']!r}")
    for name, rows in (("training", train_rows), ("validation", val), ("calibration", cal_rows)):
        if len(np.unique(y[rows])) < 2:
            raise TrainingError(f"the {name} split has one class only; add more examples "
                                "of the rarer class")
    log.info("split: %d train / %d validation rows (%d / %d patients), calibration on %s",
             len(train_rows), len(val), len(set(pids[train_rows])), len(set(pids[val])),
             cfg["calibration_split"])

    # Tabular: fitted on the training split only.
    encoding = TabularEncoding.fit(manifest, train_rows)
    raw = encoding.transform(frame, str(manifest.path))
    scaler = TabularPreprocessor().fit(raw[train_rows]) if raw.shape[1] else None
    X: dict[str, np.ndarray] = {}
    if scaler is not None:
        X["ehr"] = scaler.transform(raw)
    # Before stage 1, which takes minutes, so a bad ehr_rank fails at once.
    ehr_blocks = (ehr_rank_blocks(encoding, scaler, DEFAULT_SPEC, cfg["fusion"]["ehr_rank"])
                  if manifest.sidecar.get("feature_source") == "fhir-spec" else [])
    tab_learner: TabularLearner | None = None
    if scaler is not None:
        tab_learner, X["ehr"] = _tabular_learner(cfg, X["ehr"], raw, y, pids, train_rows, seed,
                                                 ehr_blocks)
        if tab_learner.learner_ == "gbm":
            ehr_blocks = []  # the EHR input is now one logit: no column blocks to reduce

    # Notes: the encoder chosen by inner CV of the note head (models.note_learner).
    notes = manifest.notes()
    note_encoder = None
    note_pooling = "mean"
    note_present = np.zeros(len(frame), dtype=bool)
    note_choice: NoteChoice | None = None
    if any(n is not None and n.strip() for n in notes):
        head = {k: v for k, v in cfg["fusion"].items() if k not in _NOT_HEAD_PARAMS}
        try:
            note_choice = choose_notes(notes, y, pids, train_rows, notes_cfg=cfg["notes"],
                                       head_params={**head, "seed": seed,
                                                    "calibration": cfg["calibration"]},
                                       random_state=seed, cache_dir=cache / "notes")
        except ValueError as exc:
            raise TrainingError(f"notes: {exc}") from None
        note_encoder, note_pooling = note_choice.encoder, note_choice.pooling
        # With tfidf-lr, the training rows' note input is already out-of-fold
        # (note_choice.oof_rows), as the EHR input is with boosted trees.
        X["note"], note_present = note_choice.X, note_choice.present

    # Images: stage 1.
    image_cfg: dict[str, Any] | None = None
    image_state: list[dict[str, torch.Tensor]] | None = None
    image_metrics: dict[str, Any] = {}
    paths = manifest.image_paths()
    image_rows = np.array([i for i, p in enumerate(paths) if p is not None], dtype=int)
    train_img = np.intersect1d(image_rows, train_rows)
    val_img = np.intersect1d(image_rows, val)
    stage1: _Stage1 | None = None
    if len(train_img) >= int(cfg["image"]["min_images"]) and len(val_img) >= 2 and \
            len(np.unique(y[train_img])) == 2:
        stage1 = _stage1(manifest, cfg, cache, train_img, val_img, image_rows, y, seed)
        X["image"], image_cfg, image_state, image_metrics = (stage1.logits, stage1.config,
                                                             stage1.states, stage1.metrics)
    elif len(image_rows):
        log.warning("images: only %d training image(s) (min %d, both classes); the model "
                    "will not use images", len(train_img), cfg["image"]["min_images"])

    mask_all = modality_mask(manifest, raw, note_present)
    present_mods = [m for j, m in enumerate(MODALITIES) if m in X and mask_all[train_rows, j].any()]
    if not present_mods:
        raise TrainingError(f"{manifest.path}: no usable modality (no tabular feature column, "
                            "note or image)")
    mask = mask_all[:, [MODALITIES.index(m) for m in present_mods]]
    if stage1 is not None and "image" in present_mods and cfg["image"]["head_refit"] != "none":
        X["image"], image_state = _refit_image_head(stage1, cfg, X, present_mods, mask,
                                                    train_rows, val, y, seed, cache, ehr_blocks)
        assert image_cfg is not None
        image_cfg["encoders"] = [e.to_state()[0] for e in stage1.encoders]
        image_cfg["head_refit"] = cfg["image"]["head_refit"]
    # Never worse than a baseline: simpler heads of the same format, by inner CV. The
    # image input is the frozen encoder's logit as the head sees it, not refitted per
    # inner fold; with one encoder it is in-sample on the training rows (encoder and joint
    # head refit), so then only subsets without imaging compete.
    simplification = compare_fusion_heads(
        lambda mods, hidden: _fusion_model({**cfg, "fusion": {**cfg["fusion"],
                                                              "hidden": hidden}},
                                           mods, seed, ehr_blocks),
        _rows({m: X[m] for m in present_mods}, train_rows), y[train_rows], mask[train_rows],
        present_mods, pids[train_rows], hidden=int(cfg["fusion"]["hidden"]),
        folds=int(cfg["fusion"]["simplify_folds"]), random_state=seed,
        mode=str(cfg["fusion"]["simplify"]),
        image_in_sample=stage1 is not None and len(stage1.encoders) < 2)
    if simplification["chosen"] != "full":
        log.warning("fusion: %s", simplification["summary"])
        shipped = simplification["shipped"]
        cfg["fusion"] = {**cfg["fusion"], "hidden": int(shipped["hidden"])}
        mask = mask[:, [present_mods.index(m) for m in shipped["modalities"]]]
        present_mods = list(shipped["modalities"])
        if "image" not in present_mods:  # its input is ignored: no encoder to ship or run
            image_cfg, image_state = None, None
    Xm = {m: X[m] for m in present_mods}

    # Stage 2: fusion. A small cohort cross-fits the head on every row (fusion_crossfit).
    crossfit = len(set(pids)) < int(cfg["fusion"]["crossfit_below"])
    fusion, crossfit_record, scored = _fit_head(cfg, present_mods, Xm, mask, y, pids,
                                                train_rows, val, cal_rows, seed, ehr_blocks,
                                                crossfit)
    baseline = None
    if cfg["baseline_without_image"] and "image" in present_mods and len(present_mods) > 1:
        # The comparison model for "what do images add": same inputs minus images,
        # retrained (fusion stage only, cheap) rather than merely masked.
        keep = [j for j, m in enumerate(present_mods) if m != "image"]
        others = [present_mods[j] for j in keep]
        baseline, _, _ = _fit_head(cfg, others, {m: Xm[m] for m in others}, mask[:, keep], y,
                                   pids, train_rows, val, cal_rows, seed, ehr_blocks, crossfit)
    eval_rows, p_val, alone = scored
    metrics: dict[str, Any] = {
        "split": "cross-fitted" if crossfit else "validation",
        "overall": _metrics(y[eval_rows], p_val),
        "calibrated_on": ("cross-fitted" if crossfit else cfg["calibration_split"]),
        "note": ("out-of-fold scores of the cross-fitted fusion head (the branch inputs "
                 "were built on the training split); calibration was fitted on them, so "
                 "its ECE is optimistic" if crossfit else
                 "calibration was fitted on this split, so its ECE is optimistic"
                 if cfg["calibration_split"] == "validation" else None),
        "n_examples": len(eval_rows), "n_events": int(y[eval_rows].sum())}
    ye = y[eval_rows]
    metrics["single_modality_auroc_where_present"] = {
        m: (_auroc_any(ye[~np.isnan(alone[:, j])], alone[~np.isnan(alone[:, j]), j])
            if len(np.unique(ye[~np.isnan(alone[:, j])])) == 2 else None)
        for j, m in enumerate(present_mods)}
    metrics["image_encoder"] = image_metrics
    log.info("validation: AUROC %.3f, AUPRC %.3f, Brier %.4f, ECE %.4f",
             *(metrics["overall"][k] or float("nan") for k in ("auroc", "auprc", "brier",
                                                               "ece")))

    # Artifact.
    key = _signing_key(signing_key, out_dir)
    salt = _salt(out_dir)
    outcome = manifest.outcome or {"name": "label", "definition": "the manifest's label column",
                                   "horizon_days": None, "population": "as in the manifest"}
    population = {"description": str(outcome.get("population", "as in the manifest")),
                  "min_age_years": min_age_of(outcome)}
    # Structured rules (issue 20): the outcome definition's ``population_rules``, checked
    # against the record at prediction time (pipelines/population.py).
    rules = outcome.get("population_rules")
    if isinstance(rules, dict):
        population.update({k: rules[k] for k in ("alive", "inpatient_encounter_active",
                                                 "min_hours_since_admission", "min_age_years")
                           if k in rules})
    if manifest.sidecar.get("feature_source") == "fhir-spec":
        source: dict[str, Any] = {"kind": "fhir-spec", "spec_version": DEFAULT_SPEC.version,
                                  "spec": _plain(DEFAULT_SPEC.to_dict())}
    else:
        source = {"kind": "manifest-columns", "columns": encoding.columns}
    fusion_cfg, fusion_state = fusion.to_state()
    model_config = {
        "model_name": cfg["model_name"], "model_version": cfg["model_version"],
        "model_format": MODEL_FORMAT,
        "outcome": {k: outcome.get(k) for k in ("name", "definition", "horizon_days")},
        "population": population,
        "feature_source": source,
        "input_modalities": present_mods,
        "decision_thresholds": cfg["decision_thresholds"],
        "note_encoder": note_encoder.name if note_encoder is not None and "note" in
        present_mods else None,
        "note_encoder_kind": ("tfidf" if isinstance(note_encoder, TfidfNoteEncoder)
                              else "tfidf-lr" if isinstance(note_encoder, TfidfLrNoteScorer)
                              else "minilm" if note_encoder is not None else None),
        "note_pooling": note_pooling,
        "sensitive_columns": list(manifest.sensitive),
        "tabular": encoding.to_dict(),
        "image": image_cfg,
        "fusion": fusion_cfg,
        "tabular_learner": (tab_learner.to_artifact()[0] if tab_learner is not None
                            else None),
        "note_learner": note_choice.record if note_choice is not None else None,
        "calibration": fusion_cfg["calibrator"],
        "fusion_simplification": simplification,
        "fusion_crossfit": crossfit_record,
        "training": {"seed": seed, "config": _plain(cfg),
                     "seconds": round(time.perf_counter() - started, 1)},
    }
    if isinstance(outcome.get("freshness"), dict):
        # Data-freshness rules (issue 20, pipelines/freshness.py), checked at scoring.
        model_config["freshness"] = dict(outcome["freshness"])
    tensors: dict[str, dict[str, torch.Tensor]] = {"fusion": fusion_state}
    if baseline is not None:
        base_cfg, tensors["baseline_fusion"] = baseline.to_state()
        model_config["baseline_fusion"] = base_cfg
    if scaler is not None:
        tensors["tabular_scaler"] = scaler.to_tensors()
    if tab_learner is not None and tab_learner.ensemble_ is not None:
        tensors["tabular_gbm"] = tab_learner.ensemble_.to_tensors()
    for f, state in enumerate(image_state or []):
        tensors[f"image_encoder_{f}"] = state
    documents: dict[str, Any] = {
        "metrics": _plain(metrics),
        "feature_spec": {"columns": encoding.columns},
        "training_data": _fingerprint(manifest, pids, y, train_rows, val, cal_rows, salt,
                                      mask_all),
        "history": {"image_encoder": image_metrics.get("history", []),
                    "fusion": fusion.history_},
    }
    if isinstance(note_encoder, TfidfNoteEncoder) and "note" in present_mods:
        tfidf = note_encoder.get_state()
        tensors["note_encoder"] = {"idf": torch.as_tensor(tfidf["idf"]),
                                   "components": torch.as_tensor(tfidf["components"])}
        documents["note_vocabulary"] = {"params": str(tfidf["params"][()]),
                                        "vocabulary": [str(t) for t in tfidf["vocabulary"]],
                                        "fingerprint": str(tfidf["fingerprint"][()])}
    if note_encoder is not None and "note" in present_mods:
        # Template sentences of the training notes: never shown or cited as evidence
        # (pipelines.note_evidence); fitted on the training rows only.
        documents["note_boilerplate"] = BoilerplateSentences().fit(
            [notes[i] for i in train_rows], y[train_rows]).to_document()
    if isinstance(note_encoder, TfidfLrNoteScorer) and "note" in present_mods:
        scorer = note_encoder.get_state()
        tensors["note_encoder"] = {
            "idf": torch.as_tensor(scorer["idf"]), "coef": torch.as_tensor(scorer["coef"]),
            "intercept": torch.as_tensor(scorer["intercept"]).reshape(1)}
        documents["note_vocabulary"] = {"params": str(scorer["params"][()]),
                                        "vocabulary": [str(t) for t in scorer["vocabulary"]],
                                        "fingerprint": str(scorer["fingerprint"][()])}
    path = save_artifact(out_dir, config=_plain(model_config), tensors=tensors,
                         documents=documents, signing_key=key)
    log.info("wrote artifact %s in %.1f s", path, time.perf_counter() - started)
    return path


@dataclass
class _Stage1:
    """What stage 1 hands on: the fusion input, the encoders and the image tensors."""

    logits: np.ndarray  # (n, 1) fusion input
    config: dict[str, Any]
    states: list[dict[str, torch.Tensor]]
    metrics: dict[str, Any]
    encoders: list[ImageEncoder]
    images: ImageTensors


def _refit_image_head(stage1: _Stage1, cfg: dict[str, Any], X: dict[str, np.ndarray],
                      mods: list[str], mask: np.ndarray, train_rows: np.ndarray,
                      val: np.ndarray, y: np.ndarray, seed: int, cache: Path,
                      ehr_blocks: list[tuple[list[int], int]]
                      ) -> tuple[np.ndarray, list[dict[str, torch.Tensor]]]:
    """Refit the encoder's auxiliary head as the image branch of a joint fusion fit.

    A fusion model (the stage-2 settings) is fitted with the whole frozen embedding as
    its image input; its linear image branch, folded through the branch's
    standardisation, becomes the encoder's head. Returns the new fusion input (the
    head's logit per row) and the encoders' new state dicts. With several
    (cross-fitted) encoders the stage-1 heads are kept.
    """
    if len(stage1.encoders) != 1 or int(cfg["fusion"]["hidden"]) > 0:
        log.info("image head refit: skipped (%d cross-fitted encoders, fusion hidden %s); "
                 "it needs one encoder and a linear fusion head", len(stage1.encoders),
                 cfg["fusion"]["hidden"])
        return stage1.logits, stage1.states
    encoder = stage1.encoders[0]
    images = stage1.images
    emb = np.zeros((len(y), int(encoder.embedding_dim)), dtype=np.float32)
    emb[images.rows] = encoder.embed(images.tensors)
    Xe = {m: (emb if m == "image" else X[m]) for m in mods}
    joint = _fusion_model(cfg, mods, seed, ehr_blocks)
    joint.fit(_rows(Xe, train_rows), y[train_rows], mask[train_rows], X_val=_rows(Xe, val),
              y_val=y[val], mask_val=mask[val])
    branch = joint.net_.branches["image"]
    assert isinstance(branch, Branch) and branch.mlp is None
    with torch.no_grad():
        weight = (branch.linear.weight / branch.scale).float()
        bias = (branch.linear.bias - (weight * branch.shift).sum()).float()
        head = encoder.network_.head
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    _, state = encoder.to_state()
    out = np.zeros((len(y), 1), dtype=np.float32)
    out[images.rows] = image_logits([encoder], [encoder_hash(state)], images, cache)
    val_img = np.intersect1d(images.rows, val)
    auc = (_auroc_any(y[val_img], out[val_img, 0]) if len(np.unique(y[val_img])) == 2
           else float("nan"))
    log.info("image head refitted jointly with %s (l2 %s); validation AUROC of the image "
             "logit %.3f", [m for m in mods if m != "image"], joint.l2_by_modality_["image"],
             auc)
    return out, [state]


def _stage1(manifest: CohortManifest, cfg: dict[str, Any], cache: Path, train_img: np.ndarray,
            val_img: np.ndarray, image_rows: np.ndarray, y: np.ndarray, seed: int
            ) -> _Stage1:
    """Stage 1, cross-fitted: the fusion input is each image's out-of-fold logit.

    An encoder scores the images it was trained on far better than new ones; if the
    fusion head learned from those scores it would trust images too much. So the
    training images are split by patient into ``crossfit_folds`` folds, one encoder
    is trained per fold complement, training rows get the logit of the encoder that
    did not see them, and every other row (validation, scoring) the mean over encoders.

    The default ``crossfit_folds`` is 1 (one encoder on all training images): the CPU
    default network ("threshold", ~150 weights) scores training and new images alike, so
    halving its data to cross-fit costs more than it saves. Set 2 or more for the big
    networks (compact, densenet121), whose in-sample logits are over-confident.
    """
    icfg = cfg["image"]
    channels = int(icfg["channels"])
    dims = _spatial_dims(manifest, image_rows, channels)
    size = icfg["spatial_size"] if dims == 3 else icfg["spatial_size_2d"]
    pre = preprocess_config(dims, size, icfg["windows"], channels)
    t0 = time.perf_counter()
    images = load_images(manifest, image_rows, pre, dims, cache,
                         workers=int(cfg["workers"]), progress=bool(cfg["progress"]))
    log.info("images: %d series preprocessed to %s in %.1f s", len(images.keys),
             list(pre.spatial_size), time.perf_counter() - t0)
    if images.dropped:  # those rows are image-less now
        train_img = np.intersect1d(train_img, images.rows)
        val_img = np.intersect1d(val_img, images.rows)
        if len(val_img) < 2 or len(np.unique(y[train_img])) < 2:
            raise ModelDataError(f"{manifest.path}: after dropping {len(images.dropped)} "
                                 "unusable image(s), too few training or validation images "
                                 "remain (both classes needed)")
    pos = {int(r): i for i, r in enumerate(images.rows)}
    va = [pos[int(r)] for r in val_img]
    k = int(icfg["crossfit_folds"])
    pids = manifest.frame["patient_id"].astype(str).to_numpy()
    if k >= 2:
        folds = list(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(
            np.zeros(len(train_img)), y[train_img], groups=pids[train_img]))
    else:
        folds = [(np.arange(len(train_img)), np.zeros(0, dtype=int))]
    network, choice = choose_image_network(icfg, device=cfg["device"], spatial_dims=dims,
                                           sidecar=manifest.sidecar)
    encoders, states, hashes, histories = [], [], [], []
    oof = np.zeros(len(manifest.frame), dtype=np.float32)
    t0 = time.perf_counter()
    for f, (fit_idx, out_idx) in enumerate(folds):
        encoder = ImageEncoder(network=network, spatial_dims=dims,
                               embedding_dim=int(icfg["embedding_dim"]),
                               max_epochs=int(icfg["max_epochs"]),
                               patience=int(icfg["patience"]),
                               batch_size=int(icfg["batch_size"]), lr=float(icfg["lr"]),
                               weight_decay=float(icfg["weight_decay"]),
                               augment=bool(icfg["augment"]), seed=seed + f,
                               device=cfg["device"], pretrained_path=icfg["pretrained_path"],
                               pretrained_architecture=str(icfg["pretrained_architecture"]),
                               finetune=bool(icfg["finetune"]),
                               progress=bool(cfg["progress"]))
        fit_rows = train_img[fit_idx]
        encoder.fit(images.tensors[[pos[int(r)] for r in fit_rows]], y[fit_rows],
                    images.tensors[va], y[val_img])
        log.info("image encoder %d/%d (%s): best epoch %d of %d", f + 1, len(folds),
                 encoder.network_name_, encoder.best_epoch_, len(encoder.history_))
        _, state = encoder.to_state()
        encoders.append(encoder)
        states.append(state)
        hashes.append(encoder_hash(state))
        histories.append(encoder.history_)
        if len(out_idx):
            rows = train_img[out_idx]
            oof[rows] = encoder.predict_logit(
                images.tensors[[pos[int(r)] for r in rows]])
    seconds = time.perf_counter() - t0
    mean_logit = image_logits(encoders, hashes, images, cache)[:, 0]
    out = np.zeros((len(manifest.frame), 1), dtype=np.float32)
    out[images.rows, 0] = mean_logit
    if k >= 2:
        out[train_img, 0] = oof[train_img]
    val_auc = (_auroc_any(y[val_img], out[val_img, 0]) if len(np.unique(y[val_img])) == 2
               else None)
    log.info("image stage: %d encoder(s) in %.1f s; validation AUROC of the image logit %s",
             len(encoders), seconds, f"{val_auc:.3f}" if val_auc is not None else "n/a")
    config = {"encoders": [e.to_state()[0] for e in encoders], "preprocess": pre.to_dict(),
              "spatial_dims": dims, "crossfit_folds": k, "fusion_input": "mean aux logit",
              "choice": {**choice, "pretrained_sha256": encoders[0].pretrained_ and
                         encoders[0].pretrained_["sha256"]}}
    metrics = {"network": encoders[0].network_name_, "val_auroc": val_auc,
               "seconds": round(seconds, 1), "history": histories}
    return _Stage1(out, config, states, metrics, encoders, images)


def _spatial_dims(manifest: CohortManifest, image_rows: np.ndarray, channels: int) -> int:
    """2 or 3: the dimensionality of the first image that can be read (after the colour
    policy); unreadable ones are left for load_images to drop with a warning."""
    paths = manifest.image_paths()
    first_error = None
    for r in image_rows:
        path = paths[int(r)]
        assert path is not None
        try:
            return spatial_dims_of(model_volume(path, channels))
        except ImageError as exc:
            first_error = first_error or (manifest.line_of(int(r)), exc.reason)
    assert first_error is not None
    raise ModelDataError(f"{manifest.path}: the images could not be read (none of "
                         f"{len(image_rows)}); first, on line {first_error[0]}: "
                         f"{first_error[1]}")


def ehr_rank_blocks(encoding: TabularEncoding, scaler: TabularPreprocessor | None,
                    spec: FeatureSpec, k: int | None) -> list[tuple[list[int], int]]:
    """Reduced-rank blocks of the EHR input: (input positions, k) per statistic of ``spec``.

    One block per :meth:`FeatureSpec.column_blocks` statistic, plus one for the missing
    indicators of spec columns; a block of at most ``k`` columns is left free.
    """
    if k is None or scaler is None:
        return []
    if int(k) < 1:
        raise TrainingError(f"fusion.ehr_rank must be a positive integer or null, got {k!r}")
    names = encoding.columns
    position = {name: i for i, name in enumerate(names)}
    spec_blocks = list(spec.column_blocks().values())
    in_spec = {name for cols in spec_blocks for name in cols}
    indicators = [len(names) + j for j, source in enumerate(scaler.indicator_)
                  if names[int(source)] in in_spec]
    blocks = [[position[name] for name in cols if name in position] for cols in spec_blocks]
    return [(idx, int(k)) for idx in [*blocks, indicators] if len(idx) > int(k)]


#: ``fusion`` config keys that are not FusionRiskModel parameters.
_NOT_HEAD_PARAMS = ("ehr_rank", "simplify", "simplify_folds", "crossfit_below",
                    "crossfit_folds", "crossfit_l2", "crossfit_calibration",
                    "crossfit_rule", "crossfit_bias_penalty")


def _fusion_model(cfg: dict[str, Any], modalities: Sequence[str], seed: int,
                  ehr_blocks: list[tuple[list[int], int]]) -> FusionRiskModel:
    """A fusion head with the config's settings; the EHR branch reduced where blocks say."""
    params = {k: v for k, v in cfg["fusion"].items() if k not in _NOT_HEAD_PARAMS}
    rank = {"ehr": ehr_blocks} if ehr_blocks and "ehr" in modalities else None
    return FusionRiskModel(modalities=tuple(modalities), seed=seed, device=cfg["device"],
                           calibration=cfg["calibration"], rank=rank, **params)


def _fit_head(cfg: dict[str, Any], mods: Sequence[str], X: dict[str, np.ndarray],
              mask: np.ndarray, y: np.ndarray, pids: np.ndarray, train_rows: np.ndarray,
              val: np.ndarray, cal_rows: np.ndarray, seed: int,
              ehr_blocks: list[tuple[list[int], int]], crossfit: bool
              ) -> tuple[FusionRiskModel, dict[str, Any] | None,
                         tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The fitted, calibrated fusion head over ``mods``; its cross-fit record (None when
    it used the validation split); and its held-out scores ``(rows, P(event), (n, M)
    calibrated single-modality logits, NaN where absent)`` for the metrics.

    Large cohorts: fitted on the training split, L2 strengths chosen and calibration
    fitted on the validation / calibration split. Small ones (``crossfit``):
    :func:`models.fusion_crossfit.crossfit_head` on every row.
    """
    if not crossfit:
        fusion = _fusion_model(cfg, mods, seed, ehr_blocks)
        fusion.fit(_rows(X, train_rows), y[train_rows], mask[train_rows],
                   X_val=_rows(X, val), y_val=y[val], mask_val=mask[val])
        fusion.calibrate(_rows(X, cal_rows), y[cal_rows], mask[cal_rows])
        p_val = fusion.predict_proba(_rows(X, val), mask[val])[:, 1]
        return fusion, None, (val, p_val, fusion.per_modality_logits(_rows(X, val), mask[val]))
    rows = np.arange(len(y))
    grid = cfg["fusion"]["crossfit_l2"]
    grid = [float(v) for v in (grid if isinstance(grid, Sequence) else [grid])]

    def make(l2: float) -> FusionRiskModel:
        # The branch biases (missingness-pattern rates) get the same penalty: see
        # FusionRiskModel's bias_l2.
        return _fusion_model({**cfg, "calibration": cfg["fusion"]["crossfit_calibration"],
                              "fusion": {**cfg["fusion"], "l2": [l2],
                                         "bias_l2": l2 if cfg["fusion"][
                                             "crossfit_bias_penalty"] else 0.0}},
                             mods, seed, ehr_blocks)

    try:
        cf = crossfit_head(make, X, y, mask, pids, l2_grid=grid,
                           folds=int(cfg["fusion"]["crossfit_folds"]), random_state=seed,
                           one_se=cfg["fusion"]["crossfit_rule"] == "one-se")
    except ValueError as exc:
        raise TrainingError(f"fusion: {exc}") from None
    fusion = make(cf.l2)
    fusion.fit(X, y, mask, X_val=X, y_val=y, mask_val=mask)
    fusion.calibrate_scores(cf.logit, cf.contrib, cf.present, y, bias=cf.bias)
    p = 1.0 / (1.0 + np.exp(-fusion.calibrate_logit(cf.logit, cf.present)))
    alone = np.full(cf.contrib.shape, np.nan)
    for j in range(len(mods)):
        only = np.zeros_like(cf.present)
        only[:, j] = True
        alone[:, j] = fusion.calibrate_logit(cf.bias + cf.contrib[:, j], only)
    record = {**cf.record, "modalities": list(mods)}
    return fusion, record, (rows, p, np.where(cf.present, alone, np.nan))


def _tabular_learner(cfg: dict[str, Any], scaled: np.ndarray, raw: np.ndarray, y: np.ndarray,
                     pids: np.ndarray, train_rows: np.ndarray, seed: int,
                     ehr_blocks: list[tuple[list[int], int]]
                     ) -> tuple[TabularLearner, np.ndarray]:
    """Choose the EHR learner on the training rows with EHR data; (learner, fusion EHR input).

    With boosted trees, the training rows' input is the trees' out-of-fold logit: trees
    refitted on all training rows have fitted those very rows, so their in-sample logit
    is over-confident and the fusion head would over-weight the EHR branch against the
    other modalities. Every other row (validation, calibration) gets the refitted trees.
    """
    tcfg = cfg.get("tabular") or {}
    params = {k: v for k, v in cfg["fusion"].items() if k not in _NOT_HEAD_PARAMS}
    params.update(seed=seed, calibration=cfg["calibration"],
                  rank={"ehr": ehr_blocks} if ehr_blocks else None)
    rows = train_rows[(~np.isnan(raw[train_rows])).any(axis=1)]
    learner = TabularLearner(learner=str(tcfg.get("learner", "auto")),
                             folds=int(tcfg.get("inner_folds", 5)), random_state=seed,
                             linear_params=params)
    try:
        learner.fit(scaled[rows], y[rows], pids[rows])
    except ValueError as exc:
        raise TrainingError(f"tabular.learner: {exc}") from None
    out = learner.transform(scaled)
    if learner.oof_logit_ is not None:
        out[rows, 0] = learner.oof_logit_.astype(np.float32)
    return learner, out


def _rows(X: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {m: v[rows] for m, v in X.items()}


def _signing_key(signing_key: str | Path | None, out_dir: Path) -> Any:
    if signing_key is not None:
        return load_signing_key(Path(signing_key))
    key_path = out_dir.with_name(out_dir.name + ".key")
    log.warning("no signing key given: generated a DEMO key pair %s and %s.pub; a deployment "
                "must sign with its own key and configure the service to trust it", key_path,
                key_path)
    return generate_signing_key(key_path)


def _salt(out_dir: Path) -> bytes:
    """A fresh keyed-hash salt in ``<out>.salt`` (mode 0600): a site secret, not in the artifact."""
    path = out_dir.with_name(out_dir.name + ".salt")
    salt = new_salt()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(salt.hex())
    return salt


def _fingerprint(manifest: CohortManifest, pids: np.ndarray, y: np.ndarray,
                 train_rows: np.ndarray, val: np.ndarray, cal_rows: np.ndarray, salt: bytes,
                 mask: np.ndarray) -> dict[str, Any]:
    used = np.union1d(np.union1d(train_rows, val), cal_rows)
    return {
        "manifest_sha256": _sha256(manifest.path),
        "n_rows": len(pids),
        "n_patients": len(set(pids)),
        "label_rate": float(y.mean()),
        "splits": {name: {"n_rows": len(rows), "n_patients": len(set(pids[rows])),
                          "label_rate": float(y[rows].mean())}
                   for name, rows in (("train", train_rows), ("validation", val),
                                      ("calibration", cal_rows))},
        "modalities_present": {m: int(mask[used, j].sum()) for j, m in enumerate(MODALITIES)},
        "membership": {
            "id_hash": "hmac-sha256 (salt kept by the training site, not in the artifact)",
            "train_patients": sorted(set(hashed_ids(pids[used], salt))),
            "test_patients": [],
        },
    }


def _plain(value: Any) -> Any:
    """JSON-ready: tuples to lists, numpy scalars to Python, NaN to None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def load_config(path: str | Path | None) -> dict[str, Any]:
    """A YAML/JSON training config file (overrides of DEFAULT_CONFIG)."""
    if path is None:
        return {}
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise TrainingError(f"{p}: not a readable YAML/JSON config ({type(exc).__name__})"
                            ) from None
    if not isinstance(data, dict):
        raise TrainingError(f"{p}: the config must be a mapping")
    return data


#: What the command-line bodies turn into one-line errors (no traceback).
USER_ERRORS = (ManifestError, ModelDataError, TrainingError, ArtifactError, ImageError,
               PatientOverlapError, NoteEncoderUnavailableError, FileNotFoundError,
               PermissionError)


def main_train(manifest: str | Path, out: str | Path, *, seed: int | None = None,
               epochs: int | None = None, device: str | None = None,
               config_path: str | Path | None = None, signing_key: str | Path | None = None,
               stderr: TextIO | None = None) -> int:
    """CLI body of ``clinfuse train``: 0 on success, 1 with a one-line reason otherwise.

    ``epochs`` caps the image encoder's epochs (stage 1); the fusion head has its own
    ``fusion.max_epochs`` in the config file.
    """
    stream = stderr if stderr is not None else sys.stderr
    try:
        cfg = load_config(config_path)
        if seed is not None:
            cfg["seed"] = int(seed)
        if device is not None:
            cfg["device"] = device
        if epochs is not None:
            if epochs < 1:
                raise TrainingError(f"epochs must be at least 1, got {epochs}")
            cfg["image"] = {**cfg.get("image", {}), "max_epochs": int(epochs)}
        path = train(manifest, out, config=cfg, signing_key=signing_key)
    except USER_ERRORS as exc:
        stream.write(f"clinfuse train: {exc}\n")
        return 1
    except ValueError as exc:  # bad option values (device, sizes, windows)
        stream.write(f"clinfuse train: {exc}\n")
        return 1
    stream.write(f"clinfuse train: wrote {path}\n")
    return 0
