"""End-to-end cohort scoring on a CUDA host: DICOM CT series -> 96³ tensor -> DenseNet121-3D.

Four numbers from one run, on series generated on the host itself (uncompressed Explicit VR
Little Endian int16, 300×512² by default):

* **fast path** — :class:`FastSeriesReader` parses one header per series with pydicom and,
  for every other file, walks the header bytes with a small tag scanner (layout checked
  against the first file; any file that differs is read by pydicom instead), reads the
  pixel data straight into page-locked memory, copies it to the GPU on a side stream while
  the next series is being read, and :class:`GpuPreprocess` does rescale, RAS orientation,
  ``Spacing``, window and ``Resize`` on the GPU with MONAI's own geometry; then the encoder
  in bf16 and a stand-in fusion head.
* **stock pipeline** — MONAI ``LoadImage(PydicomReader)`` + ``Orientation`` + ``Spacing`` +
  ``ScaleIntensityRange`` + ``Resize`` in DataLoader workers feeding the same encoder.
* **encoder alone** on random 96³ batches, and **H2D** for one series (the ceiling).

Self-checks: the fast path's tensors against the clinfuse CPU reference
(:func:`~pipelines.imaging.dicom_series.load_dicom_series` +
:class:`~pipelines.imaging.preprocess.Preprocess`), slice ordering of a series whose
InstanceNumbers are shuffled, and the fast path's embeddings against the encoder in fp32
on the CPU. ``--small`` runs everything on tiny series on the CPU (the test suite does).

Run: ``python -m benchmarks.gpu_scoring [--small] [--series N] [--slices S] [--size X]``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import json
import math
import mmap
import os
import platform
import shutil
import struct
import sys
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from io import BytesIO
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from pipelines.process_pool import process_pool

__all__ = [
    "FastSeriesReader", "GpuPreprocess", "ReadSeries", "ScoringConfig", "generate_series",
    "main", "run",
]

SEED = 0
RESULTS = Path(__file__).parent / "results" / "gpu_scoring.json"
#: ScaleIntensityRange(a_min=-1000, a_max=400) -> [0, 1], clipped.
A_MIN, A_MAX = -1000.0, 400.0
#: The fast path must match the CPU reference to this, in [0, 1] window units. Both run the
#: same linear maps (MONAI's Spacing geometry, torch's trilinear Resize), so the gap is
#: float rounding only; 1e-3 is ~1.4 HU.
PREPROCESS_TOL = 1e-3
#: Embeddings, relative L2 error against fp32 on the CPU: bf16 autocast through 121 layers
#: (measured ~5e-3 with CPU bf16 autocast at 64³); fp32 on both sides (``--small``) ~1e-6.
EMBED_REL_TOL_BF16 = 5e-2
EMBED_REL_TOL_FP32 = 1e-4

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


@dataclass
class ScoringConfig:
    """Sizes and switches of one run; defaults fit ~3 minutes on one H100/H200 host."""

    n_series: int = 64
    n_slices: int = 300
    size: int = 512
    pixdim: tuple[float, float, float] = (1.5, 1.5, 1.5)
    spatial_size: tuple[int, int, int] = (96, 96, 96)
    embed_dim: int = 128
    #: "tiny" (small mode) is MONAI's DenseNet with few, thin blocks: same code path, ~50x
    #: cheaper on a CPU.
    encoder: Literal["densenet121", "tiny"] = "densenet121"
    batch_size: int = 32
    passes: int = 2
    stock_series: int = 16
    stock_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    readers: tuple[str, ...] = ("threads", "processes")
    read_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    prefetch: int = 2
    check_series: int = 2
    device: str = "cuda"
    small: bool = False
    seed: int = SEED
    workdir: str | None = None
    keep_data: bool = False

    @classmethod
    def small_mode(cls) -> ScoringConfig:
        """Tiny series on the CPU: every path runs, timings mean nothing."""
        return cls(n_series=3, n_slices=24, size=64, spatial_size=(32, 32, 32), embed_dim=8,
                   encoder="tiny",
                   batch_size=2, passes=1, stock_series=2, stock_workers=0,
                   read_workers=2, prefetch=1, check_series=2,
                   device="cuda" if torch.cuda.is_available() else "cpu", small=True)


# --------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class SeriesPlan:
    """Geometry and numbering of one synthetic series (LPS, mm)."""

    index: int
    folder: str
    n_slices: int
    size: int
    pixel_spacing: float
    slice_spacing: float
    origin: tuple[float, float, float]
    slope: float
    intercept: float
    numbering: Literal["ascending", "descending", "shuffled"]
    seed: int


def _plans(root: Path, n_series: int, n_slices: int, size: int, seed: int) -> list[SeriesPlan]:
    rng = np.random.default_rng(seed)
    numbering: tuple[Literal["ascending", "descending", "shuffled"], ...] = (
        "ascending", "shuffled", "descending")
    plans = []
    for i in range(n_series):
        spacing = float(np.round(rng.uniform(0.62, 0.82), 4))
        fov = spacing * size
        plans.append(SeriesPlan(
            index=i, folder=str(root / f"series{i:04d}"), n_slices=n_slices, size=size,
            pixel_spacing=spacing, slice_spacing=float(rng.choice([1.0, 1.25])),
            origin=(float(np.round(-fov / 2 + rng.uniform(-5, 5), 3)),
                    float(np.round(-fov / 2 + rng.uniform(-5, 5), 3)),
                    float(np.round(rng.uniform(-400, -100), 3))),
            # Most CT uses slope 1, intercept -1024; every fourth series a fractional slope.
            slope=0.5 if i % 4 == 3 else 1.0, intercept=-1000.0 if i % 4 == 3 else -1024.0,
            numbering=numbering[i % 3], seed=int(rng.integers(2**31))))
    return plans


def _phantom(plan: SeriesPlan) -> np.ndarray:
    """Stored int16 values (slices, rows, cols): body, spheres, a z ramp, noise."""
    rng = np.random.default_rng(plan.seed)
    n, size = plan.n_slices, plan.size
    yy, xx = np.ogrid[-1:1:size * 1j, -1:1:size * 1j]
    body = ((yy / 0.8) ** 2 + (xx / 0.9) ** 2 < 1).astype(np.float32)
    # A ramp along z inside the body so a misordered stack is visibly wrong.
    ramp = np.linspace(-60, 60, n, dtype=np.float32)[:, None, None]
    hu = -1000.0 + body[None] * (1040.0 + ramp)
    for _ in range(6):
        centre = rng.uniform(0.2, 0.8, 3) * (n, size, size)
        radius = rng.uniform(0.05, 0.15) * size
        rz = max(1.0, radius * plan.pixel_spacing / plan.slice_spacing)
        lo = np.maximum(np.floor(centre - np.array([rz, radius, radius])), 0).astype(int)
        hi = np.minimum(np.ceil(centre + np.array([rz, radius, radius])) + 1,
                        (n, size, size)).astype(int)
        z, y, x = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        inside = (((z - centre[0]) / rz) ** 2 + ((y - centre[1]) / radius) ** 2
                  + ((x - centre[2]) / radius) ** 2) < 1
        hu[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]][inside] = rng.uniform(-300, 1500)
    # Noise from a pool of 16 slices: per-voxel draws for 300×512² cost seconds per series.
    pool = rng.integers(-25, 26, size=(16, size, size)).astype(np.float32)
    hu += pool[np.arange(n) % 16]
    hu -= plan.intercept
    hu /= plan.slope
    np.round(hu, out=hu)
    return np.clip(hu, -32768, 32767, out=hu).astype("<i2")


def _pixel_element_header(nbytes: int) -> bytes:
    return b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", nbytes)


def _write_series(plan: SeriesPlan) -> int:
    """Write one series; headers serialised by pydicom, pixel data appended. Bytes written."""
    stored = _phantom(plan)
    folder = Path(plan.folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(plan.seed + 1)
    n = plan.n_slices
    numbers = {"ascending": np.arange(1, n + 1), "descending": np.arange(n, 0, -1),
               "shuffled": rng.permutation(n) + 1}[plan.numbering]
    # File names in a random order, so listing order says nothing about position.
    names = rng.permutation(n)
    uid = lambda *parts: generate_uid(entropy_srcs=[str(plan.seed), *map(str, parts)])  # noqa: E731
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid("study"), uid("series")
    ds.FrameOfReferenceUID = uid("for")
    ds.Modality, ds.PatientID, ds.PatientName = "CT", f"BENCH{plan.index:04d}", "Bench^Gpu"
    ds.PatientBirthDate, ds.PatientSex, ds.StudyDate, ds.StudyTime = "19600101", "O", \
        "20240101", "120000"
    ds.AccessionNumber, ds.StudyID, ds.SeriesNumber = f"A{plan.index:06d}", "1", 2
    ds.SeriesDescription, ds.Manufacturer = "CHEST 1.25mm", "clinfuse-synth"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.BodyPartExamined, ds.KVP, ds.ConvolutionKernel = "CHEST", "120", "STANDARD"
    ds.PatientPosition, ds.ScanOptions = "FFS", "HELICAL MODE"
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = [f"{plan.pixel_spacing:g}"] * 2
    ds.SliceThickness = f"{plan.slice_spacing:g}"
    ds.Rows = ds.Columns = plan.size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.RescaleSlope, ds.RescaleIntercept = f"{plan.slope:g}", f"{plan.intercept:g}"
    ds.RescaleType = "HU"
    element = _pixel_element_header(stored[0].nbytes)
    written = 0
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = uid("sop", k)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.InstanceNumber = int(numbers[k])
        z = plan.origin[2] + k * plan.slice_spacing
        ds.ImagePositionPatient = [f"{plan.origin[0]:g}", f"{plan.origin[1]:g}", f"{z:.3f}"]
        ds.SliceLocation = f"{z:.3f}"
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        with open(folder / f"IM{names[k]:05d}.dcm", "wb") as fh:
            written += fh.write(buf.getvalue()) + fh.write(element) + fh.write(stored[k].data)
    return written


def generate_series(root: Path, n_series: int, n_slices: int, size: int, seed: int = SEED,
                    *, workers: int | None = None) -> list[SeriesPlan]:
    """Write ``n_series`` uncompressed int16 CT series under ``root`` in a process pool.

    Every third series has shuffled InstanceNumbers and every third descending ones; every
    fourth has RescaleSlope 0.5. Axial, PixelSpacing 0.62-0.82 mm, slices 1 or 1.25 mm apart.
    """
    plans = _plans(Path(root), n_series, n_slices, size, seed)
    workers = max(1, min(workers or os.cpu_count() or 1, n_series))
    if workers == 1:
        for plan in plans:
            _write_series(plan)
        return plans
    # Never fork: this process has imported torch, whose thread pools a forked child
    # inherits half-locked (pipelines.process_pool).
    with process_pool(workers) as pool:
        list(pool.map(_write_series, plans))
    return plans


# --------------------------------------------------------------------------- page cache


def page_cache_resident(paths: Sequence[Path]) -> float | None:
    """Fraction of the files' pages in the page cache, by mincore(2); None if unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    page = mmap.PAGESIZE
    resident = total = 0
    for path in paths:
        size = os.path.getsize(path)
        if not size:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            pages = (size + page - 1) // page
            vec = (ctypes.c_ubyte * pages)()
            ok = libc.mincore(addr, size, vec) == 0
            libc.munmap(addr, size)
            if not ok:
                return None
            resident += sum(v & 1 for v in vec)
            total += pages
        finally:
            os.close(fd)
    return resident / total if total else None


