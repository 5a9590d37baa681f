"""The engine batches continuously, matches unbatched generation, and accounts for every step."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inference.engine.engine import Engine
from inference.engine.models import LoadedModel
from tests.inference.engine_driver import Submitted, submit


@pytest.fixture
def engine(tiny_model: LoadedModel) -> Iterator[Engine]:
    engine = Engine(tiny_model, max_batch_size=8, max_prefill_tokens=256)
    engine.start()
    yield engine
    engine.stop()


def prompt(tiny_model: LoadedModel, text: str) -> list[int]:
    return tiny_model.tokenizer.encode(text)


def reference_greedy(tiny_model: LoadedModel, ids: list[int], n: int) -> list[int]:
    out = tiny_model.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                    pad_token_id=tiny_model.tokenizer.pad_token_id)
    return out[0, len(ids):].tolist()


def test_sequences_joining_midway_generate_what_they_would_alone(engine: Engine, tiny_model: LoadedModel) -> None:
    texts = ["The lighthouse", "She carried a lamp and a notebook", "Wind", "The ships that passed the rail"]
    runs = []
    for i, text in enumerate(texts):
        runs.append((text, 10 + 3 * i, submit(engine, prompt(tiny_model, text), max_tokens=10 + 3 * i,
                                              ignore_eos=True)))
        time.sleep(0.02)  # later ones join a batch that is already decoding
    for text, n, run in runs:
        result = run.result()
        expected = tiny_model.tokenizer.decode(reference_greedy(tiny_model, prompt(tiny_model, text), n),
                                               skip_special_tokens=True)
        assert result.text == expected
        assert "".join(d.text for d in run.deltas) == result.text
        assert result.completion_tokens == n and result.finish_reason == "length"


def test_a_short_request_is_not_held_behind_a_long_one(engine: Engine, tiny_model: LoadedModel) -> None:
    long = submit(engine, prompt(tiny_model, "A long story"), max_tokens=400, ignore_eos=True)
    time.sleep(0.05)
    short = submit(engine, prompt(tiny_model, "Short"), max_tokens=3, ignore_eos=True)
    short_result = short.result()
    long_result = long.result()
    assert short_result.finished_at < long_result.finished_at
    assert long_result.completion_tokens == 400
    assert short_result.mean_batch_size is not None and short_result.mean_batch_size > 1


def test_cancelling_a_running_sequence_frees_its_slot(engine: Engine, tiny_model: LoadedModel) -> None:
    run = submit(engine, prompt(tiny_model, "Go on"), max_tokens=400, ignore_eos=True)
    while not run.deltas:
        run.deltas.append(run.outputs.get(timeout=10))
    run.handle.cancel()
    result = run.result()
    assert result.finish_reason == "cancelled"
    assert 0 < result.completion_tokens < 400
    deadline = time.monotonic() + 5
    while engine.stats.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats.running == 0 and engine.stats.kv_tokens_held == 0


def wait_for_tokens(run: Submitted, count: int) -> None:
    while not run.deltas or run.deltas[-1].completion_tokens < count:
        run.deltas.append(run.outputs.get(timeout=10))


def pause(engine: Engine, run: Submitted) -> None:
    """Pause ``run`` and wait until the engine has taken it out of the batch."""
    run.handle.pause()
    deadline = time.monotonic() + 5
    while engine.stats.paused != 1:
        assert time.monotonic() < deadline, "the engine did not pause the sequence"
        time.sleep(0.005)


def test_a_paused_sequence_leaves_the_batch_and_resumes_where_it_stopped(tiny_model: LoadedModel) -> None:
    engine = Engine(tiny_model, max_batch_size=2)
    engine.start()
    try:
        text = "The keeper wound the clock"
        run = submit(engine, prompt(tiny_model, text), max_tokens=40, ignore_eos=True)
        other = submit(engine, prompt(tiny_model, "Wind"), max_tokens=60, ignore_eos=True)
        wait_for_tokens(run, 5)
        pause(engine, run)
        assert engine.stats.running <= 1, "it left the batch; the other sequence decodes on"
        while not run.outputs.empty():
            run.deltas.append(run.outputs.get())
        time.sleep(0.05)
        assert run.outputs.empty(), "nothing is generated while paused"
        run.handle.resume()
        result = run.result()
        other_result = other.result()
    finally:
        engine.stop()
    for text_, n, got in ((text, 40, result), ("Wind", 60, other_result)):
        expected = tiny_model.tokenizer.decode(reference_greedy(tiny_model, prompt(tiny_model, text_), n),
                                               skip_special_tokens=True)
        assert got.text == expected and got.completion_tokens == n
    assert engine.stats.pauses_total == 1
    assert engine.stats.prompt_tokens_total == len(prompt(tiny_model, text)) + len(prompt(tiny_model, "Wind")), \
        "nothing was prefilled again"


def test_a_paused_sequence_can_be_cancelled(tiny_model: LoadedModel) -> None:
    engine = Engine(tiny_model, max_batch_size=2)
    engine.start()
    try:
        run = submit(engine, prompt(tiny_model, "Go on"), max_tokens=400, ignore_eos=True)
        wait_for_tokens(run, 2)
        pause(engine, run)
        run.handle.cancel()
        result = run.result()
    finally:
        engine.stop()
    assert result.finish_reason == "cancelled" and 0 < result.completion_tokens < 400
    assert engine.stats.paused == 0


def test_eos_ends_a_sequence_unless_ignored(tiny_model: LoadedModel) -> None:
    eos = next(iter(tiny_model.eos_token_ids))
    biased = _always_emit(tiny_model, eos)
    engine = Engine(biased, max_batch_size=2)
    engine.start()
    try:
        stops = submit(engine, [5, 6, 7], max_tokens=10).result()
        runs_on = submit(engine, [5, 6, 7], max_tokens=10, ignore_eos=True).result()
    finally:
        engine.stop()
    assert (stops.finish_reason, stops.completion_tokens, stops.text) == ("stop", 1, "")
    assert (runs_on.finish_reason, runs_on.completion_tokens) == ("length", 10)


def test_a_sequence_stops_at_the_context_limit(tiny_model: LoadedModel) -> None:
    import dataclasses

    small = dataclasses.replace(tiny_model, max_context=12)
    engine = Engine(small, max_batch_size=2)
    engine.start()
    try:
        result = submit(engine, list(range(20, 28)), max_tokens=100, ignore_eos=True).result()
    finally:
        engine.stop()
    assert result.finish_reason == "length" and result.completion_tokens == 4


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    requests=st.lists(
        st.tuples(st.integers(1, 40), st.integers(1, 12), st.floats(0, 0.03), st.booleans()),
        min_size=1, max_size=10,
    ),
    max_batch=st.integers(1, 6),
    prefill_budget=st.sampled_from([16, 64, 512]),
)
def test_attributed_gpu_seconds_add_up_to_the_measured_busy_time(
    tiny_model: LoadedModel, requests: list[tuple[int, int, float, bool]], max_batch: int, prefill_budget: int
) -> None:
    engine = Engine(tiny_model, max_batch_size=max_batch, max_prefill_tokens=prefill_budget)
    engine.start()
    runs = []
    try:
        for prompt_len, max_tokens, delay, cancel in requests:
            time.sleep(delay)
            run = submit(engine, [(7 * i) % 300 + 3 for i in range(prompt_len)], max_tokens=max_tokens,
                         ignore_eos=True)
            if cancel:
                run.handle.cancel()
            runs.append(run)
        results = [run.result() for run in runs]
    finally:
        engine.stop()
    attributed = sum(r.gpu_seconds or 0.0 for r in results)
    assert attributed == pytest.approx(engine.stats.busy_seconds_total, rel=1e-9, abs=1e-12)
    if not all(cancel for *_, cancel in requests):
        assert engine.stats.busy_seconds_total > 0
    served = [r for r in results if r.finish_reason != "cancelled" or r.completion_tokens]
    assert all((r.gpu_seconds or 0) > 0 for r in served)


def test_energy_is_split_by_tokens_and_conserved(tiny_model: LoadedModel) -> None:
    counter = {"joules": 1000.0}

    def read_counter() -> float:
        counter["joules"] += 0.5  # the counter moves on between reads, as NVML's does
        return counter["joules"]

    engine = Engine(tiny_model, max_batch_size=4, energy_reader=read_counter)
    engine.start()
    try:
        runs = [submit(engine, list(range(3, 3 + n)), max_tokens=6, ignore_eos=True) for n in (4, 9, 17)]
        results = [run.result() for run in runs]
    finally:
        engine.stop()
    assert all(r.energy_joules is not None and r.energy_joules > 0 for r in results)
    total = engine.stats.energy_joules_total
    assert total is not None and sum(r.energy_joules or 0 for r in results) == pytest.approx(total)


def _always_emit(loaded: LoadedModel, token: int) -> LoadedModel:
    """A copy of the model whose output head always prefers ``token``."""
    import copy
    import dataclasses

    model = copy.deepcopy(loaded.model)
    original_forward = model.forward

    def forward(*args: object, **kwargs: object) -> object:
        out = original_forward(*args, **kwargs)
        out.logits[..., token] += 100.0
        return out

    model.forward = forward  # type: ignore[method-assign]
    return dataclasses.replace(loaded, model=model)
