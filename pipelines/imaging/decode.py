"""DICOM pixel decoding with licence-compatible codecs, and the modality value transform.

Decoding goes through pydicom's pixel backends (numpy, its own RLE, pylibjpeg-openjpeg,
pyjpegls, Pillow, and GDCM through python-gdcm, BSD/Apache-licensed, for JPEG lossless and
12-bit JPEG). pylibjpeg-libjpeg is GPL-3.0 and is never required; where neither it nor
GDCM is installed, those transfer syntaxes are refused with an :class:`ImageError` that
names the transfer syntax and both ways to decode it.
"""

from __future__ import annotations

import re
import struct

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from pipelines.imaging.dicom_limits import DicomLimitError, DicomLimits, check_pixel_budget
from pipelines.imaging.header import header_value
from pipelines.imaging.volume import ImageError

__all__ = [
    "GPL_EXTRA", "decode_pixels", "invert_monochrome1", "modality_values", "shown_code",
    "transfer_syntax",
]

#: The optional extra that brings the GPL JPEG decoder (pylibjpeg-libjpeg).
GPL_EXTRA = "clinfuse[gpl-codecs]"

# Transfer syntaxes whose only decoders are GDCM or pylibjpeg-libjpeg (GPL-3.0); Pillow
# handles JPEG baseline and 8-bit JPEG extended, but not 12-bit samples or process 14.
_NEEDS_LIBJPEG = {JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1}
# Native little-endian pixel data is the stored integers as they lie in memory on every
# host we run on, so it can be viewed in place instead of going through pydicom's decoder.
_NATIVE_LITTLE_ENDIAN = {ImplicitVRLittleEndian, ExplicitVRLittleEndian}
_JPEG_LS = {JPEGLSLossless, JPEGLSNearLossless}


def _decoder_available(ts: UID) -> bool:
    from pydicom.pixels import get_decoder

    try:
        return bool(get_decoder(ts).is_available)
    except NotImplementedError:
        return False


def transfer_syntax(ds: Dataset, source: str) -> UID:
    """The dataset's transfer syntax; refuse a Part-10 file whose meta lacks one.

    Files without any File Meta (read with ``force=True``) get the encoding pydicom
    detected, since a raw dataset is only ever uncompressed.
    """
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts:
        return UID(ts)
    if meta is not None and len(meta) > 0:
        raise ImageError(
            "the File Meta Information has no (0002,0010) TransferSyntaxUID, so the pixel "
            "encoding is unknown", source=source)
    implicit, little = ds.original_encoding
    if implicit is None:
        raise ImageError("no File Meta and the encoding could not be detected", source=source)
    if little:
        return UID("1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1")
    return UID("1.2.840.10008.1.2.2")


