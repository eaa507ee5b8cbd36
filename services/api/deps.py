"""Request dependencies: settings, the DICOM store, size-limited bodies."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request

from services.core.config import Settings
from services.dicom_store import DicomStore


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_dicom_store(request: Request) -> DicomStore:
    store: DicomStore = request.app.state.dicom_store
    return store


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
DicomStoreDep = Annotated[DicomStore, Depends(get_dicom_store)]


async def read_limited_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 as soon as it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body of {declared} bytes exceeds the limit of "
                                 f"{limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def base_url(request: Request, settings: Settings, prefix: str) -> str:
    root = settings.public_base_url or str(request.base_url).rstrip("/")
    return f"{root.rstrip('/')}{prefix}"
