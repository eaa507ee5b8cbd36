"""Request bodies sent with ``Content-Encoding: gzip``, inflated with a cap.

Bulk Data clients gzip their NDJSON. A few hundred KiB of gzip expand to gigabytes (a
"gzip bomb"), and the upload limit only sees the compressed size, so inflation stops
as soon as the output passes the cap. The body is inflated twice: first counted and dropped
chunk by chunk, so refusing a bomb costs one chunk of memory, never the cap; only a
body that fits is then inflated for real
(:func:`fhir_adapters.bounded_gzip.gunzip_bounded`).
"""

from __future__ import annotations

import gzip
import io
import zlib

from fhir_adapters.bounded_gzip import gunzip_bounded
from fhir_adapters.errors import IngestError, Issue

__all__ = ["ContentEncodingError", "decoded_body"]

_CHUNK = 1 << 20
_IDENTITY = {"", "identity"}
_GZIP = {"gzip", "x-gzip"}


class ContentEncodingError(ValueError):
    """A body that cannot be decoded: ``status`` is the HTTP answer (400, 413 or 415)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def decoded_body(body: bytes, content_encoding: str | None, *, max_bytes: int) -> bytes:
    """``body`` with its Content-Encoding undone; gzip may inflate to ``max_bytes``.

    Raises
    ------
    ContentEncodingError
        413 when the gzip inflates past ``max_bytes``; 400 when it is not valid gzip
        (corrupt or truncated); 415 for any encoding but identity and gzip.
    """
    encoding = (content_encoding or "").strip().lower()
    if encoding in _IDENTITY:
        return body
    if encoding not in _GZIP:
        raise ContentEncodingError(415, f"Content-Encoding {encoding[:32]!r} is not supported; "
                                        "send the body as is or with gzip")
    try:
        _count_within(body, max_bytes)
        return gunzip_bounded(body, max_decompressed=max_bytes)
    except IngestError as exc:
        too_long = any(issue.code == "too-long" for issue in exc.issues)
        detail = "; ".join(issue.diagnostics for issue in exc.issues)
        raise ContentEncodingError(413 if too_long else 400, detail) from None


def _count_within(body: bytes, max_bytes: int) -> None:
    """Inflate and drop, one chunk at a time; IngestError ("too-long") past ``max_bytes``.

    Corrupt gzip is left for :func:`gunzip_bounded` to describe.
    """
    total = 0
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(body)) as f:
            while chunk := f.read(_CHUNK):
                total += len(chunk)
                if total > max_bytes:
                    size = f"{max_bytes / (1 << 20):g} MiB" if max_bytes >= 1 << 20 \
                        else f"{max_bytes} bytes"
                    raise IngestError(Issue(
                        "too-long", f"gzip content decompresses to more than {size} (the "
                        "cap); refused unread as a possible gzip bomb"))
    except (EOFError, OSError, zlib.error):
        return
