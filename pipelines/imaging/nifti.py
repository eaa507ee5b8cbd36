"""NIfTI-1/-2 and Analyze images to :class:`Volume` via nibabel.

The affine is nibabel's best affine (sform, then qform, then the fall-back), already RAS+;
an axis of zero or non-finite size (``pixdim`` 0, say) becomes 1 mm with
``SpacingKnown=False`` (:func:`pipelines.imaging.spacing.repair_affine`).
Scaling (scl_slope/scl_inter) is applied; the result is float32 unless the image is stored
unscaled in an integer type, which is kept. CIFTI files share the NIfTI-2 container but hold
brainordinates, not voxels, and are refused.
"""

from __future__ import annotations

import logging
from importlib.metadata import version
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.openers import ImageOpener

from pipelines.imaging.spacing import repair_affine
from pipelines.imaging.volume import ImageError, Volume

__all__ = ["load_nifti"]

log = logging.getLogger(__name__)

# NIfTI intent codes 3000-3099 are reserved for CIFTI (ConnUnknown ... ConnParcelSries).
_CIFTI_INTENTS = range(3000, 3100)


def load_nifti(path: Path) -> Volume:
    """Read a NIfTI-1, NIfTI-2 (``.nii``/``.nii.gz``), or Analyze/NIfTI ``.hdr``/``.img`` pair.

    Raises
    ------
    ImageError
        Missing file or image half of a pair, CIFTI, unreadable header or data.
    """
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise ImageError("no such file", source=source)
    try:
        image = nib.load(path)
    except FileNotFoundError as exc:
        raise ImageError(f"header found but its image file is missing: {exc.filename}",
                         source=source) from exc
    except Exception as exc:  # nibabel raises ImageFileError, HeaderDataError, ValueError...
        raise ImageError(f"not a readable NIfTI/Analyze image: {exc}", source=source) from exc
    if isinstance(image, nib.Cifti2Image) or _intent_code(image) in _CIFTI_INTENTS:
        raise ImageError("CIFTI file (grayordinates/connectivity matrix), not a volume; "
                         "read it with nibabel.cifti2", source=source)
    if not isinstance(image, nib.analyze.AnalyzeImage):
        raise ImageError(f"{type(image).__name__} is not a NIfTI or Analyze volume",
                         source=source)
    _check_image_file(image, path)
    try:
        data = np.asanyarray(image.dataobj)
        slope, inter = image.dataobj.slope, image.dataobj.inter  # type: ignore[attr-defined]
    except Exception as exc:
        raise ImageError(f"image data unreadable (truncated?): {exc}", source=source) from exc
    if data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0, :]  # NIfTI keeps vectors in dim 5; squeeze the empty time axis
    while data.ndim > 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim > 4:
        raise ImageError(f"{data.ndim}-D image {data.shape} is not a 2-D/3-D/4-D volume",
                         source=source)
    if data.ndim < 2:
        raise ImageError(f"{data.ndim}-D image is not a volume", source=source)
    if data.dtype.kind == "f" or (slope, inter) != (1.0, 0.0):
        data = data.astype(np.float32)
    # Native byte order: big-endian files arrive as '>i2' views.
    data = np.ascontiguousarray(data.astype(data.dtype.newbyteorder("=")))
    header = image.header
    metadata: dict[str, Any] = {
        "Format": type(image).__name__,
        "StoredDataType": str(image.get_data_dtype()),
        "Endianness": "big" if header.endianness == ">" else "little",
        "ScaleApplied": (slope, inter) != (1.0, 0.0),
    }
    if isinstance(image, nib.Nifti1Image | nib.Nifti1Pair):
        metadata["sform_code"] = int(header["sform_code"])
        metadata["qform_code"] = int(header["qform_code"])
    try:
        best = np.asarray(image.affine, dtype=float)
    except Exception:  # nibabel's quaternion maths on a corrupt header
        best = np.full((4, 4), np.nan)
    affine, unknown = repair_affine(best, source)
    unknown = unknown or _zero_pixdim(image, source)
    metadata["SpacingKnown"] = unknown is None
    if unknown is not None:
        metadata["SpacingUnknownReason"] = unknown
    provenance = [{"step": "load_nifti", "package": "nibabel", "version": version("nibabel"),
                   "arguments": {"path": source}}]
    return Volume(data, affine, metadata, provenance)


def _zero_pixdim(image: nib.analyze.AnalyzeImage, source: str) -> str | None:
    """Why the spacing is unknown when the stored pixdim was 0 or not finite, else None.

    nibabel silently sets such pixdim to 1 on load, so the stored header is read again
    unchecked. Only matters where the affine comes from pixdim (no sform).
    """
    header = image.header
    if "pixdim" not in header or ("sform_code" in header and int(header["sform_code"]) > 0):
        return None
    try:
        holder = image.file_map.get("header") or image.file_map["image"]  # .nii: one file
        if holder.filename is None:
            return None
        with ImageOpener(holder.filename) as f:
            raw = type(header).from_fileobj(f, check=False)["pixdim"]
    except Exception:  # the checked read already succeeded; this is a best-effort look
        return None
    n = min(3, int(header["dim"][0]))
    bad = [i for i in range(n) if not np.isfinite(raw[1 + i]) or raw[1 + i] == 0]
    if not bad:
        return None
    reason = (f"pixdim: zero or non-finite voxel size along {', '.join('ijk'[i] for i in bad)}"
              " (1 mm assumed)")
    log.warning("%s: %s", source, reason)
    return reason


def _intent_code(image: object) -> int:
    header = getattr(image, "header", None)
    try:
        return int(header["intent_code"])  # type: ignore[index]
    except Exception:
        return 0


def _check_image_file(image: nib.analyze.AnalyzeImage, path: Path) -> None:
    image_file = image.file_map["image"].filename
    if image_file is not None and not Path(image_file).exists():
        raise ImageError(f"header found but its image file {Path(image_file).name} is "
                         "missing", source=str(path))
