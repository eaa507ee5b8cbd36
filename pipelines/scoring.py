"""Score a cohort manifest with a trained late-fusion artifact.

One output row per manifest row: ``example_id, patient_id, index_time, score,
label``, the sensitive columns (for audits), ``modalities`` (e.g.
``"image+ehr+note"``) and one boolean column per modality, ``model_name``,
``model_version`` and the decision thresholds (``threshold_<name>`` plus a
``flag_<name>`` where scored). Rows outside the model's population (an
``age_years`` below the stated minimum) or with no input at all get no score and
a ``refusal`` reason instead.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd

from models.artifact import Artifact, ArtifactError, load_artifact
from models.fusion import MODALITIES, FusionRiskModel
from models.image_encoder import ImageEncoder
from models.note_encoder import TfidfNoteEncoder, load_note_encoder
from models.note_scorer import TfidfLrNoteScorer
from models.tabular import TabularPreprocessor
from models.tabular_learner import TabularLearner
from pipelines.imaging.preprocess import PreprocessConfig
from pipelines.manifest import CohortManifest, read_manifest
from pipelines.model_inputs import (
    ModelDataError,
    TabularEncoding,
    embed_notes,
    encoder_hash,
    image_logits,
    load_images,
)
from pipelines.note_evidence import BoilerplateSentences
from pipelines.notes import NoteEmbedder
from pipelines.population import PopulationRules
from pipelines.training import MODEL_FORMAT, USER_ERRORS

__all__ = ["LoadedModel", "load_model", "main_score", "score"]

log = logging.getLogger(__name__)


@dataclass
class ModelInputs:
    """A manifest as model input: arrays per modality and the (n, 3) availability."""

    X: dict[str, np.ndarray]
    available: np.ndarray  # over MODALITIES, whether or not the model uses each
    in_population: np.ndarray
    refusal: list[str | None]
    #: Population rules a manifest row cannot answer (it has no record: whether the
    #: patient is alive or admitted), stated once for every row (issue 20).
    unchecked: list[str] = field(default_factory=list)


class LoadedModel:
    """A verified artifact, rebuilt into its encoders, fusion model and calibration."""

    def __init__(self, artifact: Artifact, *, device: str = "auto") -> None:
        cfg = artifact.config
        if cfg.get("model_format") != MODEL_FORMAT:
            raise ArtifactError(f"{artifact.path}: model format {cfg.get('model_format')!r} "
                                f"is not {MODEL_FORMAT!r}, which this clinfuse scores; "
                                "retrain or use the matching clinfuse version")
        self.artifact = artifact
        self.config = cfg
        self.device = device
        self.encoding = TabularEncoding.from_dict(cfg["tabular"])
        t = artifact.tensors
        self.scaler = (TabularPreprocessor.from_tensors(t["tabular_scaler"])
                       if "tabular_scaler" in t else None)
        # The EHR branch's learner (issue 18): the linear head takes the scaled columns,
        # boosted trees (stored as arrays, never pickled) turn them into one logit.
        self.tabular_learner = TabularLearner.from_artifact(cfg.get("tabular_learner"),
                                                            t.get("tabular_gbm"))
        self.fusion = FusionRiskModel.from_state(cfg["fusion"], t["fusion"])
        self.fusion.device = device
        self.baseline = (FusionRiskModel.from_state(cfg["baseline_fusion"], t["baseline_fusion"])
                         if "baseline_fusion" in t else None)
        self.image: list[ImageEncoder] | None = None
        self.preprocess: PreprocessConfig | None = None
        if cfg.get("image"):
            self.image = [ImageEncoder.from_state(c, t[f"image_encoder_{f}"])
                          for f, c in enumerate(cfg["image"]["encoders"])]
            self.preprocess = PreprocessConfig.from_dict(cfg["image"]["preprocess"])
            self.image_hashes = [encoder_hash(t[f"image_encoder_{f}"])
                                 for f in range(len(self.image))]
        self.note_encoder: Any = None
        # Fitted template sentences (never evidence); None for artifacts saved before
        # they were stored: no sentence is then treated as boilerplate.
        self.note_boilerplate = BoilerplateSentences.from_document(
            artifact.documents.get("note_boilerplate"))
        if cfg.get("note_encoder"):
            if cfg.get("note_encoder_kind") == "tfidf":
                vocab = artifact.documents["note_vocabulary"]
                self.note_encoder = TfidfNoteEncoder.from_state({
                    "params": np.array(vocab["params"]),
                    "vocabulary": np.array(vocab["vocabulary"], dtype=str),
                    "idf": t["note_encoder"]["idf"].numpy(),
                    "components": t["note_encoder"]["components"].numpy(),
                    "fingerprint": np.array(vocab["fingerprint"])})
            elif cfg.get("note_encoder_kind") == "tfidf-lr":
                vocab = artifact.documents["note_vocabulary"]
                self.note_encoder = TfidfLrNoteScorer.from_state({
                    "params": np.array(vocab["params"]),
                    "vocabulary": np.array(vocab["vocabulary"], dtype=str),
                    "idf": t["note_encoder"]["idf"].numpy(),
                    "coef": t["note_encoder"]["coef"].numpy(),
                    "intercept": t["note_encoder"]["intercept"].numpy(),
                    "fingerprint": np.array(vocab["fingerprint"])})
            else:
                self.note_encoder = load_note_encoder("minilm", strict=True)
            if self.note_encoder.name != cfg["note_encoder"]:
                raise ArtifactError(f"{artifact.path}: trained with note encoder "
                                    f"{cfg['note_encoder']!r} but {self.note_encoder.name!r} "
                                    "is installed here")

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.fusion.modalities_

    def inputs(self, manifest: CohortManifest, cache_dir: Path, *, workers: int = 1,
               progress: bool = False) -> ModelInputs:
        """Turn the manifest into model inputs, exactly as training did."""
        frame = manifest.frame
        n = len(frame)
        where = str(manifest.path)
        raw = self.encoding.transform(frame, where)
        X: dict[str, np.ndarray] = {}
        if self.scaler is not None:
            X["ehr"] = self.tabular_learner.transform(self.scaler.transform(raw))
        has_ehr = (~np.isnan(raw)).any(axis=1) if raw.shape[1] else np.zeros(n, bool)
        note_present = np.zeros(n, dtype=bool)
        if self.note_encoder is not None:
            embedder = NoteEmbedder(self.note_encoder, cache_dir / "notes")
            X["note"], note_present = embed_notes(embedder, manifest.notes(),
                                                  str(self.config.get("note_pooling", "mean")))
        paths = manifest.image_paths()
        has_image = np.array([p is not None for p in paths], dtype=bool)
        if self.image is not None and self.preprocess is not None:
            rows = np.flatnonzero(has_image)
            images = load_images(manifest, rows, self.preprocess,
                                 int(self.config["image"]["spatial_dims"]), cache_dir,
                                 workers=workers, progress=progress)
            # Dropped (unusable) images: those rows are scored without imaging.
            has_image = np.array([p is not None for p in manifest.image_paths()], dtype=bool)
            emb = np.zeros((n, 1), dtype=np.float32)
            if len(images.keys):
                emb[images.rows] = image_logits(self.image, self.image_hashes, images,
                                                cache_dir, device=self.device)
            X["image"] = emb
        available = np.column_stack([{"image": has_image, "ehr": has_ehr,
                                      "note": note_present}[m] for m in MODALITIES])
        refusal: list[str | None] = [None] * n
        min_age = (self.config.get("population") or {}).get("min_age_years")
        if min_age is not None and "age_years" in frame.columns:
            ages = pd.to_numeric(frame["age_years"], errors="coerce").to_numpy(float)
            for i in np.flatnonzero(ages < float(min_age)):
                refusal[i] = (f"out of population: age below {min_age:g} years "
                              f"({self.config['population'].get('description', '')})")
        used = self.mask(available)
        for i in np.flatnonzero(~used.any(axis=1)):
            refusal[i] = refusal[i] or "no input: none of the model's modalities is present"
        in_pop = np.array([r is None for r in refusal], dtype=bool)
        return ModelInputs(X, available, in_pop, refusal,
                           manifest_unchecked(self.config.get("population")))

    def mask(self, available: np.ndarray, allowed: frozenset[str] | None = None,
             modalities: Sequence[str] | None = None) -> np.ndarray:
        """Availability restricted to a model's modalities (and to ``allowed``)."""
        mods = tuple(modalities or self.modalities)
        cols = [available[:, MODALITIES.index(m)] & (allowed is None or m in allowed)
                for m in mods]
        return np.column_stack(cols) if cols else np.zeros((len(available), 0), bool)

    def predict(self, inputs: ModelInputs, rows: np.ndarray,
                allowed: frozenset[str] | None = None) -> np.ndarray:
        """Calibrated P(event) for ``rows``, with only ``allowed`` modalities (None: all)."""
        X = {m: v[rows] for m, v in inputs.X.items() if m in self.modalities}
        return self.fusion.predict_proba(X, self.mask(inputs.available[rows], allowed),
                                         device=self.device)[:, 1]

    def predict_baseline(self, inputs: ModelInputs, rows: np.ndarray) -> np.ndarray | None:
        """The retrained no-image model's P(event), if the artifact has one."""
        if self.baseline is None:
            return None
        mods = self.baseline.modalities_
        X = {m: inputs.X[m][rows] for m in mods}
        return self.baseline.predict_proba(X, self.mask(inputs.available[rows], None, mods),
                                           device=self.device)[:, 1]


