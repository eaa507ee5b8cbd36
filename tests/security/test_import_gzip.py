"""Gzip bombs at ``POST /fhir/$import`` (issue 19, decompression bombs beyond DICOM).

Bulk Data clients send ``Content-Encoding: gzip``. The body is inflated with a cap (the
upload limit: a compressed body may not expand beyond what an uncompressed one could
be), so a few KiB of gzip never become gigabytes: 413 as soon as the cap is passed,
400 for a body that is not gzip at all, and an honest gzipped file is imported.
"""

from __future__ import annotations

import gzip
import json
import resource
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.app import create_app
from services.auth.principal import Role
from services.core.config import Settings
from tests.services.service_support import bearer

MiB = 1 << 20
GZIP_NDJSON = {"Content-Type": "application/fhir+ndjson", "Content-Encoding": "gzip"}
PATIENT = {"resourceType": "Patient", "id": "p1",
           "identifier": [{"system": "urn:oid:1.2.3.4", "value": "MRN-1"}]}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                        data_dir=tmp_path / "data", max_upload_bytes=1 * MiB)
    app = create_app(settings)
    with TestClient(app, headers=bearer(app, Role.integration)) as test_client:
        yield test_client


def _gzip_bomb(inflated: int) -> bytes:
    """Blank lines, gzipped a MiB at a time (the bomb's content is never held whole)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    line = b"\n" * MiB
    return b"".join([*(packer.compress(line) for _ in range(inflated // MiB)),
                     packer.flush()])


def test_gzip_bomb_is_refused_with_413_before_it_is_inflated(client: TestClient) -> None:
    # 128 MiB of blank lines squeeze to about 125 KiB: under the 1 MiB upload limit.
    bomb = _gzip_bomb(128 * MiB)
    assert len(bomb) < MiB
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    response = client.post("/fhir/$import", content=bomb, headers=GZIP_NDJSON)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert response.status_code == 413, response.text
    assert "decompresses to more than 1 MiB" in response.text
    assert grown_mib < 32  # inflating it all would hold 128 MiB at once


def test_gzipped_ndjson_is_imported(client: TestClient) -> None:
    body = gzip.compress((json.dumps(PATIENT) + "\n").encode())
    response = client.post("/fhir/$import", content=body, headers=GZIP_NDJSON)
    assert response.status_code == 200, response.text
    assert "ingested 1 resources for 1 patient(s)" in response.text


def test_a_body_that_is_not_gzip_is_400(client: TestClient) -> None:
    response = client.post("/fhir/$import", content=b"\x1f\x8bnot really gzip",
                           headers=GZIP_NDJSON)
    assert response.status_code == 400, response.text
    assert "not valid gzip" in response.text


def test_an_unknown_content_encoding_is_415(client: TestClient) -> None:
    response = client.post("/fhir/$import", content=b"{}", headers={
        "Content-Type": "application/fhir+ndjson", "Content-Encoding": "br"})
    assert response.status_code == 415, response.text
