"""DIMSE networking with pynetdicom: the C-STORE SCP, and C-FIND/C-MOVE/C-GET to fetch.

The SCP accepts only allow-listed calling AE titles and answers C-ECHO. An AE
title is no credential, so off loopback the SCP also needs an allow-list of peer
addresses or TLS with client certificates (:mod:`services.peer_access`). Every
received instance goes through the same ``DicomStore`` as STOW-RS, so both
paths share the duplicate, conflict and crash-safety rules.
"""

from __future__ import annotations

import io
import logging
import socket
import ssl
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pynetdicom import AE, AllStoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from pipelines.imaging.dicom_limits import read_part10
from services.dicom_store import DicomStore, StoreResult, StoreStatus
from services.peer_access import PeerAllowList, check_peer_authentication

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000


def _status_for(result: StoreResult) -> int:
    if result.status is StoreStatus.FAILED:
        return result.code or 0xC000
    if result.status is StoreStatus.CONFLICT:
        return result.code or 0xB000
    return STATUS_SUCCESS


def encoded_instance(event: Any) -> bytes:
    """The received dataset as Part-10 bytes, exactly as the peer encoded it."""
    return bytes(event.encoded_dataset(include_meta=True))


_PEERS_SETTING = "CLINFUSE_DICOM_ALLOWED_PEERS"


class _GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, checking who connects before reading a byte.

    A peer outside the allow-list is closed on accept. pynetdicom would also run
    the TLS handshake on the accept loop, with no timeout, so one silent peer could
    stall every association; here it runs in the association's own thread, bounded
    by the AE's network timeout.
    """

    peers: PeerAllowList

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        sock, address = self.socket.accept()
        if self.peers and not self.peers.allows(str(address[0])):
            log.warning("C-STORE SCP: connection from %s refused: not in %s", address[0],
                        _PEERS_SETTING)
            sock.close()
            raise OSError("peer not allowed")  # socketserver drops the request
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(sock, server_side=True,
                                                do_handshake_on_connect=False)
        return sock, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            previous = request.gettimeout()
            request.settimeout(self.ae.network_timeout)
            try:
                request.do_handshake()
            except (OSError, ssl.SSLError) as exc:
                log.warning("C-STORE SCP %s: TLS handshake failed (%s)", client_address[0],
                            type(exc).__name__)
                self.shutdown_request(request)
                return
            request.settimeout(previous)
        super().process_request_thread(request, client_address)


@dataclass
class StoreSCP:
    """A C-STORE SCP (with C-ECHO) feeding a DicomStore."""

    store: DicomStore
    ae_title: str = "CLINFUSE"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_calling_aets: list[str] = field(default_factory=list)
    #: Peer addresses or CIDR networks allowed to connect; empty allows any address. Off
    #: loopback this or a context requiring client certificates is mandatory.
    allowed_peers: list[str] = field(default_factory=list)
    #: DICOM TLS (PS3.15 B.1): with a context, only TLS associations are accepted.
    ssl_context: ssl.SSLContext | None = None
    _server: ThreadedAssociationServer | None = None

    def start(self) -> None:
        """Listen; raises :class:`~services.peer_access.ExposedListenerError` when a
        non-loopback host would accept any peer (the AE title is no credential)."""
        peers = PeerAllowList(self.allowed_peers, setting=_PEERS_SETTING)
        check_peer_authentication("C-STORE SCP", self.host, self.ssl_context, peers,
                                  tls_setting="CLINFUSE_DICOM_TLS")
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        # An empty allow-list would let anyone in with pynetdicom's default, so keep a
        # sentinel that no real AE title can match (AE titles are at most 16 characters).
        ae.require_calling_aet = list(self.allowed_calling_aets) or ["\\no-peer-allowed\\"]
        ae.maximum_pdu_size = 0
        handlers: list[Any] = [(evt.EVT_C_STORE, self._on_store),
                                (evt.EVT_C_ECHO, lambda e: 0x0000)]
        # ae.start_server(block=False), with a server class that checks the peer on
        # accept; the allow-list is set before the accept loop runs.
        server = ae.make_server((self.host, self.port), evt_handlers=handlers,
                                ssl_context=self.ssl_context,
                                server_class=_GuardedAssociationServer)
        assert isinstance(server, _GuardedAssociationServer)
        server.peers = peers
        ae._servers.append(server)  # AssociationServer.shutdown() removes it
        threading.Thread(target=server.serve_forever, name="dicom-scp-listener",
                         daemon=True).start()
        self._server = server
        self.port = int(server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_store(self, event: Any) -> int:
        # The raw bytes, never event.dataset: pydicom would inflate a deflated dataset
        # whole; the store reads it under its caps and answers 0xA700 over them.
        try:
            data = encoded_instance(event)
        except Exception as exc:
            log.warning("C-STORE: could not decode the received dataset (%s)",
                        type(exc).__name__)
            return 0xC000
        result = self.store.store(data)
        if result.status is StoreStatus.FAILED:
            log.warning("C-STORE from %s refused: %s", event.assoc.requestor.ae_title,
                        result.reason)
        return _status_for(result)


# -- fetching from a PACS ---------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """A remote DICOM node."""

    host: str
    port: int
    ae_title: str


class DimseError(RuntimeError):
    pass


def _associate(ae: AE, peer: Peer, **kwargs: Any) -> Any:
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, **kwargs)
    if not assoc.is_established:
        raise DimseError(f"association with {peer.ae_title} at {peer.host}:{peer.port} "
                         "was rejected or failed")
    return assoc


def find_studies(peer: Peer, patient_id: str, *, calling_aet: str = "CLINFUSE") -> list[str]:
    """C-FIND at study level: StudyInstanceUIDs of a patient's studies."""
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = patient_id
    query.StudyInstanceUID = ""
    assoc = _associate(ae, peer)
    uids: list[str] = []
    try:
        for status, identifier in assoc.send_c_find(query,
                                                    StudyRootQueryRetrieveInformationModelFind):
            if status is None:
                raise DimseError("C-FIND: the peer did not answer")
            if status.Status in (0xFF00, 0xFF01) and identifier is not None:
                uids.append(str(identifier.StudyInstanceUID))
            elif status.Status not in (0x0000, 0xFF00, 0xFF01):
                raise DimseError(f"C-FIND failed with status 0x{status.Status:04X}")
    finally:
        assoc.release()
    return uids


