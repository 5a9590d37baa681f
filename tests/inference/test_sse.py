"""The one reader of inbound server-sent events (an upstream's stream, the benchmarks' clients)."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Sequence

import httpx
from hypothesis import given
from hypothesis import strategies as st

from inference.sse import sse_data

CHUNKS = [{"choices": [{"index": 0, "text": text}]} for text in ("Hello", " wörld", " \u2028 and\u2029", "🙂")]
STREAM = b"".join(b"data: " + json.dumps(c, ensure_ascii=False).encode() + b"\n\n" for c in CHUNKS)


def payloads(body: bytes, cuts: Sequence[int] = ()) -> list[str]:
    """What ``sse_data`` reads from ``body`` when it arrives cut at ``cuts``."""
    bounds = [0, *sorted(cuts), len(body)]

    async def chunks() -> AsyncIterator[bytes]:
        for start, end in itertools.pairwise(bounds):
            if end > start:
                yield body[start:end]

    async def read() -> list[str]:
        return [data async for data in sse_data(httpx.Response(200, content=chunks()))]

    return asyncio.run(read())


@given(st.lists(st.integers(min_value=1, max_value=len(STREAM) - 1), max_size=12))
def test_payloads_are_the_same_however_the_bytes_are_cut(cuts: list[int]) -> None:
    # Cut inside a multi-byte character too: lines are split before they are decoded.
    assert [json.loads(data) for data in payloads(STREAM + b"data: [DONE]\n\n", cuts)] == CHUNKS


def test_a_line_separator_inside_a_payload_is_text_not_a_line_end() -> None:
    (data,) = payloads('data: {"text": "a\u2028b\x85c"}\n\n'.encode())
    assert json.loads(data) == {"text": "a\u2028b\x85c"}


def test_lines_end_with_lf_crlf_or_cr_and_other_fields_are_passed_over() -> None:
    body = b": keepalive\r\nevent: completion\r\nid: 7\rdata: 1\rdata:2\r\n\r\ndata:  3 \n\n"
    assert payloads(body) == ["1", "2", "3"]


def test_done_ends_the_stream_and_a_last_line_needs_no_newline() -> None:
    assert payloads(b"data: 1\n\ndata: [DONE]\n\ndata: 2\n\n") == ["1"]
    assert payloads(b"data: 1\n\ndata: 2") == ["1", "2"]
    assert payloads(b"data: 1\n\ndata: [DONE]") == ["1"]


def test_bytes_that_are_not_utf8_are_replaced() -> None:
    assert payloads(b'data: "a\xffb"\n\n') == ['"a\ufffdb"']
