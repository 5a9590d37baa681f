"""A fake OpenAI-compatible server: real HTTP on a free port, answers scripted by the test.

It stands in for vLLM, llama.cpp or TGI behind ``--upstream``; ``ConnectionDropper`` stands in for
one that closes every connection without an answer. Tests (and benchmarks, which want an
upstream that costs nothing) say how it answers next — how many pieces, how fast, with or without
``usage``, an error, or a hang — and read back what it received and whether the caller stayed to
the end. Its wire format follows vLLM's: SSE chunks ``data: {...}``, a last chunk with ``usage``
and no choices when ``stream_options.include_usage`` is set, then ``data: [DONE]``.

Run alone for a benchmark: ``python -m tests.inference.fake_upstream --port 9000 --pieces 128``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import socket
import socketserver
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager, suppress
from typing import Any, Literal

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

Outcome = Literal["completed", "client_gone"]


@dataclasses.dataclass(frozen=True)
class Script:
    """How the fake answers every request until the test changes it."""

    pieces: int = 4
    delay_s: float = 0.0  # before each piece; a JSON answer waits pieces × delay_s
    tokens_per_piece: int = 1  # what ``usage`` reports, so tests can tell usage from counted pieces
    prompt_tokens: int = 7
    usage: bool = True
    finish_reason: str = "stop"
    fixed_status: int | None = None  # answer this status and ``fixed_body`` instead of generating
    fixed_body: Any = None
    hang_s: float | None = None  # wait this long (or until the caller leaves) before answering


@dataclasses.dataclass
class ReceivedRequest:
    """One request as the fake saw it, and how it ended."""

    path: str
    body: dict[str, Any]
    pieces_sent: int = 0
    outcome: Outcome | None = None
    ended: threading.Event = dataclasses.field(default_factory=threading.Event)

    def wait_until_ended(self, timeout: float = 5.0) -> Outcome | None:
        self.ended.wait(timeout)
        return self.outcome


def piece_text(index: int) -> str:
    return f"w{index} "


def text_of(pieces: int) -> str:
    """The whole text the fake sends for ``pieces`` pieces."""
    return "".join(piece_text(i) for i in range(pieces))


class FakeUpstream:
    def __init__(self) -> None:
        self.url = ""
        self.script = Script()
        self.requests: list[ReceivedRequest] = []
        self._failures_left: int | None = None  # fixed answers still to give before ``_after_failures``
        self._after_failures = self.script
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/completions", self._completion, methods=["POST"]),
            Route("/v1/models", self._models, methods=["GET"]),
        ])

    # -- what the test sets ----------------------------------------------------------------------

    def reply(self, *, pieces: int = 4, delay_s: float = 0.0, tokens_per_piece: int = 1,
              prompt_tokens: int = 7, usage: bool = True, finish_reason: str = "stop") -> None:
        self.script = Script(pieces=pieces, delay_s=delay_s, tokens_per_piece=tokens_per_piece,
                             prompt_tokens=prompt_tokens, usage=usage, finish_reason=finish_reason)
        self._failures_left = None

    def fail(self, status: int, message: str = "The upstream refused.", *, body: Any = None,
             times: int | None = None) -> None:
        """Answer ``status`` with an OpenAI error body (or ``body`` as given, for other servers' shapes);
        with ``times``, only the next that many requests, then answer as before."""
        if body is None:
            body = {"error": {"message": message, "type": "invalid_request_error", "param": None,
                              "code": status}}
        before = self.script
        self.answer_raw(body, status=status)
        self._failures_left, self._after_failures = times, before

    def answer_raw(self, body: Any, *, status: int = 200) -> None:
        """Answer exactly ``body`` with ``status``: for replies no well-behaved server sends."""
        self.script = Script(fixed_status=status, fixed_body=body)
        self._failures_left = None

    def hang(self, seconds: float = 30.0) -> None:
        """Say nothing for ``seconds`` (ending early if the caller gives up), then answer normally."""
        self.script = dataclasses.replace(self.script, hang_s=seconds)

    def reset(self) -> None:
        self.script = Script()
        self._failures_left = None
        self.requests.clear()

    def usage(self, script: Script) -> dict[str, int]:
        completion = script.pieces * script.tokens_per_piece
        return {"prompt_tokens": script.prompt_tokens, "completion_tokens": completion,
                "total_tokens": script.prompt_tokens + completion}

    # -- the HTTP side ---------------------------------------------------------------------------

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "fake", "object": "model", "owned_by": "fake"}]})

    async def _chat(self, request: Request) -> Response:
        return await self._answer(request, "chat")

    async def _completion(self, request: Request) -> Response:
        return await self._answer(request, "completion")

    async def _answer(self, request: Request, kind: Literal["chat", "completion"]) -> Response:
        script = self.script
        if self._failures_left is not None:
            self._failures_left -= 1
            if self._failures_left <= 0:
                self.script, self._failures_left = self._after_failures, None
        body = await request.json()
        received = ReceivedRequest(path=request.url.path, body=body)
        self.requests.append(received)
        if script.fixed_status is not None:
            return self._end(received, JSONResponse(script.fixed_body, status_code=script.fixed_status))
        if body.get("stream_options") and not body.get("stream"):  # as vLLM refuses it
            return self._end(received, _error(400, "Stream options can only be defined when `stream=True`."))
        if script.hang_s is not None and await _caller_left_within(request, script.hang_s):
            return self._end(received, Response(status_code=499), outcome="client_gone")
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(self._chunks(received, script, kind, include_usage),
                                     media_type="text/event-stream")
        if script.delay_s and await _caller_left_within(request, script.delay_s * script.pieces):
            return self._end(received, Response(status_code=499), outcome="client_gone")
        text = text_of(script.pieces)
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": script.finish_reason}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        answer: dict[str, Any] = {**_envelope(kind, body, stream=False), "choices": [choice]}
        if script.usage:
            answer["usage"] = self.usage(script)
        received.pieces_sent = script.pieces
        return self._end(received, JSONResponse(answer))

    async def _chunks(self, received: ReceivedRequest, script: Script, kind: str,
                      include_usage: bool) -> AsyncIterator[bytes]:
        envelope = _envelope(kind, received.body, stream=True)

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            return b"data: " + json.dumps({**envelope, "choices": choices, **extra}).encode() + b"\n\n"

        def piece(text: str, finish: str | None) -> dict[str, Any]:
            if kind == "chat":
                return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None,
                        "finish_reason": finish}
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        try:
            if kind == "chat":
                yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            for i in range(script.pieces):
                if script.delay_s:
                    await asyncio.sleep(script.delay_s)
                received.pieces_sent += 1
                yield chunk([piece(piece_text(i), None)])
            yield chunk([piece("", script.finish_reason)])
            if include_usage and script.usage:
                yield chunk([], usage=self.usage(script))
            yield b"data: [DONE]\n\n"
            received.outcome = "completed"
        finally:  # cancelled (the caller closed the connection) unless it got to the end
            if received.outcome is None:
                received.outcome = "client_gone"
            received.ended.set()

    @staticmethod
    def _end(received: ReceivedRequest, response: Response, outcome: Outcome = "completed") -> Response:
        received.outcome = outcome
        received.ended.set()
        return response


def _envelope(kind: str, body: dict[str, Any], *, stream: bool) -> dict[str, Any]:
    obj = ("chat.completion.chunk" if stream else "chat.completion") if kind == "chat" else "text_completion"
    return {"id": f"fake-{uuid.uuid4().hex}", "object": obj, "created": int(time.time()),
            "model": body.get("model", "")}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "BadRequestError", "param": None,
                                   "code": status}}, status_code=status)


async def _caller_left_within(request: Request, seconds: float) -> bool:
    """Wait ``seconds``; True as soon as the caller disconnects instead (its body is already read)."""

    async def disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    try:
        await asyncio.wait_for(disconnect(), timeout=seconds)
    except TimeoutError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def fake_upstream(port: int | None = None) -> Iterator[FakeUpstream]:
    """Serve a ``FakeUpstream`` on 127.0.0.1 (a free port unless given) until the block ends."""
    fake = FakeUpstream()
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(fake.app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False, lifespan="off", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True, name="fake-upstream")
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the fake upstream did not start")
        time.sleep(0.01)
    fake.url = f"http://127.0.0.1:{port}"
    try:
        yield fake
    finally:
        server.should_exit = True
        thread.join(timeout=10)


class ConnectionDropper:
    """An upstream that reads each request and closes the connection without a word: a server
    whose process died behind its port, or a proxy cutting it. It counts the requests that reached
    it, so a test can tell the load a failing upstream was given."""

    def __init__(self) -> None:
        self.requests = 0
        self._lock = threading.Lock()
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), self._handler(), bind_and_activate=True)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="connection-dropper")

    def _handler(self) -> type[socketserver.BaseRequestHandler]:
        dropper = self

        class Drop(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = self.request.recv(65536)
                    if not chunk:
                        return
                    head += chunk
                with dropper._lock:
                    dropper.requests += 1
                self.request.close()

        return Drop

    def __enter__(self) -> ConnectionDropper:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description="A fake OpenAI-compatible upstream for benchmarks.")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--pieces", type=int, default=128)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="delay before each streamed piece")
    args = parser.parse_args()
    with fake_upstream(args.port) as fake:
        fake.reply(pieces=args.pieces, delay_s=args.delay_ms / 1000)
        fake.requests = _Discard()  # a benchmark sends too many requests to keep
        print(f"fake upstream on {fake.url} (Ctrl-C to stop)", flush=True)
        with suppress(KeyboardInterrupt):
            threading.Event().wait()


class _Discard(list[ReceivedRequest]):
    def append(self, item: ReceivedRequest) -> None:
        pass


if __name__ == "__main__":
    main()
