"""Request bodies sent with ``Content-Encoding: gzip``, inflated with a cap.

Bulk Data clients gzip their NDJSON. A few hundred KiB of gzip expand to gigabytes (a
"gzip bomb"), and the upload limit only sees the compressed size, so inflation stops
as soon as the output passes the cap. The body is inflated twice: first counted and dropped
chunk by chunk, so refusing a bomb costs one chunk of memory, never the cap; only a
body that fits is then inflated for real
(:mod:`fhir_adapters.bounded_gzip`).
"""

from __future__ import annotations

from fhir_adapters.bounded_gzip import check_gunzip_bounded, gunzip_bounded
from fhir_adapters.errors import IngestError

__all__ = ["ContentEncodingError", "decoded_body"]

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
        check_gunzip_bounded(body, max_decompressed=max_bytes)
        return gunzip_bounded(body, max_decompressed=max_bytes)
    except IngestError as exc:
        too_long = any(issue.code == "too-long" for issue in exc.issues)
        detail = "; ".join(issue.diagnostics for issue in exc.issues)
        raise ContentEncodingError(413 if too_long else 400, detail) from None
