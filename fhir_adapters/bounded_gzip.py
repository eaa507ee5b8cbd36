"""Read a file's bytes, gunzipping with a cap on the decompressed size.

Bulk Data servers and clients write ``Patient.ndjson.gz``. A few kilobytes of gzip can
expand to gigabytes (a "gzip bomb"), so decompression stops, and the file is refused with
a located error, as soon as the output passes the cap: memory never holds more than the
cap plus one chunk.
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Iterator
from pathlib import Path

from fhir_adapters.errors import IngestError, Issue

__all__ = ["MAX_DECOMPRESSED_BYTES", "check_gunzip_bounded", "gunzip_bounded", "read_bytes"]

#: Default cap on what one ``.gz`` file may decompress to (1 GiB).
MAX_DECOMPRESSED_BYTES = 1 << 30
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20


def read_bytes(path: Path, *, max_decompressed: int = MAX_DECOMPRESSED_BYTES
               ) -> tuple[bytes, str]:
    """The file's content, gunzipped when it is gzip, and the suffix that names its format.

    ``Observation.ndjson.gz`` gives ``.ndjson``; a gzip file without ``.gz`` keeps its own
    suffix. Gzip is recognised by its magic bytes, so the suffix is never trusted alone.

    Raises
    ------
    IngestError
        The file cannot be read, is corrupt or truncated gzip, or decompresses to more than
        ``max_decompressed`` bytes.
    """
    source = str(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise IngestError(Issue("exception", f"cannot read the file ({e.strerror})"),
                          source=source) from None
    suffix = path.suffix.lower()
    if suffix == ".gz":
        suffix = Path(path.stem).suffix.lower()
    elif not data.startswith(_GZIP_MAGIC):
        return data, suffix
    return gunzip_bounded(data, source, max_decompressed), suffix


def gunzip_bounded(data: bytes, source: str | None = None,
                   max_decompressed: int = MAX_DECOMPRESSED_BYTES) -> bytes:
    """Decompress gzip ``data`` (every member), refusing output over ``max_decompressed``."""
    return b"".join(_inflated_chunks(data, source, max_decompressed))


def check_gunzip_bounded(data: bytes, source: str | None = None,
                         max_decompressed: int = MAX_DECOMPRESSED_BYTES) -> None:
    """Raise what :func:`gunzip_bounded` would raise, holding one chunk at a time.

    Inflating a bomb until the cap holds the cap in memory; this pass drops each chunk,
    so a caller that may receive bombs (a request body) refuses them for the cost of one
    chunk and inflates for real only what fits.
    """
    for _ in _inflated_chunks(data, source, max_decompressed):
        pass


def _inflated_chunks(data: bytes, source: str | None, max_decompressed: int
                     ) -> Iterator[bytes]:
    total = 0
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
            while chunk := f.read(_CHUNK):
                total += len(chunk)
                if total > max_decompressed:
                    raise IngestError(Issue(
                        "too-long", f"gzip content decompresses to more than "
                        f"{_size(max_decompressed)} (the cap); refused unread as a possible "
                        "gzip bomb"), source=source)
                yield chunk
    except EOFError:
        raise IngestError(Issue("structure", "truncated gzip: the compressed stream ends "
                                f"early (after {total} decompressed bytes)"),
                          source=source) from None
    except (OSError, zlib.error):
        # gzip.BadGzipFile and zlib errors: a fixed description; their text is not shown.
        raise IngestError(Issue("structure", "not valid gzip (bad header or corrupt "
                                f"compressed data after {total} decompressed bytes)"),
                          source=source) from None


def _size(n: int) -> str:
    return f"{n / (1 << 20):g} MiB" if n >= 1 << 20 else f"{n} bytes"
