"""The 500 handler logs the route template, not the URL (issue 19, finding 12b).

Paths carry Study/Series UIDs and patient ids; the handler used to log
``request.url.path``, so an unexpected error put them in the application log.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from services.auth.principal import Role
from tests.security.http_edge_support import edge_settings, running
from tests.services.service_support import bearer

STUDY = "1.2.826.0.1.3680043.8.498.4242424242"
SERIES = "1.2.826.0.1.3680043.8.498.5151515151"


class _BrokenStore:
    """Any use of the DICOM store fails: the route answers 500."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"store unavailable ({name})")


def test_500_log_names_the_route_template_not_the_uids(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with running(edge_settings(tmp_path), raise_server_exceptions=False) as client:
        client.app.state.dicom_store = _BrokenStore()  # type: ignore[attr-defined]
        headers = bearer(client.app, Role.clinician)  # type: ignore[arg-type]
        with caplog.at_level(logging.INFO):
            answer = client.get(f"/dicomweb/studies/{STUDY}/series/{SERIES}/instances",
                                params={"PatientID": "MRN-77"}, headers=headers)
    assert answer.status_code == 500
    # The server's log (the test client's own httpx logger names the URL it requested).
    logged = "\n".join(r.getMessage() for r in caplog.records
                       if not r.name.startswith("httpx"))
    assert "unhandled RuntimeError" in logged
    assert "/dicomweb/studies/{study}/series/{series}/instances" in logged
    for value in (STUDY, SERIES, "MRN-77"):
        assert value not in logged
        assert value not in answer.text
