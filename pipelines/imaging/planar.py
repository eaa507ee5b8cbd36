"""2-D images: projection radiographs (CR, DX, ...) and PNG/JPEG research images.

Arrays are ``(columns, rows)`` like volumes, or ``(columns, rows, 3)`` for colour, which is
kept as RGB (palette and YBR converted to RGB, alpha dropped) rather than collapsed to
grey: a model can average channels, but cannot recover them. Metadata record what was
done. Projection images have no patient-space position, so the affine only carries pixel
size, and ``SpacingKnown`` says whether that size is real.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from pipelines.imaging.decode import decode_pixels, invert_monochrome1, modality_values
from pipelines.imaging.frames import float_list
from pipelines.imaging.volume import ImageError, Volume

__all__ = ["RASTER_SUFFIXES", "is_planar", "load_raster", "planar_dicom_to_volume"]

#: File suffixes read with Pillow.
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")


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
    for magnification), else 1 mm with ``SpacingKnown=False``.
    """
    stored = decode_pixels(ds, source)[0]
    metadata: dict[str, Any] = {k: str(ds.get(k)) for k in (
        "Modality", "SOPClassUID", "SeriesInstanceUID", "PhotometricInterpretation")
        if ds.get(k) is not None}
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    spacing = None
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        if keyword in ds and ds.get(keyword):
            spacing = float_list(ds.get(keyword), 2, keyword, source)
            metadata["SpacingSource"] = keyword
            break
    metadata["SpacingKnown"] = spacing is not None
    if spacing is None:
        spacing = [1.0, 1.0]
        metadata["SpacingSource"] = "none (1 mm assumed)"
    metadata["OrientationKnown"] = False
    if stored.ndim == 3:
        array = np.swapaxes(stored, 0, 1)
        metadata["ColorChannels"] = "RGB (trailing axis)"
        metadata["ColorConversion"] = f"{photometric} -> RGB" if photometric != "RGB" else "none"
        metadata["PhotometricInterpretation"] = "RGB"
    else:
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
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
        # A lone cross-sectional slice keeps its patient-space placement (LPS -> RAS).
        iop = np.asarray(float_list(ds.ImageOrientationPatient, 6, "ImageOrientationPatient",
                                    source))
        lps = np.eye(4)
        lps[:3, 0], lps[:3, 1] = iop[:3] * spacing[1], iop[3:] * spacing[0]
        lps[:3, 2] = np.cross(iop[:3], iop[3:]) * float(ds.get("SliceThickness") or 1.0)
        lps[:3, 3] = float_list(ds.ImagePositionPatient, 3, "ImagePositionPatient", source)
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
        metadata["OrientationKnown"] = True
    provenance = [{"step": "planar_dicom_to_volume", "package": "pydicom",
                   "version": version("pydicom"), "arguments": {"source": source}}]
    return Volume(np.ascontiguousarray(array), affine, metadata, provenance)


def load_raster(path: Path) -> Volume:
    """A PNG or JPEG as a Volume: grey ``(w, h)`` or RGB ``(w, h, 3)``; spacing unknown.

    Palette images are expanded to RGB (or grey when the palette is grey); alpha is
    dropped; 16-bit grey PNGs keep their values.

    Raises
    ------
    ImageError
        Missing, truncated or non-image file.
    """
    from PIL import Image, UnidentifiedImageError

    source = str(path)
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            converted, conversion = _normalise_mode(image)
            array = np.asarray(converted)
    except FileNotFoundError as exc:
        raise ImageError("no such file", source=source) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"not a readable PNG/JPEG image: {exc}", source=source) from exc
    metadata: dict[str, Any] = {"Format": "raster", "SourceMode": mode,
                                "ColorConversion": conversion, "SpacingKnown": False,
                                "SpacingSource": "none (1 mm assumed)",
                                "OrientationKnown": False}
    if array.ndim == 3:
        metadata["ColorChannels"] = "RGB (trailing axis)"
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
    if mode == "LA":
        return image.convert("L"), "LA -> L (alpha dropped)"
    if mode in ("P", "PA"):
        rgb = image.convert("RGB")
        arr = np.asarray(rgb)
        if np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2]):
            return rgb.convert("L"), f"{mode} (grey palette) -> L"
        return rgb, f"{mode} -> RGB (palette expanded" + (", alpha dropped)" if mode == "PA"
                                                          else ")")
    if mode in ("RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        return image.convert("RGB"), f"{mode} -> RGB" + (" (alpha dropped)"
                                                         if mode == "RGBA" else "")
    raise ImageError(f"unsupported image mode {mode}")
