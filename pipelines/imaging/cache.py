"""A size-bounded on-disk cache of decoded series (Volume -> .npz).

Key
---
``series_key`` hashes (sha256), over the instances sorted by SOPInstanceUID, each
instance's SOPInstanceUID, file size and modification time in nanoseconds, plus
the cache format and a caller-chosen ``namespace`` (e.g. the reader's version).

Why stat and not file bytes: the cache exists to skip reading and decoding a
series; hashing the bytes would read every file on every lookup (for an
uncompressed CT that is most of the cost we are trying to save). Any rewrite of
a file changes its mtime (nanosecond resolution on the filesystems we run on)
and almost always its size, so a changed instance misses; an added or removed
instance changes the UID list. SOPInstanceUIDs rather than paths key the
instances so that renaming or moving files within a tree (``mv`` keeps mtime)
still hits. A copy (``cp`` without ``-p``) misses, which costs one decode.
Changing how series are decoded must change ``namespace``.

Eviction
--------
Least recently used, by the entry file's mtime, which a hit refreshes. File
access times are not used: ``relatime``/``noatime`` mounts do not keep them.
Entries are written to a temporary name and renamed into place, so a reader
never sees a half-written file, even with several processes sharing the dir.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.imaging.volume import Volume

__all__ = ["VolumeCache", "series_key"]

log = logging.getLogger(__name__)

#: Bump when the .npz layout changes: old entries then simply miss.
FORMAT_VERSION = 1
_SUFFIX = ".npz"


def series_key(paths: Sequence[Path], sop_instance_uids: Sequence[str] | None = None, *,
               namespace: str = "") -> str:
    """The cache key of a series' instances (hex sha256; see the module docstring).

    Parameters
    ----------
    paths : sequence of Path
        The series' files.
    sop_instance_uids : sequence of str, optional
        The instances' SOPInstanceUIDs, in the order of ``paths``; when None the
        resolved path stands in for the UID.
    namespace : str
        Anything that changes how a series is decoded (reader version, options).

    Raises
    ------
    ValueError
        ``paths`` is empty, or ``sop_instance_uids`` has another length.
    FileNotFoundError
        A file does not exist.
    """
    if not paths:
        raise ValueError("a series key needs at least one file")
    if sop_instance_uids is not None and len(sop_instance_uids) != len(paths):
        raise ValueError(f"{len(sop_instance_uids)} SOPInstanceUIDs for {len(paths)} files")
    ids = (list(sop_instance_uids) if sop_instance_uids is not None
           else [str(Path(p).resolve()) for p in paths])
    rows = []
    for ident, path in zip(ids, paths, strict=True):
        st = os.stat(path)
        rows.append((str(ident), st.st_size, st.st_mtime_ns))
    h = hashlib.sha256(f"clinfuse-volume-cache/{FORMAT_VERSION}/{namespace}\n".encode())
    for ident, size, mtime in sorted(rows):
        h.update(f"{ident}\t{size}\t{mtime}\n".encode())
    return h.hexdigest()


def _jsonable(value: Any) -> Any:
    """Metadata as JSON: pydicom values (MultiValue, PersonName, DSfloat) become plain."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)  # pydicom IS -> int
    if isinstance(value, float):
        return float(value)  # pydicom DSfloat -> float
    if value is None or isinstance(value, str):
        return None if value is None else str(value)
    if isinstance(value, bytes):
        return None  # raw bytes are never metadata worth caching
    return str(value)  # PersonName, UID, dates


class VolumeCache:
    """Decoded volumes on disk, at most ``max_bytes`` in total (LRU eviction).

    Parameters
    ----------
    directory : Path
        Created if missing. Only ``*.npz`` files written here are managed.
    max_bytes : int
        Bound on the total size of the entries. A volume larger than this is
        not stored.

    Examples
    --------
    >>> cache = VolumeCache(tmp, max_bytes=2**30)                    # doctest: +SKIP
    >>> vol = cache.get_or_load(series_key(paths, uids), lambda: read(paths))  # doctest: +SKIP
    """

    def __init__(self, directory: Path, *, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.directory = Path(directory)
        self.max_bytes = int(max_bytes)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        if not key or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"cache keys are lower-case hex digests, got {key!r}")
        return self.directory / f"{key}{_SUFFIX}"

    def __contains__(self, key: str) -> bool:
        return self._path(key).exists()

    def get(self, key: str) -> Volume | None:
        """The cached volume, or None on a miss; a hit counts as a use for LRU."""
        path = self._path(key)
        try:
            with np.load(path, allow_pickle=False) as z:
                stored_key = str(z["key"])
                array = z["array"]
                affine = z["affine"]
                info = json.loads(str(z["info"]))
        except FileNotFoundError:
            self.misses += 1
            return None
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            # A truncated or foreign file: drop it and decode again.
            log.warning("dropping unreadable cache entry %s: %s", path.name, e)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            self.misses += 1
            return None
        if stored_key != key:
            self.misses += 1
            return None
        with contextlib.suppress(FileNotFoundError):
            os.utime(path)  # mark as recently used (see module docstring)
        self.hits += 1
        return Volume(array=array, affine=affine, metadata=info.get("metadata", {}),
                      provenance=info.get("provenance", []))

    def put(self, key: str, volume: Volume) -> bool:
        """Store ``volume`` under ``key`` and evict old entries over the bound.

        Returns
        -------
        bool
            False when the volume alone exceeds ``max_bytes`` and was not stored.
        """
        path = self._path(key)
        info = json.dumps({"metadata": _jsonable(volume.metadata),
                           "provenance": _jsonable(volume.provenance)})
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=_SUFFIX, dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, key=np.asarray(key), array=np.asarray(volume.array),
                         affine=np.asarray(volume.affine, dtype=np.float64),
                         info=np.asarray(info))
            size = os.path.getsize(tmp)
            if size > self.max_bytes:
                log.info("volume of %d bytes exceeds cache bound %d; not cached", size,
                         self.max_bytes)
                return False
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self.evict(keep=path)
        return True

    def get_or_load(self, key: str, load: Callable[[], Volume]) -> Volume:
        """The cached volume, or ``load()``'s result, which is then cached."""
        volume = self.get(key)
        if volume is None:
            volume = load()
            self.put(key, volume)
        return volume

    def _entries(self) -> Iterable[tuple[Path, os.stat_result]]:
        for path in self.directory.glob(f"*{_SUFFIX}"):
            if path.name.startswith(".tmp-"):
                continue
            with contextlib.suppress(FileNotFoundError):
                yield path, path.stat()

    def size_bytes(self) -> int:
        """Total size of the entries."""
        return sum(st.st_size for _, st in self._entries())

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Remove least recently used entries until the total fits ``max_bytes``."""
        entries = sorted(self._entries(), key=lambda e: (e[1].st_mtime_ns, e[0].name))
        total = sum(st.st_size for _, st in entries)
        removed = []
        for path, st in entries:
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
            total -= st.st_size
        return removed

    def clear(self) -> None:
        """Remove every entry."""
        for path, _ in self._entries():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