def _sample_files(folders: Sequence[Path], per_series: int = 8) -> list[Path]:
    out = []
    for folder in folders:
        names = sorted(os.listdir(folder))
        out += [folder / names[i] for i in np.linspace(0, len(names) - 1, per_series, dtype=int)]
    return out


# --------------------------------------------------------------------------- fast reader

_EXPLICIT_LE = ExplicitVRLittleEndian
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})
_TS, _SERIES_UID, _IPP, _IOP = 0x00020010, 0x0020000E, 0x00200032, 0x00200037
_INSTANCE, _SLOPE, _INTERCEPT = 0x00200013, 0x00281053, 0x00281052
#: Must carry the same bytes as in the series' first file, or the file goes to pydicom.
_SAME_TAGS = (_TS, _SERIES_UID, _IOP, 0x00200052, 0x00280002, 0x00280004, 0x00280008,
              0x00280010, 0x00280011, 0x00280030, 0x00280100, 0x00280101, 0x00280103)
_WANTED = frozenset((*_SAME_TAGS, _IPP, _INSTANCE, _SLOPE, _INTERCEPT))


class _LayoutError(Exception):
    """This file's header is not laid out as the fast scanner expects."""


class FastPathRefused(Exception):
    """The series cannot take the fast path; the CPU reference path is used instead."""


def _walk(buf: bytes | bytearray, start: int, stop: int) -> dict[int, bytes]:
    """Top-level Explicit VR LE elements in ``buf[start:stop]``: the wanted tags' values."""
    unpack = struct.unpack_from
    found: dict[int, bytes] = {}
    pos = start
    while pos < stop:
        group, elem, vr = unpack("<HH2s", buf, pos)
        if vr in _LONG_VRS:
            length = unpack("<I", buf, pos + 8)[0]
            head = 12
        else:
            length = unpack("<H", buf, pos + 6)[0]
            head = 8
        tag = group << 16 | elem
        if length == 0xFFFFFFFF:
            if vr != b"SQ":  # undefined-length UN/OB: leave it to pydicom
                raise _LayoutError(f"undefined length {vr!r}")
            pos = _skip_sequence(buf, pos + head, stop)
            continue
        if tag in _WANTED:
            found[tag] = bytes(buf[pos + head:pos + head + length])
        pos += head + length
    if pos != stop:
        raise _LayoutError("elements overrun the pixel data")
    return found


