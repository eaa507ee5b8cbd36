"""A small read-only FHIR R4 search endpoint for the CDS Hooks fetch tests.

No FHIR server can be installed here, so the tests serve real Bundles (the shared
Synthea ones, or a synth cohort's) the way a FHIR server answers them: a
transaction Bundle's ``urn:uuid`` references become ``Type/id`` references, reads
return the resource, and searches return ``searchset`` Bundles with ``self`` and
``next`` links. It runs with uvicorn in a thread on a free loopback port and
answers 401 to any request without the bearer token it was given.

Supported: ``GET Patient/{id}``, and ``GET {Observation|Condition|DocumentReference|
MedicationRequest|Encounter}?patient=`` with ``category`` (a comma list of codes),
``_sort`` (``date`` / ``-date``), ``_count`` and ``_offset`` (paging).
"""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

__all__ = ["FhirTestServer", "server_resources"]

SEARCHABLE = ("Observation", "Condition", "DocumentReference", "MedicationRequest",
              "Encounter", "ImagingStudy")
_DATE_PATHS = ("effectiveDateTime", "effectiveInstant", "issued", "date", "recordedDate",
               "onsetDateTime", "authoredOn", "started")


def _rewrite(node: Any, refs: dict[str, str]) -> Any:
    if isinstance(node, dict):
        out = {k: _rewrite(v, refs) for k, v in node.items()}
        ref = out.get("reference")
        if isinstance(ref, str) and ref in refs:
            out["reference"] = refs[ref]
        return out
    if isinstance(node, list):
        return [_rewrite(v, refs) for v in node]
    return node


def server_resources(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    """A transaction Bundle's resources as a server stores them: ids kept, refs resolved."""
    refs: dict[str, str] = {}
    resources = []
    for entry in bundle.get("entry", []):
        resource = copy.deepcopy(entry["resource"])
        rid = resource.get("id") or str(entry.get("fullUrl", "")).rsplit(":", 1)[-1]
        resource["id"] = rid
        if entry.get("fullUrl"):
            refs[entry["fullUrl"]] = f"{resource['resourceType']}/{rid}"
        resources.append(resource)
    return [_rewrite(r, refs) for r in resources]


def _date_of(resource: dict[str, Any]) -> str:
    for path in _DATE_PATHS:
        value = resource.get(path)
        if isinstance(value, str):
            return value
    period = resource.get("effectivePeriod") or resource.get("period") or {}
    return str(period.get("start") or "")


def _subject(resource: dict[str, Any]) -> str | None:
    for key in ("subject", "patient"):
        ref = resource.get(key)
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
            return str(ref["reference"])
    return None


def _categories(resource: dict[str, Any]) -> set[str]:
    return {str(c.get("code")) for cat in resource.get("category") or []
            for c in cat.get("coding") or [] if isinstance(c, dict)}


def _outcome(status: int, code: str, text: str) -> JSONResponse:
    return JSONResponse({"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": code, "diagnostics": text}]}, status_code=status,
        media_type="application/fhir+json")


class FhirTestServer:
    """A read-only FHIR search endpoint over some Bundles, on ``http://127.0.0.1:<port>/fhir``.

    Parameters
    ----------
    bundles : iterable of dict
        Transaction (or collection) Bundles; each resource is served under its id.
    token : str
        The bearer token every request must carry.
    page_size : int
        The largest page, whatever ``_count`` asks (servers cap it): small, so the
        tests see paging.
    """

    def __init__(self, bundles: Iterable[dict[str, Any]], *, token: str,
                 page_size: int = 20) -> None:
        self.token = token
        self.page_size = page_size
        self.resources: dict[str, dict[str, dict[str, Any]]] = {}
        for bundle in bundles:
            for resource in server_resources(bundle):
                self.resources.setdefault(resource["resourceType"], {})[resource["id"]] = resource
        #: Every request as "METHOD path?query" (the tests check paging was followed).
        self.requests: list[str] = []
        self.unauthorized = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.app = self._build()

    @classmethod
    def from_files(cls, paths: Iterable[Path], **kwargs: Any) -> FhirTestServer:
        return cls((json.loads(p.read_text(encoding="utf-8")) for p in paths), **kwargs)

    # -- the app ------------------------------------------------------------------------

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.middleware("http")
        async def check_token(request: Request, call_next: Any) -> Any:
            query = f"?{request.url.query}" if request.url.query else ""
            self.requests.append(f"{request.method} {request.url.path}{query}")
            if request.headers.get("authorization") != f"Bearer {self.token}":
                self.unauthorized += 1
                return _outcome(401, "login", "a valid bearer token is required")
            return await call_next(request)

        @app.get("/fhir/Patient/{rid}")
        def read_patient(rid: str) -> JSONResponse:
            resource = self.resources.get("Patient", {}).get(rid)
            if resource is None:
                return _outcome(404, "not-found", "no such Patient")
            return JSONResponse(resource, media_type="application/fhir+json")

        @app.get("/fhir/{rtype}")
        def search(request: Request, rtype: str) -> JSONResponse:
            if rtype not in SEARCHABLE:
                return _outcome(404, "not-supported", f"{rtype} is not searchable here")
            params = request.query_params
            found = list(self.resources.get(rtype, {}).values())
            patient = params.get("patient") or params.get("subject")
            if patient:
                ref = patient if "/" in patient else f"Patient/{patient}"
                found = [r for r in found if _subject(r) == ref]
            if params.get("category"):
                wanted = set(params["category"].split(","))
                found = [r for r in found if _categories(r) & wanted]
            sort = params.get("_sort")
            if sort in ("date", "-date"):
                found.sort(key=_date_of, reverse=sort.startswith("-"))
            count = min(int(params.get("_count") or self.page_size), self.page_size)
            offset = int(params.get("_offset") or 0)
            page = found[offset:offset + count]
            base = str(request.url).split("?")[0]
            keep = [(k, v) for k, v in params.multi_items() if k not in ("_count", "_offset")]

            def page_url(start: int) -> str:
                return base + "?" + urlencode([*keep, ("_count", count), ("_offset", start)])

            links = [{"relation": "self", "url": page_url(offset)}]
            if offset + count < len(found):
                links.append({"relation": "next", "url": page_url(offset + count)})
            bundle = {"resourceType": "Bundle", "type": "searchset", "total": len(found),
                      "link": links,
                      "entry": [{"fullUrl": f"{base}/{r['id']}", "resource": r,
                                 "search": {"mode": "match"}} for r in page]}
            return JSONResponse(bundle, media_type="application/fhir+json")

        return app

    # -- serving ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._socket is None:
            raise RuntimeError("the server is not running")
        return int(self._socket.getsockname()[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def start(self) -> FhirTestServer:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))  # a free port, held from here on
        config = uvicorn.Config(self.app, log_level="warning", access_log=False,
                                lifespan="off")
        self._server = uvicorn.Server(config)
        sock = self._socket
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="fhir-test-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the FHIR test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._socket is not None:
            self._socket.close()

    def __enter__(self) -> FhirTestServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def patients(self) -> Iterator[dict[str, Any]]:
        yield from self.resources.get("Patient", {}).values()
