"""uvicorn's HTTP protocol with a deadline on each request's headers (slowloris).

uvicorn arms no timer on a new connection, and its keep-alive timer stops at the first
byte of the next request, so a client that sends a header line every few seconds holds
a connection (and a file descriptor) for as long as it likes: a few hundred such
clients take the server. The request-body deadline (services/api/body_limit.py) starts
only once the headers have arrived, so it does not cover this.

Here each connection gets ``timeout_s`` from its first byte (or from being accepted)
to the end of the request's headers; past it the connection is closed. The protocol
detects the end of the headers by uvicorn's own sign, a new request cycle, so the same
subclass serves the httptools and the h11 parser.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol

__all__ = ["DEFAULT_HEADER_TIMEOUT_S", "protocol_with_header_deadline"]

DEFAULT_HEADER_TIMEOUT_S = 10.0


def protocol_with_header_deadline(timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
                                  base: type[asyncio.Protocol] = AutoHTTPProtocol
                                  ) -> type[asyncio.Protocol]:
    """A subclass of uvicorn's ``base`` protocol closing connections slow to send headers."""
    if timeout_s <= 0:
        raise ValueError("the request header timeout must be positive")
    parent: Any = base

    class HeaderDeadlineProtocol(parent):  # type: ignore[misc]
        _header_timer: asyncio.TimerHandle | None = None
        _cycle_at_arm: object = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            idle = self.cycle is None or self.cycle.response_complete
            if self._header_timer is None and idle:
                self._arm()  # the first bytes of the next request on a kept-alive connection
            super().data_received(data)
            if self._header_timer is not None and self.cycle is not self._cycle_at_arm:
                self._disarm()  # a new request cycle: its headers are complete

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._cycle_at_arm = self.cycle
            self._header_timer = self.loop.call_later(timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.cycle is self._cycle_at_arm and not self.transport.is_closing():
                self.transport.close()

    HeaderDeadlineProtocol.__name__ = f"HeaderDeadline{base.__name__}"
    return HeaderDeadlineProtocol
