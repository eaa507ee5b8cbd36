"""2-D images: projection radiographs (CR, DX, ...) and PNG/JPEG research images.

Arrays are ``(columns, rows)`` like volumes, or ``(columns, rows, 3)`` for colour, which is
kept as RGB (palette, CMYK, YCbCr and YBR converted to RGB, alpha dropped) rather than
collapsed to grey here: :class:`pipelines.imaging.colour.ToModelChannels` fits it to the
model (BT.601 luma for one channel). Metadata record what was done. Projection images
have no patient-space position, so the affine only carries pixel size, and
``SpacingKnown`` says whether that size is real (:mod:`pipelines.imaging.spacing`).
"""

from __future__ import annotations

import logging
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from pipelines.imaging.decode import decode_pixels, invert_monochrome1, modality_values
from pipelines.imaging.frames import float_list
from pipelines.imaging.spacing import pixel_spacing, positive_number
from pipelines.imaging.volume import ImageError, Volume

__all__ = ["RASTER_SUFFIXES", "is_planar", "load_raster", "planar_dicom_to_volume"]

log = logging.getLogger(__name__)

#: File suffixes read with Pillow.
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def is_planar(ds: Dataset) -> bool:
    """True for single-frame images without patient-space geometry, or projection radiographs."""
    modality = str(ds.get("Modality", "")).upper()
    frames = str(ds.get("NumberOfFrames", "1") or "1").strip()
    if frames not in ("", "1"):
        return False
    return modality in {"CR", "DX", "MG", "IO", "PX"} or "ImagePositionPatient" not in ds


def _affine(col_spacing: float, row_spacing: float) -> np.ndarray:
    return np.diag([col_spacing, row_spacing, 1.0, 1.0])


def planar_dicom_to_volume(ds: Dataset, source: str) -> Volume:
    """A single-frame 2-D DICOM image as a 2-D (grey) or 3-D (RGB, trailing axis) Volume.

    Spacing comes from PixelSpacing, else ImagerPixelSpacing (detector plane, not corrected
    for magnification), else 1 mm with ``SpacingKnown=False``; a tag that is zero,
    negative, not finite or not numeric counts as absent, with a logged warning.
    """
    stored = decode_pixels(ds, source)[0]
    metadata: dict[str, Any] = {k: str(ds.get(k)) for k in (
        "Modality", "SOPClassUID", "SeriesInstanceUID", "PhotometricInterpretation")
        if ds.get(k) is not None}
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    found = pixel_spacing(ds, source)
    found.record(metadata)
    spacing = found.values
    metadata["OrientationKnown"] = False
    if stored.ndim == 3:
        array = np.swapaxes(stored, 0, 1)
        metadata["ColorChannels"] = 3
        metadata["ColorConversion"] = f"{photometric} -> RGB" if photometric != "RGB" else "none"
        metadata["PhotometricInterpretation"] = "RGB"
    else:
        slope = _header_number(ds, "RescaleSlope", 1.0, source)
        intercept = _header_number(ds, "RescaleIntercept", 0.0, source)
        values = modality_values(stored, slope, intercept)
        if photometric == "MONOCHROME1":
            bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
            values = invert_monochrome1(values, bits_stored=bits,
                                        signed=int(ds.get("PixelRepresentation", 0)) == 1,
                                        slope=slope, intercept=intercept)
            metadata["PhotometricInterpretation"] = "MONOCHROME2"
            metadata["InvertedFrom"] = "MONOCHROME1"
        array = values.T
    affine = _affine(spacing[1], spacing[0])
    if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
        placed = _placement(ds, spacing, source)
        if placed is not None:
            affine = placed
            metadata["OrientationKnown"] = True
    provenance = [{"step": "planar_dicom_to_volume", "package": "pydicom",
                   "version": version("pydicom"), "arguments": {"source": source}}]
    return Volume(np.ascontiguousarray(array), affine, metadata, provenance)


def _header_number(ds: Dataset, keyword: str, default: float, source: str) -> float:
    try:
        value = float(ds.get(keyword, default) or default)
    except (TypeError, ValueError):
        raise ImageError(f"{keyword} is not a number", source=source) from None
    if not np.isfinite(value):
        raise ImageError(f"{keyword} is not finite", source=source)
    return value


