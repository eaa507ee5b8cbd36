"""Load: patient-view CDS Hooks at an open-loop rate against a running `clinfuse serve`.

The server runs in its own process (the demo's model and cohort, SQLite, loopback),
and this process is the load generator. Requests are sent on a fixed schedule
(open loop: a slow answer does not delay the next request, so queueing shows up
in the latencies instead of hiding). Every patient is called once before the
measurement, so image and note embeddings are cached, as the issue asks.

Reports p50/p95/p99, errors, the server's RSS at the start and end of the run,
and the highest rate of a sweep that still meets p99 <= 500 ms with no errors.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from scripts.pg_cluster import free_port

DEMO_DIR = Path(os.environ.get("CLINFUSE_BENCH_DEMO_DIR", "/tmp/clinfuse-bench-demo"))


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def prefetch_from_bundle(bundle: dict[str, Any], templates: dict[str, str]) -> dict[str, Any]:
    """Fill the service's prefetch templates from one patient's FHIR Bundle."""
    by_type: dict[str, list[dict[str, Any]]] = {}
    for entry in bundle.get("entry", []):
        resource = entry.get("resource", {})
        by_type.setdefault(resource.get("resourceType", ""), []).append(resource)
    prefetch: dict[str, Any] = {}
    for key, template in templates.items():
        kind = re.split(r"[/?]", template, maxsplit=1)[0]
        if "?" not in template:
            found = by_type.get(kind, [])
            prefetch[key] = found[0] if found else None
        else:
            found = by_type.get(kind, [])
            prefetch[key] = {"resourceType": "Bundle", "type": "searchset",
                             "total": len(found),
                             "entry": [{"resource": r} for r in found]}
    return prefetch


def _start_server(env: dict[str, str], port: int, log_path: Path) -> subprocess.Popen[bytes]:
    log = log_path.open("wb")
    process = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "--host",
                                "127.0.0.1", "--port", str(port)], env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"the server exited; see {log_path}")
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"the server did not become ready; see {log_path}")


async def _open_loop(url: str, headers: dict[str, str], payloads: list[dict[str, Any]],
                     rate: float, seconds: float) -> tuple[list[float], int]:
    n = int(rate * seconds)
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
    async with httpx.AsyncClient(headers=headers, timeout=30, limits=limits) as client:
        async def one(i: int, at: float) -> None:
            nonlocal errors
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            body = dict(payloads[i % len(payloads)], hookInstance=str(uuid.uuid4()))
            started = time.perf_counter()
            try:
                response = await client.post(url, json=body)
                ok = response.status_code == 200 and response.json().get("cards")
            except (httpx.HTTPError, ValueError):
                ok = False
            latencies.append(time.perf_counter() - started)
            errors += not ok
        t0 = time.perf_counter() + 0.2
        await asyncio.gather(*(one(i, t0 + i / rate) for i in range(n)))
    return latencies, errors


def _wait_for_jobs(base: str, limit_s: float = 1800.0) -> float:
    """Wait until the background queue (the demo's initial predictions) is empty."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit_s:
        text = httpx.get(f"{base}/metrics", timeout=30).text
        pending = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                      if line.startswith("clinfuse_jobs{") and
                      ('status="queued"' in line or 'status="running"' in line))
        if pending == 0:
            return round(time.perf_counter() - started, 1)
        time.sleep(2.0)
    raise RuntimeError("the job queue did not drain")


async def _closed_loop(url: str, headers: dict[str, str], payloads: list[dict[str, Any]]
                       ) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    async with httpx.AsyncClient(headers=headers, timeout=120) as client:
        for payload in payloads:
            started = time.perf_counter()
            try:
                response = await client.post(url, json=dict(payload,
                                                            hookInstance=str(uuid.uuid4())))
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - started)
            errors += not ok
    return latencies, errors


def _summary(latencies: list[float]) -> dict[str, float]:
    a = np.asarray(latencies) * 1000
    return {"p50_ms": round(float(np.percentile(a, 50)), 1),
            "p95_ms": round(float(np.percentile(a, 95)), 1),
            "p99_ms": round(float(np.percentile(a, 99)), 1),
            "max_ms": round(float(a.max()), 1)}


def _stored_predictions(base: str) -> int:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("clinfuse_predictions{")))


def _sweep(url: str, headers: dict[str, str], payloads: list[dict[str, Any]],
           rates: tuple[float, ...], seconds: float) -> tuple[list[dict[str, Any]], float | None]:
    """Rising open-loop rates until one misses p99 <= 500 ms or has an error."""
    sweep: list[dict[str, Any]] = []
    best = None
    for rate in rates:
        lat, err = asyncio.run(_open_loop(url, headers, payloads, rate, seconds))
        point = {"rate_per_s": rate, "errors": err, **_summary(lat)}
        sweep.append(point)
        if err == 0 and point["p99_ms"] <= 500:
            best = rate
        else:
            break
    return sweep, best


