"""Robustness: hostile input, clients that vanish at awkward moments, and failures inside the engine
never cost a slot, an event or the other requests in the batch."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from inference.api import create_app
from inference.engine import kv_batch
from inference.engine.detokenizer import IncrementalDetokenizer
from inference.engine.engine import Engine
from inference.engine.models import LoadedModel
from inference.runtime import Runtime
from tests.inference.engine_driver import submit
from tests.inference.live import ACME, LiveRuntime, slowed, tiny_config

CHAT = "/v1/chat/completions"
GOOD_CHAT: dict[str, Any] = {"model": "tiny-random", "messages": [{"role": "user", "content": "hi"}]}


# -- helpers: drive the ASGI app directly, so a test controls exactly when the client goes away ---


def _scope(path: str = CHAT, headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
        "headers": headers if headers is not None else [
            (b"authorization", f"Bearer {ACME}".encode()), (b"content-type", b"application/json")],
    }


@pytest.fixture
def runtime(tiny_model: LoadedModel) -> Iterator[Runtime]:
    config = dataclasses.replace(tiny_config(), port=0)
    yield Runtime(config, preloaded=(tiny_model,))


async def _started(runtime: Runtime) -> list[Any]:
    events: list[Any] = []
    runtime.subscribe(events.append)
    await runtime.start()
    return events


async def _wait_for(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return bool(predicate())


# -- 1. streaming: a disconnect just before the stream starts leaks the slot and loses the event ---


def test_stream_disconnect_before_first_chunk_releases_slot_and_records_event(runtime: Runtime) -> None:
    """Uvicorn's receive() returns http.disconnect at once once the client is gone, so Starlette's
    listen_for_disconnect cancels the streaming task before it ever iterates the body generator; the
    generator's ``finally`` (the only place that abandons the exchange) never runs."""
    body = json.dumps({**GOOD_CHAT, "stream": True, "max_tokens": 4}).encode()

    async def main() -> tuple[int, list[Any]]:
        events = await _started(runtime)
        app = create_app(runtime.config, runtime)
        calls = 0
        forever = asyncio.Event()

        async def receive() -> dict[str, Any]:
            nonlocal calls
            calls += 1
            if calls == 1:
                return {"type": "http.request", "body": body, "more_body": False}
            if calls == 2:  # the API's own watcher: the client is still there while it listens
                await forever.wait()
            return {"type": "http.disconnect"}  # gone by the time the stream starts

        async def send(message: dict[str, Any]) -> None:
            # A send that is a checkpoint (any ASGI middleware that awaits, a server under flow
            # control): the task-group cancellation lands here, before the generator starts.
            await asyncio.sleep(0)

        try:
            await app(_scope(), receive, send)
            await _wait_for(lambda: runtime.backends["tiny-random"].admission.in_use == 0 and events)
            return runtime.backends["tiny-random"].admission.in_use, list(events)
        finally:
            await runtime.stop()

    in_use, events = asyncio.run(main())
    assert in_use == 0, "the admission slot of a disconnected stream was never released"
    assert len(events) == 1 and events[0].status == "cancelled"


# -- 2. a client that disconnects while uploading its body: 500 + stack trace logged, no event -----


def test_disconnect_during_body_upload_is_recorded_not_a_500(runtime: Runtime) -> None:
    async def main() -> tuple[list[dict[str, Any]], list[Any]]:
        events = await _started(runtime)
        app = create_app(runtime.config, runtime)
        messages = iter([{"type": "http.request", "body": b'{"model": "tiny-', "more_body": True},
                         {"type": "http.disconnect"}])
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return next(messages, {"type": "http.disconnect"})

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        try:
            with contextlib.suppress(Exception):  # Starlette re-raises after its 500 page
                await app(_scope(), receive, send)
            await asyncio.sleep(0.1)
            return sent, list(events)
        finally:
            await runtime.stop()

    sent, events = asyncio.run(main())
    statuses = [m["status"] for m in sent if m["type"] == "http.response.start"]
    assert 500 not in statuses, "ClientDisconnect fell through to the catch-all 500 handler"
    assert len(events) == 1 and events[0].status == "cancelled"


# -- 3./4. hostile bodies that become 500s (and lose their event) -----------------------------------


