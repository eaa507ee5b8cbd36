"""DICOMweb routes: STOW-RS, QIDO-RS and WADO-RS under /dicomweb."""

from __future__ import annotations

from functools import partial
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse

from pipelines.imaging.dicom_limits import DeflateError, DicomLimitError
from services import dicomweb, imaging_access
from services.access_log import pseudonym_secret
from services.api.deps import (
    DicomStoreDep,
    SettingsDep,
    base_url,
    read_limited_body,
    require,
)
from services.auth.principal import Role
from services.auth.scopes import Need

PREFIX = "/dicomweb"
router = APIRouter(prefix=PREFIX, tags=["DICOMweb"],
                   responses={401: {"description": "no valid bearer token"},
                              403: {"description": "the role may not use this route"}})
#: STOW is how integration systems send images; reading is for them and for clinicians.
#: A DICOM study is FHIR's ImagingStudy, so its scopes are ImagingStudy's: QIDO searches
#: (s), WADO reads (r), STOW creates or adds to a study (cu). The routes span patients
#: (a search is archive-wide), so patient/ scopes do not reach them.
WRITE = require(Role.integration, scope=Need.of("ImagingStudy.cu"))
SEARCH = require(Role.integration, Role.clinician, scope=Need.of("ImagingStudy.s"))
READ = require(Role.integration, Role.clinician, scope=Need.of("ImagingStudy.r"))


class DicomJSONResponse(JSONResponse):
    media_type = dicomweb.DICOM_JSON


_DICOM_JSON = {dicomweb.DICOM_JSON: {"schema": {"type": "array", "items": {"type": "object"}}}}
_STOW_JSON = {dicomweb.DICOM_JSON: {"schema": {"type": "object"}}}
_MULTIPART = {"multipart/related": {"schema": {"type": "string", "format": "binary"}}}
#: STOW-RS bodies: multipart/related; type="application/dicom", one DICOM file a part.
_STOW_BODY = {"requestBody": {"required": True, "content": {
    "multipart/related": {
        "schema": {"type": "string", "format": "binary"}}}}}
_STOW_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "all stored", "content": _STOW_JSON},
    202: {"description": "some stored; failures or warnings listed", "content": _STOW_JSON},
    400: {"description": "malformed multipart/related body"},
    409: {"description": "none stored", "content": _STOW_JSON},
    413: {"description": "too large"},
    415: {"description": "not multipart/related application/dicom"}}
_SEARCH_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the matches, as DICOM JSON", "content": _DICOM_JSON},
    400: {"description": "an attribute or value the search does not support"}}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such study, series or instance"}}
_RETRIEVE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the instances, one DICOM file a part", "content": _MULTIPART},
    **_NOT_FOUND}
_METADATA_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the instances' metadata, as DICOM JSON", "content": _DICOM_JSON},
    422: {"description": "a stored instance is over the DICOM dataset cap"},
    **_NOT_FOUND}
write = partial(router.post, dependencies=[WRITE], response_class=DicomJSONResponse,
                openapi_extra=_STOW_BODY, responses=_STOW_RESPONSES)
search = partial(router.get, dependencies=[SEARCH], response_class=DicomJSONResponse,
                 responses=_SEARCH_RESPONSES)
retrieve = partial(router.get, dependencies=[READ], response_class=StreamingResponse,
                   responses=_RETRIEVE_RESPONSES)
metadata = partial(router.get, dependencies=[READ], response_class=DicomJSONResponse,
                   responses=_METADATA_RESPONSES)


def _dicom_json(payload: Any, status: int = 200) -> JSONResponse:
    return DicomJSONResponse(payload, status_code=status)


async def _stow(request: Request, store: DicomStoreDep, settings: SettingsDep,
                study: str | None) -> JSONResponse:
    body = await read_limited_body(request, settings.max_upload_bytes)
    try:
        status, payload = dicomweb.stow(store, request.headers.get("content-type", ""), body,
                                        base_url=base_url(request, settings, PREFIX),
                                        study_uid=study)
    except dicomweb.UnsupportedMediaType as exc:
        raise HTTPException(415, str(exc)) from None
    except dicomweb.MultipartError as exc:
        raise HTTPException(400, f"malformed multipart/related body: {exc}") from None
    return _dicom_json(payload, status)


@write("/studies", summary="STOW-RS: store instances")
async def store_instances(request: Request, store: DicomStoreDep,
                          settings: SettingsDep) -> JSONResponse:
    return await _stow(request, store, settings, None)


@write("/studies/{study}", summary="STOW-RS: store instances into one study")
async def store_study_instances(study: str, request: Request, store: DicomStoreDep,
                                settings: SettingsDep) -> JSONResponse:
    return await _stow(request, store, settings, study)


