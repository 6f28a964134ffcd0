"""Server-sent events framing: split an upstream byte stream into whole events, bounded in size.

metergate relays events one by one (so that it can drop the usage chunk it injected), keeping each
event's bytes exactly as the upstream sent them.
"""

from __future__ import annotations

_SEPARATORS = (b"\n\n", b"\r\n\r\n", b"\r\r")


class EventTooLarge(Exception):
    pass


class SSEBuffer:
    __slots__ = ("_buf", "_max")

    def __init__(self, max_event_bytes: int) -> None:
        self._buf = bytearray()
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> list[bytes]:
        """Add bytes; return every complete event (terminator included) now available."""
        self._buf += chunk
        if b"\r" not in self._buf:
            # The common case, LF-only framing: one split in C instead of a search per event and separator.
            *done, rest = self._buf.split(b"\n\n")
            if len(rest) > self._max:
                raise EventTooLarge(f"an SSE event exceeded {self._max} bytes")
            self._buf = bytearray(rest)
            return [bytes(part) + b"\n\n" for part in done]
        events: list[bytes] = []
        while True:
            cut = -1
            for sep in _SEPARATORS:
                index = self._buf.find(sep)
                if index != -1 and (cut == -1 or index + len(sep) < cut):
                    cut = index + len(sep)
            if cut == -1:
                break
            events.append(bytes(self._buf[:cut]))
            del self._buf[:cut]
        if len(self._buf) > self._max:
            raise EventTooLarge(f"an SSE event exceeded {self._max} bytes")
        return events

    def rest(self) -> bytes:
        """Whatever trails the last complete event (an event cut off by the upstream)."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


def event_data(event: bytes) -> bytes | None:
    """The event's data field (``data:`` lines joined by newlines), or None if it has none."""
    end = len(event) - 2
    if event.startswith(b"data: ") and event.find(b"\n", 6) == end and event[end + 1] == 10 and b"\r" not in event:
        return event[6:end]  # nearly every event: one "data: ..." line and the blank line that ends it
    parts: list[bytes] = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(parts) if parts else None
