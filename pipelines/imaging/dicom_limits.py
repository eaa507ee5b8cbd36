"""Caps on what a DICOM instance may cost to read and decode: decompression-bomb defences.

Two kinds of instance are small on the wire and huge in memory:

- **Deflated Explicit VR Little Endian** (1.2.840.10008.1.2.1.99): the dataset after the
  File Meta is one deflate stream, and deflate squeezes zeros about 1000:1, so 400 KiB
  inflate to 400 MiB. pydicom inflates it all with ``zlib.decompress``, and does so even
  with ``stop_before_pixels``. :func:`read_part10` inflates with a cap instead: the
  dataset cap, and below it a cap on the inflation ratio.
- **Encapsulated pixel data** (JPEG, JPEG-LS, JPEG 2000): a few hundred bytes of
  codestream may come with a header that declares 60000 x 60000 pixels and 10 frames,
  or a codestream that itself declares far more pixels than the header's Rows x
  Columns. :func:`check_pixel_budget` refuses both before any decoder allocates.

Every reader of DICOM bytes goes through :func:`read_part10` (STOW-RS, C-STORE, WADO
metadata, the dashboard viewer, the imaging pipeline), and every decoder calls
:func:`check_pixel_budget` first.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileDataset
from pydicom.filereader import read_dataset, read_preamble
from pydicom.uid import DeflatedExplicitVRLittleEndian

__all__ = [
    "DEFAULT_MAX_DATASET_BYTES", "DEFAULT_MAX_INFLATION_RATIO", "DEFAULT_MAX_PIXEL_BYTES",
    "INFLATION_FLOOR_BYTES", "DeflateError", "DicomLimitError",
    "DicomLimits",
    "check_pixel_budget", "inflate_bounded", "read_part10",
]

MiB = 1 << 20
GiB = 1 << 30
#: Default cap on one dataset's bytes, after inflation for the Deflated transfer syntax.
#: 512 MiB is the default upload limit (``CLINFUSE_MAX_UPLOAD_BYTES``): a deflated
#: instance may not expand beyond what the service would accept uncompressed. The
#: largest single instances in clinical use (enhanced multi-frame CT, breast
#: tomosynthesis) are a few hundred MiB.
DEFAULT_MAX_DATASET_BYTES = 512 * MiB
#: Default cap on one instance's decoded pixel data: Rows x Columns x NumberOfFrames x
#: SamplesPerPixel x bytes per sample. 1 GiB holds a 2,000-frame 512 x 512 16-bit
#: enhanced CT; the pipeline's float32 copy then takes twice that.
DEFAULT_MAX_PIXEL_BYTES = 1 * GiB
#: Default cap on how many times its deflated size a Deflated dataset may inflate (past
#: INFLATION_FLOOR_BYTES, which any instance may inflate to).
DEFAULT_MAX_INFLATION_RATIO = 100
INFLATION_FLOOR_BYTES = 16 * MiB

_CHUNK = 1 * MiB
_IN_CHUNK = 64 * 1024
# Transfer syntaxes whose frames are JPEG 2000 (incl. HTJ2K) or JPEG/JPEG-LS codestreams.
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
_JPEG_SOI = b"\xff\xd8"
# Start-of-frame markers: SOF0-SOF3, SOF5-SOF7, SOF9-SOF11, SOF13-SOF15 and JPEG-LS SOF55.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF,
             0xF7}
# Markers without a length field: TEM, RST0-7, SOI, EOI.
_STANDALONE = {0x01, *range(0xD0, 0xDA)}


class DicomLimitError(ValueError):
    """An instance over a cap, refused before it is inflated or decoded past that cap."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DeflateError(ValueError):
    """A Deflated dataset whose deflate stream is corrupt or ends early."""


