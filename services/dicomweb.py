"""DICOMweb (PS3.18) logic: STOW-RS ingest, QIDO-RS search, WADO-RS retrieval.

The HTTP routes in ``services.api.routes.dicomweb`` stay thin and call these.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import pydicom
from pydicom.dataset import Dataset

from pipelines.imaging.dicom_limits import read_part10
from services.dicom_store import (
    FAILURE_DATASET_MISMATCH,
    DicomStore,
    StoreResult,
    StoreStatus,
)
from services.tables import DicomInstanceRow

DICOM_TYPE = "application/dicom"
DICOM_JSON = "application/dicom+json"


class MultipartError(ValueError):
    """A request body that is not a well-formed multipart/related message."""


class UnsupportedMediaType(ValueError):
    pass


# -- multipart/related ----------------------------------------------------------------------

_PARAM = re.compile(r';\s*([A-Za-z0-9_-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """Media type and parameters of a Content-Type header."""
    media, _, rest = value.partition(";")
    params = {k.lower(): v.strip().strip('"') for k, v in _PARAM.findall(";" + rest)}
    return media.strip().lower(), params


@dataclass(frozen=True)
class Part:
    headers: dict[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        return parse_content_type(self.headers.get("content-type", ""))[0]


def split_multipart(body: bytes, boundary: str) -> list[Part]:
    """Split a multipart body (RFC 2046) into parts.

    Raises
    ------
    MultipartError
        No opening delimiter, no closing delimiter, or a part without a blank
        line between its headers and body.
    """
    delimiter = b"--" + boundary.encode("latin-1")
    if body.startswith(delimiter):
        position = 0
    else:
        position = body.find(b"\r\n" + delimiter)
        if position < 0:
            raise MultipartError("the body has no part delimited by the declared boundary")
        position += 2
    parts: list[Part] = []
    while True:
        after = position + len(delimiter)
        if body[after:after + 2] == b"--":
            return parts
        line_end = body.find(b"\r\n", after)
        if line_end < 0:
            raise MultipartError(f"part {len(parts) + 1}: the delimiter line is not terminated")
        next_delim = body.find(b"\r\n" + delimiter, line_end)
        if next_delim < 0:
            raise MultipartError("the body ends without the closing delimiter "
                                 f"(--{boundary}--) after part {len(parts) + 1}")
        raw = body[line_end + 2:next_delim]
        head, sep, content = raw.partition(b"\r\n\r\n")
        if not sep:
            if raw.startswith(b"\r\n"):
                head, content = b"", raw[2:]
            else:
                raise MultipartError(f"part {len(parts) + 1}: no blank line after its headers")
        headers: dict[str, str] = {}
        for line in head.decode("latin-1").split("\r\n"):
            if not line.strip():
                continue
            name, colon, value = line.partition(":")
            if not colon:
                raise MultipartError(f"part {len(parts) + 1}: malformed header line")
            headers[name.strip().lower()] = value.strip()
        parts.append(Part(headers, content))
        position = next_delim + 2


def build_multipart(payloads: Iterable[bytes], content_type: str = DICOM_TYPE
                    ) -> tuple[str, Iterator[bytes]]:
    """A multipart/related body; returns (Content-Type header, body chunks)."""
    boundary = uuid.uuid4().hex
    header = f'multipart/related; type="{content_type}"; boundary={boundary}'

    def chunks() -> Iterator[bytes]:
        for payload in payloads:
            yield (f"--{boundary}\r\nContent-Type: {content_type}\r\n"
                   f"Content-Length: {len(payload)}\r\n\r\n").encode()
            yield payload
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    return header, chunks()


# -- STOW-RS ----------------------------------------------------------------------------------


def _element(vr: str, *values: Any) -> dict[str, Any]:
    return {"vr": vr, "Value": list(values)}


def stow(store: DicomStore, content_type: str, body: bytes, *, base_url: str,
         study_uid: str | None = None) -> tuple[int, dict[str, Any]]:
    """Store every part of a STOW-RS request; returns (HTTP status, PS3.18 response).

    200 when every instance was stored, 202 when some failed or carry warnings,
    409 when none was stored.
    """
    media, params = parse_content_type(content_type)
    if media != "multipart/related":
        raise UnsupportedMediaType(f"expected multipart/related, got {media or 'none'}")
    declared = params.get("type", DICOM_TYPE).lower()
    if declared != DICOM_TYPE:
        raise UnsupportedMediaType(f"only type={DICOM_TYPE} parts are accepted, got {declared}")
    boundary = params.get("boundary")
    if not boundary:
        raise MultipartError("the Content-Type has no boundary parameter")
    parts = split_multipart(body, boundary)
    if not parts:
        raise MultipartError("the multipart body holds no parts")
    results: list[StoreResult | None] = [None] * len(parts)
    accepted: list[int] = []
    for index, part in enumerate(parts):
        if part.content_type not in ("", DICOM_TYPE):
            results[index] = StoreResult(StoreStatus.FAILED, reason=f"{part.content_type} is "
                                         f"not {DICOM_TYPE}", code=0xC000)
        elif study_uid is not None and (refusal := _other_study(store, part.body, study_uid)):
            results[index] = refusal
        else:
            accepted.append(index)
    for index, result in zip(accepted, store.store_many([parts[i].body for i in accepted]),
                             strict=True):
        results[index] = result
    final = [r for r in results if r is not None]
    final = [StoreResult(**{**r.__dict__, "reason": f"part {i}: {r.reason}"})
             if r.status is StoreStatus.FAILED and r.reason else r
             for i, r in enumerate(final, start=1)]
    return _stow_response(final, base_url)


def _other_study(store: DicomStore, data: bytes, study_uid: str) -> StoreResult | None:
    """A failure when the instance belongs to another study than the URL names."""
    try:
        # Under the store's caps: pydicom alone inflates a deflated dataset whole, even
        # when it stops before the pixels.
        ds = read_part10(data, limits=store.limits, stop_before_pixels=True)
    except Exception:
        return None  # the store reports why it can't be read
    actual = str(ds.get("StudyInstanceUID", ""))
    if not actual or actual == study_uid:
        return None
    return StoreResult(StoreStatus.FAILED, str(ds.get("SOPInstanceUID", "")) or None,
                       str(ds.get("SOPClassUID", "")) or None,
                       reason="StudyInstanceUID differs from the study in the URL",
                       code=FAILURE_DATASET_MISMATCH)


def _stow_response(results: list[StoreResult], base_url: str) -> tuple[int, dict[str, Any]]:
    referenced, failed = [], []
    studies = {r.StudyInstanceUID for r in results if r.ok and r.StudyInstanceUID}
    for r in results:
        item: dict[str, Any] = {}
        if r.SOPClassUID:
            item["00081150"] = _element("UI", r.SOPClassUID)
        if r.SOPInstanceUID:
            item["00081155"] = _element("UI", r.SOPInstanceUID)
        if r.ok:
            item["00081190"] = _element("UR", instance_url(base_url, r))
            if r.status is StoreStatus.CONFLICT and r.code is not None:
                item["00081196"] = _element("US", r.code)  # WarningReason
                item["00000902"] = _element("LO", r.reason)
            referenced.append(item)
        else:
            item["00081197"] = _element("US", r.code or 0xC000)  # FailureReason
            if r.reason:
                item["00000902"] = _element("LO", r.reason)  # ErrorComment
            failed.append(item)
    response: dict[str, Any] = {}
    if len(studies) == 1:
        response["00081190"] = _element("UR", f"{base_url}/studies/{next(iter(studies))}")
    if failed:
        response["00081198"] = {"vr": "SQ", "Value": failed}
    if referenced:
        response["00081199"] = {"vr": "SQ", "Value": referenced}
    warned = any(r.status is StoreStatus.CONFLICT for r in results)
    if not referenced:
        return 409, response
    return (202 if failed or warned else 200), response


def instance_url(base_url: str, r: StoreResult | DicomInstanceRow) -> str:
    return (f"{base_url}/studies/{r.StudyInstanceUID}/series/{r.SeriesInstanceUID}"
            f"/instances/{r.SOPInstanceUID}")


# -- QIDO-RS ----------------------------------------------------------------------------------

Level = Literal["study", "series", "instance"]
_LEVEL_KEY = {"study": "StudyInstanceUID", "series": "SeriesInstanceUID",
              "instance": "SOPInstanceUID"}
_EXACT = ("PatientID", "IssuerOfPatientID", "Modality", "StudyInstanceUID", "SeriesInstanceUID",
          "SOPInstanceUID", "SOPClassUID")
_TAG_TO_KEYWORD = {f"{pydicom.datadict.tag_for_keyword(k):08X}": k
                   for k in (*_EXACT, "StudyDate")}
_STUDY_KEYS = ("00080020", "00080030", "00080050", "00200010", "00081030", "00100010",
               "00100020", "00100021", "00100030", "00100040", "00080090", "0020000D")
_SERIES_KEYS = ("0020000E", "00080060", "00200011", "0008103E", "00180015")
_INSTANCE_KEYS = ("00080016", "00080018", "00200013", "00280010", "00280011", "00280008")


class QueryError(ValueError):
    pass


def qido(store: DicomStore, level: Level, params: dict[str, str], *,
         scope: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Search the index at study, series or instance level (PS3.18 10.6)."""
    return qido_page(store, level, params, scope=scope)[0]