def test_deeply_nested_json_is_400_not_500(live: LiveRuntime) -> None:
    """json.loads raises RecursionError (not ValueError) past ~1000 levels; 200 kB is well under
    the 4 MB body limit."""
    before = len(live.events)
    raw = b'{"model": "tiny-random", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with live.client() as client:
        response = client.post(CHAT, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert len(live.wait_for_events(before + 1, timeout=2)) == before + 1


def test_lone_surrogate_in_message_content_is_400_not_500(live: LiveRuntime) -> None:
    """``"\\ud800"`` is valid JSON; pydantic passes an unconstrained str through unchanged, and the
    Rust tokenizer then refuses the string with a non-ApiError exception."""
    before = len(live.events)
    raw = b'{"model": "tiny-random", "messages": [{"role": "user", "content": "hi \\ud800 there"}]}'
    with live.client() as client:
        response = client.post(CHAT, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert len(live.wait_for_events(before + 1, timeout=2)) == before + 1


# -- 5. one request with a tiny temperature fails every sequence sharing its batch ------------------


def test_tiny_temperature_does_not_fail_the_other_sequences_in_the_batch(tiny_model: LoadedModel) -> None:
    """temperature=1e-50 passes validation (ge=0) and is not 'greedy' (!= 0.0), but as a float32 it
    is 0: logits/0 -> inf/nan -> torch.multinomial raises -> _fail_all errors the whole batch."""
    engine = Engine(slowed(tiny_model, 0.02), max_batch_size=4)
    engine.start()
    try:
        bystander = submit(engine, [5, 6, 7, 8], max_tokens=30, ignore_eos=True)
        time.sleep(0.1)  # let it be running when the hostile one joins
        hostile = submit(engine, [9, 10, 11], max_tokens=5, temperature=1e-50, ignore_eos=True)
        hostile_result = hostile.result()
        bystander_result = bystander.result()
    finally:
        engine.stop()
    assert bystander_result.finish_reason == "length", bystander_result.error
    assert hostile_result.finish_reason == "length", hostile_result.error


# -- 6. the engine thread dies if cancellation's cache trim raises (e.g. CUDA OOM) -----------------


def test_a_failure_while_dropping_a_cancelled_sequence_does_not_kill_the_engine(
    tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``_drop_cancelled`` (which copies the whole KV cache in ``KVBatch.select``) runs outside the
    step's try/except: if it raises, the engine thread ends and every sequence hangs forever."""
    engine = Engine(slowed(tiny_model, 0.02), max_batch_size=4)
    engine.start()
    try:
        a = submit(engine, [5, 6, 7], max_tokens=200, ignore_eos=True)
        b = submit(engine, [8, 9, 10], max_tokens=200, ignore_eos=True)
        time.sleep(0.2)
        original = kv_batch.KVBatch.select

        def failing_select(self: kv_batch.KVBatch, rows: list[int]) -> None:
            monkeypatch.setattr(kv_batch.KVBatch, "select", original)
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

        monkeypatch.setattr(kv_batch.KVBatch, "select", failing_select)
        a.handle.cancel()
        try:
            result = b.result(timeout=10)
        except Exception:  # queue.Empty: the engine thread is dead
            pytest.fail(f"engine thread alive={engine._thread.is_alive()}; sequence b never ended")
        assert result.finish_reason in ("error", "length")
    finally:
        engine.stop(timeout=2)


# -- 7. SentencePiece-style decoders lose the first generated token's leading space ---------------


def _sentencepiece_like_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "\u2581The": 1, "\u2581capital": 2, "\u2581is": 3, "\u2581Paris": 4, ".": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # Llama-2 / Mistral's decoder: the leading space of the decoded string is stripped.
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def test_first_generated_token_keeps_its_leading_space_with_a_sentencepiece_decoder() -> None:
    tok = _sentencepiece_like_tokenizer()
    prompt, generated = [1, 2, 3], [4, 5]
    expected = tok.decode(prompt + generated)[len(tok.decode(prompt)):]  # " Paris."
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    text = "".join(detok.add(t) for t in generated) + detok.finish()
    assert text == expected


# -- 8. Content-Length with a non-ASCII digit: str.isdigit() accepts it, int() does not ------------


def test_unicode_digit_content_length_is_not_a_500(runtime: Runtime) -> None:
    async def main() -> list[int]:
        await runtime.start()
        app = create_app(runtime.config, runtime)
        sent: list[dict[str, Any]] = []
        body = json.dumps(GOOD_CHAT).encode()
        msgs = iter([{"type": "http.request", "body": body, "more_body": False}])

        async def receive() -> dict[str, Any]:
            return next(msgs, {"type": "http.disconnect"})

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        headers = [(b"authorization", f"Bearer {ACME}".encode()), (b"content-length", "\u00b2".encode("latin-1"))]
        try:
            with contextlib.suppress(Exception):  # Starlette re-raises after its 500 page
                await app(_scope(headers=headers), receive, send)
        finally:
            await runtime.stop()
        return [m["status"] for m in sent if m["type"] == "http.response.start"]

    assert asyncio.run(main()) != [500]


# -- 9. the stop-string holdback: text must never leak a prefix of a stop string ------------------


def test_stop_string_prefix_is_never_streamed(tiny_model: LoadedModel) -> None:
    tok = tiny_model.tokenizer
    ids = tok.encode("The capital of France is Paris.")
    detok = IncrementalDetokenizer(tok, stop=("Paris",))
    streamed = "".join(detok.add(i) for i in ids) + detok.finish()
    assert streamed == "The capital of France is "
    assert detok.stopped
