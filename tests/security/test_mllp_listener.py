"""The MLLP listener: who may connect, how many, how long, and how large a frame.

HL7 v2 carries no credentials, so anyone who reached the port could send ADT^A40
merges and A11/A13 cancellations. Now a listener off loopback needs an allow-list
of peers or mutual TLS, refused peers are closed before a byte is read, and
frame size, connection count and the time to complete a frame are bounded.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.app import create_app
from services.core.config import Settings
from services.mllp import MllpServer, frame
from services.mllp_framing import VT
from services.peer_access import ExposedListenerError, PeerAllowList, is_loopback_host
from services.tls import client_context, server_context
from tests.services.certs import Pki, make_pki

ACK = "MSH|^~\\&|CLINFUSE|||||||ACK|1|P|2.5.1\rMSA|AA|1"
MESSAGE = frame("MSH|^~\\&|LAB|HOSP|CLINFUSE|CLINFUSE|20250102030400+0000||ADT^A01^ADT_A01|"
                "SEC-1|P|2.5.1\rPID|1||MRN-SEC-1^^^HOSP^MR||Doe^Jane||19500203|F\r")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@contextlib.contextmanager
def _listening(**kwargs: Any) -> Iterator[tuple[MllpServer, list[bytes]]]:
    received: list[bytes] = []

    def handle(payload: bytes) -> list[str]:
        received.append(payload)
        return [ACK]

    server = MllpServer(handle, port=0, **kwargs)
    server.start()
    try:
        yield server, received
    finally:
        server.stop()


def _answer(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Bytes up to the end of one ACK frame; b"" when the listener closed first."""
    sock.settimeout(timeout)
    data = b""
    while b"\x1c\r" not in data:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return data
        if not chunk:
            return data
        data += chunk
    return data


def _closed(sock: socket.socket, within: float) -> bool:
    """Whether the listener closed ``sock`` (unanswered) within ``within`` seconds."""
    sock.settimeout(within)
    try:
        return sock.recv(65536) == b""
    except TimeoutError:
        return False
    except OSError:
        return True  # reset


# --------------------------------------------------------------------------- start-up rule


@pytest.mark.parametrize("host", ["0.0.0.0", ""])
def test_a_public_listener_without_peer_authentication_refuses_to_start(host: str) -> None:
    server = MllpServer(lambda payload: [ACK], host=host, port=0)
    try:
        with pytest.raises(ExposedListenerError, match="CLINFUSE_MLLP_ALLOWED_PEERS") as error:
            server.start()
        assert "CLINFUSE_TLS_CLIENT_CA_FILE" in str(error.value)
        assert isinstance(error.value, ValueError)
    finally:
        server.stop()


def test_tls_without_client_certificates_is_not_peer_authentication(pki: Pki) -> None:
    server = MllpServer(lambda payload: [ACK], host="0.0.0.0", port=0,
                        ssl_context=server_context(pki.server_cert, pki.server_key))
    try:
        with pytest.raises(ExposedListenerError, match="CLINFUSE_MLLP_TLS"):
            server.start()
    finally:
        server.stop()


def test_the_app_refuses_a_public_mllp_listener_without_peer_authentication(
        tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                        data_dir=tmp_path / "data", host="0.0.0.0", mllp_enabled=True,
                        mllp_port=0)
    # Refused when the app is built, before any listener or worker has started.
    with pytest.raises(ExposedListenerError, match="CLINFUSE_MLLP_ALLOWED_PEERS"):
        create_app(settings)


def test_allow_list_entries_and_loopback_hosts() -> None:
    allowed = PeerAllowList(["10.20.0.0/16", " 192.0.2.7 ", "fd00::/8"],
                            setting="CLINFUSE_MLLP_ALLOWED_PEERS")
    assert allowed.allows("10.20.3.4") and allowed.allows("192.0.2.7")
    assert allowed.allows("::ffff:10.20.3.4")  # an IPv4 peer on a dual-stack socket
    assert allowed.allows("fd00::1")
    assert not allowed.allows("10.21.0.1") and not allowed.allows("127.0.0.1")
    assert not allowed.allows("not-an-address")
    with pytest.raises(ValueError, match=r"CLINFUSE_MLLP_ALLOWED_PEERS: '10\.0\.0\.0/33'"):
        PeerAllowList(["10.0.0.0/33"], setting="CLINFUSE_MLLP_ALLOWED_PEERS")
    assert all(map(is_loopback_host, ["127.0.0.1", "127.1.2.3", "::1", "localhost"]))
    assert not any(map(is_loopback_host, ["0.0.0.0", "", "::", "10.0.0.1", "mllp.example"]))


# --------------------------------------------------------------------------- allow-list, mTLS


def test_an_unlisted_peer_is_closed_unanswered() -> None:
    with _listening(allowed_peers=["10.0.0.0/8"]) as (server, received), \
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        with contextlib.suppress(OSError):  # the listener may already have closed it
            sock.sendall(MESSAGE)
        assert _answer(sock) == b""
    assert received == []
    with _listening(allowed_peers=["127.0.0.0/8"]) as (server, received), \
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(MESSAGE)
        assert b"MSA|AA|1" in _answer(sock)


