"""Seeded structure-aware mutations of DICOM datasets and NIfTI/Analyze headers.

DICOM elements are rewritten with pydicom (values a scanner or a broken exporter could
send: zero, negative or NaN spacing, Rows/Columns that disagree with the pixel data, odd
BitsAllocated, wrong VRs, missing tags, corrupted compressed frames); NIfTI header
fields are written straight into the header bytes through nibabel's header dtype, so
values nibabel itself would refuse to set (NaN pixdim, negative dims, unknown datatype
codes) still reach the reader. Like :mod:`benchmarks.fuzz_mutations`, every function
draws only from the ``random.Random`` it is given.
"""

from __future__ import annotations

import contextlib
import io
import random
from collections.abc import Iterator
from typing import Any

import numpy as np

from benchmarks.fuzz_mutations import MARKER, stacked

__all__ = ["mutate_dicom", "mutate_nifti_header", "nifti_header_layout", "plant_dicom_marker",
           "plant_nifti_marker"]

_DS_VALUES: tuple[Any, ...] = (["0", "0"], ["-1", "1"], ["nan", "1"], ["inf", "inf"], ["1"],
                               ["1", "1", "1"], "abc", "", ["1e400", "1"], ["0.0001", "1e6"])
_INT_VALUES = (0, 1, 2, 3, 7, 8, 12, 15, 16, 24, 32, 33, 64, 255, 256, 4096, 65535)
_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL",
                "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "CMYK", "ARGB", "HSV", "", "XYZ")
_TRANSFER_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
                      "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",
                      "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
                      "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90",
                      "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.1.99", "1.2.3.4", "")


@contextlib.contextmanager
def _lenient_pydicom() -> Iterator[None]:
    """Let invalid values be assigned and written (the point of the exercise)."""
    import pydicom.config as config

    saved = (config.settings.reading_validation_mode, config.settings.writing_validation_mode)
    config.settings.reading_validation_mode = config.IGNORE
    config.settings.writing_validation_mode = config.IGNORE
    try:
        yield
    finally:
        config.settings.reading_validation_mode, config.settings.writing_validation_mode = saved


def plant_dicom_marker(data: bytes) -> bytes:
    """The file with PatientName (and PatientID) set to :data:`MARKER`; unchanged if unreadable."""
    import pydicom

    with _lenient_pydicom():
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            if "PixelData" not in ds or "SOPClassUID" not in ds:
                return data
            ds.PatientName = MARKER
            ds.PatientID = MARKER
            out = io.BytesIO()
            ds.save_as(out, enforce_file_format=False)
            return out.getvalue()
        except Exception:  # a seed pydicom cannot round-trip stays as it is
            return data


def _set(ds: Any, keyword: str, vr: str, value: Any) -> None:
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataelem import DataElement

    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    ds[tag] = DataElement(tag, vr, value)


