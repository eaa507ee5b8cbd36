"""DICOM series -> model-ready tensor: clinfuse against a MONAI pipeline on the same series.

The MONAI baseline is ``LoadImage(reader="PydicomReader")`` followed by
``Orientation("RAS")``, ``Spacing(bilinear)``, ``ScaleIntensityRange(clip=True)`` and
``Resize(trilinear)``. clinfuse runs :func:`pipelines.imaging.dicom_series.load_dicom_series`
and :class:`pipelines.imaging.preprocess.Preprocess` with the same settings
(``fit="resize"``). Both run in this process on the same files, generated at run time:
uncompressed little-endian CT slices with RescaleSlope/Intercept and InstanceNumbers that
follow the slice positions (MONAI orders by InstanceNumber, clinfuse by position).

Agreement is the largest absolute difference between the two outputs, both RAS and on
the same grid, as a fraction of the output intensity range (``b_max - b_min``).
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from pipelines.imaging.dicom_series import load_dicom_series
from pipelines.imaging.preprocess import Preprocess, PreprocessConfig, Window

__all__ = ["SeriesSpec", "monai_pipeline", "run", "write_series"]

SEED = 0
#: CT soft-tissue-to-bone window; the output range is [0, 1].
WINDOW = Window(-1000.0, 1000.0, 0.0, 1.0)
SPACING = (1.5, 1.5, 2.0)
SPATIAL_SIZE = (128, 128, 64)
QUICK_SPATIAL_SIZE = (48, 48, 24)


@dataclass(frozen=True)
class SeriesSpec:
    """Geometry of one synthetic series (LPS, mm)."""

    size: int
    slices: int
    pixel_spacing: float
    slice_spacing: float
    origin: tuple[float, float, float]
    #: ImageOrientationPatient: row then column direction cosines.
    orientation: tuple[float, float, float, float, float, float] = (1, 0, 0, 0, 1, 0)
    #: Number the instances against the stacking direction (head first), as many scanners do.
    descending: bool = False


def _specs(quick: bool) -> list[SeriesSpec]:
    size, slices = (96, 24) if quick else (256, 64)
    return [
        SeriesSpec(size, slices, 0.78, 2.5, (-100.0, -120.0, -80.0)),
        SeriesSpec(size, slices, 0.70, 2.0, (-90.0, -110.0, -40.0), descending=True),
        SeriesSpec(size, slices, 0.85, 3.0, (-110.0, -100.0, -100.0)),
        # Coronal: rows run left->right, columns head->foot; slices stack anterior->posterior.
        SeriesSpec(size, slices, 0.80, 2.5, (-100.0, -60.0, 100.0),
                   orientation=(1, 0, 0, 0, 0, -1)),
    ]


def _phantom(spec: SeriesSpec, rng: np.random.Generator) -> np.ndarray:
    """Stored int16 values (slices, rows, cols): body, organs, bone and noise."""
    k, r, c = np.meshgrid(np.linspace(-1, 1, spec.slices), np.linspace(-1, 1, spec.size),
                          np.linspace(-1, 1, spec.size), indexing="ij")
    hu = np.full(k.shape, -1000.0)
    hu[(r / 0.8) ** 2 + (c / 0.9) ** 2 < 1] = 40.0
    for _ in range(4):
        cr, cc, ck = (float(v) for v in rng.uniform(-0.5, 0.5, 3))
        rad = float(rng.uniform(0.1, 0.3))
        hu[(r - cr) ** 2 + (c - cc) ** 2 + (k - ck) ** 2 < rad**2] = rng.uniform(-200, 1500)
    hu += rng.normal(0, 20, hu.shape)
    # Stored = (HU - intercept) / slope with slope 1, intercept -1024 (typical CT).
    return np.clip(np.round(hu + 1024), -32768, 32767).astype(np.int16)


def write_series(spec: SeriesSpec, folder: Path, rng: np.random.Generator) -> None:
    """Write one series as single-frame Part-10 files (Explicit VR Little Endian)."""
    folder.mkdir(parents=True)
    stored = _phantom(spec, rng)
    row, col = np.array(spec.orientation[:3], float), np.array(spec.orientation[3:], float)
    normal = np.cross(row, col)
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    for index in range(spec.slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = frame_of_reference
        ds.Modality, ds.PatientID = "CT", "BENCH"
        ds.InstanceNumber = spec.slices - index if spec.descending else index + 1
        position = np.array(spec.origin) + index * spec.slice_spacing * normal
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:g}" for v in spec.orientation]
        ds.PixelSpacing = [f"{spec.pixel_spacing:g}"] * 2
        ds.SliceThickness = f"{spec.slice_spacing:g}"
        ds.Rows = ds.Columns = spec.size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
        ds.PixelData = stored[index].tobytes()
        ds.save_as(folder / f"IM{index:04d}.dcm", enforce_file_format=True)


def monai_pipeline(spatial_size: tuple[int, int, int]) -> Callable[[Path], MetaTensor]:
    """The baseline: MONAI's reader and array transforms, configured like clinfuse's."""
    from monai.transforms import (
        Compose,
        EnsureChannelFirst,
        LoadImage,
        Orientation,
        Resize,
        ScaleIntensityRange,
        Spacing,
    )

    transforms = Compose([
        LoadImage(reader="PydicomReader", image_only=True),
        EnsureChannelFirst(),
        Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacing(pixdim=SPACING, mode="bilinear", padding_mode="zeros"),
        ScaleIntensityRange(WINDOW.a_min, WINDOW.a_max, WINDOW.b_min, WINDOW.b_max, clip=True,
                            dtype=np.float32),
        Resize(spatial_size=spatial_size, mode="trilinear"),
    ])

    def load(folder: Path) -> MetaTensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI warns about metadata it prunes
            out = transforms(str(folder))
        assert isinstance(out, MetaTensor)
        return out

    return load


def clinfuse_pipeline(spatial_size: tuple[int, int, int]) -> Callable[[Path], MetaTensor]:
    """clinfuse: position-ordered assembly, then the model's preprocessing."""
    preprocess = Preprocess(PreprocessConfig(spatial_size=spatial_size, windows={"CT": WINDOW},
                                             spacing=SPACING, orientation="RAS",
                                             interpolation="bilinear", fit="resize"))

    def load(folder: Path) -> MetaTensor:
        return preprocess(load_dicom_series(folder))

    return load


