"""Fixtures for the dashboard tests: a seeded service on loopback and Debian's Chromium.

The service runs under uvicorn in a thread of the test process, so the tests can
read its database directly (the feedback flow checks the stored row). The browser
is Debian's ``chromium`` (installed with apt-get when missing, as the Orthanc
fixture does), driven headless by pytest-playwright; Playwright's own browser
download is never used, since the test machines are offline.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_service

CHROMIUM = Path("/usr/bin/chromium")
#: Debian's Chromium as root in a container: no sandbox, no GPU, nothing phoned home.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic"]
REPO = Path(__file__).resolve().parents[2]


def ensure_chromium() -> str | None:
    """Install Debian's chromium when missing (needs root); None when it stays missing."""
    if CHROMIUM.exists():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "chromium is missing and apt-get cannot run here (not root)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env,
                       stdout=subprocess.DEVNULL, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env,
                       stdout=subprocess.DEVNULL, timeout=900)
    except (subprocess.SubprocessError, OSError) as exc:
        return f"apt-get install chromium failed ({type(exc).__name__})"
    return None if CHROMIUM.exists() else "apt-get ran but /usr/bin/chromium is still missing"


@pytest.fixture(scope="session")
def chromium() -> str:
    problem = ensure_chromium()
    if problem is not None:
        require_service("Chromium", problem)
    try:
        import playwright  # noqa: F401
    except ImportError:
        require_service("Playwright", "the playwright package is not installed "
                        "(pip install -e '.[dev]')")
    return str(CHROMIUM)


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, Any], chromium: str
                             ) -> dict[str, Any]:
    # pytest-playwright launches this instead of a downloaded browser.
    return {**browser_type_launch_args, "executable_path": chromium, "args": CHROMIUM_ARGS,
            "headless": True}


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args: dict[str, Any]) -> dict[str, Any]:
    return {**browser_context_args, "viewport": {"width": 1280, "height": 900},
            "locale": "en-GB", "timezone_id": "UTC"}


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: CLINFUSE_TEST_ARTIFACTS, else the session's temp folder."""
    configured = os.environ.get("CLINFUSE_TEST_ARTIFACTS")
    path = Path(configured) if configured else tmp_path_factory.getbasetemp() / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class LiveService:
    url: str
    app: Any
    demo: Any

    def session(self) -> Any:
        return self.app.state.sessions()


@pytest.fixture(scope="session")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    """The service with a seeded demo cohort, served by uvicorn on a loopback port."""
    import uvicorn

    from scripts.pg_cluster import free_port
    from services.app import create_app
    from tests.dashboard.seed import copy_seeded, seed_demo

    root = tmp_path_factory.mktemp("dashboard")
    # A deployment seeded by an earlier run can be reused (copied) to iterate quickly.
    reuse = os.environ.get("CLINFUSE_DASHBOARD_SEEDED")
    demo = copy_seeded(Path(reuse), root) if reuse else seed_demo(root)
    app = create_app(demo.settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="dashboard-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the service did not start on loopback")
        time.sleep(0.05)
    if getattr(app.state, "predictions", None) is None:
        # The app wires its prediction service from settings when it can; until then the
        # seeded one serves (the dashboard reads its cache folder and model card).
        app.state.predictions = demo.service
    try:
        yield LiveService(url=f"http://127.0.0.1:{port}", app=app, demo=demo)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