def _dicom_op(ds: Any, rng: random.Random) -> str:
    op = rng.choice(("spacing", "spacing", "size", "bits", "samples", "photometric", "frames",
                     "position", "orientation", "rescale", "drop", "drop", "transfer_syntax",
                     "pixel_length", "codestream", "bad_vr", "series", "representation",
                     "planar", "palette", "thickness"))
    if op == "spacing":
        keyword = rng.choice(("PixelSpacing", "PixelSpacing", "ImagerPixelSpacing",
                              "NominalScannedPixelSpacing"))
        _set(ds, keyword, "DS", rng.choice(_DS_VALUES))
        return f"{keyword} replaced"
    if op == "size":
        keyword = rng.choice(("Rows", "Columns"))
        current = int(ds.get(keyword, 0) or 0) if str(ds.get(keyword, "0")).isdigit() else 0
        _set(ds, keyword, "US", rng.choice((0, 1, current + 1, max(current - 1, 0),
                                            current * 2, 65535)))
        return f"{keyword} disagrees with the pixel data"
    if op == "bits":
        keyword = rng.choice(("BitsAllocated", "BitsStored", "HighBit"))
        _set(ds, keyword, "US", rng.choice(_INT_VALUES))
        return f"{keyword} replaced"
    if op == "samples":
        _set(ds, "SamplesPerPixel", "US", rng.choice((0, 1, 2, 3, 4, 255)))
        return "SamplesPerPixel replaced"
    if op == "photometric":
        _set(ds, "PhotometricInterpretation", "CS", rng.choice(_PHOTOMETRIC))
        return "PhotometricInterpretation replaced"
    if op == "frames":
        _set(ds, "NumberOfFrames", "IS", rng.choice(("0", "-1", "abc", "2", "1000", "", "1.5",
                                                     "99999999")))
        return "NumberOfFrames replaced"
    if op == "position":
        _set(ds, "ImagePositionPatient", "DS", rng.choice((["0", "0"], ["nan", "0", "0"],
                                                           ["1e308", "1e308", "1e308"], "x",
                                                           ["0", "0", "0", "0"])))
        return "ImagePositionPatient replaced"
    if op == "orientation":
        _set(ds, "ImageOrientationPatient", "DS", rng.choice((
            ["0"] * 6, ["1", "0", "0", "1", "0", "0"], ["nan"] * 6, ["1", "0", "0"],
            ["1", "0", "0", "0", "1e-9", "0"], ["2", "0", "0", "0", "2", "0"])))
        return "ImageOrientationPatient replaced"
    if op == "rescale":
        keyword = rng.choice(("RescaleSlope", "RescaleIntercept", "WindowCenter"))
        _set(ds, keyword, "DS", rng.choice(("0", "nan", "inf", "-inf", "abc", "1e308", "",
                                            ["1", "2"])))
        return f"{keyword} replaced"
    if op == "drop":
        keyword = rng.choice(("Rows", "Columns", "BitsAllocated", "BitsStored",
                              "PixelRepresentation", "SamplesPerPixel",
                              "PhotometricInterpretation", "PixelSpacing", "ImagePositionPatient",
                              "ImageOrientationPatient", "SeriesInstanceUID", "SOPClassUID",
                              "Modality", "FrameOfReferenceUID", "RedPaletteColorLookupTableData",
                              "PerFrameFunctionalGroupsSequence",
                              "SharedFunctionalGroupsSequence"))
        if keyword in ds:
            del ds[keyword]
        return f"{keyword} removed"
    if op == "transfer_syntax":
        value = rng.choice(_TRANSFER_SYNTAXES)
        if value:
            ds.file_meta.TransferSyntaxUID = value
        elif "TransferSyntaxUID" in ds.file_meta:
            del ds.file_meta.TransferSyntaxUID
        return "TransferSyntaxUID replaced"
    if op in ("pixel_length", "codestream") and "PixelData" in ds:
        data = bytearray(ds.PixelData)
        if op == "pixel_length":
            how = rng.choice(("truncate", "extend", "empty", "odd"))
            if how == "truncate":
                data = data[:rng.randrange(len(data) + 1)]
            elif how == "extend":
                data += bytes(rng.choice((2, 1024, len(data))))
            elif how == "empty":
                data = bytearray()
            else:
                data = data[:-1] if len(data) % 2 == 0 and data else data + b"\0"
            ds.PixelData = bytes(data)
            return f"PixelData length: {how}"
        if data:
            for _ in range(rng.choice((1, 4, 32))):
                data[rng.randrange(len(data))] = rng.randrange(256)
        ds.PixelData = bytes(data)
        return "PixelData bytes corrupted"
    if op == "bad_vr":
        keyword = rng.choice(("Rows", "Columns", "BitsAllocated", "PixelSpacing",
                              "SliceThickness", "NumberOfFrames", "SamplesPerPixel"))
        vr, raw = rng.choice((("LO", "abc"), ("OB", b"\x01\x02\x03"), ("SQ", []),
                                ("UN", b"\xff" * 5), ("DS", "1\\2\\3"), ("FD", [1.0, 2.0])))
        _set(ds, keyword, vr, raw)
        return f"{keyword} written with VR {vr}"
    if op == "series":
        keyword = rng.choice(("SeriesInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID"))
        _set(ds, keyword, "UI", rng.choice(("", "1.2.3", "1." + "9" * 70, "x")))
        return f"{keyword} replaced"
    if op == "representation":
        _set(ds, "PixelRepresentation", "US", rng.choice((0, 1, 2, 65535)))
        return "PixelRepresentation replaced"
    if op == "planar":
        _set(ds, "PlanarConfiguration", "US", rng.choice((0, 1, 5)))
        return "PlanarConfiguration replaced"
    if op == "palette":
        _set(ds, "PhotometricInterpretation", "CS", "PALETTE COLOR")
        _set(ds, "RedPaletteColorLookupTableDescriptor", "US",
             rng.choice(([0, 0, 16], [256, 0, 8], [1, 0, 99], [65535, 65535, 16])))
        return "palette lookup table broken"
    _set(ds, rng.choice(("SliceThickness", "SpacingBetweenSlices")), "DS",
         rng.choice(("0", "-5", "nan", "1e308", "abc")))
    return "slice thickness replaced"