def decode_pixels(ds: Dataset, source: str, *, limits: DicomLimits | None = None
                  ) -> np.ndarray:
    """Stored pixel values, frames first: ``(frames, rows, cols[, samples])``.

    Colour data come back as RGB (YBR is converted by pydicom); palette colour is
    expanded through its lookup table.

    Parameters
    ----------
    ds : Dataset
        The instance.
    source : str
        Name used in errors.
    limits : DicomLimits, optional
        The decoded-pixel cap, checked before any decoder runs; default
        :data:`pipelines.imaging.dicom_limits.DEFAULT_LIMITS`.

    Raises
    ------
    ImageError
        No pixel data, an undecodable transfer syntax, truncated/corrupt pixel data, or
        pixel data that would decode past the cap (declared by the header or by a
        JPEG/JPEG 2000 codestream).
    """
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageError(
            f"no pixel data (Modality {shown_code(ds.get('Modality'))}, "
            f"SOPClassUID {shown_code(ds.get('SOPClassUID'))})", source=source)
    try:
        check_pixel_budget(ds, limits)
    except DicomLimitError as exc:
        raise ImageError(exc.reason, source=source) from None
    ts = transfer_syntax(ds, source)
    if ds.file_meta.get("TransferSyntaxUID") is None:
        # Raw datasets read with force=True: pydicom needs the syntax in the meta to decode.
        ds.file_meta.TransferSyntaxUID = ts
    if ts in _NEEDS_LIBJPEG and not _decoder_available(ts):
        raise ImageError(
            f"transfer syntax {ts} ({ts.name}) can only be decoded by GDCM (python-gdcm) or "
            f"pylibjpeg-libjpeg (GPL-3.0, optional extra {GPL_EXTRA}), and neither is "
            "installed", source=source)
    if ts in _NATIVE_LITTLE_ENDIAN:
        native = _native_grey(ds)
        if native is not None:
            return native
    if ts in _JPEG_LS:
        _check_jpeg_ls_frames(ds, source)
    plugin = _decoding_plugin(ts)
    try:
        if plugin:
            ds.pixel_array_options(decoding_plugin=plugin)
        arr = ds.pixel_array
    except NotImplementedError as exc:
        raise ImageError(f"unsupported transfer syntax {ts} ({ts.name}): {exc}",
                         source=source) from exc
    except RuntimeError as exc:
        # pydicom raises RuntimeError when no installed plugin can decode the syntax; its
        # following lines give each plugin's reason, e.g. 12-bit JPEG needs libjpeg.
        first = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise ImageError(f"cannot decode transfer syntax {ts} ({ts.name}): {first}",
                         source=source) from exc
    except MemoryError as exc:
        # Rows x Columns x NumberOfFrames from a corrupt header can ask for terabytes.
        raise ImageError("the decoded pixel data would not fit in memory (Rows, Columns, "
                         "NumberOfFrames or BitsAllocated too large?)", source=source) from exc
    except StopIteration as exc:
        raise ImageError("NumberOfFrames is more than the frames in the encapsulated pixel "
                         "data", source=source) from exc
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, struct.error) as exc:
        # Truncated pixel data, wrong VR, unparsable group-0028 values or a broken
        # encapsulation offset table end up here.
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"corrupt pixel data or image attributes: {first}",
                         source=source) from exc
    except BaseException as exc:
        # Rust decoders (pylibjpeg-rle) turn a corrupt frame into a pyo3 PanicException,
        # which derives from BaseException; anything else (KeyboardInterrupt) goes on.
        if type(exc).__name__ != "PanicException":
            raise
        raise ImageError(f"corrupt pixel data: the {plugin or 'pixel'} decoder failed on a "
                         "frame", source=source) from exc
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        try:
            arr = apply_color_lut(arr, ds)
        except Exception as exc:  # a broken LUT is a broken file, whatever raised
            raise ImageError(f"palette colour lookup failed: {exc}", source=source) from exc
    frames = _number_of_frames(ds, source)
    samples = 3 if photometric == "PALETTE COLOR" else int(ds.get("SamplesPerPixel", 1))
    if frames == 1 and arr.ndim == (3 if samples > 1 else 2):
        arr = arr[np.newaxis]
    # Big-endian buffers are viewed as-is by pydicom; make them native for everything after.
    return np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("=")))


def _check_jpeg_ls_frames(ds: Dataset, source: str) -> None:
    """Refuse JPEG-LS frames that do not end with the end-of-image marker.

    CharLS spends seconds per frame failing on a truncated stream, so a cut-off file
    would stall a series load; an intact frame ends with FFD9 (plus an even-length pad).
    """
    from pydicom.encaps import generate_frames

    try:
        frames = list(generate_frames(ds.PixelData, number_of_frames=_number_of_frames(
            ds, source)))
    except (ValueError, TypeError, struct.error, StopIteration) as exc:
        raise ImageError("corrupt encapsulated pixel data (item lengths or offsets do not "
                         "fit the data)", source=source) from exc
    for number, frame in enumerate(frames, start=1):
        if not frame.rstrip(b"\0").endswith(b"\xff\xd9"):
            raise ImageError(f"JPEG-LS frame {number} is truncated (no end-of-image marker)",
                             source=source)


_SHOWN_CODE = re.compile(r"[A-Z0-9 _]{1,16}|[0-9.]{1,64}")


def shown_code(value: object) -> str:
    """A code string (Modality) or UID for a message, only if it looks like one.

    A corrupt header can put anything where a code belongs, a patient's name included,
    so anything else is reported as unreadable rather than echoed.
    """
    text = str(value).strip() if value is not None else ""
    if not text:
        return "absent"
    return text if _SHOWN_CODE.fullmatch(text) else "unreadable"


# Decoders tried first, where more than one is installed for a transfer syntax.
_PREFERRED_PLUGINS = ("pylibjpeg", "pyjpegls", "pillow", "pydicom")


