"""MLLP framing does work linear in the bytes received, whatever a sender does.

The listener used to strip and rescan its whole buffer on every read, so an
unterminated frame arriving in small reads cost time quadratic in its size
(8/16/32 MiB: 0.34/0.97/4.30 s). These tests count the bytes the framer examines
instead of timing it, so they are exact and do not depend on the machine's load.
"""

from __future__ import annotations

import random

import pytest

from services.mllp_framing import CR, FS, VT, Frame, MllpFramer, Refusal

MIB = 1024 * 1024


def _feed_in_chunks(framer: MllpFramer, data: bytes, size: int) -> list[Frame | Refusal]:
    events: list[Frame | Refusal] = []
    for i in range(0, len(data), size):
        events += framer.feed(data[i:i + size])
    return events


@pytest.mark.parametrize("size", [1 * MIB, 4 * MIB])
def test_an_unterminated_frame_in_small_reads_is_scanned_once(size: int) -> None:
    framer = MllpFramer(max_frame_bytes=16 * MIB)
    body = VT + b"MSH|" + b"A" * size
    assert _feed_in_chunks(framer, body, 4096) == []
    # Each byte is examined a small constant number of times, not once per read.
    assert framer.scanned_bytes <= 2 * len(body)
    # The end block then completes the frame without rescanning what came before.
    before = framer.scanned_bytes
    events = framer.feed(FS + CR)
    assert events == [Frame(body[1:])]
    assert framer.scanned_bytes - before <= len(body) + 16


def test_the_end_block_split_across_reads_still_ends_the_frame() -> None:
    framer = MllpFramer(max_frame_bytes=MIB)
    assert framer.feed(VT + b"MSH|one") == []
    assert framer.feed(FS) == []
    assert framer.feed(CR + VT + b"MSH|two" + FS) == [Frame(b"MSH|one")]
    assert framer.feed(CR) == [Frame(b"MSH|two")]
    assert framer.buffered_bytes == 0


def _outline(events: list[Frame | Refusal]) -> list[object]:
    # How much junk a refusal quotes depends on the reads; what was refused does not.
    return [e if isinstance(e, Frame) else (e.reason, e.fatal) for e in events]


def test_byte_by_byte_reads_give_the_same_events_as_one_read() -> None:
    # Frames, whitespace between them, junk, a frame cut short and a bare 0x1C.
    stream = (b"\r\n" + VT + b"MSH|a" + FS + CR + b"junk" + VT + b"MSH|cut" + VT
              + b"MSH|b" + FS + CR + VT + b"MSH|bad" + FS + b"x" + VT + b"MSH|c" + FS + CR)
    whole = MllpFramer(max_frame_bytes=MIB).feed(stream)
    assert [e.payload for e in whole if isinstance(e, Frame)] == [b"MSH|a", b"MSH|b", b"MSH|c"]
    # Junk, the cut frame, the bare 0x1C and the junk byte after it.
    assert len([e for e in whole if isinstance(e, Refusal)]) == 4
    rng = random.Random(19)
    for _ in range(20):
        framer = MllpFramer(max_frame_bytes=MIB)
        events: list[Frame | Refusal] = []
        i = 0
        while i < len(stream):
            step = rng.randint(1, 7)
            events += framer.feed(stream[i:i + step])
            i += step
        assert _outline(events) == _outline(whole)


def test_a_flood_of_frame_starts_is_linear_and_answered_once() -> None:
    # 0x0B repeated then one end block: the old reader answered a NAK per byte and
    # rescanned the rest each time.
    n = 20_000
    framer = MllpFramer(max_frame_bytes=MIB)
    events = framer.feed(VT * n + b"MSH|last" + FS + CR)
    assert framer.scanned_bytes <= 4 * n + 64
    refusals = [e for e in events if isinstance(e, Refusal)]
    assert len(refusals) == 1 and "cut short" in refusals[0].reason
    assert events[-1] == Frame(b"MSH|last")


def test_an_oversized_frame_is_refused_and_its_bytes_released() -> None:
    framer = MllpFramer(max_frame_bytes=64 * 1024)
    events = _feed_in_chunks(framer, VT + b"MSH|" + b"A" * (200 * 1024), 4096)
    assert len(events) == 1
    refusal = events[0]
    assert isinstance(refusal, Refusal) and refusal.fatal
    assert "65536" in refusal.reason and len(refusal.excerpt) <= 4096
    assert framer.buffered_bytes == 0
    # A complete frame over the limit in one read is refused the same way.
    framer = MllpFramer(max_frame_bytes=1024)
    (event,) = framer.feed(VT + b"B" * 2048 + FS + CR)
    assert isinstance(event, Refusal) and event.fatal and framer.buffered_bytes == 0


def test_junk_is_answered_once_per_run_with_a_bounded_excerpt() -> None:
    framer = MllpFramer(max_frame_bytes=MIB)
    events = _feed_in_chunks(framer, b"x" * MIB, 65536)
    assert len(events) == 1 and isinstance(events[0], Refusal)
    assert len(events[0].excerpt) <= 4096 and not events[0].fatal
    assert framer.buffered_bytes == 0
    assert framer.feed(VT + b"MSH|ok" + FS + CR) == [Frame(b"MSH|ok")]
