"""Manifest rows -> the fusion model's inputs: tabular arrays, image tensors, note vectors.

Shared by training, scoring and evaluation so that all three turn data into
tensors the same way. Images are loaded and preprocessed once per series and
cached on disk as float16 arrays keyed by :func:`pipelines.imaging.cache.series_key`
plus the preprocessing config; image embeddings are cached under the same key
plus a hash of the encoder weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from models.fusion import MODALITIES
from pipelines.imaging.cache import series_key
from pipelines.imaging.colour import ToModelChannels
from pipelines.imaging.convert import load_image
from pipelines.imaging.preprocess import Preprocess, PreprocessConfig, Window
from pipelines.imaging.volume import ImageError, Volume
from pipelines.manifest import CohortManifest

__all__ = ["DEFAULT_WINDOWS", "NOTE_POOLINGS", "ImageTensors", "ModelDataError",
           "TabularEncoding", "embed_notes", "image_logits", "load_images", "model_volume",
           "note_input_dim", "preprocess_config", "spatial_dims_of"]

log = logging.getLogger(__name__)

#: CT: the standard soft-tissue window (W400/L40), where lesions stand out from fat,
#: lung and air; everything else (PNG/JPEG, radiographs): the 8-bit range.
DEFAULT_WINDOWS: dict[str, dict[str, float]] = {
    "CT": {"a_min": -160.0, "a_max": 240.0},
    "default": {"a_min": 0.0, "a_max": 255.0},
}


class ModelDataError(ValueError):
    """Data that cannot be used for training or scoring; says what and where, no values."""


# ------------------------------------------------------------------------ tabular


@dataclass
class TabularEncoding:
    """Which manifest columns become tabular features, with categorical levels one-hot."""

    numeric: list[str]
    categorical: dict[str, list[str]]

    @classmethod
    def fit(cls, manifest: CohortManifest, rows: np.ndarray) -> TabularEncoding:
        """Columns from the manifest; categorical levels from the training rows only."""
        cats = {c: sorted({str(v) for v in manifest.frame[c].iloc[rows].dropna()})
                for c in manifest.feature_columns if c in manifest.categorical
                or c in manifest.sensitive}
        numeric = [c for c in manifest.feature_columns if c not in cats]
        return cls(numeric, cats)

    @property
    def columns(self) -> list[str]:
        return [*self.numeric, *(f"{c}={v}" for c, levels in self.categorical.items()
                                 for v in levels)]

    def transform(self, frame: pd.DataFrame, where: str) -> np.ndarray:
        """Float array (NaN = missing); refuses a manifest that lacks a column."""
        needed = [*self.numeric, *self.categorical]
        missing = [c for c in needed if c not in frame.columns]
        if missing:
            raise ModelDataError(f"{where}: the model needs feature column(s) {missing[:10]}"
                                 f"{' ...' if len(missing) > 10 else ''}, which the manifest "
                                 "lacks")
        numeric = frame[self.numeric]
        if all(pd.api.types.is_numeric_dtype(t) and not pd.api.types.is_bool_dtype(t)
               for t in numeric.dtypes):
            # Already numeric (every synth/FHIR-spec manifest): one conversion instead of a
            # per-column to_numeric, which costs ~100 ms per scored patient at 200 columns.
            numbers = numeric.to_numpy(dtype=float, na_value=np.nan)
        else:
            numbers = numeric.apply(pd.to_numeric, errors="coerce").to_numpy(float)
        parts = [numbers]
        for c, levels in self.categorical.items():
            values = frame[c].astype("string")
            onehot = np.column_stack([(values == v).fillna(False).to_numpy(float)
                                      for v in levels]) if levels else np.zeros((len(frame), 0))
            onehot[frame[c].isna().to_numpy()] = np.nan
            parts.append(onehot)
        return np.hstack(parts) if parts else np.zeros((len(frame), 0))

    def to_dict(self) -> dict[str, Any]:
        return {"numeric": self.numeric, "categorical": self.categorical}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TabularEncoding:
        return cls(list(data["numeric"]), {k: list(v) for k, v in data["categorical"].items()})


# ------------------------------------------------------------------------- images


def spatial_dims_of(volume: Volume) -> int:
    """2 for PNG/JPEG/radiographs (colour included), 3 for volumes."""
    return 2 if volume.array.ndim == 2 or (volume.array.ndim == 3 and volume.is_color) else 3


def preprocess_config(spatial_dims: int, spatial_size: Sequence[int],
                      windows: dict[str, dict[str, float]] | None = None,
                      channels: int = 1) -> PreprocessConfig:
    """Keep the input spacing and resize to ``spatial_size`` (the whole field of view);
    ``channels`` is the model's input channels (1: grey, 3: RGB)."""
    size = [int(s) for s in spatial_size]
    if spatial_dims == 2:
        size = [*size[:2], 1]
    if len(size) != 3:
        raise ValueError(f"image spatial_size must have 3 entries for 3-D images, got {size}")
    return PreprocessConfig(spatial_size=(size[0], size[1], size[2]),
                            windows={k: Window(**v) for k, v in
                                     (windows or DEFAULT_WINDOWS).items()},
                            spacing=None, fit="resize", channels=int(channels))


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        if not files:
            raise ImageError("folder holds no files", source=str(path))
        return files
    return [path]