def _skip_sequence(buf: bytes | bytearray, pos: int, stop: int) -> int:
    """Offset just past an undefined-length sequence's delimiter (items may nest)."""
    unpack = struct.unpack_from
    while pos < stop:
        group, elem, length = unpack("<HHI", buf, pos)
        if (group, elem) == (0xFFFE, 0xE0DD):  # sequence delimitation item
            return pos + 8
        if (group, elem) != (0xFFFE, 0xE000):
            raise _LayoutError("malformed sequence")
        pos += 8
        if length != 0xFFFFFFFF:
            pos += length
            continue
        while True:  # undefined-length item: elements until the item delimiter
            g, e = unpack("<HH", buf, pos)
            if (g, e) == (0xFFFE, 0xE00D):
                pos += 8
                break
            vr = bytes(buf[pos + 4:pos + 6])
            if vr in _LONG_VRS:
                length, head = unpack("<I", buf, pos + 8)[0], 12
            else:
                length, head = unpack("<H", buf, pos + 6)[0], 8
            if length == 0xFFFFFFFF:
                if vr != b"SQ":
                    raise _LayoutError(f"undefined length {vr!r}")
                pos = _skip_sequence(buf, pos + head, stop)
            else:
                pos += head + length
            if pos >= stop:
                raise _LayoutError("unterminated item")
    raise _LayoutError("unterminated sequence")


def _floats(raw: bytes | None, default: float | None = None) -> list[float]:
    if raw is None:
        if default is None:
            raise _LayoutError("missing value")
        return [default]
    return [float(v) for v in raw.decode("ascii").strip(" \0").split("\\")]


@dataclass(frozen=True)
class _Layout:
    """What every file of the series must look like (from its first file)."""

    npix: int
    rows: int
    cols: int
    dtype: str
    element: bytes
    same: dict[int, bytes]


@dataclass(frozen=True)
class _FileInfo:
    slot: int
    ipp: tuple[float, float, float]
    instance: int | None
    slope: float
    intercept: float
    via_pydicom: bool


