"""A CT series per patient, written with pydicom from one template dataset.

Files go to ``dicom/<MRN>/<SeriesInstanceUID>/NNNN.dcm`` where NNNN is the
InstanceNumber. About 15 % of series have shuffled InstanceNumbers (the
ImagePositionPatient values stay right), about 10 % are compressed (RLE
Lossless or JPEG-LS Lossless), and about 30 % store signed int16 with
intercept 0 instead of unsigned 12-bit with intercept -1024. No tag says
anything about the outcome.
"""

from __future__ import annotations

import itertools
import struct
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.pixels import get_encoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from pipelines.synth import codes
from pipelines.synth.patient import PatientSim
from pipelines.synth.phantom import geometry

__all__ = ["dicom_text_values", "series_dir", "sop_instance_uid", "write_series"]

_COMPRESSION = {"rle": RLELossless, "jpegls": JPEGLSLossless}


def series_dir(patient: PatientSim) -> Path:
    """The series folder, relative to the cohort root."""
    return Path("dicom") / patient.mrn / patient.imaging.series_uid


def sop_instance_uid(seed: int, patient: PatientSim, k: int) -> str:
    return str(generate_uid(entropy_srcs=["clinfuse-synth", str(seed), patient.mrn, "sop",
                                          str(k)]))


def _template(p: PatientSim, n_slices: int, size: int) -> Dataset:
    img = p.imaging
    pixel, thickness, _, _ = geometry(n_slices, size)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    day, clock = img.acquired.strftime("%Y%m%d"), img.acquired.strftime("%H%M%S")
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    for kind in ("Study", "Series", "Acquisition", "Content"):
        setattr(ds, f"{kind}Date", day)
        setattr(ds, f"{kind}Time", clock)
    ds.AccessionNumber = img.accession
    ds.Modality = "CT"
    ds.Manufacturer = "clinfuse-synth"
    ds.InstitutionName = "Synthetic General Hospital"
    ds.StudyDescription = "CT CHEST WITHOUT CONTRAST"
    ds.SeriesDescription = f"AXIAL {thickness:g}MM"
    ds.PatientName = f"{p.family}^{p.given}"
    ds.PatientID = p.mrn
    ds.IssuerOfPatientID = codes.MRN_SYSTEM
    qualifiers = Dataset()
    qualifiers.UniversalEntityID = codes.MRN_OID
    qualifiers.UniversalEntityIDType = "ISO"
    ds.IssuerOfPatientIDQualifiersSequence = Sequence([qualifiers])
    ds.PatientBirthDate = p.birth_date.strftime("%Y%m%d")
    ds.PatientSex = "M" if p.sex == "male" else "F"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = f"{thickness:g}"
    ds.SpacingBetweenSlices = f"{thickness:g}"
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = img.study_uid
    ds.SeriesInstanceUID = img.series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.FrameOfReferenceUID = img.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.PixelSpacing = [f"{pixel:g}", f"{pixel:g}"]
    ds.BitsAllocated = 16
    if img.signed:
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 1
        ds.RescaleIntercept = "0"
    else:
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
        ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1500"
    return ds


# Elements that change from slice to slice; everything else is serialised once.
_SOP, _INSTANCE, _POSITION, _LOCATION, _PIXELS = (0x00080018, 0x00200013, 0x00200032,
                                                  0x00201041, 0x7FE00010)
