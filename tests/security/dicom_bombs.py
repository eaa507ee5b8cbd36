"""Builders of hostile DICOM instances: small on the wire, huge once inflated or decoded."""

from __future__ import annotations

import io
import struct

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)

MiB = 1 << 20


def _image(transfer_syntax: str, *, rows: int, cols: int, frames: int = 1,
           patient: str = "BOMB-1") -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = patient
    ds.IssuerOfPatientID = "urn:oid:1.2.3.4"
    ds.Modality = "CT"
    ds.Rows, ds.Columns = rows, cols
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    return ds


def _encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def deflate_bomb(inflated_bytes: int, *, patient: str = "BOMB-1") -> bytes:
    """A Deflated Explicit VR Little Endian instance whose zero PixelData inflates to
    about ``inflated_bytes`` (deflate squeezes zeros about 1000:1)."""
    side = 1024
    frames = max(1, inflated_bytes // (side * side * 2))
    ds = _image(DeflatedExplicitVRLittleEndian, rows=side, cols=side, frames=frames,
                patient=patient)
    ds.PixelData = bytes(side * side * 2 * frames)
    return _encode(ds)


def j2k_instance(*, rows: int = 64, cols: int = 64, frames: int = 1,
                 codestream_size: tuple[int, int] | None = None) -> bytes:
    """A JPEG 2000 instance: a real 64 x 64 codestream per frame, with the header's Rows,
    Columns and NumberOfFrames as given, and optionally the codestream's own SIZ
    dimensions (width, height) rewritten."""
    ds = _image(ExplicitVRLittleEndian, rows=64, cols=64)
    ds.compress(JPEG2000Lossless, (np.arange(64 * 64).reshape(64, 64) % 4000).astype(np.uint16))
    if codestream_size is not None:
        from pydicom.encaps import encapsulate, generate_fragments

        # The first item is the Basic Offset Table; the last is the one codestream.
        stream = bytearray(list(generate_fragments(ds.PixelData))[-1])
        assert stream[:4] == b"\xff\x4f\xff\x51"  # SOC then SIZ
        # SIZ: marker(2) Lsiz(2) Rsiz(2) Xsiz(4) Ysiz(4) XOsiz(4) YOsiz(4) ...
        struct.pack_into(">II", stream, 8, *codestream_size)
        ds.PixelData = encapsulate([bytes(stream)])
    if frames > 1:
        from pydicom.encaps import encapsulate, generate_fragments

        one = list(generate_fragments(ds.PixelData))[-1]
        ds.PixelData = encapsulate([one] * frames)
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = rows, cols
    return _encode(ds)