def _read_one(path: str, slot: int, dest: np.ndarray, layout: _Layout) -> _FileInfo:
    """Header walk + pixel data straight into ``dest[slot]`` (one preadv)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            hlen = size - layout.npix
            if not 144 < hlen < 1 << 20:
                raise _LayoutError(f"file size {size}")
            head = bytearray(hlen)
            if os.preadv(fd, [head, dest[slot]], 0) != size:
                raise _LayoutError("short read")
        finally:
            os.close(fd)
        if head[128:132] != b"DICM" or head[-12:] != layout.element:
            raise _LayoutError("pixel data not where expected")
        values = _walk(head, 132, hlen - 12)
        if any(values.get(tag) != ref for tag, ref in layout.same.items()):
            raise _LayoutError("geometry or encoding differs from the first file")
        ipp = _floats(values.get(_IPP))
        if len(ipp) != 3:
            raise _LayoutError("ImagePositionPatient")
        instance = values.get(_INSTANCE)
        return _FileInfo(slot, (ipp[0], ipp[1], ipp[2]),
                         int(instance.decode().strip(" \0")) if instance else None,
                         _floats(values.get(_SLOPE), 1.0)[0],
                         _floats(values.get(_INTERCEPT), 0.0)[0], False)
    except (_LayoutError, ValueError, struct.error, UnicodeDecodeError):
        return _read_pydicom(path, slot, dest, layout)


def _read_pydicom(path: str, slot: int, dest: np.ndarray, layout: _Layout) -> _FileInfo:
    """Correctness first: any file the scanner cannot vouch for is read by pydicom."""
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    if arr.shape != (layout.rows, layout.cols) or arr.dtype != np.dtype(layout.dtype):
        raise FastPathRefused(f"{path}: pixel array {arr.shape} {arr.dtype}, series has "
                              f"{layout.rows}x{layout.cols} {layout.dtype}")
    if str(ds.get("SeriesInstanceUID", "")).encode() != layout.same.get(
            _SERIES_UID, b"").rstrip(b"\0 "):
        raise FastPathRefused(f"{path}: another SeriesInstanceUID")
    iop = [float(v) for v in ds.ImageOrientationPatient]
    if not np.allclose(iop, _floats(layout.same[_IOP]), atol=1e-4):
        raise FastPathRefused(f"{path}: ImageOrientationPatient {iop} differs")
    dest[slot] = arr
    ipp = [float(v) for v in ds.ImagePositionPatient]
    return _FileInfo(slot, (ipp[0], ipp[1], ipp[2]), int(ds.get("InstanceNumber", 0)) or None,
                     float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0)),
                     True)


# The process pool's view of the pixel ring: each worker maps the ring's file itself,
# since workers start from the forkserver and inherit no mapping.
_WORKER_RING: mmap.mmap | None = None


def _worker_init(ring_path: str, size: int) -> None:
    global _WORKER_RING
    with open(ring_path, "r+b") as fh:
        _WORKER_RING = mmap.mmap(fh.fileno(), size)


def _ring_file(size: int) -> tuple[int, str]:
    """A shared file of ``size`` bytes for the ring: (fd, path other processes open).

    A memfd (anonymous, in RAM, no write-back to disk, not under /dev/shm, whose size
    containers often cap at 64 MB), opened by workers through /proc; else an unlinked-on-
    close temporary file.
    """
    if hasattr(os, "memfd_create") and Path(f"/proc/{os.getpid()}/fd").is_dir():
        fd = os.memfd_create("clinfuse-pixel-ring")
        path = f"/proc/{os.getpid()}/fd/{fd}"
    else:
        fd, path = tempfile.mkstemp(prefix="clinfuse-pixel-ring-")
    os.ftruncate(fd, size)
    return fd, path


def _noop(_: int) -> int:
    return os.getpid()


def _read_chunk_shared(offset: int, shape: tuple[int, int, int], dtype: str,
                       jobs: list[tuple[str, int]], layout: _Layout) -> list[_FileInfo]:
    assert _WORKER_RING is not None, "worker not initialised with the pixel ring"
    dest = np.frombuffer(_WORKER_RING, dtype=dtype, count=math.prod(shape),
                         offset=offset).reshape(shape)
    return [_read_one(path, slot, dest, layout) for path, slot in jobs]


def _read_chunk_local(dest: np.ndarray, jobs: list[tuple[str, int]], layout: _Layout
                      ) -> list[_FileInfo]:
    return [_read_one(path, slot, dest, layout) for path, slot in jobs]


@dataclass
class ReadSeries:
    """One series read by :class:`FastSeriesReader`: raw pixels by file slot, and geometry."""

    folder: Path
    ring: int
    #: (n, rows, cols) int16/uint16 view of page-locked memory, in file (slot) order.
    pixels: torch.Tensor
    #: slot of the k-th slice along the slice normal.
    order: np.ndarray
    slope: np.ndarray
    intercept: np.ndarray
    #: RAS affine of the (cols, rows, slices) array, as clinfuse's Volume has it.
    affine: np.ndarray
    instance_numbers: list[int | None]
    pydicom_files: int
    #: Set when the series could not take the fast path (then ``pixels`` is unused).
    refused: str | None = None


@dataclass
class _Pending:
    folder: Path
    ring: int
    paths: list[str]
    layout: _Layout | None
    futures: list[Future[list[_FileInfo]]]
    refused: str | None = None


class FastSeriesReader:
    """Read uncompressed single-frame series into a ring of page-locked buffers.

    Parameters
    ----------
    capacity : (slices, rows, cols)
        Largest series the ring holds; larger ones are refused (reference path).
    mode : {"threads", "processes"}
        Threads share the GIL for the header scan; processes (started by the forkserver,
        writing into one shared memfd mapping registered with CUDA) do not, and move no
        arrays.
    workers : int
        Pool size; each series is split into this many chunks of files.
    prefetch : int
        Series read ahead of the one being handed out.
    pin : bool
        Page-lock the ring (only meaningful with CUDA).
    """

    def __init__(self, *, capacity: tuple[int, int, int], mode: Literal["threads", "processes"],
                 workers: int, prefetch: int = 2, pin: bool = False) -> None:
        if mode not in ("threads", "processes"):
            raise ValueError(f"mode must be 'threads' or 'processes', got {mode!r}")
        self.capacity = capacity
        self.mode = mode
        self.workers = max(1, workers)
        self.prefetch = max(1, prefetch)
        self.n_ring = self.prefetch + 1
        self.slot_bytes = math.prod(capacity) * 2
        self.release_events: list[Any] = [None] * self.n_ring
        self.pinned = False
        self._mapping: mmap.mmap | None = None
        self._ring_fd: int | None = None
        self._ring_path: str | None = None
        self._pool: Executor
        if mode == "processes":
            size = self.slot_bytes * self.n_ring
            self._ring_fd, self._ring_path = _ring_file(size)
            self._mapping = mmap.mmap(self._ring_fd, size)
            self._pool = process_pool(self.workers, initializer=_worker_init,
                                      initargs=(self._ring_path, size))
            # Start every child now, so their start-up (imports) is not timed as reading.
            list(self._pool.map(_noop, range(self.workers)))
            self._flat = torch.frombuffer(self._mapping, dtype=torch.uint8)
        else:
            self._pool = ThreadPoolExecutor(self.workers)
            self._flat = torch.empty(self.slot_bytes * self.n_ring, dtype=torch.uint8)
        if pin:
            self.pin()

    def pin(self) -> bool:
        """Page-lock the ring (initialises CUDA: call after every reader has forked)."""
        if not self.pinned:
            if self._mapping is not None:
                self.pinned = _host_register(self._flat)
            else:
                self._flat = self._flat.pin_memory()
                self.pinned = True
        return self.pinned

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._mapping is not None and self.pinned:
            _host_unregister(self._flat)
        if self._ring_fd is not None:
            os.close(self._ring_fd)
            if self._ring_path is not None and not self._ring_path.startswith("/proc/"):
                os.unlink(self._ring_path)
            self._ring_fd = None

    def __enter__(self) -> FastSeriesReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _slot_view(self, ring: int, n: int, rows: int, cols: int, dtype: torch.dtype
                   ) -> torch.Tensor:
        start = ring * self.slot_bytes
        return self._flat[start:start + n * rows * cols * 2].view(dtype).view(n, rows, cols)

    def _submit(self, folder: Path, ring: int) -> _Pending:
        names = sorted(n for n in os.listdir(folder) if n != "DICOMDIR")
        paths = [str(folder / n) for n in names]
        try:
            layout = _first_layout(paths[0]) if paths else None
            if layout is None:
                raise FastPathRefused("empty folder")
            if len(paths) > self.capacity[0] or (layout.rows, layout.cols) != tuple(
                    self.capacity[1:]):
                raise FastPathRefused(f"{len(paths)}x{layout.rows}x{layout.cols} does not fit "
                                      f"the ring {self.capacity}")
        except FastPathRefused as exc:
            return _Pending(folder, ring, paths, None, [], refused=str(exc))
        jobs = list(zip(paths, range(len(paths)), strict=True))
        chunks = [jobs[i::self.workers] for i in range(self.workers) if jobs[i::self.workers]]
        shape = (len(paths), layout.rows, layout.cols)
        if self.mode == "processes":
            offset = ring * self.slot_bytes
            futures = [self._pool.submit(_read_chunk_shared, offset, shape, layout.dtype,
                                         chunk, layout) for chunk in chunks]
        else:
            dest = self._slot_view(ring, *shape, _torch_dtype(layout.dtype)).numpy()
            futures = [self._pool.submit(_read_chunk_local, dest, chunk, layout)
                       for chunk in chunks]
        return _Pending(folder, ring, paths, layout, futures)

    def _finish(self, pending: _Pending) -> ReadSeries:
        infos: list[_FileInfo] = []
        refused = pending.refused
        for future in pending.futures:
            try:
                infos += future.result()
            except FastPathRefused as exc:
                refused = refused or str(exc)
        layout = pending.layout
        if refused is None and layout is not None:
            try:
                return _geometry(pending, layout, infos, self)
            except FastPathRefused as exc:
                refused = str(exc)
        empty = torch.empty(0)
        return ReadSeries(pending.folder, pending.ring, empty, np.empty(0, int), np.empty(0),
                          np.empty(0), np.eye(4), [], 0, refused=refused)

    def read(self, folder: Path) -> ReadSeries:
        """Read one series (no prefetch)."""
        self._wait_ring(0)
        return self._finish(self._submit(Path(folder), 0))

    def _wait_ring(self, ring: int) -> None:
        event = self.release_events[ring]
        if event is not None:
            event.synchronize()  # the previous copy out of this buffer has finished
            self.release_events[ring] = None

    def iter_series(self, folders: Sequence[Path]) -> Iterator[ReadSeries]:
        """Yield series in order, reading ``prefetch`` ahead.

        The consumer must copy (or finish with) ``pixels`` and may set
        ``release_events[series.ring]`` to a CUDA event that marks the end of its copy.
        """
        pending: deque[_Pending] = deque()
        todo = iter(enumerate(folders))

        def submit_next() -> None:
            nxt = next(todo, None)
            if nxt is not None:
                ring = nxt[0] % self.n_ring
                self._wait_ring(ring)
                pending.append(self._submit(Path(nxt[1]), ring))

        for _ in range(self.prefetch):
            submit_next()
        while pending:
            series = self._finish(pending.popleft())
            yield series
            submit_next()


def _torch_dtype(dtype: str) -> torch.dtype:
    return {"<i2": torch.int16, "<u2": torch.uint16}[dtype]


def _host_register(flat: torch.Tensor) -> bool:
    """Page-lock memory torch did not allocate (the shared ring); False if CUDA refuses."""
    try:
        err = torch.cuda.cudart().cudaHostRegister(flat.data_ptr(), flat.numel(), 0)
    except (AttributeError, RuntimeError):
        return False
    return int(err) == 0


def _host_unregister(flat: torch.Tensor) -> None:
    with contextlib.suppress(AttributeError, RuntimeError):
        torch.cuda.cudart().cudaHostUnregister(flat.data_ptr())


def _first_layout(path: str) -> _Layout:
    """Parse the first file fully with pydicom and record the layout the rest must share."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if ts != _EXPLICIT_LE:
        raise FastPathRefused(f"transfer syntax {ts}; the fast path reads only {_EXPLICIT_LE}")
    if int(ds.get("NumberOfFrames", 1) or 1) != 1 or int(ds.get("SamplesPerPixel", 1)) != 1 \
            or ds.get("PhotometricInterpretation") != "MONOCHROME2" \
            or int(ds.get("BitsAllocated", 0)) != 16:
        raise FastPathRefused("not single-frame 16-bit MONOCHROME2")
    rows, cols = int(ds.Rows), int(ds.Columns)
    npix = rows * cols * 2
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(size - npix)
    element = head[-12:]
    if element[:4] != b"\xe0\x7f\x10\x00" or element[4:6] not in (b"OW", b"OB") \
            or element[6:] != b"\0\0" + struct.pack("<I", npix):
        raise FastPathRefused("pixel data is not the last element, with a defined length")
    try:
        values = _walk(head, 132, len(head) - 12)
    except _LayoutError as exc:
        raise FastPathRefused(f"first file: {exc}") from exc
    dtype = "<i2" if int(ds.PixelRepresentation) == 1 else "<u2"
    return _Layout(npix, rows, cols, dtype, element,
                   {tag: values[tag] for tag in _SAME_TAGS if tag in values})


