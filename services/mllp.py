"""An HL7 v2 MLLP listener: a threaded TCP server answering one ACK per message.

MLLP frames a message as ``<VT> message <FS><CR>`` (0x0B ... 0x1C 0x0D). Each
frame goes through the same function as ``POST /hl7v2``
(:func:`services.record_store.ingest_hl7`), in its own database transaction, and
every message in it is answered by its own ACK frame, in order. Nothing a sender
does crashes the listener:

- bytes outside a frame, a frame cut short by a new ``<VT>``, or ``<FS>`` not
  followed by ``<CR>`` get a NAK (AR) and the reader resynchronises on the next
  ``<VT>``;
- a frame larger than the limit gets a NAK and the connection is closed, since
  the rest of it cannot be told apart from the next frame;
- a failure while storing (the database is down, say) gets a NAK (AE) telling the
  sender to resend; nothing of that frame is stored.

Logs name the peer and the acknowledgement codes, never message content.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import ssl
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from fhir_adapters.errors import Issue
from fhir_adapters.hl7v2 import build_ack
from services import record_store
from services.db import session_scope

__all__ = ["CR", "FS", "VT", "MllpServer", "frame", "hl7_handler"]

log = logging.getLogger(__name__)

VT, FS, CR = b"\x0b", b"\x1c", b"\x0d"
#: A frame's payload -> the ACK texts to send back, one per message.
Handler = Callable[[bytes], list[str]]

_RETRY = Issue("exception", "application internal error: the message was not stored; "
                            "send it again")


def frame(message: str | bytes) -> bytes:
    """``message`` wrapped in MLLP framing."""
    data = message.encode("utf-8") if isinstance(message, str) else message
    return VT + data + FS + CR


def _nak(payload: bytes, text: str) -> str:
    return build_ack(payload, "AR", Issue("structure", text))


def hl7_handler(sessions: sessionmaker[Session],
                after_commit: Callable[[], None] | None = None) -> Handler:
    """Ingest a frame's messages in one transaction; any failure answers AE for each."""

    def handle(payload: bytes) -> list[str]:
        try:
            with session_scope(sessions) as session:
                answers = record_store.ingest_hl7(session, payload)
        except Exception as exc:  # the listener answers; it never dies on a message
            log.error("MLLP: storing a message failed (%s); answered AE", type(exc).__name__)
            return [build_ack(payload, "AE", _RETRY)]
        if after_commit is not None:
            try:
                after_commit()
            except Exception as exc:
                log.warning("MLLP: after-commit hook failed (%s)", type(exc).__name__)
        return [a.ack for a in answers]

    return handle