_VARIABLE = (_SOP, _INSTANCE, _POSITION, _LOCATION, _PIXELS)
_LONG_VRS = {b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OF", b"OD", b"OL", b"OV"}
_IMPLEMENTATION_VERSION = "CLINFUSE_SYNTH"
_SEQUENCE_END = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def _element(tag: int, vr: bytes, value: bytes, *, undefined: bool = False) -> bytes:
    """One explicit-VR little-endian element."""
    group, elem = tag >> 16, tag & 0xFFFF
    if vr in _LONG_VRS:
        length = 0xFFFFFFFF if undefined else len(value)
        return struct.pack("<HH2s2xI", group, elem, vr, length) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _text(value: str, pad: bytes = b" ") -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def _file_meta(sop_uid: str, transfer_syntax: str) -> bytes:
    body = b"".join((
        _element(0x00020001, b"OB", b"\x00\x01"),
        _element(0x00020002, b"UI", _text(CTImageStorage, b"\0")),
        _element(0x00020003, b"UI", _text(sop_uid, b"\0")),
        _element(0x00020010, b"UI", _text(transfer_syntax, b"\0")),
        _element(0x00020012, b"UI", _text(PYDICOM_IMPLEMENTATION_UID, b"\0")),
        _element(0x00020013, b"SH", _text(_IMPLEMENTATION_VERSION)),
    ))
    return b"\0" * 128 + b"DICM" + _element(0x00020000, b"UL", struct.pack("<I", len(body))) + body


def _segments(ds: Dataset) -> list[bytes]:
    """The template's elements serialised in the runs between the variable tags."""
    bounds = [0, *_VARIABLE, 0xFFFFFFFF]
    out = []
    for lo, hi in itertools.pairwise(bounds):
        part = Dataset()
        for elem in ds:
            if lo < int(elem.tag) < hi:
                part.add(elem)
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_dataset(fp, part)
        out.append(fp.getvalue())
    return out


def write_series(root: Path, p: PatientSim, hu: np.ndarray, *, seed: int,
                 shuffle_rng: np.random.Generator) -> Dataset:
    """Write the HU volume ``hu`` (slices, rows, cols) as one series; return its template.

    The constant elements are serialised once and spliced with the per-slice
    ones (SOPInstanceUID, InstanceNumber, ImagePositionPatient, SliceLocation,
    PixelData): the same bytes ``pydicom.dcmwrite`` writes, ten times faster.
    """
    n_slices, size = hu.shape[0], hu.shape[1]
    img = p.imaging
    folder = root / series_dir(p)
    folder.mkdir(parents=True, exist_ok=True)
    _, _, xy, z = geometry(n_slices, size)
    if img.signed:
        stored = hu.astype("<i2")
    else:
        stored = np.clip(hu.astype(np.int32) + 1024, 0, 4095).astype("<u2")
    numbers = np.arange(1, n_slices + 1)
    if img.shuffled:
        numbers = shuffle_rng.permutation(numbers)
    ds = _template(p, n_slices, size)
    segments = _segments(ds)
    syntax = ExplicitVRLittleEndian
    encoder = None
    if img.compression != "none":
        syntax = _COMPRESSION[img.compression]
        encoder = get_encoder(syntax)
    corner = f"{xy[0]:g}"
    for k in range(n_slices):
        uid = sop_instance_uid(seed, p, k)
        if encoder is None:
            pixels = _element(_PIXELS, b"OW", stored[k].tobytes())
        else:
            frame = encoder.encode(stored[k], rows=size, columns=size, samples_per_pixel=1,
                                   number_of_frames=1, bits_allocated=16,
                                   bits_stored=int(ds.BitsStored),
                                   pixel_representation=int(ds.PixelRepresentation),
                                   photometric_interpretation="MONOCHROME2")
            pixels = _element(_PIXELS, b"OB", encapsulate([frame]) + _SEQUENCE_END,
                              undefined=True)
        parts = (
            _file_meta(uid, syntax), segments[0],
            _element(_SOP, b"UI", _text(uid, b"\0")), segments[1],
            _element(_INSTANCE, b"IS", _text(str(int(numbers[k])))), segments[2],
            _element(_POSITION, b"DS", _text(f"{corner}\\{corner}\\{z[k]:g}")), segments[3],
            _element(_LOCATION, b"DS", _text(f"{z[k]:g}")), segments[4],
            pixels, segments[5],
        )
        (folder / f"{int(numbers[k]):04d}.dcm").write_bytes(b"".join(parts))
    return ds


def dicom_text_values(ds: Dataset) -> list[str]:
    """Every text value in a dataset (nested too), for the outcome-word check."""
    out: list[str] = []
    for elem in ds.iterall():
        if elem.VR in {"SQ", "OB", "OW", "UN"} or elem.keyword == "PixelData":
            continue
        value = elem.value
        items = value if isinstance(value, list | tuple) else [value]
        out.extend(str(v) for v in items if v is not None)
    return out

