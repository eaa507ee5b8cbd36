"""The built-in issuer's token endpoint as clients name it, from configuration only.

A SMART Backend Services client signs its assertion for one audience, the token
endpoint's URL. Built from the request's Host header, the expected audience would
follow whatever host a caller claims, so an assertion minted for another server
(or for a name the caller chose) would be accepted here. Configuration decides it.
"""

from __future__ import annotations

from services.core.config import Settings

__all__ = ["TOKEN_ENDPOINT_UNCONFIGURED", "configured_token_endpoint"]

TOKEN_ENDPOINT_UNCONFIGURED = (
    "the token endpoint's address is not configured: set CLINFUSE_PUBLIC_BASE_URL (or "
    "CLINFUSE_AUTH_TOKEN_ENDPOINT); it is never taken from the request's Host header")
#: A wildcard bind names no address a client could use.
_WILDCARD_HOSTS = ("", "0.0.0.0", "::")


def configured_token_endpoint(settings: Settings) -> str | None:
    """The token endpoint URL: configured, else under the public base URL, else on the
    configured host and port (the demo's ``http://127.0.0.1:8000``); None for a wildcard
    bind without a public URL."""
    if settings.auth_token_endpoint:
        return settings.auth_token_endpoint
    if settings.public_base_url:
        return f"{settings.public_base_url.rstrip('/')}/auth/token"
    if settings.host in _WILDCARD_HOSTS:
        return None
    scheme = "https" if settings.http_tls and settings.tls_certfile is not None else "http"
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"{scheme}://{host}:{settings.port}/auth/token"
