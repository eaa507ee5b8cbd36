"""Issue 19, finding 12c: the SQLite database (and its WAL and shared-memory files) is 0600.

It holds patient records, the access log and password hashes; created with the
process umask (0644 usually) it was readable by every local user.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sqlalchemy import text

from services.db import make_engine, migrate


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_database_and_its_side_files_are_owner_only(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = tmp_path / "clinfuse.db"
        engine = make_engine(f"sqlite:///{path}")
        migrate(engine)
        with engine.begin() as connection:  # a write, so the WAL file exists
            connection.execute(text("CREATE TABLE probe (x INTEGER)"))
        side = [p for p in (Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists()]
        assert side, "WAL mode should have created side files"
        for p in (path, *side):
            assert _mode(p) == 0o600, (p.name, oct(_mode(p)))
        engine.dispose()
    finally:
        os.umask(old)


def test_an_existing_world_readable_database_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "clinfuse.db"
    migrate(make_engine(f"sqlite:///{path}"))
    path.chmod(0o644)
    engine = make_engine(f"sqlite:///{path}")
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    assert _mode(path) == 0o600
    engine.dispose()
