"""MLLP framing: bytes as they arrive -> complete frames, and what to refuse.

MLLP frames a message as ``<VT> message <FS><CR>`` (0x0B ... 0x1C 0x0D). The
framer keeps a buffer and a scan offset, so each received byte is examined a
small constant number of times however the sender splits its writes: the
listener used to strip and rescan its whole buffer on every read, which made an
unterminated frame cost time quadratic in its size. The end block may arrive
split across reads.

What a sender does wrong becomes a :class:`Refusal` (answered with a NAK) and
never an exception:

- bytes outside a frame: one refusal per run, however many reads it spans;
- a frame cut short by a new ``<VT>``: one refusal, and the frame restarts at
  the last ``<VT>`` before the end block;
- ``<FS>`` not followed by ``<CR>``;
- a frame larger than ``max_frame_bytes``: a fatal refusal, since the rest of it
  cannot be told apart from the next frame; the buffered bytes are released and
  the framer takes nothing more.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["CR", "FS", "VT", "Frame", "MllpFramer", "Refusal"]

VT, FS, CR = b"\x0b", b"\x1c", b"\x0d"
#: Line breaks and blanks between frames are common and harmless.
_BETWEEN_FRAMES = re.compile(rb"[\r\n\t ]+")
#: How much of a refused frame a NAK may quote (enough for its MSH segment).
EXCERPT_BYTES = 4096


@dataclass(frozen=True)
class Frame:
    """A complete frame's payload (without the framing bytes)."""

    payload: bytes


@dataclass(frozen=True)
class Refusal:
    """Bytes that are no usable frame, answered with a NAK (AR).

    ``excerpt`` is at most :data:`EXCERPT_BYTES` of them, so the NAK can echo the
    message's control id; ``fatal`` closes the connection.
    """

    excerpt: bytes
    reason: str
    fatal: bool = False


class MllpFramer:
    """Split a byte stream into MLLP frames; one instance per connection.

    Parameters
    ----------
    max_frame_bytes : int
        Largest payload accepted; a longer frame is refused and the connection
        should close.

    Attributes
    ----------
    scanned_bytes : int
        Bytes examined so far (searches and skips): linear in the bytes fed.
    """

    def __init__(self, *, max_frame_bytes: int) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.scanned_bytes = 0
        self._buffer = bytearray()
        # 0 between frames; inside a frame (buffer[0] is VT), where the search for the
        # end block resumes: everything before it is known to hold no FS.
        self._scan = 0
        # True while discarding bytes outside a frame that were already answered.
        self._in_junk = False
        # After a fatal refusal nothing more is framed: the stream cannot be resynchronised.
        self._closed = False

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for a frame not yet complete."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame | Refusal]:
        """Add received bytes; returns the frames and refusals they complete, in order."""
        if self._closed:
            return []
        buffer = self._buffer
        buffer += data
        events: list[Frame | Refusal] = []
        while buffer:
            if self._scan == 0 and not self._start_frame(events):
                continue
            end = buffer.find(FS, self._scan)
            self.scanned_bytes += (len(buffer) if end < 0 else end + 1) - self._scan
            size = (len(buffer) if end < 0 else end) - 1
            if size > self.max_frame_bytes:
                events.append(Refusal(bytes(buffer[1:1 + EXCERPT_BYTES]),
                                      f"MLLP frame exceeds the limit of "
                                      f"{self.max_frame_bytes} bytes", fatal=True))
                self._release()
                return events
            if end < 0:
                self._scan = len(buffer)
                return events  # wait for the rest
            # A new VT before the end block: the frame before it was cut short. Only the
            # last one matters, so a run of them is one refusal and one more scan.
            inner = buffer.rfind(VT, 1, end)
            self.scanned_bytes += end - 1
            if inner >= 0:
                events.append(Refusal(bytes(buffer[1:min(inner, 1 + EXCERPT_BYTES)]),
                                      "MLLP frame cut short: a new frame (0x0B) began before "
                                      "this one ended (0x1C 0x0D)"))
                del buffer[:inner]
                self._scan = end - inner  # the FS, where it now is
                continue
            if end + 1 >= len(buffer):
                self._scan = end
                return events  # FS arrived; its CR has not yet
            proper = buffer[end + 1] == CR[0]
            payload = bytes(buffer[1:end])
            del buffer[:end + (2 if proper else 1)]
            self._scan = 0
            events.append(Frame(payload) if proper else Refusal(
                payload[:EXCERPT_BYTES], "malformed MLLP frame: 0x1C not followed by 0x0D"))
        return events

    def _start_frame(self, events: list[Frame | Refusal]) -> bool:
        """Between frames: skip blanks and junk; True once the buffer starts with VT."""
        buffer = self._buffer
        blank = _BETWEEN_FRAMES.match(buffer)
        if blank is not None:
            self.scanned_bytes += blank.end()
            del buffer[:blank.end()]
            return False
        if buffer[0] != VT[0]:
            start = buffer.find(VT)
            length = len(buffer) if start < 0 else start
            self.scanned_bytes += length
            if not self._in_junk:
                # One NAK per run of junk, however many reads it arrives in.
                events.append(Refusal(bytes(buffer[:min(length, EXCERPT_BYTES)]),
                                      "data outside an MLLP frame (expected 0x0B before the "
                                      "message); discarded"))
            del buffer[:length]
            self._in_junk = start < 0
            return False
        self._in_junk = False
        self._scan = 1
        return True

    def _release(self) -> None:
        self._buffer = bytearray()
        self._scan = 0
        self._closed = True
