"""Every outbound HTTP call the service makes, under one policy.

clinfuse calls out to the EHR's FHIR server named in a CDS Hooks request
(``fhirServer``), to the hospital identity provider's JWKS, and to its token
endpoint (the dashboard's EHR launch). A URL that arrives in a request must not
turn the service into a proxy into the hospital network (SSRF), and a slow or
huge answer must not hold a request or the process. So every call goes through
:class:`Outbound`, which enforces:

- **Allow-list.** The URL's origin (``scheme://host:port``) must be on the list
  (setting ``outbound_allowed_origins``); an endpoint the operator configured (the
  JWKS URL, the token endpoint) adds its own https origin for its own calls
  (:meth:`Outbound.with_endpoint`). An unlisted origin is refused before any DNS
  lookup or connection.
- **https only.** http goes only to origins listed with ``http://``, and those must
  be loopback (test servers, a sidecar): a bearer token travels on these calls.
- **Pinned resolution.** A host name is resolved once per session and every
  connection of the session goes to that address (a DNS answer that changes
  between the check and the connection, DNS rebinding, is never used); TLS still
  verifies the certificate for the original name (SNI). Listed origins may resolve
  to private addresses, where hospital servers live, but loopback, link-local
  (169.254/16, the cloud metadata address, and fe80::/10), unspecified and
  multicast addresses are refused unless the origin is listed as such a literal
  address (``http://127.0.0.1:8080``, ``localhost``) or ``outbound_allow_loopback``
  is on.
- **No redirects.** A 3xx is an answer like any other non-success; it is never
  followed, so a listed server cannot bounce the call elsewhere.
- **Byte cap.** Response bodies stream under a cap (``outbound_max_body_bytes``;
  callers may lower it, e.g. 64 KiB for a JWKS).
- **One deadline.** A session has one deadline that covers everything in it:
  connecting, TLS, sending, headers and the body. Every socket operation gets only
  the time left, so a server that trickles a byte at a time is cut off at the
  deadline, not merely between requests.
- **Generic errors.** :class:`OutboundError`'s message names what was being reached
  and nothing else: no status code, exception type or remote text, which would make
  the service a port-scanning oracle. Details go to the log at DEBUG, with the
  origin but never the path or query (they carry patient ids).

Proxy settings from the environment are not used: a proxy would resolve the name
itself and undo the pinning.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import httpcore

if TYPE_CHECKING:
    from services.core.config import Settings

__all__ = ["DEFAULT_DEADLINE_S", "DEFAULT_MAX_BODY_BYTES", "Outbound", "OutboundError",
           "OutboundResponse", "OutboundSession", "check_allowed_origins", "normalize_origin",
           "origin_of"]

log = logging.getLogger(__name__)

#: Largest response body read by default (a page of FHIR search results is far less).
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
#: Default deadline of one session, in seconds (the CDS Hooks fetch's budget).
DEFAULT_DEADLINE_S = 15.0
_DEFAULT_PORTS = {"http": 80, "https": 443}
#: Request bodies are written in pieces, each with only the time left.
_WRITE_CHUNK = 64 * 1024
_READ_CHUNK = 64 * 1024

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: ``(host, port) -> addresses``, in preference order (default: ``socket.getaddrinfo``).
Resolver = Callable[[str, int], Sequence[str]]
Reason = Literal["not-allowed", "refused-address", "unreachable", "timeout", "too-large",
                 "bad-answer"]


class OutboundError(Exception):
    """An outbound call was refused or failed.

    ``message`` (also ``str(exc)``) may be shown to whoever caused the call: it
    names what was being reached, never a status code, exception or remote text.
    ``reason`` is a fixed code for logs and tests; do not echo it to callers either,
    since telling "timeout" from "unreachable" is itself an oracle.
    """

    def __init__(self, message: str, reason: Reason) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason


@dataclass(frozen=True)
class OutboundResponse:
    """A complete answer: status, headers (names lower-cased) and the capped body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


# ----------------------------------------------------------------------------- origins


