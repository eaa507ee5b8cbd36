"""TLS on the HTTP API and the DICOM SCP, with certificates made for the test."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from pydicom.data import get_testdata_file

from scripts.pg_cluster import free_port
from services.app import create_app
from services.core.config import Settings
from services.dicom_store import DicomStore
from services.dimse import DimseError, Peer, StoreSCP, send_instances
from services.tls import TLSConfigError, client_context
from tests.services.certs import Pki, make_pki

CT = Path(str(get_testdata_file("CT_small.dcm")))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _settings(root: Path, pki: Pki, **extra: Any) -> Settings:
    return Settings(database_url=f"sqlite:///{root / 'db.sqlite'}", data_dir=root / "data",
                    tls_certfile=pki.server_cert, tls_keyfile=pki.server_key, **extra)


@pytest.fixture
def https_server(tmp_path: Path, pki: Pki) -> Iterator[str]:
    settings = _settings(tmp_path, pki)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           ssl_certfile=str(pki.server_cert),
                                           ssl_keyfile=str(pki.server_key),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "HTTPS server did not start"
        time.sleep(0.05)
    yield f"https://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_https_verifies_against_the_ca_and_refuses_plain_http(https_server: str,
                                                              pki: Pki) -> None:
    response = httpx.get(f"{https_server}/healthz", verify=client_context(pki.ca))
    assert response.status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{https_server}/healthz", verify=ssl.create_default_context())
    with pytest.raises(httpx.HTTPError):
        httpx.get(https_server.replace("https", "http") + "/healthz", timeout=5)


def test_dicom_tls_store_with_mutual_tls(tmp_path: Path, pki: Pki) -> None:
    settings = _settings(tmp_path, pki, tls_client_ca_file=pki.ca)
    from services.db import make_engine, migrate, session_factory

    engine = make_engine(settings.database_url)
    migrate(engine)
    store = DicomStore(settings.dicom_storage_dir, session_factory(engine))
    scp = StoreSCP(store, port=0, allowed_calling_aets=["TLSSCU"],
                   ssl_context=settings.tls_context())
    scp.start()
    try:
        peer = Peer("127.0.0.1", scp.port, "CLINFUSE")
        with_cert = client_context(pki.ca, pki.client_cert, pki.client_key)
        assert send_instances(peer, [CT.read_bytes()], calling_aet="TLSSCU",
                              tls=(with_cert, "localhost")) == [0]
        assert len(store.find(SOPInstanceUID=_uid(CT))) == 1
        # Without a client certificate the handshake fails: no association.
        with pytest.raises(DimseError):
            send_instances(peer, [CT.read_bytes()], calling_aet="TLSSCU",
                           tls=(client_context(pki.ca), "localhost"))
        # Plain DICOM to a TLS port gets no association either.
        with pytest.raises(DimseError):
            send_instances(peer, [CT.read_bytes()], calling_aet="TLSSCU")
    finally:
        scp.stop()
        engine.dispose()


def test_half_configured_tls_is_a_clear_error(tmp_path: Path, pki: Pki) -> None:
    settings = Settings(data_dir=tmp_path, tls_certfile=pki.server_cert)
    with pytest.raises(TLSConfigError, match="CLINFUSE_TLS_KEYFILE"):
        settings.tls_context()
    missing = Settings(data_dir=tmp_path, tls_certfile=tmp_path / "nope.pem",
                       tls_keyfile=pki.server_key)
    with pytest.raises(TLSConfigError, match="does not exist"):
        missing.tls_context()


def _uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_mllp_over_tls(tmp_path: Path, pki: Pki) -> None:
    import socket

    from services.mllp import MllpServer, frame

    received: list[bytes] = []

    def handle(payload: bytes) -> list[str]:
        received.append(payload)
        return ["MSH|^~\\&|CLINFUSE|||||||ACK|1|P|2.5.1\rMSA|AA|1"]

    settings = _settings(tmp_path, pki)
    server = MllpServer(handle, port=0, ssl_context=settings.tls_context())
    server.start()
    try:
        context = client_context(pki.ca)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(frame("MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5.1\rPID|1"))
            answer = sock.recv(65536)
        assert answer.startswith(b"\x0b") and b"MSA|AA|1" in answer
        assert received and received[0].startswith(b"MSH|")
        # A plain-text MLLP peer gets no answer from a TLS listener.
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as plain:
            plain.sendall(frame("MSH|^~\\&|A|B|C|D|20240101||ADT^A01|2|P|2.5.1\rPID|1"))
            plain.settimeout(5)
            try:
                data = plain.recv(65536)
            except OSError:
                data = b""
        assert b"MSA" not in data
    finally:
        server.stop()