def _rates(pipelines: dict[str, Callable[[Path], MetaTensor]], folders: list[Path],
           rounds: int) -> tuple[dict[str, float], dict[str, float], dict[str, list[MetaTensor]]]:
    """Series/s and CPU ms per series of each pipeline, and each one's outputs.

    Rounds alternate between the pipelines so that load from other work hits both.
    CPU time (all of the process's threads) is less sensitive to that load than wall
    time, so it is reported beside the rates.
    """
    outputs = {name: [load(f) for f in folders] for name, load in pipelines.items()}  # warm-up
    wall = dict.fromkeys(pipelines, 0.0)
    cpu = dict.fromkeys(pipelines, 0.0)
    for _ in range(rounds):
        for name, load in pipelines.items():
            started, cpu_started = time.perf_counter(), time.process_time()
            for folder in folders:
                load(folder)
            wall[name] += time.perf_counter() - started
            cpu[name] += time.process_time() - cpu_started
    n = rounds * len(folders)
    return ({name: n / s for name, s in wall.items()},
            {name: 1000 * s / n for name, s in cpu.items()}, outputs)


def run(quick: bool = False) -> dict[str, Any]:
    """Series/s for both pipelines, their ratio and their agreement."""
    rng = np.random.default_rng(SEED)
    torch.manual_seed(SEED)
    specs = _specs(quick)
    spatial_size = QUICK_SPATIAL_SIZE if quick else SPATIAL_SIZE
    rounds = 1 if quick else 3
    load_before = os.getloadavg()[0]  # other work on the machine skews both rates
    with tempfile.TemporaryDirectory(prefix="clinfuse-imaging-bench-") as tmp:
        folders = []
        for n, spec in enumerate(specs):
            folders.append(Path(tmp) / f"series{n}")
            write_series(spec, folders[-1], rng)
        rates, cpu_ms, outputs = _rates({"monai": monai_pipeline(spatial_size),
                                         "clinfuse": clinfuse_pipeline(spatial_size)},
                                        folders, rounds)
    monai_rate, ours_rate = rates["monai"], rates["clinfuse"]
    monai_out, ours_out = outputs["monai"], outputs["clinfuse"]
    window_range = WINDOW.b_max - WINDOW.b_min
    per_series = []
    for a, b in zip(ours_out, monai_out, strict=True):
        if tuple(a.shape) != tuple(b.shape):
            raise AssertionError(f"shapes differ: clinfuse {tuple(a.shape)}, MONAI "
                                 f"{tuple(b.shape)}")
        affine_diff = float(np.abs(np.asarray(a.affine) - np.asarray(b.affine)).max())
        value_diff = float((a.as_tensor() - b.as_tensor()).abs().max()) / window_range
        per_series.append({"max_abs_diff_fraction": value_diff, "affine_max_diff_mm":
                           affine_diff})
    worst = max(s["max_abs_diff_fraction"] for s in per_series)
    ratio = ours_rate / monai_rate
    shape = f"{specs[0].slices}x{specs[0].size}x{specs[0].size}"
    return {
        "series": len(specs), "rounds": rounds, "seed": SEED, "input_shape": shape,
        "spacing": list(SPACING), "spatial_size": list(spatial_size),
        "window": WINDOW.to_dict(),
        "clinfuse_series_per_s": round(ours_rate, 2),
        "monai_series_per_s": round(monai_rate, 2),
        "ratio": round(ratio, 2),
        "clinfuse_cpu_ms_per_series": round(cpu_ms["clinfuse"], 1),
        "monai_cpu_ms_per_series": round(cpu_ms["monai"], 1),
        "max_abs_diff_fraction": worst,
        "per_series": per_series,
        "versions": {p: version(p) for p in ("monai", "pydicom", "torch", "numpy")},
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "summary": f"{ours_rate:.1f} series/s vs MONAI {monai_rate:.1f} (x{ratio:.1f}); "
                   f"max diff {worst:.2e} of range; {len(specs)} CT series {shape}; "
                   f"load {load_before:.1f}",
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick=True), indent=2))
