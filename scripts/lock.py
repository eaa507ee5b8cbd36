"""Regenerate the hash-pinned dependency locks: ``make lock``.

- ``requirements.lock``: the default install, i.e. the package's dependencies plus
  its build backend (setuptools, wheel), so the project itself is installed with
  ``--no-build-isolation`` from hashed packages too.
- ``requirements-dev.lock``: the same pins plus the ``dev`` extra (tests, linters,
  deploy validators). ``make demo`` and ``make test`` install this one.

torch is left out of both, and so is every package that only torch needs (sympy,
networkx, and on a GPU build the CUDA libraries and triton): ``TORCH_SPEC`` and
``TORCH_INDEX`` choose the build, which differs between CPU, GPU and a wheelhouse,
and ``make`` installs it before the lock. Packages torch shares with the rest
(jinja2, filelock, fsspec, typing-extensions) stay locked.

The locks are resolved from PyPI for CPython 3.11 on x86-64 manylinux_2_28 (the
README's Debian machine), whatever machine runs this. An existing lock is the
preferred resolution, so a rerun changes nothing unless ``pyproject.toml`` did;
pass ``--upgrade`` or ``--upgrade-package NAME`` (``make lock LOCK_FLAGS=...``)
to move pins.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_LOCK = "requirements.lock"
DEV_LOCK = "requirements-dev.lock"
# Written on every run (build/ is ignored); the locks name it as the origin of
# setuptools and wheel.
BUILD_IN = "build/lock/pyproject-build-system.in"
TORCH_IN = "build/lock/torch-constraint.txt"
PYTHON_VERSION = "3.11"
PLATFORM = "x86_64-manylinux_2_28"

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==")
_VIA_ONE = re.compile(r"^\s+# via (\S.*)$")
_VIA_ITEM = re.compile(r"^\s+#   (\S.*)$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_parents(lock_text: str) -> dict[str, set[str]]:
    """Each pinned package of a uv-compiled file with the sources uv says require it.

    A source is another package's name, ``clinfuse`` (the project and its extras) or an
    input file (``-r FILE``); constraint files (``-c FILE``) pin but require nothing.
    """
    parents: dict[str, set[str]] = {}
    current: str | None = None
    in_via = False
    for line in lock_text.splitlines():
        pin = _PIN.match(line)
        if pin:
            current = _norm(pin.group(1))
            parents[current] = set()
            in_via = False
            continue
        if current is None:
            continue
        one = _VIA_ONE.match(line)
        if one:
            parents[current].add(one.group(1))
            continue
        if line.strip() == "# via":
            in_via = True
            continue
        item = _VIA_ITEM.match(line)
        if in_via and item:
            parents[current].add(item.group(1))
            continue
        if not line.strip().startswith("--hash"):
            in_via = False
    return {
        name: {
            src if src.startswith(("-r ", "clinfuse")) else _norm(src.split(" ")[0])
            for src in sources
            if not src.startswith("-c ")
        }
        for name, sources in parents.items()
    }


def only_through(parents: Mapping[str, set[str]], package: str) -> set[str]:
    """The packages that are in the resolution only because ``package`` needs them."""
    children: dict[str, set[str]] = {}
    for name, sources in parents.items():
        for src in sources:
            children.setdefault(src, set()).add(name)
    roots = {src for sources in parents.values() for src in sources
             if src.startswith(("-r ", "clinfuse"))}
    reached: set[str] = set()
    todo = list(roots)
    while todo:
        node = todo.pop()
        for child in children.get(node, ()):
            if child != package and child not in reached:
                reached.add(child)
                todo.append(child)
    return set(parents) - reached - {package}


def _compile(uv: str, sources: Iterable[str], out: str, constraints: Iterable[str],
             no_emit: Iterable[str], extra: list[str]) -> str:
    cmd = [uv, "pip", "compile", *sources,
           "--python-version", PYTHON_VERSION, "--python-platform", PLATFORM,
           "--generate-hashes", "--custom-compile-command", "make lock",
           "--quiet", "-o", out]
    for c in constraints:
        cmd += ["-c", c]
    for name in sorted(no_emit):
        cmd += ["--no-emit-package", name]
    subprocess.run([*cmd, *extra], cwd=ROOT, check=True)
    return (ROOT / out).read_text()


def write_lock(uv: str, sources: list[str], out: str, constraints: list[str],
               extra: list[str]) -> set[str]:
    """Compile ``out`` without torch and torch's own dependencies; returns those left out."""
    text = _compile(uv, sources, out, constraints, {"torch"}, extra)
    left_out = only_through(parse_parents(text), "torch") | {"torch"}
    _compile(uv, sources, out, constraints, left_out, extra)
    return left_out


