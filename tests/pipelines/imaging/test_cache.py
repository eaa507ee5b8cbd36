"""The decoded-series cache: hits, misses, invalidation, LRU bound."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from pydicom.valuerep import DSfloat, PersonName

from pipelines.imaging.cache import VolumeCache, series_key
from pipelines.imaging.volume import Volume


def _files(tmp_path: Path, n: int = 3) -> list[Path]:
    paths = []
    for i in range(n):
        p = tmp_path / "series" / f"{i}.dcm"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(bytes([i]) * 100)
        paths.append(p)
    return paths


def _volume(seed: int = 0, shape: tuple[int, ...] = (8, 8, 4)) -> Volume:
    array = np.random.default_rng(seed).integers(0, 1000, size=shape).astype(np.int16)
    return Volume(array, np.diag([0.5, 0.5, 2.0, 1.0]),
                  {"Modality": "CT", "SliceThickness": DSfloat("2.0"),
                   "PixelSpacing": [0.5, 0.5], "ReferringPhysicianName": PersonName("A^B")},
                  [{"step": "read", "version": "1", "args": {}}])


def test_hit_and_miss(tmp_path: Path) -> None:
    paths = _files(tmp_path)
    uids = ["1.2.1", "1.2.2", "1.2.3"]
    cache = VolumeCache(tmp_path / "cache", max_bytes=10**7)
    key = series_key(paths, uids)
    assert cache.get(key) is None and cache.misses == 1
    calls = []

    def load() -> Volume:
        calls.append(1)
        return _volume()

    first = cache.get_or_load(key, load)
    second = cache.get_or_load(key, load)
    assert len(calls) == 1 and cache.hits == 1
    assert np.array_equal(first.array, second.array) and second.array.dtype == np.int16
    assert np.array_equal(first.affine, second.affine)
    assert second.metadata["SliceThickness"] == 2.0
    assert second.metadata["ReferringPhysicianName"] == "A^B"
    assert second.provenance == first.provenance
    # Same instances in another order give the same key; the path does not matter.
    assert series_key(paths[::-1], uids[::-1]) == key
    assert series_key(paths, uids, namespace="reader-2") != key


def test_changed_or_added_file_invalidates(tmp_path: Path) -> None:
    paths = _files(tmp_path)
    key = series_key(paths)
    st = paths[1].stat()
    paths[1].write_bytes(b"\x07" * 100)  # same size, new content
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000))
    assert series_key(paths) != key
    assert series_key(paths[:2]) != series_key(paths)
    with pytest.raises(ValueError, match="at least one"):
        series_key([])
    with pytest.raises(ValueError, match="2 SOPInstanceUIDs for 3 files"):
        series_key(paths, ["1", "2"])


def test_eviction_keeps_the_bound_and_recent_entries(tmp_path: Path) -> None:
    one = VolumeCache(tmp_path / "probe", max_bytes=10**7)
    one.put("00", _volume())
    entry = one.size_bytes()
    cache = VolumeCache(tmp_path / "cache", max_bytes=int(entry * 3.5))
    keys = [f"{i:02x}" for i in range(6)]
    for i, key in enumerate(keys[:3]):
        cache.put(key, _volume(i))
        os.utime(cache.directory / f"{key}.npz", ns=(i * 10**9, i * 10**9))
    assert cache.get(keys[0]) is not None  # a hit makes "00" most recently used
    cache.put(keys[3], _volume(3))
    cache.put(keys[4], _volume(4))
    assert cache.size_bytes() <= cache.max_bytes
    present = [k for k in keys if k in cache]
    assert keys[0] in present and keys[4] in present
    assert keys[1] not in present  # the least recently used went first
    # A volume bigger than the whole cache is not stored.
    assert cache.put(keys[5], _volume(shape=(64, 64, 64))) is False
    assert keys[5] not in cache and cache.size_bytes() <= cache.max_bytes


def test_corrupt_entry_is_a_miss(tmp_path: Path) -> None:
    cache = VolumeCache(tmp_path, max_bytes=10**7)
    (tmp_path / "ab.npz").write_bytes(b"not a zip")
    assert cache.get("ab") is None and "ab" not in cache
    with pytest.raises(ValueError, match="hex"):
        cache.get("../etc/passwd")