def _geometry(pending: _Pending, layout: _Layout, infos: list[_FileInfo],
              reader: FastSeriesReader) -> ReadSeries:
    """Order by IPP along the slice normal and check the stack is regular (no resampling)."""
    infos.sort(key=lambda f: f.slot)
    n = len(infos)
    if n < 3:
        raise FastPathRefused(f"{n} slices")
    iop = np.array(_floats(layout.same[_IOP]))
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    ipp = np.array([f.ipp for f in infos])
    s = ipp @ normal
    order = np.argsort(s, kind="stable")
    positions = ipp[order]
    gaps = np.diff(s[order])
    spacing = _floats(layout.same[0x00280030])
    if gaps.min() < 1e-2:
        raise FastPathRefused("repeated slice positions (4-D or duplicates)")
    if np.abs(gaps - gaps.min()).max() > 0.01 * gaps.min() + 0.01:
        raise FastPathRefused("uneven slice spacing or a missing slice")
    drift = positions - positions[0]
    if np.abs(drift - np.outer(drift @ normal, normal)).max() > 0.05 * min(spacing):
        raise FastPathRefused("gantry tilt")
    affine = np.eye(4)
    affine[:3, 0] = row * spacing[1]
    affine[:3, 1] = col * spacing[0]
    affine[:3, 2] = (positions[-1] - positions[0]) / (n - 1)
    affine[:3, 3] = positions[0]
    pixels = reader._slot_view(pending.ring, n, layout.rows, layout.cols,
                               _torch_dtype(layout.dtype))
    return ReadSeries(pending.folder, pending.ring, pixels, order,
                      np.array([f.slope for f in infos], np.float64),
                      np.array([f.intercept for f in infos], np.float64),
                      _LPS_TO_RAS @ affine, [f.instance for f in infos],
                      sum(f.via_pydicom for f in infos))


# --------------------------------------------------------------------------- GPU preprocess


@dataclass(frozen=True)
class _AxisMap:
    """Spacing output axis ``out`` samples raw axis ``src`` at ``scale * o + shift``."""

    out: int
    src: int
    n_out: int
    n_in: int
    scale: float
    shift: float


def spacing_maps(affine: np.ndarray, shape: tuple[int, int, int],
                 pixdim: Sequence[float]) -> list[_AxisMap]:
    """MONAI's Orientation("RAS") + Spacing(pixdim) geometry, as three 1-D sample maps.

    Uses nibabel/MONAI's own functions (``io_orientation``, ``zoom_affine``,
    ``compute_shape_offset``) so the output grid is MONAI's; then the map from output
    voxel to raw voxel is ``inv(A_raw) @ A_out``, which must be axis-aligned.
    """
    import nibabel as nib
    from monai.data.utils import AFFINE_TOL, compute_shape_offset, zoom_affine

    ornt = nib.orientations.ornt_transform(
        nib.io_orientation(affine), nib.orientations.axcodes2ornt("RAS", labels=_RAS_LABELS))
    a_or = affine @ nib.orientations.inv_ornt_aff(ornt, shape)
    shape_or = np.asarray(shape)[np.argsort(ornt[:, 0])]
    out_d = np.asarray(pixdim, float)
    orig_d = np.linalg.norm(a_or[:3, :3], axis=0)
    out_d = np.where(np.abs(orig_d - out_d) <= AFFINE_TOL, orig_d, out_d)  # as Spacing does
    new_affine = zoom_affine(a_or, out_d, diagonal=False)
    out_shape, offset = compute_shape_offset(shape_or, a_or, new_affine, False)
    new_affine[:3, 3] = offset[:3]
    xform = np.linalg.solve(affine, new_affine)
    maps = []
    for d in range(3):
        column = np.abs(xform[:3, d])
        src = int(np.argmax(column))
        if (np.delete(column, src) > 1e-6 * column[src]).any():
            raise FastPathRefused("oblique resampling is not axis-aligned")
        maps.append(_AxisMap(d, src, int(out_shape[d]), int(shape[src]), float(xform[src, d]),
                             float(xform[src, 3])))
    return maps


def _interp_matrix(m: _AxisMap, device: torch.device, columns: torch.Tensor | None
                   ) -> torch.Tensor:
    """(n_out, n_in) linear-interpolation weights with zero padding (grid_sample 'zeros')."""
    x = torch.arange(m.n_out, dtype=torch.float64, device=device) * m.scale + m.shift
    i0 = torch.floor(x)
    w1 = x - i0
    # Two spare columns catch out-of-range taps (then dropped): no boolean indexing, no sync.
    width = m.n_in + 2
    idx0 = (i0.long() + 1).clamp_(0, width - 1)
    idx1 = (i0.long() + 2).clamp_(0, width - 1)
    weights = torch.zeros(m.n_out, width, dtype=torch.float64, device=device)
    weights.scatter_add_(1, idx0[:, None], (1 - w1)[:, None])
    weights.scatter_add_(1, idx1[:, None], w1[:, None])
    weights = weights[:, 1:-1]
    if columns is not None:  # sorted slice k lives in file slot columns[k]
        weights = torch.zeros_like(weights).index_copy_(1, columns, weights)
    return weights.float()


