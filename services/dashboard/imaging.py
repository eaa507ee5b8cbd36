"""Server-side slice rendering for the image viewer.

Two views of a patient's series, scrolled together:

- the stored DICOM series in Hounsfield units, with window presets applied on the
  server (so the browser only ever gets PNGs, never pixel data or DICOM headers);
- the model-input view (the cached, preprocessed tensor the model saw) with the
  occlusion-saliency heatmap as a separate transparent PNG layer that the saliency
  toggle shows or hides. The heatmap is drawn on the model-input grid because that
  is where it lines up voxel for voxel; mapping it back onto the raw series would
  mean inverting the resampling and could shift it.
"""

from __future__ import annotations

import io
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from pipelines.imaging.dicom_limits import check_pixel_budget
from services.dicom_store import DicomStore
from services.tables import DicomInstanceRow, PatientIdentifierRow, PatientRow

__all__ = ["WINDOWS", "ModelView", "SeriesInfo", "anatomy_png", "find_model_view",
           "heat_png", "model_input_png", "patient_series", "series_volume"]


@dataclass(frozen=True)
class Window:
    label: str
    center: float
    width: float


#: Common CT presets (level/width in HU); "full" stretches each series' own range.
WINDOWS: dict[str, Window] = {
    "soft": Window("Soft tissue (W 400 / L 40)", 40, 400),
    "lung": Window("Lung (W 1500 / L −600)", -600, 1500),
    "bone": Window("Bone (W 1800 / L 400)", 400, 1800),
    "brain": Window("Brain (W 80 / L 40)", 40, 80),
    "full": Window("Full range", 0, 0),
}
#: Displayed slices are upscaled to at least this many pixels on their long side.
DISPLAY_PX = 320


@dataclass(frozen=True)
class SeriesInfo:
    uid: str
    modality: str | None
    study_date: str | None
    n_instances: int


def patient_series(session: Session, patient: PatientRow) -> list[SeriesInfo]:
    """The patient's stored series, the one with most instances first.

    Linked by PatientID + IssuerOfPatientID equal to one of the patient's business
    identifiers, as the service links imaging everywhere.
    """
    keys = {(patient.identifier_system, patient.identifier_value)}
    keys |= {(s, v) for s, v in session.execute(
        select(PatientIdentifierRow.system, PatientIdentifierRow.value)
        .where(PatientIdentifierRow.patient_id == patient.id))}
    clauses = [(DicomInstanceRow.IssuerOfPatientID == s) & (DicomInstanceRow.PatientID == v)
               for s, v in keys]
    rows = session.execute(
        select(DicomInstanceRow.SeriesInstanceUID, DicomInstanceRow.Modality,
               DicomInstanceRow.StudyDate).where(or_(*clauses))).all()
    counts: dict[str, list[Any]] = {}
    for uid, modality, date in rows:
        entry = counts.setdefault(uid, [modality, date, 0])
        entry[2] += 1
    infos = [SeriesInfo(uid, m, d, n) for uid, (m, d, n) in counts.items()]
    return sorted(infos, key=lambda s: (-s.n_instances, s.study_date or "", s.uid))


