"""Helpers for the outbound-request (SSRF) tests: scripted servers, fake DNS, recorders.

:class:`ScriptedServer` is a loopback HTTP/1.1 server (TLS optional) whose answer to
each path a test writes as a small function; it records every request it received,
so a test can show that a refused call never reached it. :class:`FakeDns` stands in
for ``socket.getaddrinfo`` for chosen names (a sequence of answers, to show that a
name is resolved once), and :class:`ConnectRecorder` for ``socket.create_connection``
(to show that no connection was even attempted, or to which address it went).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

Handler = Callable[[BaseHTTPRequestHandler], None]
_real_getaddrinfo = socket.getaddrinfo


def send(handler: BaseHTTPRequestHandler, status: int, body: bytes,
         content_type: str = "application/fhir+json",
         headers: dict[str, str] | None = None) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)


def send_json(handler: BaseHTTPRequestHandler, data: Any, status: int = 200) -> None:
    send(handler, status, json.dumps(data).encode())


def fhir_routes(patient_id: str = "p1") -> Handler:
    """A minimal FHIR server: the Patient, and an empty searchset for every search."""
    def answer(handler: BaseHTTPRequestHandler) -> None:
        if handler.path.startswith(f"/fhir/Patient/{patient_id}"):
            send_json(handler, {"resourceType": "Patient", "id": patient_id})
        else:
            send_json(handler, {"resourceType": "Bundle", "type": "searchset", "total": 0,
                                "entry": []})
    return answer


class ScriptedServer:
    """A threaded loopback HTTP server; ``handler`` answers every request."""

    def __init__(self, handler: Handler, *, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        #: Every request as "METHOD path" (with query), in arrival order.
        self.requests: list[str] = []
        #: The Host header of every request.
        self.hosts: list[str] = []
        server = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _any(self) -> None:
                server.requests.append(f"{self.command} {self.path}")
                server.hosts.append(self.headers.get("Host", ""))
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                # The client giving up mid-answer is what many tests want to see.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    server.handler(self)

            do_GET = do_POST = _any

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        if tls is not None:
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True)
        # A short poll interval: shutdown() waits for it, and the suite starts many.
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,),
                                        daemon=True, name="scripted-http-server")
        self.scheme = "https" if tls is not None else "http"

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def origin(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def trickle(body: bytes, every_s: float) -> Handler:
    """Headers at once, then the body one byte every ``every_s`` (a slow-read attack)."""
    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/fhir+json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        for i in range(len(body)):
            handler.wfile.write(body[i:i + 1])
            handler.wfile.flush()
            time.sleep(every_s)
    return answer


def chunked(body: bytes, chunk: int = 64 * 1024) -> Handler:
    """The body with chunked transfer encoding: no Content-Length announces its size."""
    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/fhir+json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        for start in range(0, len(body), chunk):
            piece = body[start:start + chunk]
            handler.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        handler.wfile.write(b"0\r\n\r\n")
    return answer


class FakeDns:
    """``socket.getaddrinfo`` with scripted answers for some names; the rest resolve.

    A name's answers are used in turn (the last one repeats), so a second lookup of a
    name can be made to answer differently, as a DNS-rebinding attacker would.
    """

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = {name: list(ips) for name, ips in answers.items()}
        #: Every scripted name looked up, once per lookup.
        self.asked: list[str] = []

    def __call__(self, host: Any, port: Any, family: int = 0, type: int = 0,
                 proto: int = 0, flags: int = 0) -> list[Any]:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name not in self.answers:
            return _real_getaddrinfo(host, port, family, type, proto, flags)
        self.asked.append(name)
        queue = self.answers[name]
        ip = queue.pop(0) if len(queue) > 1 else queue[0]
        if ":" in ip:
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, int(port), 0, 0))]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, int(port)))]


class ConnectRecorder:
    """``socket.create_connection`` that records the address and refuses at once."""

    def __init__(self) -> None:
        self.addresses: list[tuple[str, int]] = []

    def __call__(self, address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        self.addresses.append((str(address[0]), int(address[1])))
        raise ConnectionRefusedError(111, "Connection refused (test)")


def self_signed(tmp_path: Path, hostname: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting it) for a certificate for ``hostname``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path = tmp_path / f"{hostname}.crt"
    key_path = tmp_path / f"{hostname}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_path, key_path)
    client = ssl.create_default_context(cafile=str(cert_path))
    return server, client