def qido_page(store: DicomStore, level: Level, params: dict[str, str], *,
              scope: dict[str, str] | None = None
              ) -> tuple[list[dict[str, Any]], list[DicomInstanceRow]]:
    """:func:`qido`, with the indexed instances behind the answer's page: the access log
    names the patients they belong to."""
    filters: dict[str, str] = dict(scope or {})
    date_range: tuple[str, str] | None = None
    limit, offset = None, 0
    for name, value in params.items():
        keyword = _TAG_TO_KEYWORD.get(name.upper(), name)
        if keyword in _EXACT:
            if "," in value:
                raise QueryError(f"{keyword}: lists of values are not supported; query one")
            filters[keyword] = value
        elif keyword == "StudyDate":
            date_range = _date_range(value)
        elif keyword == "limit":
            limit = _non_negative(name, value)
        elif keyword == "offset":
            offset = _non_negative(name, value)
        elif keyword in ("includefield", "fuzzymatching"):
            continue
        else:
            raise QueryError(f"unsupported query key {name!r}")
    rows = store.find(**filters)
    if date_range is not None:
        low, high = date_range
        rows = [r for r in rows if r.StudyDate and low <= r.StudyDate <= high]
    grouped: dict[str, list[DicomInstanceRow]] = {}
    for row in rows:
        grouped.setdefault(getattr(row, _LEVEL_KEY[level]), []).append(row)
    end = None if limit is None else offset + limit
    page = list(grouped.values())[offset:end]
    return [_describe(level, members) for members in page], [r for m in page for r in m]


