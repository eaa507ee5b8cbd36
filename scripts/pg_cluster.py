"""A throwaway PostgreSQL cluster on a loopback port, from Debian's binaries.

Used by the test runner when CLINFUSE_TEST_DATABASE_URL is not set.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PG_BIN_CANDIDATES = [Path(f"/usr/lib/postgresql/{v}/bin") for v in (17, 16, 15, 14, 13)]


def find_pg_bin() -> Path | None:
    for candidate in PG_BIN_CANDIDATES:
        if (candidate / "initdb").exists():
            return candidate
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_cluster_user(cmd: list[str]) -> list[str]:
    # initdb refuses to run as root, so root runs the cluster as `postgres`.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@contextmanager
def throwaway_cluster() -> Iterator[str]:
    """Start a cluster, yield its SQLAlchemy URL, and remove it afterwards."""
    pg_bin = find_pg_bin()
    if pg_bin is None:
        raise RuntimeError("PostgreSQL binaries not found (apt-get install postgresql)")
    workdir = Path(tempfile.mkdtemp(prefix="clinfuse-pg-"))
    port = free_port()
    if os.geteuid() == 0:
        shutil.chown(workdir, "postgres", "postgres")
    workdir.chmod(0o700)
    data = workdir / "data"
    run = subprocess.run
    run(_as_cluster_user([str(pg_bin / "initdb"), "-D", str(data), "-U", "postgres", "-A",
                          "trust", "-E", "UTF8", "--locale=C.UTF-8"]),
        check=True, stdout=subprocess.DEVNULL)
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {workdir} -c fsync=off"
    run(_as_cluster_user([str(pg_bin / "pg_ctl"), "-D", str(data), "-l", str(workdir / "log"),
                          "-w", "-o", options, "start"]), check=True, stdout=subprocess.DEVNULL)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        run(_as_cluster_user([str(pg_bin / "pg_ctl"), "-D", str(data), "-m", "fast", "-w",
                              "stop"]), check=False, stdout=subprocess.DEVNULL)
        shutil.rmtree(workdir, ignore_errors=True)