def mutate_dicom(data: bytes, rng: random.Random, other: bytes | None = None
                 ) -> tuple[bytes, str]:
    """A DICOM file with one to three header elements mutated (60%), or its bytes mutated."""
    import pydicom

    if rng.random() < 0.6:
        with _lenient_pydicom():
            try:
                ds = pydicom.dcmread(io.BytesIO(data), force=True)
                steps = [_dicom_op(ds, rng) for _ in range(rng.choice((1, 1, 2, 3)))]
                out = io.BytesIO()
                ds.save_as(out, enforce_file_format=False)
                return out.getvalue(), "dicom: " + "; ".join(steps)
            except Exception:  # a seed or a value pydicom cannot write: mutate bytes instead
                pass
    mutated, what = stacked(data, rng, other, head=2048)
    return mutated, "bytes: " + what


# --------------------------------------------------------------------------- NIfTI


def nifti_header_layout(raw: bytes) -> tuple[np.dtype, int] | None:
    """The header dtype (with byte order) and its size for NIfTI-1/-2 or Analyze bytes."""
    import nibabel as nib

    if len(raw) < 4:
        return None
    for cls, size in ((nib.Nifti1Header, 348), (nib.Nifti2Header, 540)):
        for order in ("<", ">"):
            if int(np.frombuffer(raw[:4], dtype=f"{order}i4")[0]) == size and len(raw) >= size:
                dtype = cls.template_dtype.newbyteorder(order)
                magic = bytes(raw[344:348]) if size == 348 else bytes(raw[4:8])
                if size == 348 and magic[:3] not in (b"n+1", b"ni1"):
                    dtype = nib.AnalyzeHeader.template_dtype.newbyteorder(order)
                return dtype, size
    return None


def plant_nifti_marker(raw: bytes) -> bytes:
    """The image with :data:`MARKER` in its ``descrip`` (and Analyze patient_id) fields."""
    layout = nifti_header_layout(raw)
    if layout is None:
        return raw
    dtype, _ = layout
    buf = bytearray(raw)
    header = np.ndarray((), dtype=dtype, buffer=buf)
    header["descrip"] = MARKER.encode()
    if "patient_id" in (dtype.names or ()):
        header["patient_id"] = MARKER.encode()
    return bytes(buf)


_NIFTI_VALUES: dict[str, tuple[Any, ...]] = {
    "sizeof_hdr": (0, -1, 348, 540, 1543569408, 2**31 - 1),
    "datatype": (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048,
                 2304, 3, 99, 255, 32767, -1),
    "bitpix": (0, 1, 7, 8, 16, 24, 32, 64, 128, -8, 32767),
    "vox_offset": (0.0, 1.0, 347.0, 348.0, 352.0, 353.0, 1e9, -1.0, float("nan"),
                   float("inf"), 2.0**31, 540.0),
    "scl_slope": (0.0, float("nan"), float("inf"), -float("inf"), 1e38, -1.0),
    "scl_inter": (float("nan"), float("inf"), 1e38, -1e38),
    "qform_code": (-1, 0, 1, 2, 3, 4, 5, 100, 32767),
    "sform_code": (-1, 0, 1, 2, 3, 4, 5, 100, 32767),
    "quatern_b": (float("nan"), 2.0, 1.0, float("inf"), -1.0),
    "quatern_c": (float("nan"), 2.0, 1.0),
    "quatern_d": (float("nan"), 2.0, 1.0),
    "qoffset_x": (float("nan"), float("inf"), 1e38),
    "intent_code": (3000, 3001, 3099, 2001, 1002, -1, 0),
    "intent_p1": (float("nan"), float("inf")),
    "slice_code": (0, 1, 6, 7, 255),
    "slice_start": (-1, 0, 32767),
    "slice_end": (-1, 0, 32767),
    "slice_duration": (float("nan"), -1.0, 0.0),
    "xyzt_units": (0, 1, 2, 3, 8, 16, 24, 255),
    "dim_info": (0, 255, 57, 3),
    "cal_min": (float("nan"), float("inf")),
    "cal_max": (float("nan"), -float("inf")),
    "toffset": (float("nan"),),
    "magic": (b"n+1\0", b"ni1\0", b"n+2\0", b"\0\0\0\0", b"abcd", b"n+2\0\r\n\032\n"),
    "regular": (b"r", b"\0", b"x"),
    "extents": (0, 16384, -1),
    "glmin": (-1, 2**31 - 1),
}
_DIM_VALUES = (-1, 0, 1, 2, 3, 7, 8, 9, 32767, -32768, 1000)


