"""Reading a server-sent event stream that an OpenAI-compatible server sends (an upstream's
streamed completion, or the runtime's own in the benchmarks): the ``data:`` payloads, up to
``data: [DONE]``.

Lines end with LF, CRLF or CR (the SSE standard's three). The bytes are split into lines before
they are decoded, which is safe in UTF-8 (no character's bytes hold a CR or LF), so a payload's
text may hold any character, U+2028 included; each payload is decoded on its own, with bytes that
are not UTF-8 replaced as ``httpx`` replaces them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx

_LINE_ENDS = (b"\n", b"\r")


async def sse_data(response: httpx.Response) -> AsyncIterator[str]:
    """The ``data`` of each ``data:`` line of ``response``'s body as it arrives (stripped of
    surrounding white space), until ``[DONE]`` or the end of the body."""
    # One loop over the raw chunks, in place of ``aiter_lines`` (and the ``aiter_text`` beneath
    # it): a streamed token costs no more awaits than reading lines would.
    partial = b""
    async for chunk in response.aiter_bytes():
        lines = (partial + chunk).splitlines()
        partial = lines.pop() if lines and not chunk.endswith(_LINE_ENDS) else b""
        for line in lines:
            if line.startswith(b"data:"):
                data = line[5:].decode(errors="replace").strip()
                if data == "[DONE]":
                    return
                yield data
    if partial.startswith(b"data:") and (data := partial[5:].decode(errors="replace").strip()) != "[DONE]":
        yield data
