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

Framing is :mod:`services.mllp_framing` (linear in the bytes received). Who may
connect is decided on accept, before a byte is read: peers outside
``allowed_peers`` and connections beyond ``max_connections`` are closed unread,
and a listener on a non-loopback address refuses to start unless it has an
allow-list or requires client certificates (:mod:`services.peer_access`). Each
frame must arrive complete within ``idle_timeout_s`` of the previous one, so a
sender trickling bytes holds a connection no longer than a silent one.

Logs name the peer and the acknowledgement codes, never message content.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from fhir_adapters.errors import Issue
from fhir_adapters.hl7v2 import build_ack
from services import record_store
from services.db import session_scope
from services.mllp_framing import CR, FS, VT, MllpFramer, Refusal
from services.peer_access import PeerAllowList, check_peer_authentication

__all__ = ["CR", "FS", "VT", "MllpServer", "frame", "hl7_handler"]

log = logging.getLogger(__name__)

_PEERS_SETTING = "CLINFUSE_MLLP_ALLOWED_PEERS"
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

    def handle(self) -> None:
        listener = self.server.listener
        sock: socket.socket = self.request
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        # One deadline per frame, not per read: a sender trickling a byte at a time holds
        # the connection no longer than a silent one. It restarts with each frame answered.
        deadline = time.monotonic() + listener.idle_timeout_s
        if isinstance(sock, ssl.SSLSocket):
            # CPython bounds the whole handshake by the socket timeout, not each read of
            # it, so a peer trickling its ClientHello is cut off too.
            sock.settimeout(listener.idle_timeout_s)
            try:
                sock.do_handshake()
            except (OSError, ssl.SSLError) as exc:
                log.warning("MLLP %s: TLS handshake failed (%s)", peer, type(exc).__name__)
                return
        framer = MllpFramer(max_frame_bytes=listener.max_frame_bytes)
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.info("MLLP %s: no complete frame within %.0f s; closed", peer,
                             listener.idle_timeout_s)
                    return
                sock.settimeout(remaining)
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    continue  # the deadline check above closes it
                except OSError:
                    return  # reset or shutdown: the sender reconnects
                if not chunk:
                    return
                for event in framer.feed(chunk):
                    if isinstance(event, Refusal):
                        self._send(sock, [_nak(event.excerpt, event.reason)], peer)
                        if event.fatal:
                            return
                        continue
                    try:
                        acks = listener.handle(event.payload)
                    except Exception as exc:  # a handler bug must not take the listener down
                        log.error("MLLP %s: handler failed (%s)", peer, type(exc).__name__)
                        acks = [build_ack(event.payload, "AE", _RETRY)]
                    self._send(sock, acks, peer)
                    deadline = time.monotonic() + listener.idle_timeout_s
        except OSError:
            return  # the peer stopped reading its ACKs

    def _send(self, sock: socket.socket, acks: list[str], peer: str) -> None:
        for ack in acks:
            sock.sendall(frame(ack))
        codes = [a.split("\r", 2)[1][4:6] if a.count("\r") >= 1 else "?" for a in acks]
        log.info("MLLP %s: answered %s", peer, ",".join(codes))


class _TcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    listener: MllpServer

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = self.socket.accept()
        context = self.listener.ssl_context
        if context is None:
            return sock, address
        # No I/O here: the handshake runs in the connection's own thread, after
        # verify_request, so a slow, hostile or unlisted peer cannot stall the accept loop.
        return context.wrap_socket(sock, server_side=True,
                                   do_handshake_on_connect=False), address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit a connection, on the accept loop, before any byte of it is read."""
        return self.listener.admit(request, str(client_address[0]))

    def shutdown_request(self, request: Any) -> None:
        self.listener.release(request)
        super().shutdown_request(request)


class MllpServer:
    """The MLLP listener; ``port=0`` picks a free port (see :attr:`port` after start).

    Parameters
    ----------
    handle : Handler
        Frame payload -> ACK texts; :func:`hl7_handler` stores through the record store.
    host, port : str, int
        Where to listen. Any host but loopback needs ``allowed_peers`` or an
        ``ssl_context`` that requires client certificates (:mod:`services.peer_access`).
    max_frame_bytes : int, default=16 MiB
        Larger frames get a NAK and the connection is closed.
    idle_timeout_s : float, default=60
        Each frame must arrive complete within this long of the previous one (or of
        connecting); otherwise the connection is closed.
    max_connections : int, default=32
        Connections beyond this many are closed as soon as they are accepted.
    allowed_peers : sequence of str, default=()
        Peer addresses or CIDR networks allowed to connect; empty allows any peer.
    ssl_context : ssl.SSLContext, optional
        MLLP over TLS (and client certificates, if the context requires them).
    """

    def __init__(self, handle: Handler, *, host: str = "127.0.0.1", port: int = 2575,
                 max_frame_bytes: int = 16 * 1024 * 1024, idle_timeout_s: float = 60.0,
                 max_connections: int = 32, allowed_peers: Sequence[str] = (),
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.handle = handle
        self.ssl_context = ssl_context
        self.host = host
        self.requested_port = port
        self.max_frame_bytes = max_frame_bytes
        self.idle_timeout_s = idle_timeout_s
        self.max_connections = max_connections
        self.allowed_peers = allowed_peers
        self._peers = PeerAllowList((), setting=_PEERS_SETTING)
        self._server: _TcpServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the MLLP listener is not started")
        return int(self._server.server_address[1])

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    def admit(self, sock: socket.socket, address: str) -> bool:
        """Whether to serve a just-accepted connection; refused ones are closed unread."""
        if self._peers and not self._peers.allows(address):
            log.warning("MLLP: connection from %s refused: not in %s", address,
                        _PEERS_SETTING)
            return False
        with self._lock:
            if len(self._connections) >= self.max_connections:
                full = True
            else:
                full = False
                self._connections.add(sock)
        if full:
            log.warning("MLLP: connection from %s refused: %d connections are open "
                        "(CLINFUSE_MLLP_MAX_CONNECTIONS)", address, self.max_connections)
        return not full

    def release(self, sock: socket.socket) -> None:
        """Forget a connection that ended (or was refused)."""
        with self._lock:
            self._connections.discard(sock)

    def start(self) -> None:
        """Listen; raises :class:`~services.peer_access.ExposedListenerError` when a
        non-loopback host would accept any peer, and ValueError for a bad allow-list."""
        if self._server is not None:
            return
        self._peers = PeerAllowList(self.allowed_peers, setting=_PEERS_SETTING)
        check_peer_authentication("MLLP listener", self.host, self.ssl_context, self._peers,
                                  tls_setting="CLINFUSE_MLLP_TLS")
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