class GpuPreprocess:
    """Raw slots -> (X, Y, Z) float32 in [0, 1], the same maps as clinfuse's CPU path.

    Rescale per file, then Orientation("RAS") + Spacing(pixdim, bilinear, zeros) as three
    separable interpolation matrices (MONAI's geometry), the window, and torch's trilinear
    ``interpolate`` (what MONAI's Resize calls).
    """

    def __init__(self, *, pixdim: Sequence[float], spatial_size: Sequence[int],
                 device: torch.device) -> None:
        self.pixdim = tuple(float(p) for p in pixdim)
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.device = device

    def __call__(self, raw: torch.Tensor, series: ReadSeries) -> torch.Tensor:
        n, rows, cols = raw.shape
        maps = spacing_maps(series.affine, (cols, rows, n), self.pixdim)
        dev = self.device
        slope = torch.as_tensor(series.slope, dtype=torch.float32).to(dev, non_blocking=True)
        intercept = torch.as_tensor(series.intercept, dtype=torch.float32).to(
            dev, non_blocking=True)
        order = torch.as_tensor(series.order, dtype=torch.long).to(dev, non_blocking=True)
        hu = raw.float().mul_(slope[:, None, None]).add_(intercept[:, None, None])
        # Raw (Volume) axes i, j, k are tensor dims col, row, slot.
        letter = {0: "c", 1: "r", 2: "k"}
        cur = "krc"
        # Contract the biggest in-plane axes first: least work for the later steps.
        for m in sorted(maps, key=lambda m: m.src):
            w = _interp_matrix(m, dev, order if m.src == 2 else None)
            new = cur.replace(letter[m.src], "xyz"[m.out])
            hu = torch.einsum(f"{'xyz'[m.out]}{letter[m.src]},{cur}->{new}", w, hu)
            cur = new
        vol = hu.permute([cur.index(a) for a in "xyz"])
        vol = ((vol - A_MIN) / (A_MAX - A_MIN)).clamp_(0.0, 1.0)
        out = F.interpolate(vol[None, None], size=self.spatial_size, mode="trilinear",
                            align_corners=False)
        return out[0, 0]


# --------------------------------------------------------------------------- models


def make_encoder(embed_dim: int, device: torch.device, seed: int = SEED,
                 kind: Literal["densenet121", "tiny"] = "densenet121") -> torch.nn.Module:
    """DenseNet121-3D (or a tiny DenseNet), fixed random weights: timing and agreement."""
    from monai.networks.nets import DenseNet, DenseNet121

    torch.manual_seed(seed)
    if kind == "tiny":
        net = DenseNet(spatial_dims=3, in_channels=1, out_channels=embed_dim, init_features=8,
                       growth_rate=4, block_config=(2, 2, 2, 2)).eval()
    else:
        net = DenseNet121(spatial_dims=3, in_channels=1, out_channels=embed_dim).eval()
    net = net.to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last_3d)
    return net


class _FusionHead(torch.nn.Module):
    """Stand-in fusion: image embedding + tabular features -> probability (cost only)."""

    def __init__(self, embed_dim: int, n_tabular: int = 16) -> None:
        super().__init__()
        self.n_tabular = n_tabular
        self.linear = torch.nn.Linear(embed_dim + n_tabular, 1)

    def forward(self, embedding: torch.Tensor, tabular: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear(torch.cat([embedding.float(), tabular], 1)))[:, 0]


def _encode(encoder: torch.nn.Module, batch: torch.Tensor, device: torch.device
            ) -> torch.Tensor:
    x = batch[:, None]
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return encoder(x).float()
    return encoder(x).float()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- the paths


def reference_tensor(folder: Path, pixdim: Sequence[float], spatial_size: Sequence[int]
                     ) -> tuple[torch.Tensor, np.ndarray]:
    """clinfuse's CPU path: (X, Y, Z) tensor, and the assembled HU array (i, j, k)."""
    from pipelines.imaging.dicom_series import load_dicom_series
    from pipelines.imaging.preprocess import Preprocess, PreprocessConfig, Window

    volume = load_dicom_series(Path(folder))
    config = PreprocessConfig(spatial_size=tuple(int(s) for s in spatial_size),  # type: ignore[arg-type]
                              windows={"CT": Window(A_MIN, A_MAX)},
                              spacing=tuple(float(p) for p in pixdim),  # type: ignore[arg-type]
                              interpolation="bilinear", fit="resize")
    return Preprocess(config)(volume).as_tensor()[0], np.asarray(volume.array)