def _header_op(header: np.ndarray, names: tuple[str, ...], rng: random.Random) -> str:
    op = rng.choice(("dim", "dim", "pixdim", "pixdim", "srow", "field", "field", "field"))
    if op == "dim":
        k = rng.randrange(8)
        value = rng.choice(_DIM_VALUES)
        if header.dtype["dim"].base.itemsize == 8 and rng.random() < 0.2:
            value = 2**40
        header["dim"][k] = value
        return f"dim[{k}] = {value}"
    if op == "pixdim":
        k = rng.randrange(8)
        size = rng.choice((0.0, -1.0, float("nan"), float("inf"), 1e30, -0.0, 2.0))
        header["pixdim"][k] = size
        return f"pixdim[{k}] = {size}"
    if op == "srow" and "srow_x" in names:
        row = rng.choice(("srow_x", "srow_y", "srow_z"))
        header[row] = rng.choice(([0, 0, 0, 0], [float("nan")] * 4, [float("inf")] * 4,
                                  [1e30, 1e30, 1e30, 0], [1, 0, 0, 0]))
        return f"{row} replaced"
    candidates = [n for n in _NIFTI_VALUES if n in names]
    name = rng.choice(candidates)
    value = rng.choice(_NIFTI_VALUES[name])
    try:
        header[name] = value
    except (OverflowError, ValueError):
        header[name] = 0
    return f"{name} = {value!r}"


def mutate_nifti_header(raw: bytes, rng: random.Random, other: bytes | None = None
                        ) -> tuple[bytes, str]:
    """NIfTI/Analyze bytes (uncompressed) with one to three header fields replaced (65%),
    the data or extension area disturbed (10%), or bytes mutated near the header."""
    layout = nifti_header_layout(raw)
    roll = rng.random()
    if layout is not None and roll < 0.65:
        dtype, _ = layout
        buf = bytearray(raw)
        header = np.ndarray((), dtype=dtype, buffer=buf)
        with np.errstate(all="ignore"):
            steps = [_header_op(header, dtype.names or (), rng)
                     for _ in range(rng.choice((1, 1, 2, 3)))]
        return bytes(buf), "header: " + "; ".join(steps)
    if layout is not None and roll < 0.75:
        _, size = layout
        buf = bytearray(raw)
        how = rng.choice(("extension", "truncate_data", "append"))
        if how == "extension":
            esize = rng.choice((0, 8, 15, 16, -16, 2**31 - 8, 1_000_000))
            ext = bytes([1, 0, 0, 0]) + int(esize).to_bytes(4, "little", signed=True) + \
                rng.choice((0, 2, 4, 6, 32, 44, -1)).to_bytes(4, "little", signed=True)
            buf[size:size + 12] = ext
        elif how == "truncate_data":
            buf = buf[:size + rng.randrange(max(1, len(buf) - size))]
        else:
            buf += bytes(rng.choice((1, 7, 4096)))
        return bytes(buf), f"data: {how}"
    mutated, what = stacked(raw, rng, other, head=560)
    return mutated, "bytes: " + what