class _Connection(socketserver.BaseRequestHandler):
    server: _TcpServer
    #: True while discarding bytes outside a frame that were already answered.
    in_junk = False

    def handle(self) -> None:
        listener = self.server.listener
        sock: socket.socket = self.request
        sock.settimeout(listener.idle_timeout_s)
        if isinstance(sock, ssl.SSLSocket):
            try:
                sock.do_handshake()
            except (OSError, ssl.SSLError) as exc:
                log.warning("MLLP: TLS handshake failed (%s)", type(exc).__name__)
                return
        listener.track(sock, add=True)
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        buffer = bytearray()
        try:
            while True:
                try:
                    chunk = sock.recv(65536)
                except OSError:
                    return  # idle timeout, reset or shutdown: the sender reconnects
                if not chunk:
                    return
                buffer += chunk
                if not self._drain(buffer, sock, peer):
                    return
        finally:
            listener.track(sock, add=False)

    def _send(self, sock: socket.socket, acks: list[str], peer: str) -> None:
        for ack in acks:
            sock.sendall(frame(ack))
        codes = [a.split("\r", 2)[1][4:6] if a.count("\r") >= 1 else "?" for a in acks]
        log.info("MLLP %s: answered %s", peer, ",".join(codes))

    def _drain(self, buffer: bytearray, sock: socket.socket, peer: str) -> bool:
        """Answer every complete frame in ``buffer``; False closes the connection."""
        listener = self.server.listener
        while buffer:
            # Line breaks between frames are common and harmless.
            stripped = buffer.lstrip(b"\r\n\t ")
            if len(stripped) != len(buffer):
                del buffer[:len(buffer) - len(stripped)]
                continue
            if buffer[:1] != VT:
                start = buffer.find(VT)
                junk = bytes(buffer if start < 0 else buffer[:start])
                del buffer[:len(junk)]
                if not self.in_junk:
                    # One NAK per run of junk, however many reads it arrives in.
                    self._send(sock, [_nak(junk, "data outside an MLLP frame (expected 0x0B "
                                                 "before the message); discarded")], peer)
                self.in_junk = start < 0
                continue
            self.in_junk = False
            end = buffer.find(FS, 1)
            if end < 0:
                if len(buffer) > listener.max_frame_bytes:
                    self._send(sock, [_nak(bytes(buffer[1:4096]), "MLLP frame exceeds the "
                                           f"limit of {listener.max_frame_bytes} bytes")], peer)
                    return False
                return True  # wait for the rest
            inner = buffer.find(VT, 1, end)
            if inner >= 0:
                cut = bytes(buffer[1:inner])
                del buffer[:inner]
                self._send(sock, [_nak(cut, "MLLP frame cut short: a new frame (0x0B) began "
                                            "before this one ended (0x1C 0x0D)")], peer)
                continue
            if end + 1 >= len(buffer):
                return True  # FS arrived; its CR has not yet
            payload = bytes(buffer[1:end])
            proper = buffer[end + 1:end + 2] == CR
            del buffer[:end + (2 if proper else 1)]
            if not proper:
                self._send(sock, [_nak(payload, "malformed MLLP frame: 0x1C not followed "
                                                "by 0x0D")], peer)
                continue
            try:
                acks = listener.handle(payload)
            except Exception as exc:  # a handler bug must not take the listener down
                log.error("MLLP %s: handler failed (%s)", peer, type(exc).__name__)
                acks = [build_ack(payload, "AE", _RETRY)]
            self._send(sock, acks, peer)
        return True


class _TcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    listener: MllpServer

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = self.socket.accept()
        context = self.listener.ssl_context
        if context is None:
            return sock, address
        # The handshake runs in the connection's own thread (first recv), so a slow or
        # hostile peer cannot stall the accept loop.
        return context.wrap_socket(sock, server_side=True,
                                   do_handshake_on_connect=False), address


class MllpServer:
    """The MLLP listener; ``port=0`` picks a free port (see :attr:`port` after start).

    Parameters
    ----------
    handle : Handler
        Frame payload -> ACK texts; :func:`hl7_handler` stores through the record store.
    host, port : str, int
        Where to listen.
    max_frame_bytes : int, default=16 MiB
        Larger frames get a NAK and the connection is closed.
    idle_timeout_s : float, default=300
        A connection silent this long is closed.
    """

    def __init__(self, handle: Handler, *, host: str = "127.0.0.1", port: int = 2575,
                 max_frame_bytes: int = 16 * 1024 * 1024, idle_timeout_s: float = 300.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.handle = handle
        #: MLLP over TLS (and client certificates, if the context requires them).
        self.ssl_context = ssl_context
        self.host = host
        self.requested_port = port
        self.max_frame_bytes = max_frame_bytes
        self.idle_timeout_s = idle_timeout_s
        self._server: _TcpServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the MLLP listener is not started")
        return int(self._server.server_address[1])

    def track(self, sock: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(sock)
            else:
                self._connections.discard(sock)

    def start(self) -> None:
        if self._server is not None:
            return
        server = _TcpServer((self.host, self.requested_port), _Connection)
        server.listener = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="mllp-listener",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, close open connections and wait for the accept loop to end."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            connections = list(self._connections)
        for sock in connections:
            with contextlib.suppress(OSError):  # already closed by the peer
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
