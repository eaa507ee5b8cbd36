"""Report files, the folder store, compare, and the CLI entry points."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from audits import AuditStore, main_audit, main_compare
from audits.report import METRIC_MEANING


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, scores: pd.DataFrame) -> AuditStore:
    root = tmp_path_factory.mktemp("audits")
    csv = root / "scores.csv"
    scores.to_csv(csv, index=False)
    assert main_audit(csv, ["sex", "race"], root / "store", "alice", n_boot=100) == 0
    shifted = scores.assign(score=(scores["score"] * 1.3).clip(0, 1), model_version="m-1.1")
    shifted.to_csv(csv, index=False)
    assert main_audit(csv, ["sex", "race"], root / "store", None, n_boot=100) == 0
    return AuditStore(root / "store")


def test_reports_written_and_self_contained(store: AuditStore) -> None:
    first = store.list()[0]["audit_id"]
    folder = store.path(first)
    page = (folder / "report.html").read_text()
    assert not re.search(r"""(src|href)=['"](https?:|//|/)""", page)  # no external assets
    assert page.count("data:image/png;base64,") == 3  # forest, ROC, calibration
    assert page.index("Summary") < page.index("Disparities")
    for sentence in METRIC_MEANING.values():
        assert html.escape(sentence.split(" (")[0][:40]) in page
    assert (folder / "report.pdf").read_bytes().startswith(b"%PDF")
    rec = json.loads((folder / "audit.json").read_text())
    assert rec["run_by"] == "alice" and rec["model_version"] == ["m-1.0"]
    assert len(rec["data_fingerprint"]["sha256"]) == 64
    assert rec["threshold"] == {"value": 0.25, "source": "column threshold"}
    assert rec["data_window"]["start"].startswith("2024-01")
    assert "Holm" in rec["multiplicity"] and "intersection tests" in rec["multiplicity"]


def test_store_lists_gets_and_compares(store: AuditStore,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    listed = store.list()
    assert [a["audit_id"][-5:] for a in listed] == ["v0001", "v0002"]
    a, b = (x["audit_id"] for x in listed)
    diff = store.compare(a, b)
    assert diff["provenance"]["model_version"] == {"before": ["m-1.0"], "after": ["m-1.1"]}
    assert "data_sha256" in diff["provenance"]
    moved = [c for c in diff["metric_changes"] if c.get("intervals_separate")]
    assert any(c["metric"] == "selection_rate" for c in moved)
    assert main_compare(store.path(a), store.path(b)) == 0
    assert "model_version" in capsys.readouterr().out
    with pytest.raises(KeyError, match="no audit"):
        store.get("20000101T000000Z-v0999")
    assert main_compare(Path("/nonexistent"), store.path(b)) == 2