@dataclass(frozen=True)
class DicomLimits:
    """The caps one reader applies.

    Parameters
    ----------
    max_dataset_bytes : int, default 512 MiB
        Most bytes one dataset may occupy, after inflation for the Deflated syntax.
    max_pixel_bytes : int, default 1 GiB
        Most bytes one instance's decoded pixel data may occupy.
    max_inflation_ratio : int, default 100
        Past the first 16 MiB, a Deflated dataset may inflate to at most this many
        times its deflated size; 0 turns the ratio off (the dataset cap still holds).
        Clinical images deflate 2-20:1, a bomb of zeros about 1000:1: the ratio refuses
        the bomb at a few tens of MiB where the dataset cap alone would let it take
        hundreds.
    """

    max_dataset_bytes: int = DEFAULT_MAX_DATASET_BYTES
    max_pixel_bytes: int = DEFAULT_MAX_PIXEL_BYTES
    max_inflation_ratio: int = DEFAULT_MAX_INFLATION_RATIO

    def __post_init__(self) -> None:
        for name in ("max_dataset_bytes", "max_pixel_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_inflation_ratio < 0:
            raise ValueError("max_inflation_ratio must be 0 (off) or positive, got "
                             f"{self.max_inflation_ratio}")

    def inflation_limit(self, deflated_bytes: int) -> tuple[int, str]:
        """How far a deflated stream of ``deflated_bytes`` may inflate, and which cap
        that is (for the error)."""
        if self.max_inflation_ratio:
            by_ratio = max(INFLATION_FLOOR_BYTES, self.max_inflation_ratio * deflated_bytes)
            if by_ratio < self.max_dataset_bytes:
                return by_ratio, (f"{self.max_inflation_ratio} times its deflated size, the "
                                  "inflation-ratio cap")
        return self.max_dataset_bytes, "the dataset cap"


DEFAULT_LIMITS = DicomLimits()


def size_text(n: int) -> str:
    """``8 MiB``, ``1.5 GiB``: a byte count as an error message shows it."""
    if n >= GiB:
        return f"{n / GiB:.4g} GiB"
    return f"{n / MiB:.4g} MiB" if n >= MiB else f"{n} bytes"


def inflate_bounded(deflated: bytes | memoryview, limit: int, *,
                    cap: str = "the dataset cap") -> bytes:
    """Inflate a raw deflate stream (no zlib header), refusing output over ``limit`` bytes.

    The stream is first inflated chunk by chunk and its output counted and dropped, so
    refusing a bomb costs one chunk of memory, never ``limit``; only a stream that fits
    is then inflated for real. Deflated instances are rare, so paying the inflation
    twice for them is cheaper than holding ``limit`` bytes for every bomb.

    Raises
    ------
    DicomLimitError
        The stream inflates to more than ``limit`` bytes.
    DeflateError
        The stream is corrupt or ends early.
    """
    total = 0
    counter = zlib.decompressobj(-zlib.MAX_WBITS)
    view = memoryview(deflated)

    def step(piece: bytes | memoryview) -> bytes:
        nonlocal total
        # max_length bounds the output of one call; input it did not consume waits in
        # unconsumed_tail (at most one input piece, so the copies stay small).
        out = counter.decompress(piece, _CHUNK)
        total += len(out)
        if total > limit:
            raise DicomLimitError(
                f"the deflated dataset inflates to more than {size_text(limit)} ({cap}); "
                "refused unread as a possible decompression bomb")
        return out

    try:
        for start in range(0, len(view), _IN_CHUNK):
            step(view[start:start + _IN_CHUNK])
            while counter.unconsumed_tail and not counter.eof:
                step(counter.unconsumed_tail)
            if counter.eof:
                break
        while not counter.eof and step(b""):
            pass  # output zlib still held after the last input
        if not counter.eof:
            raise DeflateError("the deflated dataset ends early (truncated deflate stream)")
        # Bounded again: the same stream gives the same output, but never trust a count.
        inflated = zlib.decompressobj(-zlib.MAX_WBITS).decompress(deflated, limit + 1)
    except zlib.error:
        raise DeflateError(f"the deflated dataset is corrupt (after {total} inflated bytes)"
                           ) from None
    if len(inflated) > limit:  # pragma: no cover - the count above already refused it
        raise DicomLimitError(f"the deflated dataset inflates to more than {size_text(limit)}")
    return inflated


def read_part10(data: bytes | Path, *, limits: DicomLimits | None = None,
                stop_before_pixels: bool = False, force: bool = False) -> FileDataset:
    """``pydicom.dcmread`` with the dataset cap, and bounded inflation for Deflated data.

    Parameters
    ----------
    data : bytes or Path
        A Part-10 instance, or its file (read by path, so ``ds.filename`` is set).
    limits : DicomLimits, optional
        The caps; default :data:`DEFAULT_LIMITS`.
    stop_before_pixels, force
        As for :func:`pydicom.dcmread`.

    Raises
    ------
    DicomLimitError
        The instance, or its inflated dataset, is larger than ``limits.max_dataset_bytes``.
    DeflateError
        A corrupt or truncated deflate stream. Everything else :func:`pydicom.dcmread`
        raises for unreadable input passes through unchanged.
    """
    limits = limits or DEFAULT_LIMITS
    size = data.stat().st_size if isinstance(data, Path) else len(data)
    if size > limits.max_dataset_bytes:
        raise DicomLimitError(f"the instance is {size_text(size)}, more than the "
                              f"{size_text(limits.max_dataset_bytes)} dataset cap")
    if _is_deflated(data):
        raw = data.read_bytes() if isinstance(data, Path) else data
        ds = _read_deflated(raw, limits, stop_before_pixels)
        if isinstance(data, Path):
            ds.filename = str(data)
        return ds
    source = str(data) if isinstance(data, Path) else io.BytesIO(data)
    return pydicom.dcmread(source, stop_before_pixels=stop_before_pixels, force=force)


def _is_deflated(data: bytes | Path) -> bool:
    """Whether the File Meta names the Deflated syntax; False for anything unreadable
    (pydicom then reports why, or reads a raw dataset with ``force``)."""
    try:
        if isinstance(data, Path):
            with data.open("rb") as fp:
                return _meta_says_deflated(fp)
        return _meta_says_deflated(io.BytesIO(data))
    except Exception:  # pydicom raises many types on a corrupt header
        return False


def _meta_says_deflated(fp: io.BufferedIOBase | io.BytesIO) -> bool:
    from pydicom.filereader import _read_file_meta_info

    read_preamble(fp, False)  # type: ignore[arg-type]
    meta = _read_file_meta_info(fp)  # type: ignore[arg-type]
    return bool(meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian)


def _read_deflated(data: bytes, limits: DicomLimits, stop_before_pixels: bool
                   ) -> FileDataset:
    """What ``pydicom.filereader.read_partial`` does for the Deflated syntax, with the
    one unbounded ``zlib.decompress`` replaced by :func:`inflate_bounded`."""
    # pydicom has no public reader of the File Meta from a buffer; this private one is
    # what dcmread itself uses (pydicom is pinned in the lock).
    from pydicom.filereader import _read_file_meta_info

    fp = io.BytesIO(data)
    preamble = read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    deflated = memoryview(data)[fp.tell():]
    limit, cap = limits.inflation_limit(len(deflated))
    inflated = io.BytesIO(inflate_bounded(deflated, limit, cap=cap))
    dataset = read_dataset(inflated, False, True,
                           stop_when=_at_pixel_data if stop_before_pixels else None)
    ds = FileDataset(inflated, dataset, preamble, meta, False, True)
    ds.set_original_encoding(False, True, dataset._character_set)
    return ds


def _at_pixel_data(tag: int, vr: str | None, length: int) -> bool:
    return tag in {0x7FE00010, 0x7FE00009, 0x7FE00008}


# -- the pixel budget -------------------------------------------------------------------------


def check_pixel_budget(ds: Dataset, limits: DicomLimits | None = None) -> None:
    """Refuse pixel data whose decoding would take more than ``limits.max_pixel_bytes``.

    Looks at the header (Rows x Columns x NumberOfFrames x SamplesPerPixel x bytes per
    sample) and, for encapsulated data, at the dimensions each JPEG/JPEG-LS/JPEG 2000
    codestream declares for itself: a codestream larger than Rows x Columns makes the
    decoder allocate for the codestream's size, whatever the header says. Values it
    cannot parse are left for the decoder to refuse.

    Raises
    ------
    DicomLimitError
        Either is over the cap, or a codestream is larger than Rows x Columns.
    """
    limits = limits or DEFAULT_LIMITS
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 8) or 8)
    except (AttributeError, TypeError, ValueError):
        return
    need = rows * cols * max(frames, 1) * max(samples, 1) * max((bits + 7) // 8, 1)
    if need > limits.max_pixel_bytes:
        raise DicomLimitError(
            f"the decoded pixel data would take {size_text(need)} (Rows {rows} x Columns "
            f"{cols} x {frames} frame(s) x {samples} sample(s) x {bits} bits), more than "
            f"the {size_text(limits.max_pixel_bytes)} cap; refused before decoding")
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    try:
        encapsulated = syntax is not None and syntax.is_encapsulated
    except (AttributeError, ValueError):
        return  # not a transfer syntax UID: left for the store's checks and the decoder
    if not encapsulated or "PixelData" not in ds:
        return
    _check_codestreams(ds.PixelData, rows, cols)


def _check_codestreams(pixel_data: bytes, rows: int, cols: int) -> None:
    from pydicom.encaps import generate_fragments

    try:
        # The first item is the Basic Offset Table; it never starts with a marker.
        fragments = generate_fragments(pixel_data)
        for number, fragment in enumerate(fragments):
            size = _codestream_size(fragment)
            if size is None:
                continue
            width, height = size
            if width > cols or height > rows:
                kind = "JPEG 2000" if fragment.startswith(_J2K_SOC_SIZ) else "JPEG"
                raise DicomLimitError(
                    f"the {kind} codestream in fragment {number} declares {width} x {height} "
                    f"pixels, more than the header's Columns x Rows {cols} x {rows}; refused "
                    "before decoding")
    except DicomLimitError:
        raise
    except Exception:
        return  # malformed encapsulation: the store's own checks and the decoder refuse it


def _codestream_size(fragment: bytes) -> tuple[int, int] | None:
    """(width, height) a fragment's codestream declares, or None if it starts none."""
    if fragment.startswith(_J2K_SOC_SIZ) and len(fragment) >= 24:
        # SIZ: Lsiz(2) Rsiz(2) Xsiz(4) Ysiz(4) XOsiz(4) YOsiz(4); the image area is
        # (Xsiz - XOsiz) x (Ysiz - YOsiz), but the decoder's canvas is Xsiz x Ysiz.
        xsiz, ysiz = struct.unpack_from(">II", fragment, 8)
        return xsiz, ysiz
    if fragment.startswith(_JPEG_SOI):
        return _jpeg_sof_size(fragment)
    return None


def _jpeg_sof_size(stream: bytes) -> tuple[int, int] | None:
    """(width, height) from the first start-of-frame segment of a JPEG/JPEG-LS stream."""
    position = 2
    while position + 4 <= len(stream):
        if stream[position] != 0xFF:
            return None
        marker = stream[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _STANDALONE:
            position += 2
            continue
        if marker == 0xDA:  # start of scan: no frame header before it
            return None
        (length,) = struct.unpack_from(">H", stream, position + 2)
        if marker in _JPEG_SOF and position + 9 <= len(stream):
            height, width = struct.unpack_from(">HH", stream, position + 5)
            return width, height
        position += 2 + length
    return None