def _describe(level: Level, rows: list[DicomInstanceRow]) -> dict[str, Any]:
    first = rows[0].attributes
    keys = {"study": _STUDY_KEYS, "series": (*_SERIES_KEYS, "0020000D"),
            "instance": (*_INSTANCE_KEYS, "0020000E", "0020000D")}[level]
    out = {k: first[k] for k in keys if k in first}
    if level == "study":
        out["00080061"] = {"vr": "CS", "Value": sorted({r.Modality for r in rows if r.Modality})}
        out["00201206"] = _element("IS", len({r.SeriesInstanceUID for r in rows}))
        out["00201208"] = _element("IS", len(rows))
    elif level == "series":
        out["00201209"] = _element("IS", len(rows))
    return out


def _date_range(value: str) -> tuple[str, str]:
    match = re.fullmatch(r"(\d{8})?(-)?(\d{8})?", value.strip())
    if not match or not (match.group(1) or match.group(3)):
        raise QueryError("StudyDate must be YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
    low = match.group(1) or "00000000"
    high = match.group(3) or ("99999999" if match.group(2) else low)
    return low, high


def _non_negative(name: str, value: str) -> int:
    if not value.isdigit():
        raise QueryError(f"{name} must be a non-negative integer")
    return int(value)


# -- WADO-RS ----------------------------------------------------------------------------------


def instance_metadata(ds: Dataset, base_url: str, row: DicomInstanceRow) -> dict[str, Any]:
    """DICOM JSON of one instance (read by ``DicomStore.read_dataset``), bulk data replaced
    by its retrieve URL."""
    url = instance_url(base_url, row)

    def bulk_handler(element: pydicom.DataElement) -> str:
        return f"{url}/bulkdata/{element.tag:08X}"

    return ds.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=bulk_handler)