def _note_patients(request: Request, store: DicomStoreDep, rows: list[Any]) -> None:
    """One access-log entry per patient whose instances this answer returns."""
    secret = pseudonym_secret(request.app.state.settings)
    request.state.patient_ids = imaging_access.patients_of(store.sessions, rows, secret)


def _search(store: DicomStoreDep, level: dicomweb.Level, request: Request,
            scope: dict[str, str]) -> JSONResponse:
    try:
        matches, rows = dicomweb.qido_page(store, level, dict(request.query_params),
                                           scope=scope)
    except dicomweb.QueryError as exc:
        raise HTTPException(400, str(exc)) from None
    _note_patients(request, store, rows)
    return _dicom_json(matches)


@search("/studies", summary="QIDO-RS: search studies")
def search_studies(request: Request, store: DicomStoreDep) -> JSONResponse:
    return _search(store, "study", request, {})


@search("/series", summary="QIDO-RS: search series")
def search_series(request: Request, store: DicomStoreDep) -> JSONResponse:
    return _search(store, "series", request, {})


@search("/instances", summary="QIDO-RS: search instances")
def search_instances(request: Request, store: DicomStoreDep) -> JSONResponse:
    return _search(store, "instance", request, {})


@search("/studies/{study}/series", summary="QIDO-RS: search a study's series")
def search_study_series(study: str, request: Request, store: DicomStoreDep) -> JSONResponse:
    return _search(store, "series", request, {"StudyInstanceUID": study})


@search("/studies/{study}/series/{series}/instances",
            summary="QIDO-RS: search a series' instances")
def search_series_instances(study: str, series: str, request: Request,
                            store: DicomStoreDep) -> JSONResponse:
    return _search(store, "instance", request,
                   {"StudyInstanceUID": study, "SeriesInstanceUID": series})


def _rows(store: DicomStoreDep, study: str, series: str | None = None,
          instance: str | None = None) -> list[Any]:
    rows = store.find(StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=instance)
    if not rows:
        raise HTTPException(404, "no such study, series or instance")
    return rows


def _retrieve(request: Request, store: DicomStoreDep, rows: list[Any]) -> StreamingResponse:
    _note_patients(request, store, rows)
    content_type, chunks = dicomweb.build_multipart(store.iter_bytes(rows))
    return StreamingResponse(chunks, media_type=content_type)


@retrieve("/studies/{study}", summary="WADO-RS: retrieve a study")
def retrieve_study(study: str, request: Request, store: DicomStoreDep) -> StreamingResponse:
    return _retrieve(request, store, _rows(store, study))


@retrieve("/studies/{study}/series/{series}", summary="WADO-RS: retrieve a series")
def retrieve_series(study: str, series: str, request: Request,
                    store: DicomStoreDep) -> StreamingResponse:
    return _retrieve(request, store, _rows(store, study, series))


@retrieve("/studies/{study}/series/{series}/instances/{instance}",
            summary="WADO-RS: retrieve an instance")
def retrieve_instance(study: str, series: str, instance: str, request: Request,
                      store: DicomStoreDep) -> StreamingResponse:
    return _retrieve(request, store, _rows(store, study, series, instance))


def _metadata(request: Request, settings: SettingsDep, store: DicomStoreDep,
              rows: list[Any]) -> JSONResponse:
    root = base_url(request, settings, PREFIX)
    _note_patients(request, store, rows)
    out = []
    for number, row in enumerate(rows, start=1):
        try:
            ds = store.read_dataset(row)
        except (DicomLimitError, DeflateError) as exc:
            # Stored before the caps existed (or under larger ones): never inflated here
            # past the cap. Named by its place in the answer; UIDs stay out of errors.
            raise HTTPException(422, f"instance {number} of {len(rows)} cannot be read "
                                     f"within this server's limits: {exc}") from None
        out.append(dicomweb.instance_metadata(ds, root, row))
    return _dicom_json(out)


@metadata("/studies/{study}/metadata", summary="WADO-RS: a study's metadata")
def study_metadata(study: str, request: Request, settings: SettingsDep,
                   store: DicomStoreDep) -> JSONResponse:
    return _metadata(request, settings, store, _rows(store, study))


@metadata("/studies/{study}/series/{series}/metadata", summary="WADO-RS: a series' metadata")
def series_metadata(study: str, series: str, request: Request, settings: SettingsDep,
                    store: DicomStoreDep) -> JSONResponse:
    return _metadata(request, settings, store, _rows(store, study, series))


@metadata("/studies/{study}/series/{series}/instances/{instance}/metadata",
            summary="WADO-RS: an instance's metadata")
def instance_metadata(study: str, series: str, instance: str, request: Request,
                      settings: SettingsDep, store: DicomStoreDep) -> JSONResponse:
    return _metadata(request, settings, store, _rows(store, study, series, instance))
