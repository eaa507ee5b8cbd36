"""Assemble a DICOM series into a :class:`Volume`, strictly.

Slices are ordered by ImagePositionPatient projected on the slice normal (row x column
cosines), never by InstanceNumber, which scanners and PACS renumber freely. Repeated
positions make a 4-D volume (time, echoes) rather than a doubled slice axis. Gaps, uneven
spacing, gantry tilt, too few slices, mixed geometry and strays from another series are
refused with an :class:`ImageError` unless ``resample=True`` is asked to fix tilt and
spacing.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.imaging.decode import invert_monochrome1, modality_values
from pipelines.imaging.discovery import DicomInstance, discover
from pipelines.imaging.frames import Frame, frames_from_dataset
from pipelines.imaging.resample import resample_stack
from pipelines.imaging.spacing import flag_unknown
from pipelines.imaging.volume import ImageError, Volume

__all__ = ["LPS_TO_RAS", "assemble_frames", "load_dicom_series", "series_to_volume"]

log = logging.getLogger(__name__)

#: DICOM patient space is LPS; NIfTI/nibabel is RAS: flip x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

_COPY_KEYWORDS = ("Modality", "SeriesInstanceUID", "StudyInstanceUID", "SeriesDescription",
                  "Manufacturer", "SOPClassUID", "BodyPartExamined", "RepetitionTime",
                  "EchoTime")


def _few(sources: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(sources[:limit])
    return shown + (f" and {len(sources) - limit} more" if len(sources) > limit else "")


def _check_uniform(frames: Sequence[Frame], what: str, key: Any, source: str) -> None:
    """Refuse frames that disagree on ``key``; name the minority's files."""
    groups: dict[Any, list[str]] = {}
    for frame in frames:
        groups.setdefault(key(frame), []).append(frame.source)
    if len(groups) > 1:
        ordered = sorted(groups.items(), key=lambda kv: -len(kv[1]))
        detail = "; ".join(f"{value} ({len(files)}: {_few(files)})" for value, files in ordered)
        raise ImageError(f"not a volume: mixed {what}: {detail}", source=source)


