"""SSE framing: whatever way the upstream's bytes are cut into reads, the events come out whole, in order,
byte for byte, with their terminators; what trails the last one stays buffered.

Method: Hypothesis builds streams from SSE pieces (LF, CRLF and CR framing, comments, empty events) and cuts
them at random points; the buffer's output is compared with a reference splitter written independently
(earliest terminator of the three wins, as the SSE spec reads).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metergate.proxy.sse import EventTooLarge, SSEBuffer, event_data

_TERMINATORS = (b"\n\n", b"\r\n\r\n", b"\r\r")


def reference(data: bytes) -> tuple[list[bytes], bytes]:
    events: list[bytes] = []
    while True:
        ends = [i + len(t) for t in _TERMINATORS if (i := data.find(t)) != -1]
        if not ends:
            return events, data
        cut = min(ends)
        events.append(data[:cut])
        data = data[cut:]


LF_PIECES = [b"data: ", b"{\"a\": 1}", b"\n", b"\n\n", b": keep-alive", b"event: x", b"[DONE]"]
ANY_PIECES = [*LF_PIECES, b"\r\n", b"\r", b"\r\n\r\n"]


def streams(pieces: list[bytes]) -> st.SearchStrategy[tuple[bytes, list[int]]]:
    data = st.lists(st.sampled_from(pieces), max_size=30).map(b"".join)
    return data.flatmap(lambda d: st.tuples(st.just(d), st.lists(st.integers(0, len(d)), max_size=6)))


def feed_in_reads(data: bytes, cuts: list[int]) -> tuple[list[bytes], bytes]:
    buffer = SSEBuffer(1 << 20)
    points = sorted(set(cuts))
    events: list[bytes] = []
    for start, end in zip([0, *points], [*points, len(data)], strict=True):
        events += buffer.feed(data[start:end])
    return events, buffer.rest()


@given(streams(LF_PIECES))
def test_lf_framed_streams_split_like_the_reference(case: tuple[bytes, list[int]]) -> None:
    data, cuts = case
    assert feed_in_reads(data, cuts) == reference(data)


@given(streams(ANY_PIECES))
def test_crlf_and_cr_framed_streams_split_like_the_reference(case: tuple[bytes, list[int]]) -> None:
    data, cuts = case
    assert feed_in_reads(data, cuts) == reference(data)


def test_an_oversized_event_is_refused_on_both_paths() -> None:
    for newline in (b"\n", b"\r\n"):
        buffer = SSEBuffer(16)
        assert buffer.feed(b"data: ok" + newline * 2) == [b"data: ok" + newline * 2]
        with pytest.raises(EventTooLarge):
            buffer.feed(b"data: " + b"x" * 32 + newline)


def test_event_data_joins_data_lines() -> None:
    assert event_data(b"event: a\ndata: one\ndata:two\n\n") == b"one\ntwo"
    assert event_data(b": comment\n\n") is None