def _pins(lock_text: str) -> dict[str, tuple[str, int]]:
    """Each pinned name with its version and how many hashes it carries."""
    pins: dict[str, tuple[str, int]] = {}
    current: str | None = None
    for line in lock_text.splitlines():
        pin = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line)
        if pin:
            current = _norm(pin.group(1))
            pins[current] = (pin.group(2), 0)
        elif current and line.strip().startswith("--hash=sha256:"):
            version, hashes = pins[current]
            pins[current] = (version, hashes + 1)
    return pins


def lock_problems(pyproject_text: str, runtime_text: str, dev_text: str) -> list[str]:
    """What keeps the locks from installing ``pyproject.toml`` as it is; empty when current.

    Each requirement (but torch) must be pinned with hashes at a version it allows, the
    dev lock must repeat every runtime pin, and torch's own build must stay out.
    """
    from packaging.requirements import Requirement

    project = tomllib.loads(pyproject_text)
    wanted = {
        RUNTIME_LOCK: [*project["project"]["dependencies"],
                       *project["build-system"]["requires"]],
        DEV_LOCK: [*project["project"]["dependencies"],
                   *project["project"]["optional-dependencies"]["dev"],
                   *project["build-system"]["requires"]],
    }
    locks = {RUNTIME_LOCK: _pins(runtime_text), DEV_LOCK: _pins(dev_text)}
    problems: list[str] = []
    for lock_name, requirements in wanted.items():
        pins = locks[lock_name]
        for text in requirements:
            req = Requirement(text)
            name = _norm(req.name)
            if name == "torch":
                continue
            if name not in pins:
                problems.append(f"{lock_name}: {req.name} is required by pyproject.toml "
                                "but not pinned; run `make lock`")
                continue
            version, hashes = pins[name]
            if not req.specifier.contains(version, prereleases=True):
                problems.append(f"{lock_name}: {req.name}=={version} does not satisfy "
                                f"pyproject.toml's '{text}'; run `make lock`")
            if hashes == 0:
                problems.append(f"{lock_name}: {req.name} is pinned without a hash")
        for name in pins:
            if name == "torch" or name.startswith(("nvidia-", "cuda-")) or name == "triton":
                problems.append(f"{lock_name}: {name} belongs to the torch build "
                                "(TORCH_SPEC) and must not be locked")
    for name, (version, _) in locks[RUNTIME_LOCK].items():
        dev_pin = locks[DEV_LOCK].get(name)
        if dev_pin is None or dev_pin[0] != version:
            problems.append(f"{DEV_LOCK}: {name} must be pinned =={version} as in "
                            f"{RUNTIME_LOCK}, found {dev_pin[0] if dev_pin else 'nothing'}")
    return problems


def torch_constraint(spec: str) -> str:
    """``TORCH_SPEC`` as a PyPI constraint: a local build tag (``+cpu``) is dropped."""
    return re.sub(r"\+[A-Za-z0-9.]+", "", spec.strip())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uv", default="uv", help="the uv executable")
    parser.add_argument("--torch", default="torch==2.13.0",
                        help="TORCH_SPEC: the torch the other pins must agree with")
    args, extra = parser.parse_known_args(argv)

    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    (ROOT / BUILD_IN).parent.mkdir(parents=True, exist_ok=True)
    (ROOT / BUILD_IN).write_text("\n".join(build) + "\n")
    (ROOT / TORCH_IN).write_text(torch_constraint(args.torch) + "\n")

    runtime = write_lock(args.uv, ["pyproject.toml", BUILD_IN], RUNTIME_LOCK, [TORCH_IN],
                         extra)
    # The dev lock keeps every runtime pin: one environment for the demo and the tests.
    dev = write_lock(args.uv, ["pyproject.toml", "--extra", "dev", BUILD_IN], DEV_LOCK,
                     [TORCH_IN, RUNTIME_LOCK], extra)
    print(f"wrote {RUNTIME_LOCK} and {DEV_LOCK}; left to TORCH_SPEC: "
          f"{', '.join(sorted(runtime | dev))}", file=sys.stderr)


if __name__ == "__main__":
    main()
