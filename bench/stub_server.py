"""An instant stand-in for an OpenAI-compatible upstream and for the control plane's ingest API.

``python -m bench.stub_server --port PORT`` answers

- ``POST /v1/chat/completions`` at once with a fixed short reply (non-streamed), so what a client
  measures through the runtime minus what it measures here directly is the runtime's own cost;
- ``POST /api/v1/events`` with 202, counting the events and samples it was sent;
- ``GET /stats`` with those counts, ``GET /device-use`` with each event's device figures in the
  order received (``gpu_seconds``, ``energy_joules``, ``device_use_source``, ``device``), and
  ``GET /health``.

It runs in a process of its own so that it does not share a GIL with the runtime or the load.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

REPLY = "Hello from the stub."
REPLY_TOKENS = 5

received = {"posts": 0, "events": 0, "samples": 0}
DEVICE_USE_FIELDS = ("gpu_seconds", "energy_joules", "device_use_source", "device")
device_use: list[dict[str, object]] = []


async def chat_completions(request: Request) -> JSONResponse:
    body = json.loads(await request.body())
    prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
    return JSONResponse({
        "id": "chatcmpl-" + uuid.uuid4().hex,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "stub"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": REPLY},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": REPLY_TOKENS,
                  "total_tokens": prompt_tokens + REPLY_TOKENS},
    })


async def events(request: Request) -> Response:
    # Parsed like a collector would at least do, so a malformed batch would show up as a 400.
    try:
        batch = json.loads(await request.body())
        event_count, sample_count = len(batch["events"]), len(batch["samples"])
    except (ValueError, KeyError, TypeError):
        return JSONResponse({"error": {"type": "invalid_request_error", "message": "bad batch"}},
                            status_code=400)
    received["posts"] += 1
    device_use.extend({name: event.get(name) for name in DEVICE_USE_FIELDS} for event in batch["events"])
    received["events"] += event_count
    received["samples"] += sample_count
    return JSONResponse({"accepted": event_count + sample_count}, status_code=202)


async def stats(request: Request) -> JSONResponse:
    return JSONResponse(received)


async def device_uses(request: Request) -> JSONResponse:
    return JSONResponse(device_use)


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


app = Starlette(routes=[
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/api/v1/events", events, methods=["POST"]),
    Route("/stats", stats),
    Route("/device-use", device_uses),
    Route("/health", health),
])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.stub_server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