def _host_text(host: str) -> str:
    """A host as it appears in an origin: IP literals canonical, IPv6 bracketed."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host.lower()
    return f"[{ip.compressed}]" if ip.version == 6 else ip.compressed


def _split(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL; ValueError naming the problem."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise ValueError("the URL is malformed (bad host or port)") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"the URL scheme must be http or https, not {scheme or 'none'!r}")
    host = parts.hostname or ""
    if not host:
        raise ValueError("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("the URL must not carry a user name or password")
    if not host.isascii():
        raise ValueError("the URL's host must be ASCII (use its punycode form)")
    return scheme, host.lower(), port if port is not None else _DEFAULT_PORTS[scheme]


def origin_of(url: str) -> str:
    """The canonical origin ``scheme://host:port`` of an http(s) URL (port always given)."""
    scheme, host, port = _split(url)
    return f"{scheme}://{_host_text(host)}:{port}"


def normalize_origin(text: str) -> str:
    """One allow-list entry, ``scheme://host[:port]``, in canonical form.

    Raises
    ------
    ValueError
        When the entry is not an http(s) origin, or carries a path, query or user.
    """
    try:
        parts = urlsplit(text.strip())
    except ValueError:
        raise ValueError(f"outbound origin {text!r} is malformed") from None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"outbound origin {text!r} must be scheme://host[:port] only, "
                         "without a path or query")
    try:
        return origin_of(text)
    except ValueError as exc:
        raise ValueError(f"outbound origin {text!r}: {exc}") from None


def _host_header(scheme: str, host: str, port: int) -> str:
    """The Host header for a URL's host: the name (not the pinned address), IPv6 bracketed,
    the port only when it is not the scheme's default (RFC 9110 7.2)."""
    text = _host_text(host)
    return text if _DEFAULT_PORTS[scheme] == port else f"{text}:{port}"


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":  # RFC 6761: always loopback
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_allowed_origins(entries: Iterable[str]) -> list[str]:
    """Validate and normalize an allow-list; http entries must be loopback.

    http carries bearer tokens in the clear, so it is allowed only to this machine
    (a test server, a sidecar proxy that does TLS onwards).
    """
    out: list[str] = []
    for entry in entries:
        origin = normalize_origin(entry)
        scheme, _, rest = origin.partition("://")
        host = rest.rsplit(":", 1)[0]
        if scheme == "http" and not _is_loopback_host(host):
            raise ValueError(f"outbound origin {entry!r}: http is allowed only to a loopback "
                             "address (127.0.0.1, [::1], localhost); use https")
        if origin not in out:
            out.append(origin)
    return out


# ----------------------------------------------------------------------------- addresses


def _special(ip: IPAddress) -> str | None:
    """Why connecting to ``ip`` is refused by default, or None for a usable address."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_unspecified or (ip.version == 4 and ip in ipaddress.ip_network("0.0.0.0/8")):
        return "unspecified"  # 0.0.0.0 reaches this host on Linux
    if ip.is_multicast:
        return "multicast"
    return None


def _system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


_ssl_lock = threading.Lock()
_default_ssl: ssl.SSLContext | None = None


def _default_ssl_context() -> ssl.SSLContext:
    """The same trust as httpx's default (certifi, or SSL_CERT_FILE), built once."""
    global _default_ssl
    with _ssl_lock:
        if _default_ssl is None:
            import httpx

            _default_ssl = httpx.create_ssl_context()
        return _default_ssl


# ----------------------------------------------------------------------------- policy


