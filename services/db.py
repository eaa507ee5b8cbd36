"""Database plumbing: engine, sessions and Alembic migrations.

SQLite is the embedded default and PostgreSQL the production store; the same
migrations build both.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
log = logging.getLogger(__name__)


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets foreign keys and WAL for concurrent readers."""
    if url.startswith("sqlite"):
        _owner_only_sqlite_file(url)
        # One connection per server thread that may hold a session (FastAPI's threadpool
        # has 40): a small pool would make requests wait for connections, not for work.
        engine = create_engine(url, connect_args={"check_same_thread": False},
                               pool_size=20, max_overflow=30, pool_timeout=10)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            # In WAL mode NORMAL keeps the database consistent across crashes; only the last
            # commits may roll back on power loss, and file bytes are synced separately.
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20,
                         pool_timeout=10)


def _owner_only_sqlite_file(url: str) -> None:
    """Create the SQLite file 0600, or tighten an existing one to 0600.

    The file holds patient records, password hashes and the access log; created by
    SQLite with the process umask it is usually 0644, readable by every local user.
    SQLite gives its -wal, -shm and -journal files the database file's mode, so they
    follow; existing ones are tightened too.
    """
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return  # in memory, or a URI filename whose options SQLite parses itself
    path = Path(database)
    if not path.parent.is_dir():
        return  # SQLite reports the missing folder itself
    if not path.exists():
        # Another process may create it first: then it is tightened below.
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    for file in (path, *(Path(f"{path}{suffix}") for suffix in ("-wal", "-shm", "-journal"))):
        try:
            if file.stat().st_mode & 0o077:
                file.chmod(0o600)
        except FileNotFoundError:
            continue
        except PermissionError:
            log.warning("cannot make %s owner-only (not its owner); check its permissions",
                        file.name)


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration."""
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A transaction: committed on success, rolled back on any error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
