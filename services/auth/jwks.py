"""The identity provider's JWKS, fetched from its URL under the outbound policy.

The keys are cached for ``ttl_s`` (300 s), so a routine rotation is picked up
within minutes. A token signed with a ``kid`` the cache does not know triggers one
early refetch (the IdP has just rotated), at most once per ``min_refetch_s`` (60 s),
so a stream of tokens with made-up kids cannot make the service hammer the IdP.
When the IdP is down or answers garbage, the last good keys stay in use for up to
``max_stale_s`` (24 h; after that the keys may have been revoked) and the next try
waits ``min_refetch_s``, so an outage does not cost every request a fetch deadline.

The fetch itself goes through :mod:`services.outbound`: https only (http only to a
listed loopback origin), a 64 KiB body cap, a 5 s deadline, no redirects.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

from services.auth.tokens import AuthError
from services.outbound import Outbound, OutboundError

__all__ = ["JWKS_DEADLINE_S", "JWKS_MAX_BYTES", "JWKS_MAX_STALE_S", "JWKS_MIN_REFETCH_S",
           "JWKS_TTL_S", "RemoteJwks"]

log = logging.getLogger(__name__)

#: Largest JWKS accepted: a handful of RSA/EC keys is a few KiB.
JWKS_MAX_BYTES = 64 * 1024
#: A JWKS fetch runs on the request path of a token check: it must be quick.
JWKS_DEADLINE_S = 5.0
#: How long fetched keys are used before they are fetched again.
JWKS_TTL_S = 300.0
#: Shortest time between two refetches caused by unknown kids, and between tries
#: while the IdP fails.
JWKS_MIN_REFETCH_S = 60.0
#: Longest time the last good keys stand in while the IdP cannot be reached.
JWKS_MAX_STALE_S = 24 * 3600.0
_PURPOSE = "the identity provider's JWKS"


class RemoteJwks:
    """A JWKS URL as a callable returning ``{"keys": [...]}``; :meth:`refresh` on rotation.

    Parameters
    ----------
    url : str
        The JWKS URL (``CLINFUSE_AUTH_JWKS_URL``): https, or a listed loopback http origin.
    outbound : Outbound
        The outbound policy; the URL's https origin is allowed for this fetch only.

    Raises
    ------
    ValueError
        At construction, when the URL is http and its origin is not listed.
    """

    def __init__(self, url: str, *, outbound: Outbound, ttl_s: float = JWKS_TTL_S,
                 min_refetch_s: float = JWKS_MIN_REFETCH_S,
                 max_stale_s: float = JWKS_MAX_STALE_S) -> None:
        try:
            self.outbound = outbound.with_endpoint(url)
        except ValueError as exc:
            raise ValueError(f"CLINFUSE_AUTH_JWKS_URL: {exc}") from None
        self.url = url
        self.ttl_s = ttl_s
        self.min_refetch_s = min_refetch_s
        self.max_stale_s = max_stale_s
        #: Fetch attempts so far (tests and diagnostics).
        self.fetches = 0
        self._keys: dict[str, Any] | None = None
        self._fetched_at = -math.inf  # last good fetch
        self._retry_at = -math.inf  # after a failed fetch, no new try before this
        self._refreshed_at = -math.inf  # last refetch caused by an unknown kid
        self._lock = threading.Lock()

    def __call__(self) -> dict[str, Any]:
        """The current keys: cached, fetched when expired, stale while the IdP fails."""
        with self._lock:
            now = time.monotonic()
            if self._keys is not None and now - self._fetched_at < self.ttl_s:
                return dict(self._keys)
            if self._keys is not None and now < self._retry_at:
                return self._stale(now)
            return self._fetch(now)

    def refresh(self) -> dict[str, Any]:
        """Fetch now because a token names an unknown kid, unless one did so recently."""
        with self._lock:
            now = time.monotonic()
            if now - self._refreshed_at < self.min_refetch_s and self._keys is not None:
                return dict(self._keys)
            self._refreshed_at = now
            return self._fetch(now)

    def _fetch(self, now: float) -> dict[str, Any]:
        self.fetches += 1
        try:
            with self.outbound.session(
                    _PURPOSE, deadline_s=min(JWKS_DEADLINE_S, self.outbound.deadline_s),
                    max_body_bytes=JWKS_MAX_BYTES) as session:
                data = session.get_json(self.url)
            keys = data.get("keys")
            if not isinstance(keys, list) or not all(isinstance(k, dict) for k in keys):
                raise ValueError("the JWKS has no 'keys' array of objects")
        except (OutboundError, ValueError) as exc:
            self._retry_at = now + self.min_refetch_s
            why = exc.reason if isinstance(exc, OutboundError) else str(exc)
            if self._keys is None:
                log.warning("JWKS fetch failed (%s); no keys to verify tokens with", why)
                raise AuthError(401, "the token issuer's signing keys cannot be fetched "
                                     "now; try again later") from None
            log.warning("JWKS fetch failed (%s); using the keys fetched %.0f s ago", why,
                        now - self._fetched_at)
            return self._stale(now)
        self._keys = {"keys": keys}
        self._fetched_at = now
        self._retry_at = -math.inf
        return dict(self._keys)

    def _stale(self, now: float) -> dict[str, Any]:
        if self._keys is None or now - self._fetched_at > self.max_stale_s:
            raise AuthError(401, "the token issuer's signing keys are out of date and cannot "
                                 "be fetched now; try again later")
        return dict(self._keys)
