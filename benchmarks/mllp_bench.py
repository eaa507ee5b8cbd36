"""MLLP framing: an unterminated frame arriving in 64 KiB reads, old reader vs the framer.

Both run in this process on the same bytes. The baseline is the listener's reader
from before issue 19, kept here verbatim in its scanning (strip the buffer's
leading blanks, then search it whole for the end block, on every read): quadratic
in the frame's size. :class:`services.mllp_framing.MllpFramer` resumes its search
where the last one ended. A second figure times the real listener over a socket
(frame sent, end block sent, ACK received), which is what a sender sees.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from services.mllp import MllpServer
from services.mllp_framing import FS, VT, MllpFramer

MIB = 1024 * 1024
CHUNK = 64 * 1024
ACK = "MSH|^~\\&|CLINFUSE|||||||ACK|1|P|2.5.1\rMSA|AA|1"


def _old_reader(chunks: list[bytes]) -> None:
    """The pre-issue-19 scan of an unterminated frame (the frame-cap check never fires)."""
    buffer = bytearray()
    for chunk in chunks:
        buffer += chunk
        stripped = buffer.lstrip(b"\r\n\t ")
        if len(stripped) != len(buffer):
            del buffer[:len(buffer) - len(stripped)]
        if buffer.find(FS, 1) >= 0:
            raise AssertionError("the benchmark frame has no end block")


def _framer(chunks: list[bytes]) -> None:
    framer = MllpFramer(max_frame_bytes=1 << 30)
    for chunk in chunks:
        if framer.feed(chunk):
            raise AssertionError("the benchmark frame has no end block")


def _timed(function: Any, chunks: list[bytes]) -> float:
    started = time.perf_counter()
    function(chunks)
    return time.perf_counter() - started


def _listener_seconds(server: MllpServer, size: int) -> float:
    body = memoryview(VT + b"MSH|" + b"A" * size)
    with socket.create_connection(("127.0.0.1", server.port), timeout=120) as sock:
        started = time.perf_counter()
        for i in range(0, len(body), CHUNK):
            sock.sendall(body[i:i + CHUNK])
        sock.sendall(b"\x1c\r")
        answer = b""
        while b"\x1c" not in answer:
            answer += sock.recv(65536)
        return time.perf_counter() - started


def run(quick: bool = False) -> dict[str, Any]:
    """Seconds per frame size for both readers and for the listener end to end."""
    sizes = [1, 2, 4] if quick else [8, 16, 32]
    rows = []
    server = MllpServer(lambda payload: [ACK], port=0, max_frame_bytes=1 << 30)
    server.start()
    try:
        for mib in sizes:
            data = VT + b"MSH|" + b"A" * (mib * MIB)
            chunks = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]
            rows.append({"frame_mib": mib,
                         "old_reader_s": round(_timed(_old_reader, chunks), 3),
                         "framer_s": round(_timed(_framer, chunks), 4),
                         "listener_s": round(_listener_seconds(server, mib * MIB), 3)})
    finally:
        server.stop()
    last = rows[-1]
    ratio = last["old_reader_s"] / max(last["framer_s"], 1e-6)
    old = "/".join(f"{r['old_reader_s']:.2f}" for r in rows)
    new = "/".join(f"{r['framer_s']:.3f}" for r in rows)
    listener = "/".join(f"{r['listener_s']:.2f}" for r in rows)
    mibs = "/".join(str(r["frame_mib"]) for r in rows)
    return {"chunk_bytes": CHUNK, "rows": rows, "ratio_at_largest": round(ratio, 1),
            "summary": f"unterminated {mibs} MiB frame in 64 KiB reads: old reader "
                       f"{old} s, framer {new} s ({ratio:,.0f}x at {last['frame_mib']} MiB); "
                       f"listener end to end {listener} s"}