def assemble_frames(
    frames: Sequence[Frame],
    *,
    source: str,
    min_slices: int = 3,
    resample: bool = False,
    spacing_rtol: float = 0.01,
    metadata: dict[str, Any] | None = None,
) -> Volume:
    """Order, validate and stack frames into a 3-D (or 4-D) volume.

    Parameters
    ----------
    frames : sequence of Frame
        Every frame of one series, in any order.
    source : str
        Series name for errors (folder, file or SeriesInstanceUID).
    min_slices : int, default 3
        Fewer distinct slice positions are refused (localizers, stray slices).
        dicom2nifti uses 4; a thick-slab 3-slice series is still a volume here.
    resample : bool, default False
        Resample gantry-tilted or unevenly spaced stacks onto a regular orthogonal grid
        instead of refusing them. Gaps stay refused when a whole slice is missing and
        ``resample`` is False.
    spacing_rtol : float, default 0.01
        Relative tolerance on slice gaps (plus 0.01 mm for rounding in DS values).

    Raises
    ------
    ImageError
        The frames do not form one regular volume; the message names the problem and files.
    """
    if not frames:
        raise ImageError("no image frames", source=source)
    _check_uniform(frames, "series (SeriesInstanceUID)", lambda f: f.series_uid, source)
    _check_uniform(frames, "frames of reference (FrameOfReferenceUID)",
                   lambda f: f.frame_of_reference, source)
    _check_uniform(frames, "image sizes (Rows x Columns)", lambda f: f"{f.rows}x{f.cols}", source)
    _check_uniform(frames, "photometric interpretations",
                   lambda f: (f.photometric, f.samples), source)
    ref = frames[0]
    _check_uniform(frames, "orientations (ImageOrientationPatient)", lambda f: tuple(
        round(float(v), 3) + 0.0 for v in (*f.row_cosine, *f.col_cosine)), source)
    _check_uniform(frames, "pixel spacings (PixelSpacing)",
                   lambda f: tuple(round(float(v), 4) for v in f.spacing), source)
    normal = np.cross(ref.row_cosine, ref.col_cosine)
    if float(np.linalg.norm(normal)) < 1e-6:
        raise ImageError("not a volume: ImageOrientationPatient's row and column directions "
                         "are parallel", source=source)
    normal /= np.linalg.norm(normal)
    slice_unknown: str | None = None

    # Group frames by plane: distance along the normal, with DS rounding tolerance.
    ordered = sorted(frames, key=lambda f: float(f.position @ normal))
    planes: list[list[Frame]] = []
    for frame in ordered:
        if planes and abs(float((frame.position - planes[-1][0].position) @ normal)) < 1e-2:
            planes[-1].append(frame)
        else:
            planes.append([frame])
    min_pixel = min(ref.spacing)
    for plane in planes:
        offsets = [float(np.linalg.norm(f.position - plane[0].position)) for f in plane]
        if max(offsets) > 0.05 * min_pixel:
            raise ImageError(f"not a volume: images in the same plane at different positions "
                             f"({_few([f.source for f in plane])})", source=source)
    if len(planes) < min_slices:
        if len(planes) == 1 and len(frames) > 1:
            raise ImageError(f"not a volume: all {len(frames)} images lie at the same "
                             f"position ({_few([f.source for f in frames])})", source=source)
        raise ImageError(f"too few slices: {len(planes)} distinct position(s), fewer than "
                         f"min_slices={min_slices} (a localizer or an incomplete series?)",
                         source=source)
    counts = Counter(len(p) for p in planes)
    if len(counts) > 1:
        usual = counts.most_common(1)[0][0]
        odd = [p for p in planes if len(p) != usual]
        raise ImageError(
            f"4-D series with unequal repeats: most positions have {usual} images but "
            f"{len(odd)} have {sorted({len(p) for p in odd})} "
            f"(e.g. {_few([f.source for f in odd[0]])}); missing or extra files?",
            source=source)
    n_t = len(planes[0])
    for plane in planes:
        plane.sort(key=lambda f: f.temporal)

    positions = np.array([p[0].position for p in planes])
    s = positions @ normal
    gaps = np.diff(s)
    problems = _geometry_problems(planes, positions, normal, ref, gaps, spacing_rtol)
    if problems and not resample:
        raise ImageError("; ".join(problems) + " (resample=True resamples onto a regular "
                         "grid)", source=source)

    colour = ref.samples > 1 or ref.photometric == "PALETTE COLOR"
    stack = None if colour else _grey_stack(planes)
    if stack is None:
        stack = np.stack([np.stack([_values(f, colour) for f in plane], axis=2)
                          for plane in planes], axis=2)  # (i, j, k, t[, c])
    resampled = bool(problems)
    if resampled:
        if colour:
            raise ImageError("resampling colour series is not supported", source=source)
        outs = []
        affine_lps = np.eye(4)
        for t in range(n_t):
            out, affine_lps = resample_stack(
                np.moveaxis(stack[:, :, :, t], 2, 0), positions, ref.row_cosine,
                ref.col_cosine, ref.spacing)
            outs.append(out)
        array = np.stack(outs, axis=-1)
    else:
        array = stack
        affine_lps = np.eye(4)
        affine_lps[:3, 0] = ref.row_cosine * ref.spacing[1]
        affine_lps[:3, 1] = ref.col_cosine * ref.spacing[0]
        if len(planes) > 1:
            affine_lps[:3, 2] = (positions[-1] - positions[0]) / (len(planes) - 1)
        else:
            affine_lps[:3, 2] = normal * (ref.slice_thickness or 1.0)
            if ref.slice_thickness is None:
                slice_unknown = ("one plane and no usable SpacingBetweenSlices or "
                                 "SliceThickness (1 mm assumed)")
        affine_lps[:3, 3] = positions[0]
    if n_t == 1:
        array = array[:, :, :, 0]
    meta: dict[str, Any] = dict(metadata or {})
    meta.update({
        "SliceCount": len(planes), "Timepoints": n_t, "Resampled": resampled,
        "OrderedBy": "ImagePositionPatient projected on the slice normal",
        "PhotometricInterpretation": "RGB" if colour else "MONOCHROME2",
        "SourcePhotometricInterpretation": ref.photometric,
        "RescaleApplied": not colour,
    })
    if colour:
        meta["ColorChannels"] = 3
    meta["SpacingKnown"] = True
    for reason in (ref.spacing_unknown, slice_unknown):
        if reason is not None:
            flag_unknown(meta, reason)
            log.warning("%s: spacing unknown: %s", source, reason)
    if resampled:
        meta["ResampleReasons"] = problems
    provenance = [{"step": "assemble_frames", "package": "pydicom",
                   "version": version("pydicom"),
                   "arguments": {"min_slices": min_slices, "resample": resample,
                                 "spacing_rtol": spacing_rtol}}]
    if not (array.flags.c_contiguous or array.flags.f_contiguous):
        array = np.ascontiguousarray(array)
    return Volume(array, LPS_TO_RAS @ affine_lps, meta, provenance)