class Outbound:
    """The outbound policy: which origins, how long, how much; makes sessions.

    Parameters
    ----------
    allowed_origins : iterable of str
        ``scheme://host[:port]`` entries (see :func:`check_allowed_origins`).
    allow_loopback : bool
        Let listed origins resolve to loopback or link-local addresses (default off).
    max_body_bytes : int
        Largest response body a session reads, unless the session asks for less.
    deadline_s : float
        A session's deadline, unless the session asks for another.
    resolver : callable, optional
        ``(host, port) -> addresses``; default ``socket.getaddrinfo``.
    ssl_context : ssl.SSLContext, optional
        Trust for https; default httpx's (certifi, or ``SSL_CERT_FILE``).
    """

    def __init__(self, allowed_origins: Iterable[str] = (), *, allow_loopback: bool = False,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 deadline_s: float = DEFAULT_DEADLINE_S, resolver: Resolver | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.allowed_origins = frozenset(check_allowed_origins(allowed_origins))
        self.allow_loopback = allow_loopback
        self.max_body_bytes = max_body_bytes
        self.deadline_s = deadline_s
        self.resolver = resolver
        self.ssl_context = ssl_context
        self._endpoint_origins: frozenset[str] = frozenset()

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> Outbound:
        """The policy the settings describe (``outbound_*``)."""
        kwargs: dict[str, Any] = {
            "allow_loopback": settings.outbound_allow_loopback,
            "max_body_bytes": settings.outbound_max_body_bytes,
            "deadline_s": settings.outbound_deadline_s}
        kwargs.update(overrides)
        return cls(settings.outbound_allowed_origins, **kwargs)

    def with_endpoint(self, url: str, *, allow_http: bool = False) -> Outbound:
        """This policy, also allowing the origin of an endpoint the operator configured.

        A configured https endpoint (the JWKS URL, the token endpoint) states its own
        origin; an http one must already be listed explicitly (and so be loopback).
        ``allow_http`` is for this service's own address only (the built-in issuer's
        token endpoint, taken from the listening socket or the public URL, never from
        a request): it is reached the way the browser reached it.

        Raises
        ------
        ValueError
            When ``url`` is not an https URL and its origin is not listed.
        """
        origin = origin_of(url)
        if origin.startswith("http://") and not allow_http and \
                origin not in self.allowed_origins:
            raise ValueError(f"{url!r} is not https; an http endpoint must be a loopback "
                             "origin listed in CLINFUSE_OUTBOUND_ALLOWED_ORIGINS")
        copy = Outbound.__new__(Outbound)
        copy.__dict__.update(self.__dict__)
        copy._endpoint_origins = self._endpoint_origins | {origin}
        return copy

    def allows(self, url: str) -> bool:
        """Whether ``url``'s origin is on the allow-list (no lookup, no connection)."""
        try:
            origin = origin_of(url)
        except ValueError:
            return False
        return origin in self.allowed_origins or origin in self._endpoint_origins

    def session(self, purpose: str, *, deadline_s: float | None = None,
                max_body_bytes: int | None = None) -> OutboundSession:
        """A session for one piece of work; its deadline starts now.

        ``purpose`` names what is reached, for messages and the log: "the FHIR server".
        """
        return OutboundSession(self, purpose,
                               deadline_s=self.deadline_s if deadline_s is None else deadline_s,
                               max_body_bytes=min(self.max_body_bytes, max_body_bytes or
                                                  self.max_body_bytes))

    def request(self, method: str, url: str, *, purpose: str,
                headers: Mapping[str, str] | None = None, content: bytes | None = None,
                deadline_s: float | None = None, max_body_bytes: int | None = None
                ) -> OutboundResponse:
        """One request in a session of its own."""
        with self.session(purpose, deadline_s=deadline_s,
                          max_body_bytes=max_body_bytes) as session:
            return session.request(method, url, headers=headers, content=content)

    def _resolve(self, scheme: str, host: str, port: int) -> str:
        """The one address to connect to for ``host``; refuses special addresses."""
        origin = f"{scheme}://{_host_text(host)}:{port}"
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            candidates = [literal.compressed]
        else:
            resolver = self.resolver or _system_resolver
            try:
                candidates = list(resolver(host, port))
            except OSError as exc:
                raise _Failure("unreachable", f"no address ({type(exc).__name__})") from None
        addresses = []
        for text in candidates:
            try:
                addresses.append(ipaddress.ip_address(str(text).split("%", 1)[0]))
            except ValueError:
                raise _Failure("unreachable", "the resolver gave a non-address") from None
        if not addresses:
            raise _Failure("unreachable", "no address")
        # A literal loopback/link-local origin that is itself listed was asked for by name.
        listed_literal = (literal is not None or host == "localhost") and (
            origin in self.allowed_origins or origin in self._endpoint_origins)
        if not (self.allow_loopback or listed_literal):
            # Any special address refuses the name: a name that mixes a public and a
            # loopback answer is a rebinding attempt, not a server to talk to.
            for ip in addresses:
                kind = _special(ip)
                if kind is not None:
                    raise _Failure("refused-address", f"the name resolves to a {kind} address")
        return addresses[0].compressed


class _Failure(Exception):
    """Internal: a refusal or failure with its log detail (never shown to callers)."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# ----------------------------------------------------------------------------- session


class OutboundSession:
    """Requests under one deadline, with each host resolved once (pinned).

    Thread-safe: a CDS hook's searches run side by side in one session.
    """

    def __init__(self, policy: Outbound, purpose: str, *, deadline_s: float,
                 max_body_bytes: int) -> None:
        self.policy = policy
        self.purpose = purpose
        self.max_body_bytes = max_body_bytes
        self.deadline_s = deadline_s
        self.deadline = time.monotonic() + deadline_s
        self._pins: dict[tuple[str, int], str] = {}
        self._lock = threading.Lock()
        self._pool: httpcore.ConnectionPool | None = None

    # -- public -----------------------------------------------------------------------

    def __enter__(self) -> OutboundSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def check(self, url: str) -> None:
        """Refuse ``url`` (OutboundError ``not-allowed``) unless its origin is listed."""
        scheme, host, port = self._origin_parts(url)
        self._check_listed(scheme, host, port)

    def request(self, method: str, url: str, *, headers: Mapping[str, str] | None = None,
                content: bytes | None = None) -> OutboundResponse:
        """Send one request and read the whole (capped) answer, whatever its status.

        Raises
        ------
        OutboundError
            Refused (origin not listed, special address) or failed (unreachable,
            deadline passed, body over the cap, malformed answer); generic message.
        """
        scheme, host, port = self._origin_parts(url)
        origin = self._check_listed(scheme, host, port)
        started = time.monotonic()
        try:
            self._pin(scheme, host, port)
            return self._send(method, url, _host_header(scheme, host, port), headers or {},
                              content)
        except _Failure as exc:
            self._log(origin, exc.reason, exc.detail, started)
            raise self._error(exc.reason) from None
        except httpcore.TimeoutException:
            self._log(origin, "timeout", "deadline reached", started)
            raise self._error("timeout") from None
        except (httpcore.ProtocolError, httpcore.NetworkError, httpcore.UnsupportedProtocol,
                ssl.SSLError, OSError) as exc:
            reason: Reason = "timeout" if self.time_left() <= 0 else "unreachable"
            self._log(origin, reason, type(exc).__name__, started)
            raise self._error(reason) from None

    def get_json(self, url: str, *, headers: Mapping[str, str] | None = None
                 ) -> dict[str, Any]:
        """GET a JSON object; anything but a 200 with a JSON object is an OutboundError."""
        response = self.request("GET", url, headers=headers)
        return self.json_object(response, url)

    def json_object(self, response: OutboundResponse, url: str) -> dict[str, Any]:
        """The 200 answer's JSON object; otherwise a generic OutboundError (logged)."""
        origin = origin_of(url)
        if response.status != 200:
            self._log(origin, "bad-answer", f"status {response.status}", None)
            raise self._error("bad-answer")
        try:
            data = json.loads(response.body)
        except (ValueError, RecursionError):
            self._log(origin, "bad-answer", "not JSON", None)
            raise self._error("bad-answer") from None
        if not isinstance(data, dict):
            self._log(origin, "bad-answer", "not a JSON object", None)
            raise self._error("bad-answer")
        return data

    # -- internals ----------------------------------------------------------------------

    def _origin_parts(self, url: str) -> tuple[str, str, int]:
        try:
            return _split(url)
        except ValueError as exc:
            log.warning("outbound request to %s refused: %s", self.purpose, exc)
            raise self._error("not-allowed") from None

    def _check_listed(self, scheme: str, host: str, port: int) -> str:
        origin = f"{scheme}://{_host_text(host)}:{port}"
        policy = self.policy
        if origin not in policy.allowed_origins and origin not in policy._endpoint_origins:
            # An operator needs the origin to add it; it is not patient data.
            log.warning("outbound request to %s refused: origin %s is not in "
                        "CLINFUSE_OUTBOUND_ALLOWED_ORIGINS", self.purpose, origin)
            raise self._error("not-allowed")
        return origin

    def _error(self, reason: Reason) -> OutboundError:
        if reason == "not-allowed":
            return OutboundError(f"{self.purpose} is not one this service may call (its "
                                 "origin is not on the outbound allow-list)", reason)
        return OutboundError(f"{self.purpose} could not be reached or gave no usable "
                             "answer", reason)

    def _log(self, origin: str, reason: str, detail: str, started: float | None) -> None:
        took = "" if started is None else f" after {time.monotonic() - started:.2f} s"
        log.debug("outbound request to %s (%s) failed: %s, %s%s", self.purpose, origin,
                  reason, detail, took)

    def _pin(self, scheme: str, host: str, port: int) -> str:
        with self._lock:
            pinned = self._pins.get((host, port))
            if pinned is None:
                pinned = self.policy._resolve(scheme, host, port)
                self._pins[(host, port)] = pinned
            return pinned

    def _pinned(self, host: str, port: int) -> str:
        with self._lock:
            pinned = self._pins.get((host.strip("[]").lower(), port))
        if pinned is None:  # every request pins before it connects; never a fresh lookup
            raise _Failure("unreachable", "connection to an unpinned host")
        return pinned

    def _get_pool(self) -> httpcore.ConnectionPool:
        with self._lock:
            if self._pool is None:
                self._pool = httpcore.ConnectionPool(
                    ssl_context=self.policy.ssl_context or _default_ssl_context(),
                    network_backend=_PinnedBackend(self), retries=0, http1=True,
                    http2=False, max_connections=8)
            return self._pool

    def _send(self, method: str, url: str, host: str, headers: Mapping[str, str],
              content: bytes | None) -> OutboundResponse:
        left = self.time_left()
        if left <= 0:
            raise httpcore.PoolTimeout("deadline")
        sent = [(b"Host", host.encode("ascii")), (b"User-Agent", b"clinfuse"),
                *((k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()
                  if k.lower() != "host")]
        timeouts = {"connect": left, "read": left, "write": left, "pool": left}
        with self._get_pool().stream(method.encode("ascii"), url, headers=sent,
                                     content=content, extensions={"timeout": timeouts}
                                     ) as response:
            names = {k.decode("latin-1").lower(): v.decode("latin-1")
                     for k, v in response.headers}
            declared = names.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_body_bytes:
                raise _Failure("too-large", f"declared {declared} bytes")
            body = bytearray()
            for chunk in response.iter_stream():
                body += chunk
                if len(body) > self.max_body_bytes:
                    raise _Failure("too-large", f"over {self.max_body_bytes} bytes")
                if self.time_left() <= 0:
                    raise httpcore.ReadTimeout("deadline")
            return OutboundResponse(response.status, names, bytes(body))


# ----------------------------------------------------------------------------- network


class _PinnedBackend(httpcore.NetworkBackend):
    """Connects to the session's pinned address, within the session's deadline."""

    def __init__(self, session: OutboundSession) -> None:
        self._session = session
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        address = self._session._pinned(host, port)
        left = _left(self._session, timeout)
        stream = self._inner.connect_tcp(address, port, timeout=left,
                                         local_address=local_address,
                                         socket_options=socket_options)
        return _DeadlineStream(stream, self._session)

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None
                            ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are not used for outbound calls")

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, max(0.0, self._session.time_left())))


def _left(session: OutboundSession, timeout: float | None) -> float:
    """The time an operation may take: its own timeout, cut to the session's deadline."""
    left = session.time_left()
    if left <= 0:
        raise httpcore.ReadTimeout("deadline")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A stream whose every read, write and handshake ends by the session's deadline."""

    def __init__(self, inner: httpcore.NetworkStream, session: OutboundSession) -> None:
        self._inner = inner
        self._session = session

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(min(max_bytes, _READ_CHUNK), _left(self._session, timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        for start in range(0, len(buffer), _WRITE_CHUNK):
            self._inner.write(buffer[start:start + _WRITE_CHUNK],
                              _left(self._session, timeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        inner = self._inner.start_tls(ssl_context, server_hostname,
                                      _left(self._session, timeout))
        return _DeadlineStream(inner, self._session)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)