def _decoding_plugin(ts: UID) -> str:
    """The pixel decoder to use: anything but GDCM where another one is installed.

    GDCM (python-gdcm) checks frame sizes and component counts against the header with
    C++ exceptions that its binding does not translate: a frame that disagrees with
    Rows, Columns or SamplesPerPixel aborts the whole process. pydicom tries GDCM first
    for JPEG, JPEG-LS and JPEG 2000, so it is kept for the transfer syntaxes only it can
    decode (JPEG lossless, 12-bit JPEG). "" leaves the choice to pydicom.
    """
    from pydicom.pixels import get_decoder

    try:
        available = list(get_decoder(ts).available_plugins)
    except NotImplementedError:
        return ""
    for plugin in _PREFERRED_PLUGINS:
        if plugin in available:
            return plugin
    return ""


def _native_grey(ds: Dataset) -> np.ndarray | None:
    """Uncompressed greyscale pixels viewed straight from the file bytes, frames first.

    Gives what pydicom's ``pixel_array`` gives (including its masking of unused high bits)
    for the common case: 8/16/32-bit integer MONOCHROME data. Returns None for anything
    else (colour, 1-bit, short or odd data, unparsable attributes), which then goes
    through pydicom so that it raises its usual errors. The array is read-only unless a
    bit correction made a copy; callers only ever read decoded pixels.
    """
    try:
        photometric = str(header_value(ds, "PhotometricInterpretation", "")).strip()
        if photometric not in ("MONOCHROME1", "MONOCHROME2") or \
                int(header_value(ds, "SamplesPerPixel", 1)) != 1:
            return None
        allocated = int(header_value(ds, "BitsAllocated"))
        stored = int(header_value(ds, "BitsStored", allocated))
        signed = int(header_value(ds, "PixelRepresentation", 0)) == 1
        rows, cols = int(header_value(ds, "Rows")), int(header_value(ds, "Columns"))
        value = header_value(ds, "NumberOfFrames", 1)
        frames = int(value) if value not in (None, "") else 1
        data = ds.PixelData
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    if allocated not in (8, 16, 32) or not 0 < stored <= allocated or frames < 1 or \
            rows < 1 or cols < 1 or not isinstance(data, bytes):
        return None
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    count = frames * rows * cols
    if len(data) < count * dtype.itemsize:
        return None  # truncated: pydicom names the shortfall
    arr = np.frombuffer(data, dtype=dtype, count=count).reshape(frames, rows, cols)
    arr = arr.astype(dtype.newbyteorder("="), copy=False)
    if stored < allocated:
        # pydicom's default: the unused high bits are shifted out (sign-extended if signed).
        shift = allocated - stored
        arr = np.right_shift(np.left_shift(arr, shift), shift)
    return arr


def _number_of_frames(ds: Dataset, source: str) -> int:
    value = ds.get("NumberOfFrames", 1)
    try:
        frames = int(value) if value not in (None, "") else 1
    except (TypeError, ValueError) as exc:
        raise ImageError("NumberOfFrames is not an integer (wrong VR or value)",
                         source=source) from exc
    if frames < 1:
        raise ImageError(f"NumberOfFrames is {frames}", source=source)
    return frames


def modality_values(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Apply RescaleSlope/Intercept; float32, exact for integer results.

    float32 holds every integer up to 2**24 exactly, so 16-bit data with slope 1 and an
    integral intercept keep exact values; wider integers fall back to float64.
    """
    if slope == 1.0 and float(intercept).is_integer():
        out64 = stored.astype(np.float64) + intercept
        exact = out64.size == 0 or float(np.abs(out64).max()) <= 2**24
        return out64.astype(np.float32) if exact else out64
    return (stored.astype(np.float64) * slope + intercept).astype(np.float32)


def invert_monochrome1(values: np.ndarray, *, bits_stored: int, signed: bool,
                       slope: float, intercept: float) -> np.ndarray:
    """Flip MONOCHROME1 (white = low) to MONOCHROME2 about the stored range's midpoint.

    Inverting about the possible range, not the observed min/max, keeps the mapping the
    same for every image of a series.
    """
    lo, hi = (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1) if signed else (
        0, 2**bits_stored - 1)
    lo_v, hi_v = sorted((lo * slope + intercept, hi * slope + intercept))
    return (lo_v + hi_v - values.astype(np.float64)).astype(values.dtype)
