"""TLS contexts for the three listeners (HTTP, MLLP, DICOM), from certificate paths.

One server certificate serves all three. With a client CA configured, MLLP and
DICOM peers must present a certificate signed by it (mutual TLS), which is how
interface engines and modalities are usually authenticated on hospital networks.
"""

from __future__ import annotations

import ssl
from pathlib import Path

__all__ = ["TLSConfigError", "client_context", "server_context"]


class TLSConfigError(ValueError):
    """A certificate or key path that cannot be used; names the path and the problem."""


def _readable(path: Path | None, what: str) -> Path:
    if path is None:
        raise TLSConfigError(f"TLS needs a {what}")
    if not path.is_file():
        raise TLSConfigError(f"TLS {what} {path} does not exist")
    return path


def server_context(certfile: Path, keyfile: Path, client_ca: Path | None = None
                   ) -> ssl.SSLContext:
    """A TLS 1.2+ server context; requires client certificates when ``client_ca`` is set."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(_readable(certfile, "certificate"), _readable(keyfile, "key"))
    except ssl.SSLError as exc:
        raise TLSConfigError(f"TLS certificate {certfile} and key {keyfile} do not load "
                             f"({exc.reason})") from None
    if client_ca is not None:
        context.load_verify_locations(cafile=_readable(client_ca, "client CA file"))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(ca_file: Path | None = None, certfile: Path | None = None,
                   keyfile: Path | None = None) -> ssl.SSLContext:
    """A TLS 1.2+ client context verifying the server against ``ca_file`` (else system CAs)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                         cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if certfile is not None:
        context.load_cert_chain(_readable(certfile, "client certificate"),
                                _readable(keyfile, "client key"))
    return context