def test_mutual_tls_on_a_public_address(pki: Pki) -> None:
    context = server_context(pki.server_cert, pki.server_key, pki.ca)
    with _listening(host="0.0.0.0", ssl_context=context) as (server, received):
        # Without a client certificate the handshake fails: no ACK, nothing handled.
        no_cert = client_context(pki.ca)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
            answer = b""
            with contextlib.suppress(ssl.SSLError, OSError), \
                    no_cert.wrap_socket(raw, server_hostname="localhost") as sock:
                sock.sendall(MESSAGE)
                answer = _answer(sock)
            assert answer == b""
        assert received == []
        with_cert = client_context(pki.ca, pki.client_cert, pki.client_key)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw, \
                with_cert.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(MESSAGE)
            assert b"MSA|AA|1" in _answer(sock)
        assert len(received) == 1


def _client_hello(context: ssl.SSLContext) -> bytes:
    """The bytes a TLS client opens with, taken from an in-memory handshake."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_a_trickled_tls_handshake_is_cut_off(pki: Pki) -> None:
    hello = _client_hello(client_context(pki.ca))
    context = server_context(pki.server_cert, pki.server_key, pki.ca)
    with _listening(ssl_context=context, idle_timeout_s=1.0) as (server, _), \
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        # A valid ClientHello, a byte every 0.1 s: each read is well inside any
        # per-read timeout, so only a deadline on the whole handshake ends it.
        started = time.monotonic()
        closed = False
        for byte in hello[:-1]:
            if time.monotonic() - started > 5:
                break
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            if _closed(sock, 0.1):
                closed = True
                break
        elapsed = time.monotonic() - started
    assert closed, f"a trickled handshake held the connection for {elapsed:.1f} s"
    assert elapsed < 3


# --------------------------------------------------------------------------- the app's limits


@pytest.fixture
def guarded_app(tmp_path: Path) -> Iterator[Any]:
    """MLLP on every address, allow-listed to loopback, with small limits."""
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                        data_dir=tmp_path / "data", host="0.0.0.0", mllp_enabled=True,
                        mllp_port=0, mllp_allowed_peers=["127.0.0.1/32", "::1"],
                        mllp_max_frame_bytes=4096, mllp_max_connections=2,
                        mllp_idle_timeout_s=2.0)
    app = create_app(settings)
    with TestClient(app):
        yield app


def _connect(app: Any) -> socket.socket:
    return socket.create_connection(("127.0.0.1", app.state.mllp.port), timeout=10)


def test_an_oversized_frame_gets_a_nak_and_the_connection_closes(guarded_app: Any) -> None:
    big = MESSAGE[:-2] + b"NTE|1||" + b"A" * 8192 + b"\r\x1c\r"
    with _connect(guarded_app) as sock:
        sock.sendall(MESSAGE)
        assert b"MSA|AA|SEC-1" in _answer(sock)
        with contextlib.suppress(OSError):
            sock.sendall(big)
        answer = _answer(sock)
        assert b"MSA|AR|SEC-1" in answer and b"exceeds the limit of 4096 bytes" in answer
        assert _closed(sock, 5)


def test_connections_beyond_the_limit_are_closed_at_once(guarded_app: Any) -> None:
    with _connect(guarded_app) as first, _connect(guarded_app) as second:
        with _connect(guarded_app) as third:
            assert _closed(third, 1.0)
        first.sendall(MESSAGE)
        assert b"MSA|AA|SEC-1" in _answer(first)
        second.close()
        # Once a slot frees up, a new connection is served.
        deadline = time.monotonic() + 5
        while guarded_app.state.mllp.open_connections > 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        with _connect(guarded_app) as fourth:
            fourth.sendall(MESSAGE)
            assert b"MSA|AA|SEC-1" in _answer(fourth)


def test_a_slowloris_sender_is_disconnected(guarded_app: Any) -> None:
    with _connect(guarded_app) as sock:
        started = time.monotonic()
        sock.sendall(VT + b"MSH|")
        closed = False
        # A byte every 0.2 s never lets a per-read timeout of 2 s fire; the frame deadline does.
        while not closed and time.monotonic() - started < 6:
            try:
                sock.sendall(b"A")
            except OSError:
                break
            closed = _closed(sock, 0.2)
        elapsed = time.monotonic() - started
    assert elapsed < 4, f"a trickling sender held the connection for {elapsed:.1f} s"


def test_frames_in_time_keep_a_connection_open(guarded_app: Any) -> None:
    with _connect(guarded_app) as sock:
        for _ in range(2):
            sock.sendall(MESSAGE)
            assert b"MSA|AA|SEC-1" in _answer(sock)
            time.sleep(1.2)  # over half the 2 s frame deadline, twice over
        sock.sendall(MESSAGE)
        assert b"MSA|AA|SEC-1" in _answer(sock)