def _geometry_problems(planes: list[list[Frame]], positions: np.ndarray, normal: np.ndarray,
                       ref: Frame, gaps: np.ndarray, rtol: float) -> list[str]:
    problems = []
    if len(planes) > 1:
        # Tilt: slice origins drift in-plane along the stack, so the stacking direction is
        # not the slice normal.
        drift = positions - positions[0]
        in_plane = drift - np.outer(drift @ normal, normal)
        if float(np.abs(in_plane).max()) > 0.05 * min(ref.spacing):
            step = positions[-1] - positions[0]
            angle = np.degrees(np.arccos(min(1.0, abs(float(step @ normal)) /
                                             float(np.linalg.norm(step)))))
            problems.append(f"gantry tilt: the stacking direction is {angle:.2f} degrees off "
                            f"the slice normal ({planes[0][0].source} -> "
                            f"{planes[-1][0].source})")
    if len(gaps) > 1:
        base = float(gaps.min())
        tolerance = rtol * base + 0.01
        for k, gap in enumerate(gaps):
            if abs(gap - base) <= tolerance:
                continue
            a, b = planes[k][0].source, planes[k + 1][0].source
            missing = round(gap / base) - 1
            if missing >= 1 and abs(gap - (missing + 1) * base) <= tolerance * (missing + 1):
                problems.append(f"missing slice: {missing} slice(s) absent between {a} and "
                                f"{b} (gap {gap:.3f} mm, spacing elsewhere {base:.3f} mm)")
            else:
                problems.append(f"uneven slice spacing: {gap:.3f} mm between {a} and {b}, "
                                f"{base:.3f} mm elsewhere")
    return problems


def _grey_stack(planes: list[list[Frame]]) -> np.ndarray | None:
    """All grey frames as one (i, j, k, t) float array, rescaled in one pass.

    The frames are stacked as stored, (t, k, rows, cols), and the result is the
    transposed view of that buffer, so it is Fortran-ordered: a C-ordered copy would
    cost a transposing pass over the whole volume, and nothing downstream needs one.
    Values are bit-identical to :func:`_values` frame by frame. Returns None where that
    cannot be guaranteed cheaply (MONOCHROME1, rescale differing between frames, or
    integers too wide for exact float32), and the frame-by-frame path runs instead.
    """
    ordered = [plane[t] for t in range(len(planes[0])) for plane in planes]
    first = ordered[0]
    if first.photometric == "MONOCHROME1" or any(
            (f.slope, f.intercept, f.photometric) != (first.slope, first.intercept,
                                                      first.photometric) for f in ordered):
        return None
    stored = []
    for frame in ordered:
        pixels = frame.load()
        if pixels.shape != (frame.rows, frame.cols):
            raise ImageError(f"pixel data are {pixels.shape[:2]}, expected "
                             f"{frame.rows}x{frame.cols}", source=frame.source)
        stored.append(pixels)
    dtype = np.result_type(*stored)
    slope, intercept = first.slope, first.intercept
    # (t * k, rows, cols), C-ordered: each frame is converted straight into its slot.
    values = np.empty((len(stored), first.rows, first.cols), dtype=np.float32)
    if slope == 1.0 and float(intercept).is_integer():
        if dtype.kind not in "iu":
            return None
        info = np.iinfo(dtype)
        if max(-int(info.min), int(info.max)) + abs(intercept) > 2**24:
            return None  # modality_values may keep float64 here; let it decide per frame
        # Every operand and result is an integer below 2**24: float32 is exact.
        for slot, pixels in zip(values, stored, strict=True):
            np.add(pixels, np.float32(intercept), out=slot, dtype=np.float32)
    else:
        for slot, pixels in zip(values, stored, strict=True):
            slot[...] = pixels.astype(np.float64) * slope + intercept
    n_t = len(planes[0])
    return values.reshape(n_t, len(planes), first.rows, first.cols).T


