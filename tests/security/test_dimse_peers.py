"""The C-STORE SCP: an AE title is no credential, so who connects is checked too.

Off loopback the SCP needs an allow-list of peer addresses or TLS with client
certificates, besides the calling AE title; an unlisted peer is closed before a
byte is read, and no peer can stall the accept loop in a TLS handshake.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from services.app import create_app
from services.core.config import Settings
from services.db import make_engine, migrate, session_factory
from services.dicom_store import DicomStore
from services.dimse import StoreSCP
from services.peer_access import ExposedListenerError
from services.tls import client_context, server_context
from tests.services.certs import Pki, make_pki

CALLING = "SECTEST"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[DicomStore]:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine)
    yield DicomStore(tmp_path / "dicom", session_factory(engine))
    engine.dispose()


def _echo(port: int, tls: tuple[Any, str] | None = None, timeout: float = 5.0) -> bool:
    """Whether a C-ECHO association from 127.0.0.1 is accepted and answered."""
    ae = AE(ae_title=CALLING)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    assoc = ae.associate("127.0.0.1", port, ae_title="CLINFUSE",
                         **({"tls_args": tls} if tls else {}))
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return status is not None and status.Status == 0x0000
    finally:
        assoc.release()


@pytest.mark.parametrize("host", ["0.0.0.0", ""])
def test_a_public_scp_without_peer_authentication_refuses_to_start(store: DicomStore,
                                                                   host: str) -> None:
    scp = StoreSCP(store, host=host, port=0, allowed_calling_aets=[CALLING])
    try:
        with pytest.raises(ExposedListenerError, match="CLINFUSE_DICOM_ALLOWED_PEERS") as error:
            scp.start()
        assert "CLINFUSE_TLS_CLIENT_CA_FILE" in str(error.value)
    finally:
        scp.stop()


def test_the_app_refuses_a_public_scp_without_peer_authentication(tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                        data_dir=tmp_path / "data", host="0.0.0.0", dicom_scp_enabled=True,
                        dicom_port=0, dicom_allowed_aets=[CALLING])
    with pytest.raises(ExposedListenerError, match="CLINFUSE_DICOM_ALLOWED_PEERS"):
        create_app(settings)


def test_an_unlisted_peer_gets_no_association_whatever_its_ae_title(
        store: DicomStore) -> None:
    scp = StoreSCP(store, port=0, allowed_calling_aets=[CALLING],
                   allowed_peers=["10.0.0.0/8"])
    scp.start()
    try:
        assert not _echo(scp.port)
    finally:
        scp.stop()
    listed = StoreSCP(store, host="0.0.0.0", port=0, allowed_calling_aets=[CALLING],
                      allowed_peers=["127.0.0.1/32"])
    listed.start()
    try:
        assert _echo(listed.port)
    finally:
        listed.stop()


def test_mutual_tls_on_a_public_address(store: DicomStore, pki: Pki) -> None:
    scp = StoreSCP(store, host="0.0.0.0", port=0, allowed_calling_aets=[CALLING],
                   ssl_context=server_context(pki.server_cert, pki.server_key, pki.ca))
    scp.start()
    try:
        with_cert = client_context(pki.ca, pki.client_cert, pki.client_key)
        assert _echo(scp.port, (with_cert, "localhost"))
        assert not _echo(scp.port, (client_context(pki.ca), "localhost"))
    finally:
        scp.stop()
    tls_only = StoreSCP(store, host="0.0.0.0", port=0, allowed_calling_aets=[CALLING],
                        ssl_context=server_context(pki.server_cert, pki.server_key))
    try:
        with pytest.raises(ExposedListenerError, match="CLINFUSE_DICOM_TLS"):
            tls_only.start()
    finally:
        tls_only.stop()


def test_a_silent_peer_does_not_stall_the_tls_accept_loop(store: DicomStore, pki: Pki) -> None:
    scp = StoreSCP(store, port=0, allowed_calling_aets=[CALLING],
                   ssl_context=server_context(pki.server_cert, pki.server_key, pki.ca))
    scp.start()
    answered: list[bool] = []
    try:
        with socket.create_connection(("127.0.0.1", scp.port), timeout=10):
            # That connection never sends its ClientHello; a real modality comes next.
            with_cert = client_context(pki.ca, pki.client_cert, pki.client_key)
            worker = threading.Thread(
                target=lambda: answered.append(_echo(scp.port, (with_cert, "localhost"))),
                daemon=True)
            worker.start()
            worker.join(timeout=15)
        assert answered == [True], "the association waited behind a silent TLS peer"
    finally:
        scp.stop()
