"""Prometheus labels stay a fixed set (issue 19, finding 11: metric-label growth).

Every HTTP method string used to become a ``method`` label, so unauthenticated requests
with made-up methods grew /metrics without bound (300 requests: 468 B to 582 KB).
Methods are now one of a fixed set or ``other``, and routes are templates or
``<unmatched>``, never a raw path.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.security.http_edge_support import edge_settings, run_in_fresh_loop, running

SERIES = re.compile(r"^clinfuse_http_request_duration_seconds_count\{([^}]*)\}", re.M)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with running(edge_settings(tmp_path)) as test_client:
        yield test_client


def _series(client: TestClient) -> tuple[set[str], int]:
    text = client.get("/metrics").text
    return set(SERIES.findall(text)), len(text)


def test_random_methods_and_paths_leave_metrics_bounded(client: TestClient) -> None:
    rng = random.Random(19)
    for path in ("/healthz", "/no-such-route", "/fhir/metadata"):
        client.get(path)
    baseline, baseline_size = _series(client)
    paths = ["/healthz", "/fhir/metadata", "/dicomweb/studies"]
    requests = []
    for _ in range(300):
        method = "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=rng.randint(3, 12)))
        noise = f"{rng.getrandbits(64):016x}"
        requests.append((method, rng.choice(
            [*paths, f"/x/{noise}", f"/fhir/Patient/{noise}/$nothing"])))

    async def send_all() -> None:
        # One event loop for all 300 (the test client would cross threads for each).
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            for method, path in requests:
                await c.request(method, path)

    run_in_fresh_loop(send_all())
    after, size = _series(client)
    grown = after - baseline
    # New series: at most method "other" on the few matched routes and "<unmatched>",
    # with the few statuses those answer (404, 405).
    assert len(grown) <= 12, sorted(grown)
    assert size - baseline_size < 20_000, (baseline_size, size)
    labels = " ".join(after)
    assert 'method="other"' in labels
    assert "/x/" not in labels and "$nothing" not in labels
    assert all(re.search(r'method="(GET|HEAD|POST|PUT|PATCH|DELETE|OPTIONS|other)"', s)
               for s in after), sorted(after)


def test_refused_host_and_body_are_counted_under_fixed_labels(client: TestClient) -> None:
    client.request("PURGE", "/healthz")
    client.get("/dashboard/login", headers={"Host": "attacker.example"})
    series, _ = _series(client)
    joined = " ".join(series)
    assert "attacker" not in joined
    assert 'method="other",route="/healthz",status="405"' in joined
