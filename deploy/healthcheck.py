"""Container health check: GET /healthz on the port the service itself listens on.

The image has no curl (fewer tools for an attacker), so Docker's HEALTHCHECK runs this
with the image's Python. Port and scheme come from the same Settings the service
reads (`clinfuse serve` speaks HTTPS when CLINFUSE_HTTP_TLS and a certificate are
set), so the probe cannot drift from the service's configuration.
"""

from __future__ import annotations

import ssl
import sys
import urllib.error
import urllib.request


def main() -> int:
    from services.core.config import Settings

    settings = Settings()
    context: ssl.SSLContext | None = None
    scheme = "http"
    if settings.http_tls and settings.tls_certfile is not None:
        scheme = "https"
        # Liveness, not identity: the certificate names the public host, not 127.0.0.1,
        # and the probe sends nothing secret, so it does not verify it.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    url = f"{scheme}://127.0.0.1:{settings.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=4, context=context) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        sys.stderr.write(f"{url}: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
