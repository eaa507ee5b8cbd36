"""Who may connect to the MLLP and DICOM listeners.

HL7 v2 and DICOM carry no user credentials: an ADT^A40 merge or a C-STORE is
trusted because of where it comes from. So a listener that binds anything but
loopback must authenticate its peers by one of two means before a byte of the
protocol is read:

- mutual TLS: a server certificate plus a client CA, so every peer presents a
  certificate signed by it (``ssl.CERT_REQUIRED``); or
- an allow-list of peer addresses and networks (CIDR), checked on accept.

Both may be set; then both apply. TLS without a client CA encrypts but does not
authenticate, so on its own it does not count.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.core.config import Settings

__all__ = ["ExposedListenerError", "PeerAllowList", "check_listener_settings",
           "check_peer_authentication", "is_loopback_host", "requires_client_certificates"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ExposedListenerError(ValueError):
    """A listener on a non-loopback address that would accept any peer."""


class PeerAllowList:
    """Peer addresses and networks (``"10.1.2.3"``, ``"10.20.0.0/16"``, ``"fd00::/8"``).

    Parameters
    ----------
    entries : iterable of str
        Addresses or CIDR networks; host bits are ignored (``10.1.2.3/24`` is ``10.1.2.0/24``).
    setting : str
        The setting the entries came from, named in the error for a bad entry.
    """

    def __init__(self, entries: Iterable[str], *, setting: str) -> None:
        self.setting = setting
        self.networks: list[Network] = []
        for entry in entries:
            try:
                self.networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                raise ValueError(f"{setting}: {entry!r} is not an IP address or a CIDR "
                                 "network (such as 10.20.0.0/16)") from None

    def __bool__(self) -> bool:
        return bool(self.networks)

    def allows(self, address: str) -> bool:
        """Whether a peer at ``address`` (as ``accept()`` reports it) may connect."""
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d.
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.networks)


def is_loopback_host(host: str) -> bool:
    """Whether binding ``host`` keeps a listener reachable from this machine only."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name, or "" (every address): assume it is reachable


def requires_client_certificates(context: ssl.SSLContext | None) -> bool:
    """Whether a server context makes every peer present a certificate its CA signed."""
    return (context is not None and context.verify_mode == ssl.CERT_REQUIRED
            and context.cert_store_stats().get("x509_ca", 0) > 0)


def check_peer_authentication(listener: str, host: str, context: ssl.SSLContext | None,
                              allowed: PeerAllowList, *, tls_setting: str) -> None:
    """Refuse to start ``listener`` on a non-loopback ``host`` that authenticates no peer.

    Raises
    ------
    ExposedListenerError
        Naming the settings that fix it: the allow-list, or mutual TLS.
    """
    if is_loopback_host(host) or allowed or requires_client_certificates(context):
        return
    raise ExposedListenerError(
        f"the {listener} would listen on {host!r}, which is not loopback, and accept any "
        f"peer: set {allowed.setting} to the addresses or CIDR networks allowed to connect, "
        "or require mutual TLS (CLINFUSE_TLS_CERTFILE, CLINFUSE_TLS_KEYFILE and "
        f"CLINFUSE_TLS_CLIENT_CA_FILE, with {tls_setting}=true), or bind loopback "
        "(CLINFUSE_HOST=127.0.0.1)")


def check_listener_settings(settings: Settings) -> None:
    """Apply :func:`check_peer_authentication` to the enabled MLLP and DICOM listeners.

    Run when the app is built, so a misconfigured deployment stops before anything
    starts; each listener checks again when it starts.
    """
    listeners = [("MLLP listener", settings.mllp_enabled, settings.mllp_tls,
                  settings.mllp_allowed_peers, "MLLP"),
                 ("C-STORE SCP", settings.dicom_scp_enabled, settings.dicom_tls,
                  settings.dicom_allowed_peers, "DICOM")]
    for name, enabled, tls, peers, prefix in listeners:
        if enabled:
            check_peer_authentication(
                name, settings.host, settings.tls_context() if tls else None,
                PeerAllowList(peers, setting=f"CLINFUSE_{prefix}_ALLOWED_PEERS"),
                tls_setting=f"CLINFUSE_{prefix}_TLS")