def _placement(ds: Dataset, spacing: tuple[float, float], source: str) -> np.ndarray | None:
    """A lone cross-sectional slice's patient-space affine (LPS -> RAS), or None.

    Broken placement tags only cost the placement: the image is still a usable 2-D
    image, so they are logged and the projection affine kept.
    """
    try:
        iop = np.asarray(float_list(ds.ImageOrientationPatient, 6, "ImageOrientationPatient",
                                    source))
        position = float_list(ds.ImagePositionPatient, 3, "ImagePositionPatient", source)
    except ImageError:
        log.warning("%s: ImageOrientationPatient/ImagePositionPatient unusable; the slice "
                    "is kept without its patient-space placement", source)
        return None
    normal = np.cross(iop[:3], iop[3:])
    if float(np.linalg.norm(normal)) < 1e-6:
        log.warning("%s: ImageOrientationPatient has parallel or zero direction cosines; "
                    "the slice is kept without its patient-space placement", source)
        return None
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = iop[:3] * spacing[1], iop[3:] * spacing[0]
    lps[:3, 2] = normal * (positive_number(ds.get("SliceThickness")) or 1.0)
    lps[:3, 3] = position
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def load_raster(path: Path) -> Volume:
    """A PNG, JPEG or TIFF as a Volume: grey ``(w, h)`` or RGB ``(w, h, 3)``; spacing unknown.

    Palette images are expanded to RGB (or grey when the palette is grey); alpha is
    dropped; CMYK and YCbCr become RGB; 16-bit grey keeps its values.

    Raises
    ------
    ImageError
        Missing, truncated or non-image file, several frames (animated PNG, multi-page
        TIFF), an image too large to decode safely, or an unsupported mode.
    """
    from PIL import Image, UnidentifiedImageError

    source = str(path)
    try:
        with Image.open(path) as image:
            frames = int(getattr(image, "n_frames", 1) or 1)
            if frames > 1:
                raise ImageError(f"holds {frames} frames (animated or multi-page); one "
                                 "image is expected", source=source)
            image.load()
            mode = image.mode
            converted, conversion = _normalise_mode(image)
            array = np.asarray(converted)
    except ImageError as exc:
        raise ImageError(exc.reason, source=source) from None
    except FileNotFoundError as exc:
        raise ImageError("no such file", source=source) from exc
    except Image.DecompressionBombError:
        raise ImageError("image too large to decode safely (Pillow's decompression-bomb "
                         "limit)", source=source) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"not a readable PNG/JPEG/TIFF image ({type(exc).__name__})",
                         source=source) from exc
    metadata: dict[str, Any] = {"Format": "raster", "SourceMode": mode,
                                "ColorConversion": conversion, "SpacingKnown": False,
                                "SpacingSource": "none (1 mm assumed)",
                                "SpacingUnknownReason": "raster files carry no pixel spacing",
                                "OrientationKnown": False}
    if array.ndim == 3:
        metadata["ColorChannels"] = 3
    metadata["PhotometricInterpretation"] = "RGB" if array.ndim == 3 else "MONOCHROME2"
    provenance = [{"step": "load_raster", "package": "Pillow", "version": version("pillow"),
                   "arguments": {"path": source}}]
    return Volume(np.ascontiguousarray(np.swapaxes(array, 0, 1)), _affine(1.0, 1.0),
                  metadata, provenance)


def _normalise_mode(image: Any) -> tuple[Any, str]:
    """Grey stays grey (8/16/32-bit), colour becomes RGB; returns the image and what changed."""
    mode = image.mode
    if mode in ("L", "I", "I;16", "I;16B", "I;16L", "F", "RGB"):
        return image, "none"
    if mode == "1":
        return image.convert("L"), "1-bit -> L"
    if mode in ("LA", "La"):
        return image.convert("L"), f"{mode} -> L (alpha dropped)"
    if mode in ("P", "PA"):
        rgb = image.convert("RGB")
        arr = np.asarray(rgb)
        if np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2]):
            return rgb.convert("L"), f"{mode} (grey palette) -> L"
        return rgb, f"{mode} -> RGB (palette expanded" + (", alpha dropped)" if mode == "PA"
                                                          else ")")
    if mode in ("RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        return image.convert("RGB"), f"{mode} -> RGB" + (" (alpha dropped)"
                                                         if mode in ("RGBA", "RGBa") else "")
    raise ImageError(f"unsupported image mode {mode}")
