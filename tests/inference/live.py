"""A live runtime for tests: the real FastAPI app under a real uvicorn server on a free port."""

from __future__ import annotations

import dataclasses
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from inference.api import create_app
from inference.config import ApiKey, RuntimeConfig
from inference.contracts import RequestEvent
from inference.engine.models import LoadedModel
from inference.runtime import Runtime

KEYS = (
    ApiKey("sk-acme-premium-0001", "acme", "premium"),
    ApiKey("sk-globex-standard-02", "globex", "standard"),
    ApiKey("sk-initech-free-0003", "initech", "free"),
)
ACME, GLOBEX, INITECH = (k.key for k in KEYS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass
class LiveRuntime:
    base_url: str
    runtime: Runtime
    events: list[RequestEvent]

    def client(self, key: str = ACME, **headers: str) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {key}", **headers},
                            timeout=60)

    def wait_for_events(self, count: int, timeout: float = 10.0) -> list[RequestEvent]:
        deadline = time.monotonic() + timeout
        while len(self.events) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return list(self.events)


@contextmanager
def serve(config: RuntimeConfig, preloaded: tuple[LoadedModel, ...] = (), **runtime_kwargs: Any
          ) -> Iterator[LiveRuntime]:
    """Serve ``config`` on a free port until the block ends."""
    port = free_port()
    config = dataclasses.replace(config, port=port)
    runtime = Runtime(config, preloaded=preloaded, **runtime_kwargs)
    events: list[RequestEvent] = []
    runtime.subscribe(events.append)
    server = uvicorn.Server(uvicorn.Config(create_app(config, runtime), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the runtime did not start")
        time.sleep(0.02)
    try:
        yield LiveRuntime(f"http://127.0.0.1:{port}", runtime, events)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def tiny_config(**overrides: Any) -> RuntimeConfig:
    # Each config its own state directory: runtimes in one test run never share a ruleset or ledger.
    base = RuntimeConfig(models=("tiny-random",), device="cpu", api_keys=KEYS, runtime_id="test-runtime",
                         sample_interval_s=60.0, max_batch_size=8, max_queue_depth=16, max_queue_wait_s=30.0,
                         default_max_tokens=16, state_dir=Path(tempfile.mkdtemp(prefix="wattson-state-")))
    return dataclasses.replace(base, **overrides)


def slowed(loaded: LoadedModel, seconds_per_step: float) -> LoadedModel:
    """The same model made slower by ``seconds_per_step`` a forward pass, so that a test can act
    while a request is still generating."""
    import copy

    model = copy.copy(loaded.model)
    forward = loaded.model.forward

    def slow_forward(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds_per_step)
        return forward(*args, **kwargs)

    model.forward = slow_forward  # type: ignore[method-assign]
    return dataclasses.replace(loaded, model=model)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def post_in_thread(live: LiveRuntime, body: dict, results: list, **headers: str) -> threading.Thread:
    """POST a completion from a thread of its own; its response lands in ``results``."""
    def run() -> None:
        with live.client(**headers) as client:
            results.append(client.post("/v1/completions", json=body))

    thread = threading.Thread(target=run)
    thread.start()
    return thread
