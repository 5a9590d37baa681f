"""A long prompt is prefilled in chunks, with the running streams decoding between them."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from inference.engine.engine import Engine
from inference.engine.models import LoadedModel
from tests.inference.engine_driver import submit

CHUNK = 8
LONG_TEXT = ("The lighthouse keeper climbed the stairs every evening at dusk. She carried a lamp, a notebook "
             "and a flask of tea, and she wrote down the weather.")


class Steps:
    """The engine's steps as they happen: (kind, batch size)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[tuple[str, int]] = []

    def __call__(self, kind: str, batch: int, elapsed: float) -> None:
        with self.lock:
            self.seen.append((kind, batch))

    def kinds(self) -> list[str]:
        with self.lock:
            return [kind for kind, _ in self.seen]


@pytest.fixture
def steps() -> Steps:
    return Steps()


@pytest.fixture
def engine(tiny_model: LoadedModel, steps: Steps) -> Iterator[Engine]:
    engine = Engine(tiny_model, max_batch_size=8, prefill_chunk_tokens=CHUNK, on_step=steps)
    engine.start()
    yield engine
    engine.stop()


def reference_greedy(tiny_model: LoadedModel, ids: list[int], n: int) -> list[int]:
    out = tiny_model.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                    pad_token_id=tiny_model.tokenizer.pad_token_id)
    return out[0, len(ids):].tolist()


def test_a_chunked_prompt_generates_what_one_prefill_would(engine: Engine, tiny_model: LoadedModel,
                                                           steps: Steps) -> None:
    ids = tiny_model.tokenizer.encode(LONG_TEXT)
    assert len(ids) > 3 * CHUNK
    result = submit(engine, ids, max_tokens=12, ignore_eos=True).result()
    expected = tiny_model.tokenizer.decode(reference_greedy(tiny_model, ids, 12), skip_special_tokens=True)
    assert result.text == expected
    assert steps.kinds().count("prefill") == -(-len(ids) // CHUNK), "one prefill step per chunk"
    assert engine.stats.prompt_tokens_total == len(ids)


def test_running_streams_decode_between_the_chunks_of_a_long_prompt(engine: Engine, tiny_model: LoadedModel,
                                                                    steps: Steps) -> None:
    running = submit(engine, tiny_model.tokenizer.encode("Wind"), max_tokens=300, ignore_eos=True)
    while not running.deltas:
        running.deltas.append(running.outputs.get(timeout=10))
    ids = tiny_model.tokenizer.encode(LONG_TEXT)
    long = submit(engine, ids, max_tokens=4, ignore_eos=True)
    long.result()
    running.result()
    kinds = steps.kinds()
    chunk_steps = [i for i, kind in enumerate(kinds) if kind == "prefill"][1:]  # the first is "Wind"'s own
    assert len(chunk_steps) == -(-len(ids) // CHUNK)
    for before, after in itertools.pairwise(chunk_steps):
        assert "decode" in kinds[before + 1:after], "a decode step of the running stream follows every chunk"


def test_short_prompts_queued_behind_a_long_one_still_batch_together(engine: Engine, tiny_model: LoadedModel,
                                                                     steps: Steps) -> None:
    long = submit(engine, tiny_model.tokenizer.encode(LONG_TEXT), max_tokens=2, ignore_eos=True)
    shorts = [submit(engine, tiny_model.tokenizer.encode(t), max_tokens=2, ignore_eos=True)
              for t in ("Wind", "Hello", "Rome")]
    assert long.result().completion_tokens == 2
    assert [s.result().completion_tokens for s in shorts] == [2, 2, 2]
    assert ("prefill", 3) in steps.seen, "the three waited out the chunks, then were prefilled in one step"


def test_cancelling_a_prompt_halfway_through_its_chunks_frees_everything(tiny_model: LoadedModel) -> None:
    gate = threading.Event()

    def slow(kind: str, batch: int, elapsed: float) -> None:
        gate.wait(5)

    engine = Engine(tiny_model, max_batch_size=8, prefill_chunk_tokens=CHUNK, on_step=slow)
    engine.start()
    try:
        run = submit(engine, tiny_model.tokenizer.encode(LONG_TEXT), max_tokens=4, ignore_eos=True)
        time.sleep(0.05)  # the first chunk is being prefilled, held at its step observer
        run.handle.cancel()
        gate.set()
        result = run.result()
        assert result.finish_reason == "cancelled" and result.completion_tokens == 0
        deadline = time.monotonic() + 5
        while (engine.stats.waiting or engine.stats.kv_tokens_held) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats.waiting == 0 and engine.stats.kv_tokens_held == 0
    finally:
        engine.stop()


def test_a_prompt_paused_between_chunks_resumes_and_generates_the_same(tiny_model: LoadedModel) -> None:
    gate = threading.Event()

    def slow(kind: str, batch: int, elapsed: float) -> None:
        gate.wait(5)

    engine = Engine(tiny_model, max_batch_size=8, prefill_chunk_tokens=CHUNK, on_step=slow)
    engine.start()
    try:
        ids = tiny_model.tokenizer.encode(LONG_TEXT)
        run = submit(engine, ids, max_tokens=6, ignore_eos=True)
        time.sleep(0.05)
        run.handle.pause()
        gate.set()
        time.sleep(0.1)
        assert engine.stats.paused == 1
        run.handle.resume()
        result = run.result()
    finally:
        engine.stop()
    expected = tiny_model.tokenizer.decode(reference_greedy(tiny_model, ids, 6), skip_special_tokens=True)
    assert result.text == expected and result.finish_reason == "length"
