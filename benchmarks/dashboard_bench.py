"""Dashboard page loads on loopback with a seeded demo cohort (goal: every page <= 1 s).

The dashboard tests' seeded deployment (synthetic cohort, tiny signed model,
predictions by the service) is served by uvicorn on a loopback port; a client
signs in like a browser (session cookie, CSRF token) and times each page's full
response, the worklist over the whole cohort included. p50 and max over repeats,
after one warm-up request per page (the first slice request decodes the series).

``python -m benchmarks.dashboard_bench [--quick] [--seeded DIR]`` prints the JSON
result; ``--seeded`` reuses (a copy of) a deployment seeded earlier instead of
seeding a new one, which takes minutes.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

GOAL_S = 1.0


def run(quick: bool = False, seeded: Path | None = None) -> dict[str, Any]:
    import httpx
    import uvicorn

    from scripts.pg_cluster import free_port
    from services.app import create_app
    from tests.dashboard.seed import CLINICIAN, COMPLIANCE, copy_seeded, seed_demo

    n_patients, repeats = (60, 5) if quick else (150, 20)
    with tempfile.TemporaryDirectory(prefix="clinfuse-dashboard-bench-") as tmp:
        demo = (copy_seeded(seeded, Path(tmp)) if seeded is not None
                else seed_demo(Path(tmp), n_patients=n_patients, seed=5))
        n_patients = len(demo.patients)
        app = create_app(demo.settings)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                               log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        if getattr(app.state, "predictions", None) is None:
            app.state.predictions = demo.service
        base = f"http://127.0.0.1:{port}"
        pid = demo.featured[0]
        try:
            pages: dict[str, list[str]] = {
                "clinician": ["/dashboard/worklist", "/dashboard/worklist?sort=time&order=asc",
                              f"/dashboard/patients/{pid}",
                              f"/dashboard/patients/{pid}/series/{{series}}/slices/3.png"
                              "?window=lung",
                              f"/dashboard/patients/{pid}/model-input/3.png",
                              f"/dashboard/patients/{pid}/saliency/3.png",
                              "/dashboard/model-card"],
                "compliance": ["/dashboard/audits", "/dashboard/access-log"],
            }
            results: dict[str, dict[str, float]] = {}
            for role, user in (("clinician", CLINICIAN), ("compliance", COMPLIANCE)):
                with httpx.Client(base_url=base, timeout=30) as client:
                    form = client.get("/dashboard/login").text
                    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', form)
                    assert csrf is not None
                    client.post("/dashboard/login", data={"username": user[0],
                                                          "password": user[1],
                                                          "csrf": csrf.group(1)})
                    series = ""
                    if role == "clinician":
                        page = client.get(f"/dashboard/patients/{pid}").text
                        found = re.search(r'data-series="([0-9.]+)"', page)
                        series = found.group(1) if found else ""
                    for path in pages[role]:
                        url = path.replace("{series}", series)
                        response = client.get(url)  # warm-up
                        assert response.status_code == 200, (url, response.status_code)
                        times = []
                        for _ in range(repeats):
                            start = time.perf_counter()
                            client.get(url).raise_for_status()
                            times.append(time.perf_counter() - start)
                        key = re.sub(r"[0-9a-f]{32}", "{id}", path).replace("{series}", "")
                        results[key] = {"p50_ms": round(1000 * statistics.median(times), 1),
                                        "max_ms": round(1000 * max(times), 1)}
        finally:
            server.should_exit = True
            thread.join(timeout=30)
    worst = max(r["max_ms"] for r in results.values())
    return {"patients": n_patients, "repeats": repeats, "pages": results,
            "worst_ms": worst, "goal_ms": 1000 * GOAL_S, "met": worst <= 1000 * GOAL_S,
            "seed_timings_s": {k: round(v, 1) for k, v in demo.timings_s.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeded", type=Path, default=None)
    args = parser.parse_args()
    print(json.dumps(run(args.quick, args.seeded), indent=2))


if __name__ == "__main__":
    main()
