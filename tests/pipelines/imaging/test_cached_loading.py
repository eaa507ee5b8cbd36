"""load_image_cached: a series is decoded once, later reads hit the cache, changes miss."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest

import pipelines.imaging.convert as convert
from benchmarks.imaging_bench import SeriesSpec, write_series
from pipelines.imaging.cache import VolumeCache
from pipelines.imaging.convert import load_image_cached
from pipelines.imaging.volume import ImageError, Volume


@pytest.fixture
def series(tmp_path: Path) -> Path:
    folder = tmp_path / "series"
    write_series(SeriesSpec(16, 6, 0.8, 2.0, (-6.0, -6.0, 0.0)), folder,
                 np.random.default_rng(0))
    return folder


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every call of the real reader behind the cache."""
    calls: list[Path] = []
    real = convert.load_image

    def counting(src: Path, **kw: object) -> Volume:
        calls.append(Path(src))
        return real(src, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(convert, "load_image", counting)
    return calls


def test_second_read_is_served_from_the_cache(tmp_path: Path, series: Path,
                                              decodes: list[Path]) -> None:
    cache = VolumeCache(tmp_path / "cache", max_bytes=10**8)
    first = load_image_cached(series, cache)
    second = load_image_cached(series, cache)
    assert len(decodes) == 1 and (cache.hits, cache.misses) == (1, 1)
    assert np.array_equal(first.array, second.array)
    assert second.array.dtype == np.float32
    assert np.array_equal(first.affine, second.affine)
    assert second.metadata["SeriesInstanceUID"] == first.metadata["SeriesInstanceUID"]
    assert second.provenance == first.provenance
    # Other reader options are another entry, not a wrong hit.
    load_image_cached(series, cache, min_slices=4)
    assert len(decodes) == 2
    # No cache: plain reads.
    load_image_cached(series, None)
    assert len(decodes) == 3


def test_changed_file_invalidates(tmp_path: Path, series: Path, decodes: list[Path]) -> None:
    cache = VolumeCache(tmp_path / "cache", max_bytes=10**8)
    before = load_image_cached(series, cache)
    path = sorted(series.glob("*.dcm"))[0]
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.copy()
    pixels[0, 0] += 100
    ds.PixelData = pixels.tobytes()
    st = path.stat()
    ds.save_as(path)
    # Same size; make sure the mtime moves even on coarse-clock filesystems.
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    after = load_image_cached(series, cache)
    assert len(decodes) == 2 and cache.hits == 0
    assert after.array[0, 0, 0] == before.array[0, 0, 0] + 100
    path.unlink()  # a removed instance changes the file list: another miss
    load_image_cached(series, cache)
    assert len(decodes) == 3


def test_cache_stays_bounded_and_errors_are_not_cached(tmp_path: Path, series: Path,
                                                       decodes: list[Path]) -> None:
    probe = VolumeCache(tmp_path / "probe", max_bytes=10**8)
    load_image_cached(series, probe)
    entry = probe.size_bytes()
    cache = VolumeCache(tmp_path / "cache", max_bytes=int(entry * 1.5))
    for min_slices in (1, 2, 3):  # three distinct entries, room for one
        load_image_cached(series, cache, min_slices=min_slices)
        assert cache.size_bytes() <= cache.max_bytes
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    with pytest.raises(ImageError, match="no such file"):
        load_image_cached(tmp_path / "missing", cache)
