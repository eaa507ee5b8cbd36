"""Content-addressed DICOM instance storage with a database index.

Bytes go to ``root/ab/cd/<sha256>`` through a temporary file, fsync and an
atomic rename; only then is the instance indexed, in a transaction. A crash
mid-write leaves at most an unindexed temporary file, never a half-written
file in the index. The same SOPInstanceUID is kept once; if it arrives again
with different bytes, the first is kept and the caller is warned.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from pipelines.imaging.dicom_limits import (
    DeflateError,
    DicomLimitError,
    DicomLimits,
    check_pixel_budget,
    read_part10,
)
from services.jobs import enqueue_series_stored
from services.tables import DicomInstanceRow

log = logging.getLogger(__name__)

#: Attributes kept in the index for QIDO-RS answers (study, series and instance level).
QIDO_KEYWORDS = (
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
    "StudyDescription", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate",
    "PatientSex", "ReferringPhysicianName", "SeriesInstanceUID", "Modality", "SeriesNumber",
    "SeriesDescription", "BodyPartExamined", "SOPClassUID", "SOPInstanceUID", "InstanceNumber",
    "Rows", "Columns", "NumberOfFrames",
)
REQUIRED_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


class StoreStatus(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # same UID, same bytes: kept once
    CONFLICT = "conflict"  # same UID, other bytes: first kept, warning
    FAILED = "failed"


#: PS3.4 / PS3.18 status codes for failures and warnings.
FAILURE_CANNOT_UNDERSTAND = 0xC000
FAILURE_DATASET_MISMATCH = 0xA900
FAILURE_OUT_OF_RESOURCES = 0xA700
WARNING_COERCION = 0xB000


@dataclass(frozen=True)
class StoreResult:
    status: StoreStatus
    SOPInstanceUID: str | None = None
    SOPClassUID: str | None = None
    StudyInstanceUID: str | None = None
    SeriesInstanceUID: str | None = None
    reason: str | None = None
    #: DICOM status: failure reason or warning reason; None when stored cleanly.
    code: int | None = None

    @property
    def ok(self) -> bool:
        return self.status is not StoreStatus.FAILED


class InstanceError(ValueError):
    """Bytes that aren't a storable DICOM instance."""

    def __init__(self, reason: str, code: int = FAILURE_CANNOT_UNDERSTAND,
                 dataset: Dataset | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.dataset = dataset


def parse_instance(data: bytes, limits: DicomLimits | None = None) -> Dataset:
    """Parse and check a Part-10 instance: required UIDs and complete pixel data.

    A deflated dataset is inflated only up to ``limits.max_dataset_bytes``, and pixel
    data whose decoding would pass ``limits.max_pixel_bytes`` is refused
    (:mod:`pipelines.imaging.dicom_limits`), both with FAILURE_OUT_OF_RESOURCES.
    """
    if not data:
        raise InstanceError("empty part: no DICOM bytes")
    try:
        # dcmread without defer_size reads every element now, so corrupt data fails here;
        # pydicom only warns when a file ends inside a sequence or encapsulated data.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = read_part10(data, limits=limits)
    except DicomLimitError as exc:
        raise InstanceError(exc.reason, FAILURE_OUT_OF_RESOURCES) from None
    except DeflateError as exc:
        raise InstanceError(str(exc)) from None
    except InvalidDicomError:
        raise InstanceError("not a DICOM Part-10 file (no 'DICM' prefix after the preamble)"
                            ) from None
    except Exception as exc:  # pydicom raises many types on corrupt input
        raise InstanceError(f"unreadable DICOM ({type(exc).__name__})") from None
    if any("End of file" in str(w.message) for w in caught):
        raise InstanceError("the file ends inside a sequence or the encapsulated PixelData "
                            "(truncated)", FAILURE_CANNOT_UNDERSTAND, ds)
    missing = [k for k in REQUIRED_KEYWORDS if not str(ds.get(k, "") or "").strip()]
    if missing:
        raise InstanceError(f"missing required attribute(s) {missing}", FAILURE_DATASET_MISMATCH,
                            ds)
    _check_pixel_data(ds)
    try:
        check_pixel_budget(ds, limits)
    except DicomLimitError as exc:
        raise InstanceError(exc.reason, FAILURE_OUT_OF_RESOURCES, ds) from None
    return ds


def _check_pixel_data(ds: Dataset) -> None:
    if "PixelData" not in ds:
        if "Rows" in ds and not {"FloatPixelData", "DoubleFloatPixelData"} & set(ds.dir()):
            raise InstanceError("an image (Rows present) without PixelData: truncated?",
                                FAILURE_DATASET_MISMATCH, ds)
        return
    try:
        pixel_bytes = ds.PixelData
    except Exception as exc:
        raise InstanceError(f"unreadable PixelData ({type(exc).__name__})",
                            FAILURE_CANNOT_UNDERSTAND, ds) from None
    meta = getattr(ds, "file_meta", None)
    tsyntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if tsyntax is not None and tsyntax.is_encapsulated:
        try:
            from pydicom.encaps import generate_fragments

            fragments = list(generate_fragments(pixel_bytes))
        except Exception:
            raise InstanceError("encapsulated PixelData is truncated or malformed",
                                FAILURE_CANNOT_UNDERSTAND, ds) from None
        if not fragments:
            raise InstanceError("encapsulated PixelData holds no fragments",
                                FAILURE_CANNOT_UNDERSTAND, ds)
        # JPEG, JPEG-LS and JPEG 2000 codestreams all end with the FFD9 marker (EOI/EOC);
        # a frame cut short by a dropped transfer lacks it.
        # Some writers pad the odd byte with 0xFF instead of 0x00, hence the tail search.
        if tsyntax.name.startswith(("JPEG", "High-Throughput JPEG")) and (
                b"\xff\xd9" not in fragments[-1][-4:]):
            raise InstanceError("encapsulated PixelData is truncated (the last codestream "
                                "lacks its end marker)", FAILURE_CANNOT_UNDERSTAND, ds)
        return
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise InstanceError("PixelData without valid Rows, Columns or BitsAllocated",
                            FAILURE_DATASET_MISMATCH, ds) from None
    expected = (rows * cols * samples * frames * bits + 7) // 8
    if len(pixel_bytes) < expected:
        raise InstanceError(
            f"truncated PixelData: {len(pixel_bytes)} of {expected} bytes expected from "
            f"Rows, Columns, BitsAllocated, SamplesPerPixel and NumberOfFrames",
            FAILURE_CANNOT_UNDERSTAND, ds)


def qido_attributes(ds: Dataset) -> dict[str, Any]:
    """The indexed attributes, as DICOM JSON."""
    out: dict[str, Any] = {}
    for keyword in QIDO_KEYWORDS:
        if keyword in ds:
            element = ds[keyword]
            out[f"{element.tag:08X}"] = element.to_json_dict(None, 0)
    return out


class DicomStore:
    """Stores instances on disk and indexes them in the database.

    ``limits`` caps what one instance may cost to inflate and decode; ingest refuses an
    instance over them, and :meth:`read_dataset` reads under them.
    """

    def __init__(self, root: Path, sessions: sessionmaker[Session], *,
                 limits: DicomLimits | None = None) -> None:
        self.root = Path(root)
        self.sessions = sessions
        self.limits = limits or DicomLimits()
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def store(self, data: bytes) -> StoreResult:
        """Store one Part-10 instance. Never raises for bad input: it returns FAILED."""
        return self.store_many([data])[0]

    def store_many(self, payloads: Sequence[bytes]) -> list[StoreResult]:
        """Store Part-10 instances, one result each, in input order.

        Files are written first and made durable with one filesystem sync; the
        index rows of the good instances are then committed in one transaction.
        """
        results: list[StoreResult | None] = [None] * len(payloads)
        pending: dict[str, tuple[int, str, bytes, Dataset]] = {}
        for i, data in enumerate(payloads):
            try:
                ds = parse_instance(data, self.limits)
            except InstanceError as exc:
                results[i] = StoreResult(StoreStatus.FAILED, _uid(exc.dataset, "SOPInstanceUID"),
                                         _uid(exc.dataset, "SOPClassUID"), reason=exc.reason,
                                         code=exc.code)
                continue
            uid = str(ds.SOPInstanceUID)
            sha = hashlib.sha256(data).hexdigest()
            if uid in pending:  # the same UID twice in one batch: the first one wins
                results[i] = self._repeat(pending[uid][1], sha, _identity(ds))
                continue
            pending[uid] = (i, sha, data, ds)
        if pending:
            with self.sessions() as session:
                query = select(DicomInstanceRow.SOPInstanceUID, DicomInstanceRow.sha256).where(
                    DicomInstanceRow.SOPInstanceUID.in_(list(pending)))
                known = {uid: sha for uid, sha in session.execute(query).all()}
            for uid, first_sha in known.items():
                i, sha, _, ds = pending.pop(uid)
                results[i] = self._repeat(first_sha, sha, _identity(ds))
        self._commit_new(pending, results)
        return [r for r in results if r is not None]

    def _commit_new(self, pending: dict[str, tuple[int, str, bytes, Dataset]],
                    results: list[StoreResult | None]) -> None:
        if not pending:
            return
        try:
            written = [self._write_file(sha, data) for _, sha, data, _ in pending.values()]
            _sync_files([p for p in written if p is not None], self.root)
        except OSError as exc:
            log.error("DICOM store write failed: %s", type(exc).__name__)
            for i, _, _, ds in pending.values():
                results[i] = StoreResult(StoreStatus.FAILED, **_identity(ds),
                                         reason="storage write failed",
                                         code=FAILURE_OUT_OF_RESOURCES)
            return
        rows = [self._row(ds, sha, len(data)) for _, sha, data, ds in pending.values()]
        try:
            with self.sessions.begin() as session:
                session.add_all(rows)
                # In the same transaction: a committed series always has its job.
                enqueue_series_stored(session, {r.SeriesInstanceUID for r in rows})
        except IntegrityError:
            # Another writer indexed some of these UIDs meanwhile: settle them one by one.
            for i, _, data, _ in pending.values():
                results[i] = self.store(data)
            return
        for i, _, _, ds in pending.values():
            results[i] = StoreResult(StoreStatus.STORED, **_identity(ds))

    @staticmethod
    def _row(ds: Dataset, sha: str, size: int) -> DicomInstanceRow:
        return DicomInstanceRow(
            **_identity(ds),
            PatientID=_str_or_none(ds.get("PatientID")),
            IssuerOfPatientID=_str_or_none(ds.get("IssuerOfPatientID")),
            Modality=_str_or_none(ds.get("Modality")),
            StudyDate=_str_or_none(ds.get("StudyDate")),
            InstanceNumber=_int_or_none(ds.get("InstanceNumber")),
            TransferSyntaxUID=_str_or_none(ds.file_meta.get("TransferSyntaxUID")),
            sha256=sha, size=size, attributes=qido_attributes(ds),
        )

    @staticmethod
    def _repeat(first_sha: str, sha: str, identity: dict[str, Any]) -> StoreResult:
        if first_sha == sha:
            return StoreResult(StoreStatus.DUPLICATE, **identity)
        return StoreResult(StoreStatus.CONFLICT, **identity, code=WARNING_COERCION,
                           reason="SOPInstanceUID already stored with different content; "
                                  "the first instance was kept")

    def _write_file(self, sha: str, data: bytes) -> Path | None:
        """Write through a temporary name; the rename is atomic. None if already there."""
        target = self.path_for(sha)
        if target.exists() and target.stat().st_size == len(data):
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    # -- reading -----------------------------------------------------------------------

    def find(self, **filters: str | None) -> list[DicomInstanceRow]:
        """Indexed instances matching exact keyword filters (None values are ignored)."""
        query = select(DicomInstanceRow)
        for keyword, value in filters.items():
            if value is not None:
                query = query.where(getattr(DicomInstanceRow, keyword) == value)
        query = query.order_by(DicomInstanceRow.StudyInstanceUID,
                               DicomInstanceRow.SeriesInstanceUID,
                               DicomInstanceRow.InstanceNumber,
                               DicomInstanceRow.SOPInstanceUID)
        with self.sessions() as session:
            return list(session.scalars(query))

    def read_bytes(self, row: DicomInstanceRow) -> bytes:
        return self.path_for(row.sha256).read_bytes()

    def read_dataset(self, row: DicomInstanceRow, *, stop_before_pixels: bool = False
                     ) -> Dataset:
        """A stored instance parsed under the store's caps (bounded inflation).

        Raises
        ------
        DicomLimitError
            The instance, or its inflated dataset, is over ``limits.max_dataset_bytes``
            (stored before the caps existed, or under larger ones).
        """
        return read_part10(self.read_bytes(row), limits=self.limits,
                           stop_before_pixels=stop_before_pixels)

    def iter_bytes(self, rows: Iterable[DicomInstanceRow]) -> Iterator[bytes]:
        for row in rows:
            yield self.read_bytes(row)


def _identity(ds: Dataset) -> dict[str, Any]:
    return {k: str(ds[k].value) for k in REQUIRED_KEYWORDS}


def _sync_files(paths: list[Path], root: Path) -> None:
    """Make new files durable before they are indexed.

    On Linux one syncfs(2) of the store's filesystem replaces an fsync per file,
    which dominated ingest time; elsewhere each file is fsynced.
    """
    if not paths:
        return
    if _syncfs is not None:
        fd = os.open(root, os.O_RDONLY)
        try:
            if _syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _load_syncfs() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.syncfs
    except (OSError, AttributeError):
        return None


_syncfs = _load_syncfs()


def _uid(ds: Dataset | None, keyword: str) -> str | None:
    if ds is None:
        return None
    value = ds.get(keyword)
    return str(value) if value else None


def _str_or_none(value: object) -> str | None:
    return None if value in (None, "") else str(value)


def _int_or_none(value: object) -> int | None:
    try:
        return None if value in (None, "") else int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
