"""The whole test suite: lint, type check, then pytest against real services.

Starts a throwaway PostgreSQL unless CLINFUSE_TEST_DATABASE_URL is set. Under
CI=true a service that cannot start is a failure, never a skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import ExitStack

from scripts.pg_cluster import throwaway_cluster

PACKAGES = ["fhir_adapters", "pipelines", "models", "audits", "services"]


def _step(name: str, cmd: list[str]) -> None:
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    result = subprocess.run(cmd)
    if result.returncode != 0:
        print(f"== {name} failed (exit {result.returncode})", flush=True)
        sys.exit(result.returncode)


def main() -> None:
    bin_dir = os.path.dirname(sys.executable)
    _step("ruff", [os.path.join(bin_dir, "ruff"), "check", *PACKAGES, "tests", "benchmarks",
                   "scripts"])
    _step("mypy", [os.path.join(bin_dir, "mypy")])
    env = dict(os.environ)
    with ExitStack() as stack:
        if not env.get("CLINFUSE_TEST_DATABASE_URL"):
            try:
                env["CLINFUSE_TEST_DATABASE_URL"] = stack.enter_context(throwaway_cluster())
                print("== PostgreSQL: throwaway cluster on loopback", flush=True)
            except Exception as exc:
                print(f"== PostgreSQL could not start: {exc}", flush=True)
                if env.get("CI") == "true":
                    sys.exit(1)
        cmd = [sys.executable, "-m", "pytest", *sys.argv[1:]]
        print(f"== pytest: {' '.join(cmd)}", flush=True)
        code = subprocess.run(cmd, env=env).returncode
    sys.exit(code)


if __name__ == "__main__":
    main()