class FastScorer:
    """The fast path end to end: read -> H2D -> preprocess -> encode -> fuse, batched."""

    def __init__(self, *, reader: FastSeriesReader, preprocess: GpuPreprocess,
                 encoder: torch.nn.Module, head: _FusionHead, batch_size: int,
                 device: torch.device, config: ScoringConfig) -> None:
        self.reader = reader
        self.preprocess = preprocess
        self.encoder = encoder
        self.head = head
        self.batch_size = batch_size
        self.device = device
        self.config = config
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.refused: list[str] = []
        self.pydicom_files = 0

    def _to_device(self, series: ReadSeries) -> torch.Tensor:
        if series.refused is not None:
            self.refused.append(f"{series.folder.name}: {series.refused}")
            tensor, _ = reference_tensor(series.folder, self.config.pixdim,
                                         self.config.spatial_size)
            return tensor.to(self.device)
        self.pydicom_files += series.pydicom_files
        if self.copy_stream is None:
            return self.preprocess(series.pixels, series)
        with torch.cuda.stream(self.copy_stream):
            raw = series.pixels.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        self.reader.release_events[series.ring] = done
        current = torch.cuda.current_stream(self.device)
        current.wait_event(done)
        raw.record_stream(current)
        return self.preprocess(raw, series)

    @torch.inference_mode()
    def score(self, folders: Sequence[Path], keep: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Embeddings (n, D) and probabilities (n,) on the CPU; the first ``keep`` inputs."""
        embeddings, probs, kept, batch = [], [], [], []
        tabular = torch.zeros(self.batch_size, self.head.n_tabular, device=self.device)

        def flush() -> None:
            x = torch.stack(batch)
            emb = _encode(self.encoder, x, self.device)
            embeddings.append(emb)
            probs.append(self.head(emb, tabular[:len(batch)]))
            batch.clear()

        for series in self.reader.iter_series(folders):
            x = self._to_device(series)
            if len(kept) < keep:
                kept.append(x.detach().float().cpu())
            batch.append(x)
            if len(batch) == self.batch_size:
                flush()
        if batch:
            flush()
        _sync(self.device)
        return torch.cat(embeddings).cpu(), torch.cat(probs).cpu(), kept


def stock_transform(pixdim: Sequence[float], spatial_size: Sequence[int]) -> Any:
    """The stock MONAI chain the issue measured at 1.3 series/s on 16 cores."""
    from monai.transforms import (
        Compose,
        LoadImage,
        Orientation,
        Resize,
        ScaleIntensityRange,
        Spacing,
    )

    return Compose([
        LoadImage(reader="PydicomReader", image_only=True, ensure_channel_first=True),
        Orientation(axcodes="RAS", labels=_RAS_LABELS),
        Spacing(pixdim=tuple(pixdim), mode="bilinear", padding_mode="zeros"),
        ScaleIntensityRange(A_MIN, A_MAX, 0.0, 1.0, clip=True, dtype=np.float32),
        Resize(spatial_size=tuple(spatial_size), mode="trilinear"),
    ])


@torch.inference_mode()
def run_stock(folders: Sequence[Path], config: ScoringConfig, encoder: torch.nn.Module,
              device: torch.device) -> dict[str, Any]:
    """Stock MONAI loading in DataLoader workers -> encoder; series/s incl. worker start."""
    from monai.data import DataLoader
    from monai.data import Dataset as MonaiDataset

    workers = config.stock_workers
    batch = max(1, len(folders) // max(1, workers)) if workers else config.batch_size
    dataset = MonaiDataset([str(f) for f in folders],
                           transform=stock_transform(config.pixdim, config.spatial_size))
    loader = DataLoader(dataset, batch_size=batch, num_workers=workers,
                        pin_memory=device.type == "cuda", shuffle=False)
    kept: list[torch.Tensor] = []
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PydicomReader warns about pruned metadata
        for x in loader:
            x = x.as_tensor() if hasattr(x, "as_tensor") else x
            if len(kept) < config.check_series:
                kept += [t[0].float().clone() for t in x[:config.check_series - len(kept)]]
            _encode(encoder, x.to(device, non_blocking=True)[:, 0], device)
    _sync(device)
    seconds = time.perf_counter() - started
    return {"series": len(folders), "workers": workers, "batch_size": batch,
            "seconds": round(seconds, 3), "series_per_s": round(len(folders) / seconds, 3),
            "_kept": kept}


@torch.inference_mode()
def run_encoder_alone(encoder: torch.nn.Module, config: ScoringConfig, device: torch.device,
                      seconds: float = 2.0) -> dict[str, Any]:
    """Random (B, 1, 96³) batches through the encoder; series/s."""
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    x = torch.rand((config.batch_size, *config.spatial_size), generator=gen).to(device)
    for _ in range(1 if config.small else 3):
        _encode(encoder, x, device)
    _sync(device)
    iters, started = 0, time.perf_counter()
    while iters < (1 if config.small else 5) or time.perf_counter() - started < seconds:
        _encode(encoder, x, device)
        iters += 1
        if config.small:
            break
    _sync(device)
    elapsed = time.perf_counter() - started
    return {"batch_size": config.batch_size, "iterations": iters,
            "series_per_s": round(iters * config.batch_size / elapsed, 2),
            "precision": "bf16 autocast, channels_last_3d" if device.type == "cuda" else "fp32"}


def run_h2d(config: ScoringConfig, device: torch.device) -> dict[str, Any]:
    """Copy one page-locked series to the device; the ceiling for any reader."""
    if device.type != "cuda":
        return {"skipped": "no CUDA device"}
    host = torch.empty((config.n_slices, config.size, config.size), dtype=torch.int16,
                       pin_memory=True)
    dev = torch.empty_like(host, device=device)
    for _ in range(3):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize(device)
    reps = 20
    started = time.perf_counter()
    for _ in range(reps):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize(device)
    per = (time.perf_counter() - started) / reps
    return {"bytes": host.numel() * 2, "series_per_s": round(1 / per, 1),
            "gb_per_s": round(host.numel() * 2 / per / 1e9, 2)}


# --------------------------------------------------------------------------- run


def _check_ordering(series: ReadSeries, volume_array: np.ndarray) -> dict[str, Any]:
    """The fast path's position order against the reference Volume (exact HU match)."""
    pixels = series.pixels.numpy()[series.order].astype(np.float64)
    hu = pixels * series.slope[series.order, None, None] + \
        series.intercept[series.order, None, None]
    ordered = np.transpose(hu, (2, 1, 0))  # (k, r, c) -> Volume's (i=c, j=r, k)
    numbers = [series.instance_numbers[s] for s in series.order]
    pairs = list(itertools.pairwise(numbers))
    monotone = all(a < b for a, b in pairs) or all(a > b for a, b in pairs)
    same = ordered.shape == volume_array.shape and bool(
        np.array_equal(ordered.astype(np.float32), volume_array))
    return {"instance_numbers_follow_position": monotone, "stack_equals_reference": same}


def self_checks(folders: Sequence[Path], config: ScoringConfig, device: torch.device,
                fast_inputs: list[torch.Tensor], fast_embeddings: torch.Tensor,
                stock_inputs: list[torch.Tensor]) -> dict[str, Any]:
    """Fast path vs the CPU reference: tensors, slice order, embeddings."""
    checks: list[dict[str, Any]] = []
    cpu_encoder = make_encoder(config.embed_dim, torch.device("cpu"), config.seed,
                               config.encoder)
    with FastSeriesReader(capacity=(config.n_slices, config.size, config.size),
                          mode="threads", workers=config.read_workers, prefetch=1) as reader:
        for i, folder in enumerate(folders[:config.check_series]):
            ref, volume_array = reference_tensor(folder, config.pixdim, config.spatial_size)
            series = reader.read(folder)
            entry: dict[str, Any] = {"series": folder.name}
            if series.refused is not None:
                entry["refused"] = series.refused
            else:
                entry.update(_check_ordering(series, volume_array))
            diff = float((fast_inputs[i] - ref).abs().max())
            entry["preprocess_max_abs_diff"] = diff
            if i < len(stock_inputs) and stock_inputs[i].shape == ref.shape:
                # Informational: MONAI's reader orders by InstanceNumber, not position.
                entry["stock_vs_reference_max_abs_diff"] = float(
                    (stock_inputs[i] - ref).abs().max())
            with torch.inference_mode():
                ref_emb = cpu_encoder(ref[None, None]).float()[0]
            fast = fast_embeddings[i]
            entry["embedding_max_abs_diff"] = float((fast - ref_emb).abs().max())
            entry["embedding_rel_l2"] = float((fast - ref_emb).norm() / ref_emb.norm())
            entry["embedding_cosine"] = float(F.cosine_similarity(fast, ref_emb, dim=0))
            checks.append(entry)
    rel_tol = EMBED_REL_TOL_BF16 if device.type == "cuda" else EMBED_REL_TOL_FP32
    shuffled = [c for c in checks if not c.get("instance_numbers_follow_position", True)]
    ok = {
        "preprocess": all(c["preprocess_max_abs_diff"] <= PREPROCESS_TOL for c in checks),
        "ordering": all(c.get("stack_equals_reference", False) for c in checks)
        and bool(shuffled),
        "embeddings": all(c["embedding_rel_l2"] <= rel_tol for c in checks),
    }
    return {"passed": all(ok.values()), "ok": ok, "series": checks,
            "tolerances": {"preprocess_max_abs_diff": PREPROCESS_TOL,
                           "embedding_rel_l2": rel_tol,
                           "ordering": "position-sorted stack equals the reference Volume "
                                       "exactly, and a checked series has InstanceNumbers "
                                       "out of position order"}}


def _filesystem(path: Path) -> str | None:
    try:
        best, fstype = "", None
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, fstype = parts[1], parts[2]
        return fstype
    except OSError:
        return None


def _device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
                            "python": platform.python_version(),
                            "versions": {p: version(p) for p in ("monai", "pydicom", "numpy")}}
    if device.type == "cuda":
        info["card"] = torch.cuda.get_device_name(device)
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def run(config: ScoringConfig) -> dict[str, Any]:
    """Generate, check, time; the results dict (also what the JSON holds)."""
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="clinfuse-gpu-scoring-", dir=config.workdir))
    try:
        return _run(config, tmp, started)
    finally:
        if not config.keep_data:
            shutil.rmtree(tmp, ignore_errors=True)


