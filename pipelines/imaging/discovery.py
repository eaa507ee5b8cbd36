"""Find DICOM series in a folder, a DICOMDIR or a zip archive, grouped by SeriesInstanceUID.

Files are read as Part-10 first. A file without the 128-byte preamble and File Meta is
read again with ``force=True`` and kept only if what comes out looks like a DICOM
dataset; anything else (PNG, text, truncated headers) is reported, never raised.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence
from pydicom.valuerep import VR as VR_

from pipelines.imaging.decode import shown_code, transfer_syntax
from pipelines.imaging.dicom_limits import DeflateError, DicomLimitError, DicomLimits, read_part10
from pipelines.imaging.header import header_value
from pipelines.imaging.volume import ImageError

__all__ = ["DicomInstance", "Discovery", "Rejected", "discover", "read_dicom"]

_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
_KNOWN_VRS = frozenset(VR_.__members__.values())
# Attributes that a real dataset without File Meta still carries at least one of; garbage
# bytes forced through the parser essentially never produce these tags.
_IDENTIFYING = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                "Modality", "PixelData")


@dataclass
class DicomInstance:
    """One DICOM file: where it came from (path, or ``archive.zip!member``) and its dataset."""

    source: str
    dataset: Dataset


@dataclass
class Rejected:
    """A file that is not a usable DICOM image, with the reason."""

    source: str
    reason: str


@dataclass
class Discovery:
    """Series found under a source, keyed by SeriesInstanceUID, plus what was rejected."""

    series: dict[str, list[DicomInstance]] = field(default_factory=dict)
    rejected: list[Rejected] = field(default_factory=list)

    def describe(self) -> str:
        """One line per series: UID, file count and the first file."""
        return "; ".join(f"{uid} ({len(items)} files, e.g. {items[0].source})"
                         for uid, items in self.series.items())


def read_dicom(data: Path | bytes, source: str | None = None, *,
               limits: DicomLimits | None = None) -> Dataset:
    """Read one DICOM file, allowing files without File Meta only if they parse as DICOM.

    Parameters
    ----------
    data : Path or bytes
        The file, or its bytes (a zip member).
    source : str, optional
        Name used in errors; defaults to the path.
    limits : DicomLimits, optional
        The dataset cap, also on what a Deflated dataset inflates to; default
        :data:`pipelines.imaging.dicom_limits.DEFAULT_LIMITS`.

    Raises
    ------
    ImageError
        The bytes are not DICOM, the header cannot be parsed, or the dataset is over
        the cap (a possible decompression bomb).
    """
    name = source if source is not None else str(data)

    def _open() -> io.BytesIO | str:
        return io.BytesIO(data) if isinstance(data, bytes) else str(data)

    try:
        ds = read_part10(data, limits=limits)
    except (DicomLimitError, DeflateError) as exc:
        raise ImageError(str(exc), source=name) from None
    except InvalidDicomError:
        pass  # no preamble/'DICM': maybe a raw dataset, tried below with force=True
    except FileNotFoundError as exc:
        raise ImageError("file not found", source=name) from exc
    except Exception as exc:  # pydicom raises many types on corrupt headers
        raise ImageError(f"unreadable DICOM header: {_first_line(exc)}", source=name) from exc
    else:
        _check_vrs(ds, name)
        return ds
    try:
        ds = pydicom.dcmread(_open(), force=True)
        # Touch every element: garbage bytes often fail only when values are converted.
        for elem in ds:
            _ = elem.value
    except Exception as exc:
        raise ImageError(f"not DICOM (no Part-10 header and it does not parse as a "
                         f"dataset: {_first_line(exc)})", source=name) from exc
    if len(ds) == 0 or not any(k in ds for k in _IDENTIFYING) or not _plausible_tags(ds):
        raise ImageError("not DICOM (no Part-10 header, and forcing it yields no "
                         "identifying DICOM attributes)", source=name)
    return ds


def _check_vrs(ds: Dataset, source: str) -> None:
    """Refuse an element whose explicit VR pydicom cannot convert (a corrupt header byte).

    Values are converted lazily, so without this the file reads and then fails with
    pydicom's NotImplementedError wherever the element is first used. Only the raw
    elements' VR codes are looked at; no value is converted here.
    """
    # The raw stores themselves: Dataset.elements() converts private elements as it goes.
    meta = getattr(ds, "file_meta", None)
    raw = [*ds._dict.values(), *(meta._dict.values() if meta is not None else ())]
    for elem in raw:
        vr = elem.VR
        if vr is not None and vr not in _KNOWN_VRS:
            raise ImageError(f"unreadable DICOM header: element {elem.tag} has an unknown "
                             "value representation", source=source)


def _plausible_tags(ds: Dataset) -> bool:
    # A raw dataset starts at group 0x0008 (or the 0x0000 command group); forced garbage
    # usually yields huge odd groups first.
    first = next(iter(ds.keys()))
    return first.group in (0x0000, 0x0002, 0x0008)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def discover(src: Path) -> Discovery:
    """Find image series in a folder (recursive), a DICOMDIR, a zip archive or one file.

    Non-image DICOM objects (SR, RT plans), non-DICOM files and unreadable files are listed
    in ``rejected`` with a reason. Instances keep their order of discovery; ordering in
    space is the assembler's job.

    Raises
    ------
    ImageError
        ``src`` does not exist, or is a corrupt zip or DICOMDIR.
    """
    src = Path(src)
    if not src.exists():
        raise ImageError("no such file or folder", source=str(src))
    found = Discovery()
    for source, data in _candidates(src):
        try:
            ds = read_dicom(data, source)
        except ImageError as exc:
            found.rejected.append(Rejected(source, exc.reason))
            continue
        if ds.file_meta.get("MediaStorageSOPClassUID") == _MEDIA_STORAGE_DIRECTORY or \
                "DirectoryRecordSequence" in ds:
            continue  # a DICOMDIR inside a folder: its files are walked anyway
        if "PixelData" not in ds and "FloatPixelData" not in ds and \
                "DoubleFloatPixelData" not in ds:
            found.rejected.append(Rejected(
                source, f"no pixel data (Modality {shown_code(ds.get('Modality'))})"))
            continue
        try:
            transfer_syntax(ds, source)
        except ImageError as exc:
            found.rejected.append(Rejected(source, exc.reason))
            continue
        uid = str(header_value(ds, "SeriesInstanceUID", "") or "")
        if not uid:
            found.rejected.append(Rejected(source, "no SeriesInstanceUID"))
            continue
        found.series.setdefault(uid, []).append(DicomInstance(source, ds))
    return found


def _candidates(src: Path) -> Iterator[tuple[str, Path | bytes]]:
    if src.is_dir():
        for path in sorted(p for p in src.rglob("*") if p.is_file()):
            if path.name.startswith("."):
                continue  # editor and OS droppings, never DICOM
            if not _has_dicm_prefix(path) and zipfile.is_zipfile(path):
                yield from _zip_members(path)
            else:
                yield str(path), path
    elif zipfile.is_zipfile(src):
        yield from _zip_members(src)
    elif src.name.upper().startswith("DICOMDIR"):
        yield from _dicomdir_files(src)
    else:
        yield str(src), src


def _has_dicm_prefix(path: Path) -> bool:
    """A Part-10 file: 'DICM' after the 128-byte preamble.

    Checked before ``zipfile.is_zipfile``, which on a file that is no zip scans up to
    64 KiB from its end for a directory record: a whole uncompressed slice's worth.
    """
    try:
        with path.open("rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False  # reported when the file is read


def _zip_members(path: Path) -> Iterator[tuple[str, bytes]]:
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.is_dir() or Path(info.filename).name.startswith("."):
                    continue
                yield f"{path}!{info.filename}", archive.read(info)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ImageError(f"corrupt zip archive: {exc}", source=str(path)) from exc


def _dicomdir_files(path: Path) -> Iterator[tuple[str, Path]]:
    ds = read_dicom(path)
    try:
        records = ds.get("DirectoryRecordSequence")
    except (TypeError, ValueError, NotImplementedError) as exc:
        # A corrupted VR: pydicom cannot build the items, or knows no such VR.
        raise ImageError("not a DICOMDIR: its DirectoryRecordSequence is unreadable",
                         source=str(path)) from exc
    if records is None:
        raise ImageError("not a DICOMDIR: no DirectoryRecordSequence", source=str(path))
    if not isinstance(records, Sequence):
        raise ImageError("not a DICOMDIR: DirectoryRecordSequence is not a sequence",
                         source=str(path))
    root = path.parent
    for number, record in enumerate(records, start=1):
        try:
            file_id = record.get("ReferencedFileID")
        except (TypeError, ValueError, NotImplementedError) as exc:  # NotImplementedError:
            # pydicom's "Unknown Value Representation" inside the record
            raise ImageError(f"DICOMDIR record {number} is unreadable", source=str(path)
                             ) from exc
        if not file_id:
            continue  # PATIENT/STUDY/SERIES records carry no file
        parts = [str(p) for p in ([file_id] if isinstance(file_id, str | bytes | int | float)
                                  else file_id)]
        target = root.joinpath(*parts)
        if not target.exists():
            # Media file IDs are upper-case by rule; real trees are not always.
            matches = [p for p in root.rglob("*")
                       if p.relative_to(root).as_posix().upper() == "/".join(parts).upper()]
            target = matches[0] if matches else target
        yield str(target), target