def move_study(peer: Peer, study_uid: str, destination_aet: str, *,
               calling_aet: str = "CLINFUSE") -> int:
    """C-MOVE a study to ``destination_aet``; returns the number of completed sub-operations."""
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    assoc = _associate(ae, peer)
    completed, final = 0, None
    try:
        for status, _ in assoc.send_c_move(query, destination_aet,
                                           StudyRootQueryRetrieveInformationModelMove):
            if status is None:
                raise DimseError("C-MOVE: the peer did not answer")
            final = status.Status
            completed = int(status.get("NumberOfCompletedSuboperations", completed) or completed)
    finally:
        assoc.release()
    if final not in (0x0000, 0xB000):
        raise DimseError(f"C-MOVE ended with status 0x{(final or 0):04X}")
    return completed


def get_study(peer: Peer, study_uid: str, store: DicomStore, *,
              calling_aet: str = "CLINFUSE") -> list[StoreResult]:
    """C-GET a study over one association, storing what arrives."""
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    roles = []
    # One association carries at most 128 presentation contexts, one of them the C-GET model.
    for context in AllStoragePresentationContexts[:120]:
        syntax = str(context.abstract_syntax)
        ae.add_requested_context(syntax)
        roles.append(build_role(syntax, scp_role=True))
    results: list[StoreResult] = []
    lock = threading.Lock()

    def on_store(event: Any) -> int:
        result = store.store(encoded_instance(event))
        with lock:
            results.append(result)
        return _status_for(result)

    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    assoc = _associate(ae, peer, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
            if status is None:
                raise DimseError("C-GET: the peer did not answer")
    finally:
        assoc.release()
    return results


def send_instances(peer: Peer, payloads: Iterable[bytes], *,
                   calling_aet: str = "CLINFUSE",
                   tls: tuple[ssl.SSLContext, str] | None = None) -> list[int]:
    """C-STORE Part-10 instances to a peer over one association; returns the statuses."""
    # Bounded like every other reader: a deflated payload inflates only up to the cap.
    datasets = [read_part10(p) for p in payloads]
    ae = AE(ae_title=calling_aet)
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        syntaxes = sorted({str(ds.file_meta.TransferSyntaxUID) for ds in datasets})
        ae.add_requested_context(sop_class, syntaxes)
    assoc = _associate(ae, peer, **({"tls_args": tls} if tls else {}))
    statuses: list[int] = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            statuses.append(int(status.Status) if status else -1)
    finally:
        assoc.release()
    return statuses


def fetch_dicomweb(url: str, patient_id: str, store: DicomStore) -> list[StoreResult]:
    """Retrieve a patient's studies from a DICOMweb server (QIDO then WADO) into the store."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=url)
    results: list[StoreResult] = []
    for study in client.search_for_studies(search_filters={"PatientID": patient_id}):
        study_uid = study["0020000D"]["Value"][0]
        for ds in client.retrieve_study(study_uid):
            buffer = io.BytesIO()
            dcmwrite(buffer, ds, enforce_file_format=True)
            results.append(store.store(buffer.getvalue()))
    return results