def _tensor_key(path: Path, config: PreprocessConfig) -> str:
    namespace = json.dumps(config.to_dict(), sort_keys=True)
    return series_key(_files(path), namespace=f"clinfuse-model-input/1/{namespace}")


def model_volume(path: Path, channels: int = 1) -> Volume:
    """The image at ``path`` fitted to a model of ``channels`` input channels (the colour
    policy), before any spatial step: what train, score, explain and the service's
    predictions all see."""
    return ToModelChannels(channels)(load_image(path))


def _load_one(args: tuple[str, dict[str, Any], int, str]) -> tuple[str, str | None]:
    """Worker: load + preprocess one image into the cache; (key, error or None)."""
    path_s, config_d, spatial_dims, cache_s = args
    path = Path(path_s)
    config = PreprocessConfig.from_dict(config_d)
    try:
        key = _tensor_key(path, config)
        target = Path(cache_s) / f"{key}.npy"
        if target.exists():
            return key, None
        volume = model_volume(path, config.channels)
        if spatial_dims_of(volume) != spatial_dims:
            raise ImageError(f"is {spatial_dims_of(volume)}-D but the model takes "
                             f"{spatial_dims}-D images", source=str(path))
        if volume.array.ndim == 4:
            raise ImageError("is 4-D; the model takes one 3-D volume", source=str(path))
        tensor = Preprocess(config)(volume).as_tensor().numpy()
        if spatial_dims == 2:
            tensor = tensor[..., 0]
        # Threads of one process may write the same key (one image on two rows).
        tmp = target.with_suffix(f".{os.getpid()}-{threading.get_ident()}.tmp.npy")
        np.save(tmp, tensor.astype(np.float16))
        os.replace(tmp, target)
        return key, None
    except ImageError as exc:
        return "", exc.reason
    except OSError as exc:
        return "", f"cannot be read ({type(exc).__name__}: {exc.strerror or 'I/O error'})"
    except Exception as exc:  # decoders raise anything on corrupt data; messages may quote it
        return "", f"could not be decoded or preprocessed ({type(exc).__name__})"


@dataclass
class ImageTensors:
    """Preprocessed images for the rows that have one; ``rows`` index the manifest."""

    rows: np.ndarray
    keys: list[str]
    tensors: torch.Tensor  # (n, C, *spatial) float16
    #: (manifest line, reason) of each image dropped as unusable; its row became image-less.
    dropped: list[tuple[int, str]] = field(default_factory=list)


def load_images(manifest: CohortManifest, rows: np.ndarray, config: PreprocessConfig,
                spatial_dims: int, cache_dir: Path, *, workers: int = 1,
                progress: bool = False) -> ImageTensors:
    """Load and preprocess the images of ``rows`` (those with one) through the cache.

    Decoding runs in ``workers`` threads: Pillow, pydicom's decoders, NumPy and torch
    release the GIL for the heavy work, and threads cannot inherit a half-locked torch
    thread pool the way forked processes do (the hang of ``clinfuse train`` after the
    notes were embedded). On 2 cores, 200 1024x1024 PNGs took 2.1 s in 2 threads, 2.6 s
    serially and 26 s in 2 forkserver processes, which each import torch and MONAI.

    An image that cannot be used (unreadable, wrong dimensionality) is dropped: its row
    becomes image-less in ``manifest`` (so modality masks agree), a warning names the
    manifest line and the reason, and ``dropped`` lists it. The batch survives.

    Raises
    ------
    ModelDataError
        Every image of ``rows`` is unusable (nothing to train or score on); names the
        manifest lines and the first reason, not values.
    """
    cache = Path(cache_dir) / "images"
    cache.mkdir(parents=True, exist_ok=True)
    paths = manifest.image_paths()
    have = np.array([r for r in rows if paths[r] is not None], dtype=int)
    jobs = [(str(paths[r]), config.to_dict(), spatial_dims, str(cache)) for r in have]
    results: list[tuple[str, str | None]]
    if workers > 1 and len(jobs) > 8:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="images") as pool:
            results = list(_bar(pool.map(_load_one, jobs), len(jobs), progress))
    else:
        results = list(_bar(map(_load_one, jobs), len(jobs), progress))
    bad = [(int(r), err) for r, (_, err) in zip(have, results, strict=True) if err is not None]
    if bad and len(bad) == len(have):
        lines = ", ".join(str(manifest.line_of(r)) for r, _ in bad[:5])
        raise ModelDataError(f"{manifest.path}: {len(bad)} image(s) could not be used "
                             f"(line(s) {lines}{' ...' if len(bad) > 5 else ''}); first: "
                             f"{bad[0][1]}")
    dropped = []
    if bad:
        column = manifest.frame.columns.get_loc("image")
        assert isinstance(column, int)  # "image" is one column
        for r, err in bad:
            manifest.frame.iat[r, column] = None
            dropped.append((manifest.line_of(r), err))
            log.warning("%s: line %d: image dropped (the row is used without it): %s",
                        manifest.path, manifest.line_of(r), err)
        log.warning("%s: %d of %d image(s) dropped as unusable", manifest.path, len(bad),
                    len(have))
    ok = [(int(r), k) for r, (k, err) in zip(have, results, strict=True) if err is None]
    keys = [k for _, k in ok]
    kept = np.array([r for r, _ in ok], dtype=int)
    if not keys:
        return ImageTensors(kept, [], torch.zeros(0), dropped)
    arrays = [np.load(cache / f"{k}.npy") for k in keys]
    return ImageTensors(kept, keys, torch.from_numpy(np.stack(arrays)), dropped)