def run(quick: bool = False) -> dict[str, Any]:
    from services.demo import prepare_service, service_environment

    patients, seconds = (60, 10.0) if quick else (300, 60.0)
    step = 5.0 if quick else 15.0
    out = DEMO_DIR.with_name(DEMO_DIR.name + ("-quick" if quick else ""))
    demo = prepare_service(out, patients=patients)
    env = {**os.environ, **service_environment(demo)}
    bundles = sorted((demo.cohort / "fhir").glob("*.json"))

    def serve(extra: dict[str, str], log_name: str) -> tuple[subprocess.Popen[bytes], str,
                                                                dict[str, str],
                                                                list[dict[str, Any]]]:
        port = free_port()
        server = _start_server({**env, **extra}, port, out / log_name)
        base = f"http://127.0.0.1:{port}"
        token = httpx.post(f"{base}/auth/token", data={
            "grant_type": "password", "username": "integration",
            "password": demo.passwords["integration"]}).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        discovery = httpx.get(f"{base}/cds-services", headers=headers).json()["services"]
        service = next(s for s in discovery if s["hook"] == "patient-view")
        payloads = []
        for bundle_path in bundles:
            bundle = json.loads(bundle_path.read_text())
            patient = next(e["resource"] for e in bundle["entry"]
                           if e["resource"]["resourceType"] == "Patient")
            payloads.append({"hook": "patient-view", "fhirServer": f"{base}/fhir",
                             "context": {"userId": "Practitioner/load", "patientId":
                                         patient["id"]},
                             "prefetch": prefetch_from_bundle(bundle,
                                                              service.get("prefetch", {}))})
        return server, f"{base}/cds-services/{service['id']}", headers, payloads

    def stop(server: subprocess.Popen[bytes]) -> None:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)

    # 1. The default settings: a chart opened again within prediction_reuse_s gets the
    # prediction made from the same data, so most hooks do not run the model.
    server, url, headers, payloads = serve({}, "load-server.log")
    base = url.split("/cds-services")[0]
    try:
        drained_s = _wait_for_jobs(base)
        # Warm-up: every patient once, one at a time, so embeddings and tensors are cached.
        warm, warm_errors = asyncio.run(_closed_loop(url, headers, payloads))
        rss_start = _rss_kb(server.pid)
        before = _stored_predictions(base)
        latencies, errors = asyncio.run(_open_loop(url, headers, payloads, 20.0, seconds))
        model_runs = _stored_predictions(base) - before
        rss_end = _rss_kb(server.pid)
        main = {"rate_per_s": 20.0, "seconds": seconds, "requests": len(latencies),
                "errors": errors, **_summary(latencies),
                "rss_start_mb": round(rss_start / 1024, 1),
                "rss_end_mb": round(rss_end / 1024, 1), "model_runs": model_runs}
        sweep, best = _sweep(url, headers, payloads, (5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0,
                                                      80.0), step)
    finally:
        stop(server)
    # 2. Reuse off (CLINFUSE_PREDICTION_REUSE_S=0): every hook ingests, predicts and
    # explains, the capacity when each chart opens on new data.
    server, url, headers, payloads = serve({"CLINFUSE_PREDICTION_REUSE_S": "0"},
                                           "load-server-no-reuse.log")
    try:
        _wait_for_jobs(url.split("/cds-services")[0])
        asyncio.run(_closed_loop(url, headers, payloads[:20]))
        sweep_off, best_off = _sweep(url, headers, payloads, (2.5, 5.0, 7.5, 10.0, 15.0, 20.0),
                                     step)
    finally:
        stop(server)
    goal = (main["p50_ms"] <= 150 and main["p99_ms"] <= 500 and main["errors"] == 0)
    return {"patients": len(payloads), "job_queue_drained_s": drained_s,
            "prediction_reuse_s": demo.settings.prediction_reuse_s,
            "warmup": {"requests": len(warm), "errors": warm_errors, **_summary(warm)},
            "open_loop_20rps": main, "sweep": sweep, "highest_rate_meeting_p99_500ms": best,
            "no_reuse": {"sweep": sweep_off, "highest_rate_meeting_p99_500ms": best_off},
            "goal_met": goal,
            "summary": (f"20 req/s x {seconds:.0f} s open loop: p50 {main['p50_ms']} ms, "
                        f"p99 {main['p99_ms']} ms, {main['errors']} errors, RSS "
                        f"{main['rss_start_mb']} -> {main['rss_end_mb']} MB, model ran for "
                        f"{model_runs} of {main['requests']} hooks (the rest reused a "
                        f"prediction from the same data, prediction_reuse_s="
                        f"{demo.settings.prediction_reuse_s:g}); highest rate with p99 <= "
                        f"500 ms: {best} req/s, {best_off} req/s with reuse off "
                        "(goal p50 <= 150, p99 <= 500)")}