class _LRU:
    """A small thread-safe cache of decoded volumes: scrolling reuses one decode."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


_volumes = _LRU(8)
_model_views = _LRU(16)


def series_volume(session: Session, store: DicomStore, series_uid: str) -> np.ndarray:
    """The series as a (slices, rows, cols) float32 array in HU, ordered along its normal.

    Slices are ordered by ImagePositionPatient projected on the slice normal, not by
    InstanceNumber, which senders do not always keep in anatomical order.
    """
    rows = list(session.scalars(select(DicomInstanceRow).where(
        DicomInstanceRow.SeriesInstanceUID == series_uid)))
    key = (series_uid, tuple(sorted(r.sha256 for r in rows)))
    cached = _volumes.get(key)
    if cached is not None:
        return np.asarray(cached)
    slices: list[tuple[float, np.ndarray]] = []
    for k, row in enumerate(rows):
        # Under the store's caps: bounded inflation, and no decoding past the pixel cap.
        ds = store.read_dataset(row)
        check_pixel_budget(ds, store.limits)
        pixels = np.asarray(ds.pixel_array, dtype=np.float32)
        if pixels.ndim != 2:
            continue  # multi-frame or colour: not a slice of this viewer
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
        position = getattr(ds, "ImagePositionPatient", None)
        orientation = getattr(ds, "ImageOrientationPatient", None)
        if position is not None and orientation is not None and len(orientation) == 6:
            normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:],
                                                                              float))
            order = float(np.dot(normal, np.asarray(position, float)))
        else:
            order = float(getattr(ds, "InstanceNumber", k) or k)
        slices.append((order, pixels * slope + intercept))
    if not slices:
        raise ValueError(f"series {series_uid} has no single-frame greyscale slices")
    shapes = {s.shape for _, s in slices}
    if len(shapes) != 1:
        raise ValueError(f"series {series_uid} mixes slice sizes {sorted(shapes)}")
    slices.sort(key=lambda t: t[0])
    volume = np.stack([s for _, s in slices])
    _volumes.put(key, volume)
    return volume


def _png(rgb_or_grey: np.ndarray, *, resample: Image.Resampling) -> bytes:
    image = Image.fromarray(rgb_or_grey)
    long_side = max(image.size)
    if long_side < DISPLAY_PX:
        scale = DISPLAY_PX / long_side
        image = image.resize((round(image.size[0] * scale), round(image.size[1] * scale)),
                             resample)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()


def anatomy_png(volume: np.ndarray, index: int, window: str) -> bytes:
    """Slice ``index`` of a HU volume through a window preset, as a greyscale PNG."""
    preset = WINDOWS[window]
    data = volume[index]
    if window == "full":
        lo, hi = float(volume.min()), float(volume.max())
    else:
        lo, hi = preset.center - preset.width / 2, preset.center + preset.width / 2
    scaled = np.clip((data - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    return _png((scaled * 255).astype(np.uint8), resample=Image.Resampling.BILINEAR)


@dataclass(frozen=True)
class ModelView:
    """The model-input tensor (X, Y, Z) and its saliency heatmap, on the same grid."""

    image: np.ndarray
    heatmap: np.ndarray
    vmax: float
    folder: Path

    @property
    def n_slices(self) -> int:
        return int(self.image.shape[-1]) if self.image.ndim == 3 else 1


def _matches(meta: dict[str, Any], summary: dict[str, Any]) -> bool:
    files = [o.get("file") for o in meta.get("overlays", [])]
    return (files == [o.get("file") for o in summary.get("overlays", [])]
            and meta.get("top_slices") == summary.get("top_slices")
            and meta.get("max_block_logit") == summary.get("max_block_logit"))


def find_model_view(cache_dir: Path | None, summary: dict[str, Any] | None
                    ) -> ModelView | None:
    """The cached model input and saliency behind an explanation's image summary, if kept.

    The explanation names its overlay files, top slices and peak value but not its
    cache folder, so the folder is found by those (they come from the same
    ``saliency.json``). None when the cache was cleared: the page then says so.
    """
    if cache_dir is None or not summary or not summary.get("overlays"):
        return None
    marker = (str(cache_dir), json.dumps(summary.get("overlays"), sort_keys=True),
              summary.get("max_block_logit"))
    cached = _model_views.get(marker)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    for meta_path in sorted((cache_dir / "saliency").glob("*/saliency.json")):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        if not _matches(meta, summary):
            continue
        folder = meta_path.parent
        # The folder is "<model-input key>-<16-hex model key>" (pipelines.saliency_overlay).
        tensor_key = folder.name.rsplit("-", 1)[0]
        tensor_path = cache_dir / "images" / f"{tensor_key}.npy"
        npz_path = folder / "saliency.npz"
        if not tensor_path.is_file() or not npz_path.is_file():
            continue
        image = np.asarray(np.load(tensor_path), dtype=np.float32)[0]
        with np.load(npz_path) as npz:
            heat = np.asarray(npz["heatmap"], dtype=np.float32)
        if heat.shape != image.shape:
            continue
        positive = float(np.clip(heat, 0, None).max())
        view = ModelView(image=image, heatmap=heat, vmax=positive or 1.0, folder=folder)
        _model_views.put(marker, view)
        return view
    return None


def _model_slice(array: np.ndarray, index: int) -> np.ndarray:
    """One model-input slice drawn like the stored series beside it.

    The model input is reoriented (RAS by default); transposed and flipped both ways,
    anterior is at the top and the patient's right on the viewer's left, as in the
    DICOM slices, so the two views are not mirror images of each other.
    """
    plane = array[..., index] if array.ndim == 3 else array
    return np.flipud(np.fliplr(plane.T))


def model_input_png(view: ModelView, index: int) -> bytes:
    plane = _model_slice(view.image, index)
    lo, hi = float(view.image.min()), float(view.image.max())
    scaled = np.clip((plane - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    return _png((scaled * 255).astype(np.uint8), resample=Image.Resampling.BILINEAR)


def heat_png(view: ModelView, index: int) -> bytes:
    """The heatmap of one slice as RGBA: warm where occlusion lowered the risk, else clear.

    Scaled by the series-wide peak, so colours compare across slices.
    """
    import matplotlib

    plane = _model_slice(view.heatmap, index)
    level = np.clip(plane / view.vmax, 0.0, 1.0)
    rgba = matplotlib.colormaps["inferno"](level)
    # Faint blocks stay clear, so the anatomy under the strong ones can still be read.
    rgba[..., 3] = np.where(level > 0.35, 0.15 + 0.45 * level, 0.0)
    return _png((rgba * 255).astype(np.uint8), resample=Image.Resampling.NEAREST)