def encoder_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over an encoder's weights: part of the embedding cache key."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def image_logits(encoders: Sequence[Any], hashes: Sequence[str], images: ImageTensors,
                 cache_dir: Path, *, device: str | None = None) -> np.ndarray:
    """Mean auxiliary logit of the (cross-fitted) encoders per image row, ``(n, 1)``.

    Cached per series key under each encoder's weight hash.
    """
    if not images.keys:
        return np.zeros((0, 1), dtype=np.float32)
    per_encoder = []
    for encoder, weights_hash in zip(encoders, hashes, strict=True):
        folder = Path(cache_dir) / "image_logits" / weights_hash
        folder.mkdir(parents=True, exist_ok=True)
        values = np.full(len(images.keys), np.nan, dtype=np.float32)
        for i, key in enumerate(images.keys):
            f = folder / f"{key}.npy"
            if f.exists():
                values[i] = float(np.load(f)[0])
        todo = np.flatnonzero(np.isnan(values))
        if len(todo):
            values[todo] = encoder.predict_logit(images.tensors[todo], device=device)
            for j in todo:
                np.save(folder / f"{images.keys[int(j)]}.npy", values[j:j + 1])
        per_encoder.append(values)
    return np.mean(per_encoder, axis=0).astype(np.float32)[:, None]


# -------------------------------------------------------------------------- notes


#: How a note's sentence vectors become the fusion input (``notes.pooling``).
NOTE_POOLINGS = ("negation", "mean")


def note_input_dim(encoder_dim: int, pooling: str) -> int:
    """Width of the note input: ``d`` for mean pooling, ``2 d + 2`` for negation pooling."""
    if pooling not in NOTE_POOLINGS:
        raise ValueError(f"notes pooling must be one of {list(NOTE_POOLINGS)}, got {pooling!r}")
    return encoder_dim if pooling == "mean" else 2 * encoder_dim + 2


def embed_notes(embedder: Any, notes: Sequence[str | None], pooling: str = "mean"
                ) -> tuple[np.ndarray, np.ndarray]:
    """(pooled vectors (n, width), present (n,)); a note with no sentence counts as absent.

    ``pooling="mean"`` is :func:`~models.note_encoder.pool`; ``"negation"`` is
    :func:`~pipelines.notes.negation_pool` (affirmed and negated sentences apart).
    """
    dim = note_input_dim(int(embedder.encoder.dim), pooling)
    present_idx = [i for i, n in enumerate(notes) if n is not None and n.strip()]
    out = np.zeros((len(notes), dim), dtype=np.float32)
    present = np.zeros(len(notes), dtype=bool)
    if present_idx:
        embedded = embedder.embed_many([notes[i] for i in present_idx])
        for i, e in zip(present_idx, embedded, strict=True):
            if not e.is_empty:
                out[i] = e.pooled if pooling == "mean" else e.pool_negation()
                present[i] = True
    return out, present


def modality_mask(manifest: CohortManifest, tabular: np.ndarray, note_present: np.ndarray,
                  modalities: Sequence[str] = MODALITIES) -> np.ndarray:
    """(n, M) availability: image path given, any tabular value, a note with a sentence."""
    image = np.array([p is not None for p in manifest.image_paths()], dtype=bool)
    ehr = (~np.isnan(tabular)).any(axis=1) if tabular.shape[1] else np.zeros(len(tabular), bool)
    columns = {"image": image, "ehr": ehr, "note": note_present}
    return np.column_stack([columns[m] for m in modalities])


def _bar(it: Any, total: int, show: bool) -> Any:
    if not show:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc="images", unit="series")
