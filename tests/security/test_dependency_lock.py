"""The hash-pinned locks install pyproject.toml as it is (issue 19, beyond the list).

`make demo` and `make test` install requirements-dev.lock with --require-hashes and
the package with --no-deps, so a dependency added to pyproject.toml without
`make lock` would be missing from the install. This checks the committed files
offline; scripts/lock.py regenerates them.
"""

from __future__ import annotations

from pathlib import Path

from scripts.lock import DEV_LOCK, RUNTIME_LOCK, lock_problems, only_through, parse_parents

ROOT = Path(__file__).resolve().parents[2]


def _read(name: str) -> str:
    return (ROOT / name).read_text()


def test_committed_locks_match_pyproject() -> None:
    problems = lock_problems(_read("pyproject.toml"), _read(RUNTIME_LOCK), _read(DEV_LOCK))
    assert problems == []


def test_a_dependency_added_without_relocking_is_named() -> None:
    pyproject = _read("pyproject.toml").replace(
        '"jinja2>=3.1",', '"jinja2>=3.1",\n    "left-pad-example>=1.0",', 1)
    problems = lock_problems(pyproject, _read(RUNTIME_LOCK), _read(DEV_LOCK))
    assert any("left-pad-example is required by pyproject.toml but not pinned" in p
               for p in problems)


def test_a_pin_outside_the_allowed_range_is_named() -> None:
    pyproject = _read("pyproject.toml").replace('"fastapi>=0.110"', '"fastapi>=999"', 1)
    problems = lock_problems(pyproject, _read(RUNTIME_LOCK), _read(DEV_LOCK))
    assert any("fastapi==" in p and "does not satisfy" in p for p in problems)


def test_torch_and_its_build_stay_out_of_the_locks() -> None:
    for lock in (RUNTIME_LOCK, DEV_LOCK):
        pinned = {line.split("==")[0] for line in _read(lock).splitlines() if "==" in line
                  and not line.startswith((" ", "#"))}
        assert "torch" not in pinned
        assert not {p for p in pinned if p.startswith(("nvidia-", "cuda-")) or p == "triton"}


def test_only_packages_reached_solely_through_torch_are_left_out() -> None:
    lock = """\
jinja2==3.1.6 \\
    --hash=sha256:aa
    # via
    #   clinfuse (pyproject.toml)
    #   torch
mpmath==1.3.0 \\
    --hash=sha256:bb
    # via sympy
sympy==1.14.0 \\
    --hash=sha256:cc
    # via torch
monai==1.6.1 \\
    --hash=sha256:dd
    # via clinfuse (pyproject.toml)
wheel==0.48.0 \\
    --hash=sha256:ee
    # via -r build/lock/pyproject-build-system.in
"""
    assert only_through(parse_parents(lock), "torch") == {"sympy", "mpmath"}
