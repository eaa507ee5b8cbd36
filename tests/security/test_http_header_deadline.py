"""Slow request headers (slowloris) close the connection (issue 19, beyond the list).

uvicorn arms no timer until a request's headers are complete, so a client trickling
header lines held a connection indefinitely; the body deadline starts only after the
headers. ``clinfuse serve`` and the demo now run uvicorn with
:func:`services.http_protocol.protocol_with_header_deadline`. Tested against a real
uvicorn server on loopback, with both of its HTTP parsers.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from services.http_protocol import protocol_with_header_deadline

DEADLINE_S = 0.8
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: abc\r\n\r\n"


async def _hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def _parsers() -> list[Any]:
    parsers: list[Any] = [pytest.param(H11Protocol, id="h11")]
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools is optional for uvicorn; h11 is always there
        return parsers
    return [*parsers, pytest.param(HttpToolsProtocol, id="httptools")]


@contextmanager
def _server(protocol: type[asyncio.Protocol]) -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(_hello, http=protocol, log_config=None, access_log=False,
                            lifespan="off", timeout_keep_alive=30)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def _trickle(conn: socket.socket, data: bytes, every_s: float, for_s: float) -> float:
    """Send ``data`` a byte every ``every_s`` until closed or ``for_s``; seconds it lasted."""
    started = time.monotonic()
    for byte in data:
        if time.monotonic() - started > for_s:
            break
        try:
            conn.sendall(bytes([byte]))
        except OSError:
            break
        conn.settimeout(every_s)
        try:
            if conn.recv(1024) == b"":
                break
        except TimeoutError:
            continue
        except OSError:
            break
    return time.monotonic() - started


@pytest.mark.parametrize("parser", _parsers())
def test_trickled_headers_are_cut_off_at_the_deadline(parser: type[asyncio.Protocol]
                                                      ) -> None:
    with _server(protocol_with_header_deadline(DEADLINE_S, base=parser)) as port, \
            socket.create_connection(("127.0.0.1", port)) as conn:
        lasted = _trickle(conn, REQUEST * 4, every_s=0.1, for_s=6.0)
    assert lasted < DEADLINE_S + 0.7, lasted


def test_uvicorn_alone_keeps_a_trickling_client() -> None:
    # The finding: without the deadline the same client is still connected after 2 s.
    with _server(H11Protocol) as port, socket.create_connection(("127.0.0.1", port)) as conn:
        lasted = _trickle(conn, REQUEST * 4, every_s=0.1, for_s=2.0)
    assert lasted >= 2.0, lasted


@pytest.mark.parametrize("parser", _parsers())
def test_prompt_requests_on_a_kept_alive_connection_are_answered(
        parser: type[asyncio.Protocol]) -> None:
    with _server(protocol_with_header_deadline(DEADLINE_S, base=parser)) as port, \
            socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        for _ in range(2):
            conn.sendall(REQUEST)
            assert conn.recv(4096).startswith(b"HTTP/1.1 200")
            time.sleep(DEADLINE_S + 0.3)  # idle between requests is keep-alive's business
        # A slow second-or-later request on the same connection is cut off too.
        lasted = _trickle(conn, REQUEST * 4, every_s=0.1, for_s=6.0)
    assert lasted < DEADLINE_S + 0.7, lasted


def test_a_silent_connection_is_closed() -> None:
    with _server(protocol_with_header_deadline(DEADLINE_S)) as port, \
            socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        started = time.monotonic()
        assert conn.recv(1) == b""
        assert time.monotonic() - started < DEADLINE_S + 0.7


def test_the_deadline_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        protocol_with_header_deadline(0)