def _run(config: ScoringConfig, tmp: Path, started: float) -> dict[str, Any]:
    gen_started = time.perf_counter()
    plans = generate_series(tmp, config.n_series, config.n_slices, config.size, config.seed)
    folders = [Path(p.folder) for p in plans]
    gen_seconds = time.perf_counter() - gen_started
    data_bytes = sum(f.stat().st_size for d in folders for f in d.iterdir())
    device = torch.device(config.device)
    capacity = (config.n_slices, config.size, config.size)
    pin = device.type == "cuda"
    # Readers first: their workers start (and import) before CUDA is initialised.
    readers = {mode: FastSeriesReader(capacity=capacity, mode=mode,  # type: ignore[arg-type]
                                      workers=config.read_workers * (2 if mode == "threads"
                                                                     and not config.small
                                                                     else 1),
                                      prefetch=config.prefetch, pin=False)
               for mode in config.readers}
    try:
        if pin:
            torch.backends.cudnn.benchmark = True
            for reader in readers.values():  # now page-lock the rings
                reader.pin()
        encoder = make_encoder(config.embed_dim, device, config.seed, config.encoder)
        head = _FusionHead(config.embed_dim).to(device).eval()
        preprocess = GpuPreprocess(pixdim=config.pixdim, spatial_size=config.spatial_size,
                                   device=device)
        encoder_alone = run_encoder_alone(encoder, config, device)
        h2d = run_h2d(config, device)
        cache_before = page_cache_resident(_sample_files(folders))
        fast: dict[str, Any] = {}
        kept: list[torch.Tensor] = []
        best_embeddings = torch.empty(0)
        for mode, reader in readers.items():
            scorer = FastScorer(reader=reader, preprocess=preprocess, encoder=encoder,
                                head=head, batch_size=config.batch_size, device=device,
                                config=config)
            # Warm-up (cuDNN autotune, allocator, first-touch of the ring): not timed.
            emb, _, warm_kept = scorer.score(folders[:max(config.batch_size,
                                                          config.check_series)],
                                             keep=config.check_series)
            if not kept:
                kept, best_embeddings = warm_kept, emb
            read_started = time.perf_counter()
            for _ in reader.iter_series(folders):
                pass
            read_rate = len(folders) / (time.perf_counter() - read_started)
            rates = []
            for _ in range(config.passes):
                t0 = time.perf_counter()
                scorer.score(folders)
                rates.append(len(folders) / (time.perf_counter() - t0))
            total = config.passes * len(folders) / sum(len(folders) / r for r in rates)
            fast[mode] = {"series_per_s": round(total, 2),
                          "per_pass": [round(r, 2) for r in rates],
                          "read_only_series_per_s": round(read_rate, 2),
                          "workers": reader.workers, "pinned": reader.pinned,
                          "refused_series": scorer.refused,
                          "files_read_by_pydicom": scorer.pydicom_files}
        cache_after = page_cache_resident(_sample_files(folders))
        stock = run_stock(folders[:config.stock_series], config, encoder, device)
        stock_inputs = stock.pop("_kept")
        checks = self_checks(folders, config, device, kept, best_embeddings, stock_inputs)
    finally:
        for reader in readers.values():
            reader.close()
    best_mode = max(fast, key=lambda m: fast[m]["series_per_s"])
    best = fast[best_mode]["series_per_s"]
    ratio = best / stock["series_per_s"] if stock["series_per_s"] else None
    shape = f"{config.n_slices}x{config.size}x{config.size}"
    result: dict[str, Any] = {
        "benchmark": "gpu_scoring",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        **_device_info(device),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "data": {"series": len(folders), "shape": shape, "gigabytes": round(data_bytes / 1e9, 2),
                 "generate_seconds": round(gen_seconds, 1), "workdir_fs": _filesystem(tmp)},
        "page_cache": {"method": "mincore(2) on 8 files per series, before and after the "
                                 "fast-path passes",
                       "resident_before": cache_before, "resident_after": cache_after,
                       "warm": cache_before is not None and cache_before > 0.99},
        "fast_path": {"best_reader": best_mode, "series_per_s": best, "by_reader": fast},
        "stock_pipeline": stock,
        "encoder_alone": encoder_alone,
        "h2d_one_series": h2d,
        "ratio_fast_over_stock": round(ratio, 1) if ratio else None,
        "self_checks": checks,
        "seconds": round(time.perf_counter() - started, 1),
    }
    result["summary"] = (
        f"{best:.1f} series/s fast ({best_mode}) vs stock {stock['series_per_s']:.2f} "
        f"(x{ratio:.0f}); encoder alone {encoder_alone['series_per_s']:.0f}/s; "
        f"H2D {h2d.get('series_per_s', 'n/a')}/s; checks "
        f"{'passed' if checks['passed'] else 'FAILED'}; {len(folders)} CT {shape}, "
        f"cache {'warm' if result['page_cache']['warm'] else 'not warm'}; "
        f"{result.get('card', device.type)}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """CLI; exit 0 when the self-checks pass, 1 when they fail, 2 without CUDA."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_scoring",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true",
                        help="tiny series on the CPU (or GPU if present): the self-checks")
    parser.add_argument("--series", type=int, help="series to generate (default 64)")
    parser.add_argument("--slices", type=int, help="slices per series (default 300)")
    parser.add_argument("--size", type=int, help="rows = columns (default 512)")
    parser.add_argument("--stock-series", type=int, help="series for the stock run (16)")
    parser.add_argument("--batch-size", type=int, help="series per encoder batch (32)")
    parser.add_argument("--passes", type=int, help="timed fast-path passes (2)")
    parser.add_argument("--readers", help="comma list of threads,processes")
    parser.add_argument("--workdir", help="where to generate series (default $TMPDIR)")
    parser.add_argument("--keep-data", action="store_true")
    parser.add_argument("--out", type=Path, help=f"results JSON (full mode default {RESULTS})")
    args = parser.parse_args(argv)
    config = ScoringConfig.small_mode() if args.small else ScoringConfig()
    for name, attr in (("series", "n_series"), ("slices", "n_slices"), ("size", "size"),
                       ("stock_series", "stock_series"), ("batch_size", "batch_size"),
                       ("passes", "passes"), ("workdir", "workdir"), ("keep_data", "keep_data")):
        value = getattr(args, name)
        if value not in (None, False):
            setattr(config, attr, value)
    if args.readers:
        config.readers = tuple(r.strip() for r in args.readers.split(","))
    if not args.small and not torch.cuda.is_available():
        print(f"torch.cuda.is_available() is False (torch {torch.__version__}, built for "
              f"CUDA {torch.version.cuda}): the full run needs a CUDA build of torch and a "
              "visible GPU. Use --small for the CPU self-check mode.", file=sys.stderr)
        return 2
    result = run(config)
    out = args.out if args.out is not None else (None if args.small else RESULTS)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("self_checks", "fast_path", "page_cache")},
                     indent=2))
    print(result["summary"])
    return 0 if result["self_checks"]["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
