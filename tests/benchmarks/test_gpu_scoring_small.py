"""The GPU scoring benchmark's small mode: every path runs on the CPU and self-checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks import gpu_scoring
from benchmarks.gpu_scoring import FastSeriesReader, ScoringConfig, generate_series


@pytest.mark.slow
def test_small_mode_self_checks_pass(tmp_path: Path) -> None:
    config = ScoringConfig.small_mode()
    config.workdir = str(tmp_path)
    result = gpu_scoring.run(config)
    checks = result["self_checks"]
    assert checks["passed"], checks
    # A checked series has InstanceNumbers out of position order, and still matches.
    assert any(not s["instance_numbers_follow_position"] for s in checks["series"])
    for mode in config.readers:
        entry = result["fast_path"]["by_reader"][mode]
        assert entry["refused_series"] == [] and entry["files_read_by_pydicom"] == 0
    assert result["page_cache"]["method"].startswith("mincore")
    assert not list(tmp_path.iterdir()), "generated series are removed after the run"


@pytest.mark.slow
def test_odd_files_fast_path_or_pydicom(tmp_path: Path) -> None:
    """An extra element stays on the fast path; another encoding goes to pydicom."""
    import pydicom
    from pydicom.uid import ImplicitVRLittleEndian

    plan = generate_series(tmp_path, 1, 6, 16, seed=3, workers=1)[0]
    folder = Path(plan.folder)
    files = sorted(folder.iterdir())
    with FastSeriesReader(capacity=(8, 16, 16), mode="threads", workers=2) as reader:
        before = reader.read(folder)
        pixels = before.pixels.numpy()[before.order].copy()
        ds = pydicom.dcmread(files[2])
        ds.ImageComments = "an element the other files lack"
        ds.save_as(files[2], enforce_file_format=True)
        ds = pydicom.dcmread(files[3])
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(files[3], enforce_file_format=True)
        after = reader.read(folder)
        assert after.refused is None and after.pydicom_files == 1
        np.testing.assert_array_equal(after.pixels.numpy()[after.order], pixels)
        np.testing.assert_allclose(after.affine, before.affine)
