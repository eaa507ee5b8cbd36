"""Host header checking: the API answers only for the names it is reached by.

URLs the service builds (FHIR base, redirect URIs, RetrieveURLs) fall back to the
request's Host header when no public URL is configured, and a browser tricked by DNS
rebinding sends the attacker's host name. Starlette's TrustedHostMiddleware answers
400 for any other Host; the liveness, readiness and metrics routes are exempt, since
Kubernetes probes and Prometheus scrapes name the pod's address, which changes with
every pod, and those routes build nothing from the Host header.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

#: Routes any Host may reach: they answer the same to everyone and build no URL.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class HostCheckMiddleware(TrustedHostMiddleware):
    """TrustedHostMiddleware, except for :data:`PROBE_PATHS`; never redirects to www."""

    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str]) -> None:
        super().__init__(app, allowed_hosts=allowed_hosts, www_redirect=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        await super().__call__(scope, receive, send)
