"""Helpers for the HTTP-edge security tests: an in-process app and a raw ASGI client.

Starlette's TestClient reads a request body whole before the app sees it, so it cannot
show whether the app stops reading an oversized stream or how it treats a body that
trickles in. :func:`drive` calls the ASGI app directly with a ``receive`` fed from a
generator, counts the chunks the app pulled, and gives up after ``give_up_s``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient

from services.app import create_app
from services.core.config import Settings


def edge_settings(tmp_path: Path, **extra: Any) -> Settings:
    """A throwaway SQLite deployment under ``tmp_path`` (built-in issuer on: demo)."""
    return Settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                    data_dir=tmp_path / "data", **extra)


@contextmanager
def running(settings: Settings, **client_args: Any) -> Iterator[TestClient]:
    """The app with its lifespan started (database migrated, stores open)."""
    with TestClient(create_app(settings), **client_args) as client:
        yield client


@dataclass
class Answer:
    """What the app sent back, and how much of the request body it pulled."""

    status: int | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    chunks_pulled: int = 0
    seconds: float = 0.0

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode()
        return next((v.decode("latin-1") for k, v in self.headers if k.lower() == wanted),
                    None)


def drive(app: FastAPI, method: str, path: str, chunks: Iterator[bytes], *,
          headers: dict[str, str] | list[tuple[str, str]] | None = None,
          pause_s: float = 0.0, give_up_s: float = 10.0) -> Answer:
    """One request, its body streamed from ``chunks`` (``pause_s`` between chunks).

    Without a ``content-length`` header the body is sent like chunked transfer: the app
    learns its size only by reading. Returns when the response is complete, or after
    ``give_up_s`` with ``status`` None (the app never answered).
    """
    items = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    raw_headers = [(b"host", b"testserver")] + [
        (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in items]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "headers": raw_headers,
             "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}
    answer = Answer()

    async def run() -> None:
        done = asyncio.Event()
        exhausted = False

        async def receive() -> dict[str, Any]:
            nonlocal exhausted
            if exhausted:
                await done.wait()
                return {"type": "http.disconnect"}
            if answer.chunks_pulled and pause_s:
                await asyncio.sleep(pause_s)
            chunk = next(chunks, None)
            if chunk is None:
                exhausted = True
                return {"type": "http.request", "body": b"", "more_body": False}
            answer.chunks_pulled += 1
            return {"type": "http.request", "body": chunk, "more_body": True}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answer.status = message["status"]
                answer.headers = list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                answer.body += message.get("body", b"")
                if not message.get("more_body", False):
                    done.set()

        task = asyncio.ensure_future(app(scope, receive, send))
        try:
            await asyncio.wait_for(done.wait(), give_up_s)
        except TimeoutError:
            answer.status = None
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    started = time.perf_counter()
    run_in_fresh_loop(run())
    answer.seconds = time.perf_counter() - started
    return answer


def run_in_fresh_loop(coroutine: Coroutine[Any, Any, None]) -> None:
    """``asyncio.run`` in a thread of its own.

    Earlier tests in the same process (Playwright's sync API) may leave an event loop
    running in the main thread, where ``asyncio.run`` refuses to start.
    """
    failure: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(coroutine)
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=target, name="test-event-loop")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def stream(total: int, chunk: int = 64 * 1024, byte: bytes = b"[") -> Iterator[bytes]:
    """``total`` bytes in ``chunk``-sized pieces, made only as they are pulled."""
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        sent += n
        yield byte * n
