"""Siemens MOSAIC: unpack the tiled slices of one image into frames with true positions.

The slice count is NumberOfImagesInMosaic from the CSA image header (0029,1010), read
with nibabel's CSA parser (pydicom cannot parse CSA), or the public-private
(0019,100A). ImagePositionPatient of a MOSAIC refers to the corner of the whole tiled
image, so the first slice's position is corrected by half the difference between the
mosaic and tile sizes, as dcm2niix and nibabel do.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from pydicom.dataset import Dataset

from pipelines.imaging.frames import Frame, FrameLoader, classic_frame
from pipelines.imaging.header import header_value
from pipelines.imaging.volume import ImageError

__all__ = ["is_mosaic", "mosaic_frames", "number_of_images_in_mosaic"]


def is_mosaic(ds: Dataset) -> bool:
    """True for Siemens MOSAIC images (ImageType contains MOSAIC)."""
    image_type = header_value(ds, "ImageType") or []
    values = [image_type] if isinstance(image_type, str) else list(image_type)
    return "MOSAIC" in [str(v).upper() for v in values]


def _csa(ds: Dataset) -> dict | None:
    try:
        with warnings.catch_warnings():
            # nibabel.nicom warns on import that its DICOM readers are experimental; only
            # its CSA parser is used here.
            warnings.simplefilter("ignore", UserWarning)
            from nibabel.nicom import csareader

        return csareader.get_csa_header(ds, "image")
    except Exception:  # a corrupt CSA header: fall back to the public tags
        return None


def number_of_images_in_mosaic(ds: Dataset, source: str) -> int:
    """Slices in the mosaic, from the CSA header or (0019,100A)."""
    csa = _csa(ds)
    if csa is not None:
        from nibabel.nicom import csareader

        try:
            n = csareader.get_n_mosaic(csa)
        except Exception:
            n = None
        if n:
            return int(n)
    if (0x0019, 0x100A) in ds:
        value = ds[0x0019, 0x100A].value
        try:
            return int(value if not isinstance(value, bytes)
                       else int.from_bytes(value[:2], "little"))
        except (TypeError, ValueError):
            pass
    raise ImageError("MOSAIC image without NumberOfImagesInMosaic (CSA (0029,1010) or "
                     "(0019,100A))", source=source)


def _slice_normal(ds: Dataset, frame: Frame) -> np.ndarray:
    csa = _csa(ds)
    if csa is not None:
        from nibabel.nicom import csareader

        try:
            normal = csareader.get_slice_normal(csa)
        except Exception:
            normal = None
        if normal is not None and np.linalg.norm(normal) > 0.5:
            # The CSA normal carries the acquisition order (ascending/descending tiles).
            return np.asarray(normal, dtype=float) / np.linalg.norm(normal)
    normal = np.cross(frame.row_cosine, frame.col_cosine)
    return np.asarray(normal / np.linalg.norm(normal))


def mosaic_frames(ds: Dataset, source: str, loader: FrameLoader) -> list[Frame]:
    """One frame per mosaic tile, in acquisition order, with corrected positions."""
    base = classic_frame(ds, source, loader)
    n = number_of_images_in_mosaic(ds, source)
    per_side = math.ceil(math.sqrt(n))
    if base.rows % per_side or base.cols % per_side:
        raise ImageError(f"MOSAIC of {base.rows}x{base.cols} cannot hold {n} tiles on a "
                         f"{per_side}x{per_side} grid", source=source)
    rows, cols = base.rows // per_side, base.cols // per_side
    spacing = base.slice_thickness
    if not spacing:
        raise ImageError("MOSAIC without SpacingBetweenSlices or SliceThickness",
                         source=source)
    normal = _slice_normal(ds, base)
    row_spacing, col_spacing = base.spacing
    # Shift from the mosaic's corner to the first tile's corner (nibabel MosaicWrapper).
    shift = ((base.cols - cols) / 2.0) * col_spacing * base.row_cosine + \
        ((base.rows - rows) / 2.0) * row_spacing * base.col_cosine
    first = base.position + shift
    cache: dict[str, np.ndarray] = {}

    def tile(k: int) -> np.ndarray:
        if "m" not in cache:
            cache["m"] = loader(0)
        r, c = divmod(k, per_side)
        return cache["m"][r * rows:(r + 1) * rows, c * cols:(c + 1) * cols]

    frames = []
    for k in range(n):
        frames.append(Frame(
            source=f"{source} tile {k + 1}", rows=rows, cols=cols,
            position=first + k * spacing * normal,
            row_cosine=base.row_cosine, col_cosine=base.col_cosine, spacing=base.spacing,
            slope=base.slope, intercept=base.intercept, temporal=base.temporal,
            load=(lambda k=k: tile(k)),  # type: ignore[misc]
            series_uid=base.series_uid, frame_of_reference=base.frame_of_reference,
            photometric=base.photometric, samples=base.samples,
            bits_stored=base.bits_stored, signed=base.signed, slice_thickness=spacing,
        ))
    return frames
