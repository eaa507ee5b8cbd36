"""Any supported image source to a Volume, and DICOM -> NIfTI for ``clinfuse dicom2nifti``."""

from __future__ import annotations

import sys
from importlib.metadata import version
from pathlib import Path
from typing import TextIO

import nibabel as nib
import numpy as np
from nibabel.spatialimages import HeaderDataError
from pydicom.dataset import Dataset

from pipelines.imaging.cache import VolumeCache, series_key
from pipelines.imaging.dicom_series import load_dicom_series, series_to_volume
from pipelines.imaging.discovery import discover
from pipelines.imaging.mosaic import is_mosaic
from pipelines.imaging.nifti import load_nifti
from pipelines.imaging.planar import RASTER_SUFFIXES, is_planar, load_raster, planar_dicom_to_volume
from pipelines.imaging.volume import ImageError, Volume

__all__ = ["READER_VERSION", "dicom_to_nifti", "load_image", "load_image_cached",
           "main_dicom2nifti", "source_files", "volume_to_nifti"]

_NIFTI_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".img", ".img.gz")

#: Bump whenever a change to reading or assembly can change a Volume: cached volumes
#: from older readers then miss instead of being served.
READER_VERSION = 3


def load_image(src: Path, *, resample: bool = False, min_slices: int = 3) -> Volume:
    """Load a NIfTI/Analyze file, a PNG/JPEG, or a DICOM series (folder, DICOMDIR, zip, file).

    A DICOM source holding one single-frame image without patient geometry, or a CR/DX
    radiograph, becomes a 2-D volume; everything else must assemble into a 3-D/4-D volume.

    Raises
    ------
    ImageError
        Whatever made the source unusable, naming the file.
    """
    src = Path(src)
    name = src.name.lower()
    if src.is_file() and name.endswith(_NIFTI_SUFFIXES):
        return load_nifti(src)
    if src.is_file() and name.endswith(RASTER_SUFFIXES):
        return load_raster(src)
    found = discover(src)
    if len(found.series) == 1:
        instances = next(iter(found.series.values()))
        if len(instances) == 1 and (is_planar(instances[0].dataset) or (
                _single_frame(instances[0].dataset) and not is_mosaic(instances[0].dataset))):
            # One single-frame file is a 2-D image, whatever geometry it carries.
            return planar_dicom_to_volume(instances[0].dataset, instances[0].source)
        return series_to_volume(instances, min_slices=min_slices, resample=resample,
                                source=str(src))
    return load_dicom_series(src, min_slices=min_slices, resample=resample)


def source_files(src: Path) -> list[Path]:
    """The files a source is read from: a folder's files (as :func:`discover` walks them),
    a DICOMDIR's folder tree, or the one file.

    Raises
    ------
    ImageError
        ``src`` does not exist or is an empty folder.
    """
    src = Path(src)
    if not src.exists():
        raise ImageError("no such file or folder", source=str(src))
    root = src.parent if src.is_file() and src.name.upper().startswith("DICOMDIR") else src
    if not root.is_dir():
        return [src]
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ImageError("folder holds no files", source=str(src))
    return files


def load_image_cached(src: Path, cache: VolumeCache | None, *, resample: bool = False,
                      min_slices: int = 3) -> Volume:
    """:func:`load_image`, decoded once per series and then served from ``cache``.

    The key is :func:`~pipelines.imaging.cache.series_key` over the source's files
    (resolved path, size, mtime), namespaced by :data:`READER_VERSION`, the pydicom
    version and the options, so finding a hit costs one ``stat`` per file and no
    DICOM parsing. A rewritten, added or removed file misses and is decoded again;
    eviction keeps the cache under its ``max_bytes``.

    Parameters
    ----------
    src : Path
        As for :func:`load_image`.
    cache : VolumeCache or None
        None reads without caching.
    resample, min_slices
        As for :func:`load_image`; part of the key.

    Raises
    ------
    ImageError
        As :func:`load_image`; failures are not cached.
    """
    if cache is None:
        return load_image(src, resample=resample, min_slices=min_slices)
    namespace = (f"clinfuse-reader/{READER_VERSION}/pydicom-{version('pydicom')}/"
                 f"resample={resample}/min_slices={min_slices}")
    key = series_key(source_files(Path(src)), namespace=namespace)
    return cache.get_or_load(
        key, lambda: load_image(src, resample=resample, min_slices=min_slices))


def _single_frame(ds: Dataset) -> bool:
    return str(ds.get("NumberOfFrames", "1") or "1").strip() in ("", "1") and \
        "PerFrameFunctionalGroupsSequence" not in ds


def volume_to_nifti(volume: Volume, source: str | None = None) -> nib.Nifti1Image:
    """A NIfTI-1 image of the volume; RGB volumes are written as NIfTI RGB24.

    Raises
    ------
    ImageError
        The affine cannot be written as NIfTI qform/sform: not finite, or singular
        (zero spacing, or parallel ImageOrientationPatient cosines).
    """
    affine = volume.affine
    if not np.all(np.isfinite(affine)) or abs(float(np.linalg.det(affine[:3, :3]))) < 1e-12:
        raise ImageError("cannot write NIfTI: the voxel-to-patient affine is singular or not "
                         "finite (zero spacing, or parallel ImageOrientationPatient "
                         "direction cosines)", source=source)
    array = volume.array
    if volume.is_color:
        rgb = np.ascontiguousarray(array.astype(np.uint8))
        array = rgb.view(np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")]))[..., 0]
    image = nib.Nifti1Image(array, volume.affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_sform(affine, code=1)
    try:
        image.set_qform(affine, code=1)
    except HeaderDataError as exc:
        # nibabel cannot decompose an affine with a shear (orientation cosines that are
        # not orthogonal) into a quaternion: name it instead of its traceback.
        raise ImageError("cannot write NIfTI: the voxel-to-patient affine is not a rotation "
                         "and scaling (ImageOrientationPatient cosines not orthogonal?)",
                         source=source) from exc
    return image


def dicom_to_nifti(src: Path, out: Path, *, resample: bool = False) -> Volume:
    """Convert the one DICOM series under ``src`` to the NIfTI file ``out``.

    Parameters
    ----------
    src : Path
        Folder, DICOMDIR, zip archive or single file holding exactly one series.
    out : Path
        Output ``.nii`` or ``.nii.gz``.
    resample : bool, default False
        Resample gantry tilt and uneven spacing instead of refusing them.

    Raises
    ------
    ImageError
        The source is not one valid series, or ``out`` cannot be written.
    """
    out = Path(out)
    if not out.name.lower().endswith((".nii", ".nii.gz")):
        raise ImageError("output must end in .nii or .nii.gz", source=str(out))
    volume = load_image(Path(src), resample=resample)
    if Path(src).is_file() and Path(src).name.lower().endswith(_NIFTI_SUFFIXES):
        raise ImageError("source is already NIfTI, not DICOM", source=str(src))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        nib.save(volume_to_nifti(volume, source=str(src)), out)
    except OSError as exc:
        raise ImageError(f"cannot write NIfTI: {exc}", source=str(out)) from exc
    return volume


def main_dicom2nifti(src: Path, out: Path, resample: bool = False,
                     stderr: TextIO | None = None) -> int:
    """CLI body: 0 on success; on an ImageError write the reason (no traceback), return 1."""
    stream = stderr if stderr is not None else sys.stderr
    try:
        dicom_to_nifti(Path(src), Path(out), resample=resample)
    except ImageError as exc:
        stream.write(f"dicom2nifti: {exc}\n")
        return 1
    return 0