def _values(frame: Frame, colour: bool) -> np.ndarray:
    """Frame pixels as (i, j[, c]) values: colour kept as stored, grey rescaled."""
    stored = frame.load()
    if stored.shape[:2] != (frame.rows, frame.cols):
        raise ImageError(f"pixel data are {stored.shape[:2]}, expected "
                         f"{frame.rows}x{frame.cols}", source=frame.source)
    if colour:
        return np.swapaxes(stored, 0, 1)
    values = modality_values(stored, frame.slope, frame.intercept)
    if frame.photometric == "MONOCHROME1":
        values = invert_monochrome1(values, bits_stored=frame.bits_stored, signed=frame.signed,
                                    slope=frame.slope, intercept=frame.intercept)
    return values.T


def series_to_volume(instances: Sequence[DicomInstance], *, min_slices: int = 3,
                     resample: bool = False, source: str | None = None) -> Volume:
    """One series' instances -> Volume (classic, enhanced multi-frame or MOSAIC).

    Raises
    ------
    ImageError
        Unreadable pixels or geometry, or the checks of :func:`assemble_frames`.
    """
    if not instances:
        raise ImageError("no DICOM instances", source=source)
    name = source or str(instances[0].dataset.get("SeriesInstanceUID", instances[0].source))
    frames: list[Frame] = []
    for instance in instances:
        frames.extend(frames_from_dataset(instance.dataset, instance.source))
    first = instances[0].dataset
    metadata = {k: _plain(first.get(k)) for k in _COPY_KEYWORDS if first.get(k) is not None}
    metadata["SourceFiles"] = len(instances)
    if len(frames) > len(instances):
        # Multi-frame and MOSAIC files carry their slices themselves.
        min_slices = min(min_slices, len(frames))
    return assemble_frames(frames, source=name, min_slices=min_slices, resample=resample,
                           metadata=metadata)


def _plain(value: Any) -> Any:
    # pydicom's DSfloat/IS/UID subclasses become plain JSON-friendly values.
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)


def load_dicom_series(src: Path, *, series_uid: str | None = None, min_slices: int = 3,
                      resample: bool = False) -> Volume:
    """Find the one series under ``src`` (folder, DICOMDIR, zip or file) and assemble it.

    Raises
    ------
    ImageError
        No DICOM image found, several series and no ``series_uid`` chosen, or any
        assembly problem.
    """
    found = discover(Path(src))
    if not found.series:
        reasons = "; ".join(f"{r.source}: {r.reason}" for r in found.rejected[:3])
        raise ImageError(f"no DICOM image series found ({reasons})" if reasons
                         else "no DICOM image series found", source=str(src))
    if series_uid is not None:
        if series_uid not in found.series:
            raise ImageError(f"series {series_uid} not found; found {found.describe()}",
                             source=str(src))
        instances = found.series[series_uid]
    elif len(found.series) > 1:
        raise ImageError(f"{len(found.series)} series found, expected one (a slice from "
                         f"another series?): {found.describe()}", source=str(src))
    else:
        instances = next(iter(found.series.values()))
    return series_to_volume(instances, min_slices=min_slices, resample=resample,
                            source=str(src))
