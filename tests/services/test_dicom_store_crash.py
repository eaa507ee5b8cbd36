"""kill -9 during ingest leaves no half-written file in the index."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine

from services.db import session_factory
from services.dicom_store import DicomStore

WRITER = textwrap.dedent("""
    import io, sys
    from pathlib import Path
    import pydicom
    from pydicom.data import get_testdata_file
    from services.db import make_engine, session_factory
    from services.dicom_store import DicomStore
    store = DicomStore(Path(sys.argv[2]), session_factory(make_engine(sys.argv[1])))
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for i in range(100000):
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.InstanceNumber = i
        buffer = io.BytesIO()
        ds.save_as(buffer)
        store.store(buffer.getvalue())
        if i == 5:
            print("ready", flush=True)
""")


@pytest.mark.integration
def test_kill_9_mid_ingest(db_engine: Engine, tmp_path: Path) -> None:
    url = db_engine.url.render_as_string(hide_password=False)
    root = tmp_path / "instances"
    child = subprocess.Popen([sys.executable, "-c", WRITER, url, str(root)],
                             stdout=subprocess.PIPE, cwd=Path(__file__).parents[2])
    assert child.stdout is not None
    assert child.stdout.readline().strip() == b"ready"
    time.sleep(0.7)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()

    store = DicomStore(root, session_factory(db_engine))
    rows = store.find()
    assert len(rows) > 5
    for row in rows:  # every indexed instance is complete and matches its hash
        data = store.path_for(row.sha256).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row.sha256 and len(data) == row.size
    indexed = {store.path_for(r.sha256) for r in rows}
    complete = {p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")}
    assert indexed <= complete
    # A restarted writer carries on: a re-sent instance is accepted once.
    again = store.store(store.read_bytes(rows[0]))
    assert again.status.value == "duplicate"
