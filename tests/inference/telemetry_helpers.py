"""Request events and runtime samples as the runtime records them, and what the telemetry tests
share to read what reached the collector (the exporter fixtures are in conftest.py)."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from inference.contracts import DeviceSample, RequestEvent, RuntimeSample

TOKEN = "ingest-t0ken"


# -- factories --------------------------------------------------------------------------------


def make_event(**overrides: Any) -> RequestEvent:
    now = datetime.now(UTC)
    fields: dict[str, Any] = {
        "event_id": uuid.uuid4(),
        "runtime_id": "rt-1",
        "started_at": now,
        "finished_at": now,
        "tenant": "acme",
        "feature": "search",
        "api_key_id": "acme:…abcd",
        "model_requested": "tiny-random",
        "model_served": "tiny-random",
        "route_reason": "requested",
        "priority": "normal",
        "status": "ok",
        "http_status": 200,
        "prompt_tokens": 12,
        "completion_tokens": 34,
        "e2e_ms": 56.7,
        "device": "cpu",
    }
    fields.update(overrides)
    return RequestEvent(**fields)


def make_sample(**overrides: Any) -> RuntimeSample:
    fields: dict[str, Any] = {
        "runtime_id": "rt-1",
        "at": datetime.now(UTC),
        "queue_depth": 3,
        "running": 2,
        "tokens_per_s": 41.5,
        "devices": [DeviceSample(device="cpu")],
    }
    fields.update(overrides)
    return RuntimeSample(**fields)


def ids(events: list[RequestEvent]) -> list[str]:
    return [str(e.event_id) for e in events]


def wait_until(condition: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def raw_events(bodies: list[bytes]) -> dict[str, bytes]:
    """Each event's bytes exactly as they appeared on the wire, by event_id."""
    decoder = json.JSONDecoder()
    found: dict[str, bytes] = {}
    for body in bodies:
        text = body.decode()
        assert text.startswith('{"events":[')
        pos = len('{"events":[')
        while text[pos] != "]":
            event, end = decoder.raw_decode(text, pos)
            found[event["event_id"]] = text[pos:end].encode()
            pos = end + (text[end] == ",")
    return found


def segment_files(spool_dir: Path) -> list[Path]:
    return sorted(spool_dir.glob("segment-*.log"))
