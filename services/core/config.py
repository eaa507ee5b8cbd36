"""All service configuration, read from CLINFUSE_* environment variables."""

from __future__ import annotations

import ssl
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from pipelines.imaging.dicom_limits import DicomLimits


class Settings(BaseSettings):
    """The one place configuration is read. Nothing else reads os.environ."""

    model_config = SettingsConfigDict(env_prefix="CLINFUSE_", extra="ignore")

    #: demo enables the built-in issuer and local logins; production refuses both.
    environment: Literal["demo", "development", "production"] = "demo"
    #: SQLAlchemy URL. SQLite is the embedded default; PostgreSQL for deployments.
    database_url: str = "sqlite:///clinfuse.db"
    #: Where the DICOM store, keys and caches live (a persistent volume in deployment).
    data_dir: Path = Path("clinfuse-data")
    #: Address the HTTP, DICOM and MLLP listeners bind; loopback by default.
    host: str = "127.0.0.1"
    #: HTTP(S) port of the API.
    port: int = 8000
    #: Level of the JSON application log (never carries patient values).
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: Public base URL used in RetrieveURLs; defaults to the request's own.
    public_base_url: str | None = None
    #: Largest request body on the upload routes (STOW-RS, POST /fhir, $import, $predict,
    #: POST /hl7v2); larger ones get 413. Each is held in memory while it is parsed.
    max_upload_bytes: int = 256 * 1024 * 1024
    #: Largest request body on every other route, checked before authentication (413).
    max_request_bytes: int = 1024 * 1024
    #: Seconds a client has to send a whole request body on ordinary routes (408 after).
    request_body_timeout_s: float = 30.0
    #: Seconds a client has to send a whole body on the upload routes (408 after).
    upload_body_timeout_s: float = 600.0
    #: Seconds a client has from its first byte to the end of a request's headers;
    #: slower connections are closed (clients trickling header lines, "slowloris").
    request_header_timeout_s: float = 10.0
    #: Host names (the Host header) the API answers besides loopback, the host of
    #: public_base_url and a specific bound host; others get 400. "*.example.org" matches
    #: subdomains; "*" turns the check off.
    allowed_hosts: list[str] = []
    #: DIMSE C-STORE SCP, started with the service when enabled.
    dicom_scp_enabled: bool = False
    #: AE title of the C-STORE SCP.
    dicom_ae_title: str = "CLINFUSE"
    #: Port of the C-STORE SCP.
    dicom_port: int = 11112
    #: Calling AE titles allowed to associate; empty means none is allowed.
    dicom_allowed_aets: list[str] = []
    #: Largest DICOM dataset in bytes, measured after inflating the Deflated transfer
    #: syntax (a decompression-bomb cap): STOW-RS and C-STORE refuse a larger instance
    #: (status 0xA700), and reads stop inflating at it.
    dicom_max_dataset_bytes: int = 512 * 1024 * 1024
    #: Largest decoded pixel data of one instance in bytes (Rows x Columns x frames x
    #: samples x bytes per sample, and each JPEG/JPEG 2000 codestream's own size), checked
    #: before any decoding; STOW-RS and C-STORE refuse a larger instance (0xA700).
    dicom_max_pixel_bytes: int = 1024 * 1024 * 1024
    #: Past its first 16 MiB, a Deflated DICOM dataset may inflate to at most this many
    #: times its deflated size (clinical images deflate 2-20:1, a bomb of zeros 1000:1);
    #: 0 turns the ratio off, leaving the dataset cap.
    dicom_max_inflation_ratio: int = 100
    #: Peer addresses or CIDR networks allowed to connect to the C-STORE SCP; others are
    #: closed unread. Off loopback the SCP needs this or mutual TLS (a client CA), or it
    #: refuses to start: an AE title is no credential.
    dicom_allowed_peers: list[str] = []
    #: HL7 v2 MLLP listener (one ACK per message), started with the service when enabled.
    mllp_enabled: bool = False
    #: Port of the MLLP listener (2575 is HL7's registered port); it listens on ``host``.
    mllp_port: int = 2575
    #: Peer addresses or CIDR networks allowed to connect to the MLLP listener; others are
    #: closed unread. Off loopback the listener needs this or mutual TLS (a client CA), or
    #: it refuses to start: HL7 v2 carries no credentials.
    mllp_allowed_peers: list[str] = []
    #: Largest MLLP frame in bytes; a larger one gets a NAK (AR) and the connection closes.
    mllp_max_frame_bytes: int = 16 * 1024 * 1024
    #: Most MLLP connections open at once; more are closed as soon as they are accepted.
    mllp_max_connections: int = 32
    #: Each MLLP frame must arrive complete within this many seconds of the previous one
    #: (or of connecting), else the connection closes; the sender reconnects.
    mllp_idle_timeout_s: float = 60.0

    #: The model artifact served; None serves no predictions (ingest and PACS still work).
    model_path: Path | None = None
    #: Ed25519 public keys (PEM paths) trusted to have signed model artifacts.
    model_trusted_keys: list[Path] = []
    #: Directory for the model's caches (image tensors, sentence vectors, saliency).
    cache_dir: Path | None = None

    #: A CDS hook answers again with a prediction the same model made from the same record
    #: and imaging at most this many seconds ago; 0 makes every hook run the model.
    prediction_reuse_s: float = 300.0

    #: Freeze the start-up heap (libraries, model) out of the garbage collector once the
    #: model is warm: full collections then stop pausing requests. Off for test runs that
    #: build many apps in one process.
    gc_freeze_after_warm_up: bool = True

    #: How long a background job's lease lasts; a crashed worker's job runs again after it.
    job_lease_s: float = 300.0

    # -- access control: clinfuse is an OAuth 2.0 resource server -------------------
    #: The hospital identity provider's issuer (``iss``); None trusts only the built-in one.
    auth_issuer: str | None = None
    #: Where that issuer's public keys are: a JWKS URL, or a JWKS file.
    auth_jwks_url: str | None = None
    #: A JWKS file with the issuer's public keys (instead of a URL).
    auth_jwks_file: Path | None = None
    #: The ``aud`` every accepted token must carry.
    auth_audience: str = "clinfuse"
    #: The claim holding the clinfuse role (a string or a list of strings).
    auth_role_claim: str = "clinfuse_role"
    #: The built-in ES384 issuer (local users, registered SMART backend clients).
    #: Default: on in the demo environment only.
    auth_builtin_issuer: bool | None = None
    #: The ``iss`` of tokens from the built-in issuer.
    auth_builtin_issuer_id: str = "urn:clinfuse:builtin-issuer"
    #: Lifetime of tokens the built-in issuer signs, in seconds.
    auth_token_ttl_s: int = 3600
    #: The OAuth endpoints published in /.well-known/smart-configuration; default: built-in.
    auth_token_endpoint: str | None = None
    #: The authorization endpoint for SMART App Launch; default: built-in.
    auth_authorize_endpoint: str | None = None
    #: Failed local sign-ins per user name, within the window, before further tries of
    #: that name get 429 (checked before the password is hashed).
    sign_in_max_failures_per_user: int = 5
    #: Failed local sign-ins per client address, within the window, before 429.
    sign_in_max_failures_per_address: int = 20
    #: The window, in seconds, over which failed sign-ins are counted.
    sign_in_window_s: float = 900.0
    #: Dashboard cookies (session, CSRF, launch) carry Secure. Only a plain-http loopback
    #: demo sets false (``make demo`` does); production refuses false.
    session_cookie_secure: bool = True

    @model_validator(mode="after")
    def _secure_cookies_in_production(self) -> Settings:
        # A production dashboard is reached over https (directly or behind a proxy): a
        # session cookie without Secure would also be sent over any plain-http request.
        if self.environment == "production" and not self.session_cookie_secure:
            raise ValueError("session_cookie_secure=false is for a plain-http loopback demo; "
                             "production dashboards need Secure cookies (serve over https)")
        return self

    #: Access-log checkpoints: every N entries or every S seconds, whichever comes first.
    access_log_checkpoint_every: int = 100
    #: Longest time between two signed access-log checkpoints, in seconds.
    access_log_checkpoint_interval_s: float = 300.0
    #: A file each signed access-log checkpoint is also appended to (one JSON line), and
    #: that verification checks the database against; put it where the database's
    #: writers cannot rewrite it (append-only/WORM storage, another host). None: off.
    access_log_checkpoint_file: Path | None = None
    #: Secret for patient pseudonyms shown to compliance users; default: a key file.
    pseudonym_secret: str | None = None

    # -- outbound requests (services/outbound.py) -----------------------------------------
    #: Origins (``scheme://host[:port]``, a JSON list) the service may call: the EHRs'
    #: FHIR servers named as CDS Hooks ``fhirServer``; any other is refused. The https
    #: JWKS URL and token endpoint above allow their own origin for their own calls.
    #: http only to loopback (``http://127.0.0.1:8080``, test servers, a TLS sidecar).
    outbound_allowed_origins: list[str] = []
    #: Let listed host names resolve to loopback or link-local addresses (169.254/16,
    #: fe80::/10); off, only a listed literal loopback origin reaches this host.
    outbound_allow_loopback: bool = False
    #: Largest response body an outbound call reads (a JWKS: at most 64 KiB).
    outbound_max_body_bytes: int = 16 * 1024 * 1024
    #: One deadline in seconds for a whole outbound fetch: connect, headers and body, and
    #: all pages of a CDS hook's fetch (a JWKS fetch: at most 5 s).
    outbound_deadline_s: float = 15.0

    @field_validator("outbound_allowed_origins")
    @classmethod
    def _check_outbound_origins(cls, value: list[str]) -> list[str]:
        from services.outbound import check_allowed_origins

        return check_allowed_origins(value)

    # -- transport security ------------------------------------------------------------
    #: Server certificate and key (PEM) for HTTPS, MLLP over TLS and DICOM TLS.
    tls_certfile: Path | None = None
    #: The private key (PEM) of the server certificate.
    tls_keyfile: Path | None = None
    #: CA whose certificates MLLP and DICOM peers must present (mutual TLS); optional.
    tls_client_ca_file: Path | None = None
    #: HTTPS on the API when a certificate is configured.
    http_tls: bool = True
    #: DICOM TLS on the C-STORE SCP when a certificate is configured.
    dicom_tls: bool = True
    #: MLLP over TLS when a certificate is configured.
    mllp_tls: bool = True

    def tls_context(self) -> ssl.SSLContext | None:
        """The listeners' server TLS context, or None when no certificate is configured."""
        if self.tls_certfile is None and self.tls_keyfile is None:
            return None
        from services.tls import TLSConfigError, server_context

        if self.tls_certfile is None or self.tls_keyfile is None:
            raise TLSConfigError("set both CLINFUSE_TLS_CERTFILE and CLINFUSE_TLS_KEYFILE")
        return server_context(self.tls_certfile, self.tls_keyfile, self.tls_client_ca_file)

    def trusted_hosts(self) -> list[str]:
        """Every Host header value the HTTP API answers (TrustedHostMiddleware's list)."""
        from urllib.parse import urlsplit

        names = ["127.0.0.1", "localhost", "::1"]
        public = urlsplit(self.public_base_url).hostname if self.public_base_url else None
        if public:
            names.append(public)
        if self.host not in ("0.0.0.0", "::", ""):  # a wildcard bind has no one name
            names.append(self.host)
        # A Host header writes an IPv6 literal in brackets ("[::1]:8000").
        hosts = [f"[{n}]" if ":" in n else n for n in names] + self.allowed_hosts
        return list(dict.fromkeys(h.lower() for h in hosts))

    def dicom_limits(self) -> DicomLimits:
        """The DICOM dataset and pixel caps, for the store and every reader of it."""
        from pipelines.imaging.dicom_limits import DicomLimits

        return DicomLimits(max_dataset_bytes=self.dicom_max_dataset_bytes,
                           max_pixel_bytes=self.dicom_max_pixel_bytes,
                           max_inflation_ratio=self.dicom_max_inflation_ratio)

    @property
    def dicom_storage_dir(self) -> Path:
        return self.data_dir / "dicom"

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def builtin_issuer_enabled(self) -> bool:
        if self.auth_builtin_issuer is not None:
            return self.auth_builtin_issuer
        return self.environment == "demo"


@lru_cache
def get_settings() -> Settings:
    return Settings()