def manifest_unchecked(population: Any) -> list[str]:
    """"population rule unchecked: ..." for each rule a research manifest cannot answer.

    A manifest row holds features, not the record: only the age rule can be checked
    (its ``age_years`` column); alive and the inpatient stay cannot.
    """
    rules = PopulationRules.from_config(population)
    stated = {"alive": rules.alive,
              "inpatient_encounter_active": rules.inpatient_encounter_active,
              "min_hours_since_admission": rules.min_hours_since_admission is not None}
    return [f"population rule unchecked: {name} (a manifest row has no record to check it "
            "against)" for name, on in stated.items() if on]


def load_model(model_dir: str | Path, *, trusted_keys: Sequence[str | Path] | None,
               device: str = "auto") -> LoadedModel:
    """Verify (signature with ``trusted_keys``; None skips it, with a warning) and rebuild."""
    if trusted_keys is None:
        log.warning("no trusted public key given: the artifact's signature is NOT checked "
                    "(its file hashes are); never do this in deployment")
        artifact = load_artifact(Path(model_dir), trusted_public_keys=None)
    else:
        artifact = load_artifact(Path(model_dir),
                                 trusted_public_keys=[Path(k) for k in trusted_keys])
    return LoadedModel(artifact, device=device)


def score(model_dir: str | Path, manifest_path: str | Path, out_csv: str | Path, *,
          trusted_keys: Sequence[str | Path] | None, device: str = "auto",
          cache_dir: str | Path | None = None, workers: int = 1,
          progress: bool = False) -> pd.DataFrame:
    """Score every row of a manifest and write ``out_csv``; returns the table."""
    model = load_model(model_dir, trusted_keys=trusted_keys, device=device)
    manifest = read_manifest(manifest_path, strict=False)
    with tempfile.TemporaryDirectory(prefix="clinfuse-score-") as tmp:
        cache = Path(cache_dir) if cache_dir is not None else Path(tmp)
        inputs = model.inputs(manifest, cache, workers=workers, progress=progress)
        table = score_table(model, manifest, inputs)
    out = Path(out_csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    log.info("scored %d of %d rows into %s", int(table["score"].notna().sum()), len(table), out)
    return table


def score_table(model: LoadedModel, manifest: CohortManifest, inputs: ModelInputs
                ) -> pd.DataFrame:
    frame = manifest.frame
    rows = np.flatnonzero(inputs.in_population)
    scores = np.full(len(frame), np.nan)
    if len(rows):
        scores[rows] = model.predict(inputs, rows)
    out = pd.DataFrame({"example_id": frame["example_id"].astype(str),
                        "patient_id": frame["patient_id"].astype(str)})
    out["index_time"] = frame.get("index_time", None)
    out["score"] = scores
    out["label"] = frame["label"]
    for c in manifest.sensitive:
        out[c] = frame[c]
    names = []
    for i in range(len(frame)):
        present = [m for j, m in enumerate(MODALITIES) if inputs.available[i, j]]
        names.append("+".join(present) or "none")
    out["modalities"] = names
    for j, m in enumerate(MODALITIES):
        out[f"has_{m}"] = inputs.available[:, j]
    out["model_name"] = model.config["model_name"]
    out["model_version"] = model.config["model_version"]
    for name, value in model.config["decision_thresholds"].items():
        out[f"threshold_{name}"] = float(value)
        out[f"flag_{name}"] = pd.array([None if np.isnan(s) else bool(s >= value)
                                        for s in scores], dtype="boolean")
    out["refusal"] = inputs.refusal
    # Scored rows carry the population rules their manifest could not check.
    out["population_unchecked"] = ["; ".join(inputs.unchecked) if inputs.unchecked and
                                   not np.isnan(s) else None for s in scores]
    return out


def main_score(model: str | Path, manifest: str | Path, out_csv: str | Path, *,
               trusted_keys: Sequence[str | Path] | None = None, device: str = "auto",
               stderr: TextIO | None = None) -> int:
    """CLI body of ``clinfuse score``: 0 on success, 1 with a one-line reason otherwise."""
    stream = stderr if stderr is not None else sys.stderr
    try:
        table = score(model, manifest, out_csv, trusted_keys=trusted_keys, device=device)
    except (*USER_ERRORS, ModelDataError, ValueError) as exc:
        stream.write(f"clinfuse score: {exc}\n")
        return 1
    refused = int(table["refusal"].notna().sum())
    stream.write(f"clinfuse score: wrote {out_csv} ({len(table) - refused} scored, "
                 f"{refused} refused)\n")
    return 0
