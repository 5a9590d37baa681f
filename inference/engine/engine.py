"""The engine: continuous batching of one model on one device, in a thread of its own.

Between decode steps new sequences are prefilled and join the running batch, and finished or
cancelled ones leave it, so a short request is never held behind a long one. A sequence can be
paused (``SequenceHandle.pause``: admission preempts it for high-priority work): it leaves the batch
with its KV cache rows kept aside, and resumed, those rows join the batch again and it carries on
where it stopped, with nothing recomputed. A prompt longer than ``prefill_chunk_tokens`` is
prefilled alone, one chunk per step with a decode step of the running batch after each, so a long
prompt never stalls the streams already running. Every step is timed
(and its energy read where NVML has a counter) and its cost split among the sequences in it by the
tokens each processed (``attribute_step_time``), so the per-request GPU-seconds add up to the
engine's measured busy time.

The engine knows nothing of HTTP or asyncio: requests come in through ``submit`` and results go out
through each request's ``sink`` callable, which the API turns into an asyncio queue.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from inference.contracts import DeviceUseSource
from inference.engine.attribution import attribute_step_time
from inference.engine.detokenizer import IncrementalDetokenizer
from inference.engine.kv_batch import KVBatch
from inference.engine.llama_forward import model_forward
from inference.engine.models import LoadedModel
from inference.engine.sampling import SamplerState, SamplingParams, sample_next_tokens
from inference.engine.threads import DEFAULT_THREADS, pin_torch_threads

log = logging.getLogger("inference.engine")


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class TokenDelta:
    """New text that is safe to show, and how many tokens have been generated so far."""

    text: str
    completion_tokens: int


@dataclass(frozen=True)
class GenerationResult:
    """How a sequence ended and what it cost. Times are ``time.perf_counter()`` readings."""

    text: str
    finish_reason: str  # "stop", "length", "cancelled" or "error"
    prompt_tokens: int
    completion_tokens: int
    submitted_at: float
    first_token_at: float | None
    finished_at: float
    gpu_seconds: float | None
    energy_joules: float | None
    mean_batch_size: float | None
    error: str | None = None
    # "measured": this engine timed the steps (a cache hit ran none); "attributed": an upstream's
    # busy time and energy were split from outside it (inference/upstream_attribution.py).
    device_use_source: DeviceUseSource = "measured"


EngineOutput = TokenDelta | GenerationResult
Sink = Callable[[EngineOutput], None]


class SequenceHandle:
    """The caller's hold on a submitted sequence: it can cancel it, from any thread."""

    def __init__(self, engine: Engine, seq_id: int) -> None:
        self._engine = engine
        self.seq_id = seq_id
        self.cancelled = threading.Event()
        self.pause_wanted = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()
        self._engine.wake()

    def pause(self) -> None:
        """Take the sequence out of the batch before the next step (a finished one stays finished)."""
        self.pause_wanted.set()
        self._engine.wake()

    def resume(self) -> None:
        self.pause_wanted.clear()
        self._engine.wake()


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    paused: int = 0
    pauses_total: int = 0
    steps_total: int = 0
    busy_seconds_total: float = 0.0
    energy_joules_total: float | None = None
    prompt_tokens_total: int = 0
    completion_tokens_total: int = 0
    kv_tokens_held: int = 0
    last_batch_size: int = 0


@dataclass
class _Sequence:
    handle: SequenceHandle
    request: GenerationRequest
    sink: Sink
    sampler: SamplerState
    detokenizer: IncrementalDetokenizer
    submitted_at: float
    first_token_at: float | None = None
    last_token: int = 0
    generated: int = 0
    gpu_seconds: float = 0.0
    energy_joules: float | None = None
    batch_size_sum: int = 0
    steps: int = 0
    finish_reason: str | None = None
    error: str | None = None
    kv: KVBatch | None = None  # its KV cache rows, kept aside while paused
    partial: DynamicCache | None = None  # a chunked prefill's cache so far
    prefilled: int = 0  # prompt tokens in ``partial``

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)


class _PrefillFailed(Exception):
    """A prefill failed before its sequences joined the running batch: fail them, not the batch."""

    def __init__(self, group: list[_Sequence]) -> None:
        super().__init__("prefill failed")
        self.group = group


EnergyReader = Callable[[], float | None]
StepObserver = Callable[[str, int, float], None]


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_batch_size: int = 32,
        max_prefill_tokens: int = 4096,
        prefill_chunk_tokens: int | None = 512,
        energy_reader: EnergyReader | None = None,
        on_step: StepObserver | None = None,
        torch_threads: int | None = None,
    ) -> None:
        self.loaded = loaded
        # The engine's thread runs the model on this many cores (default: what torch would use here);
        # see inference.engine.threads for why other threads get one.
        self.torch_threads = torch_threads or DEFAULT_THREADS
        self._pinned = threading.Event()
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self._chunking: _Sequence | None = None  # the long prompt being prefilled a chunk at a time
        self._energy_reader = energy_reader
        self._on_step = on_step
        self._cond = threading.Condition()
        self._inbox: deque[_Sequence] = deque()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._paused: list[_Sequence] = []
        self._batch: KVBatch | None = None
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stats = EngineStats(energy_joules_total=0.0 if energy_reader else None)
        self._forward = model_forward(loaded.model, loaded.device)
        pad = loaded.tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else next(iter(loaded.eos_token_ids), 0)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"engine-{self.loaded.name}", daemon=True)
        self._thread.start()
        self._pinned.wait()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # -- requests ------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, sink: Sink) -> SequenceHandle:
        """Queue a sequence for the next step. The caller has already admitted it (a free slot)."""
        if not request.prompt_ids:
            raise ValueError("a prompt needs at least one token")
        handle = SequenceHandle(self, next(self._ids))
        tokenizer = self.loaded.tokenizer
        seq = _Sequence(
            handle=handle,
            request=request,
            sink=sink,
            sampler=SamplerState.create(request.params, self.loaded.device),
            detokenizer=IncrementalDetokenizer(tokenizer, request.params.stop, request.prompt_ids),
            submitted_at=time.perf_counter(),
            energy_joules=0.0 if self._energy_reader else None,
        )
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine is shutting down")
            self._inbox.append(seq)
            self._cond.notify_all()
        return handle

    # -- the loop ------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            pin_torch_threads(self.torch_threads)
        finally:
            self._pinned.set()  # start() waits for this: never leave it waiting
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                if not (self._inbox or self._waiting or self._running or self._chunking or self._stopping
                        or self._resumable()):
                    self._cond.wait(timeout=1.0)
                if self._stopping:
                    break
                self._waiting.extend(self._inbox)
                self._inbox.clear()
            try:
                self._drop_cancelled()
                self._apply_pauses()
                with torch.inference_mode():
                    if (self._chunking or self._waiting) and len(self._running) < self.max_batch_size:
                        self._prefill()
                    if self._running:
                        self._decode()
            except _PrefillFailed as failed:  # only the sequences being prefilled fail
                log.error("prefill failed: %s", failed.__cause__, exc_info=failed.__cause__)
                for seq in failed.group:
                    self._finish(seq, "error", error=str(failed.__cause__))
            except Exception as exc:  # a failed step fails its sequences, never the engine
                log.exception("engine step failed")
                self._fail_all(f"{type(exc).__name__}: {exc}")
            self._publish_stats()
        self._fail_all("the engine stopped", reason="cancelled")

    def _drop_cancelled(self) -> None:
        chunking = self._chunking
        if chunking is not None and chunking.handle.cancelled.is_set():
            self._chunking, chunking.partial = None, None
            self._finish(chunking, "cancelled")
        for seq in [s for s in self._waiting if s.handle.cancelled.is_set()]:
            self._waiting.remove(seq)
            self._finish(seq, "cancelled")
        for seq in [s for s in self._paused if s.handle.cancelled.is_set()]:
            self._paused.remove(seq)
            seq.kv = None
            self._finish(seq, "cancelled")
        gone = [i for i, s in enumerate(self._running) if s.handle.cancelled.is_set()]
        for i in gone:
            self._running[i].finish_reason = "cancelled"
        if gone:
            self._retire_finished()

    def _resumable(self) -> bool:
        return any(not s.handle.pause_wanted.is_set() for s in self._paused)

    def _apply_pauses(self) -> None:
        """Move the sequences asked to pause out of the batch (their KV rows with them), and those
        asked to resume back into it while it has room; one paused before its prefill waits for
        it again, ahead of the rest."""
        for seq in [s for s in self._running if s.handle.pause_wanted.is_set()]:
            row = self._running.index(seq)
            assert self._batch is not None
            if len(self._running) == 1:
                seq.kv, self._batch = self._batch, None
            else:
                seq.kv = self._batch.split([row])
            self._running.pop(row)
            self._paused.append(seq)
            self.stats.pauses_total += 1
        for seq in [s for s in self._waiting if s.handle.pause_wanted.is_set()]:
            self._waiting.remove(seq)
            self._paused.append(seq)
        chunking = self._chunking
        if chunking is not None and chunking.handle.pause_wanted.is_set():
            # Paused halfway through its prompt: its chunks are dropped and prefilled again on resume.
            self._chunking, chunking.partial, chunking.prefilled = None, None, 0
            self._paused.append(chunking)
        unprefilled: list[_Sequence] = []
        for seq in [s for s in self._paused if not s.handle.pause_wanted.is_set()]:
            if seq.kv is None:
                unprefilled.append(seq)
            elif len(self._running) < self.max_batch_size:
                if self._batch is None:
                    self._batch = seq.kv
                else:
                    self._batch.extend(seq.kv)
                seq.kv = None
                self._running.append(seq)
            else:
                continue  # no room in the batch yet: it joins once a sequence leaves
            self._paused.remove(seq)
        self._waiting.extendleft(reversed(unprefilled))

    def _take_prefill_group(self) -> list[_Sequence]:
        group: list[_Sequence] = []
        longest = 0
        free = self.max_batch_size - len(self._running)
        while self._waiting and len(group) < free:
            candidate = self._waiting[0]
            if group and self._chunked(candidate):
                break  # a long prompt is prefilled alone, in chunks
            padded = max(longest, candidate.prompt_len) * (len(group) + 1)
            if group and padded > self.max_prefill_tokens:
                break
            group.append(self._waiting.popleft())
            longest = max(longest, candidate.prompt_len)
        return group

    def _chunked(self, seq: _Sequence) -> bool:
        return self.prefill_chunk_tokens is not None and seq.prompt_len > self.prefill_chunk_tokens

    def _prefill(self) -> None:
        if self._chunking is None and self._chunked(self._waiting[0]):
            self._chunking = self._waiting.popleft()
        if self._chunking is not None:
            self._prefill_chunk(self._chunking)
            return
        group = self._take_prefill_group()
        device = self.loaded.device
        longest = max(s.prompt_len for s in group)
        ids = torch.full((len(group), longest), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), longest), dtype=torch.long)
        for row, seq in enumerate(group):
            ids[row, longest - seq.prompt_len :] = torch.tensor(seq.request.prompt_ids)
            mask[row, longest - seq.prompt_len :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)

        started, energy_before = time.perf_counter(), self._read_energy()
        try:
            cache = DynamicCache(config=self.loaded.model.config)
            logits = self._forward(ids, mask, positions, cache)
            tokens = sample_next_tokens(logits, [s.sampler for s in group])
            new_rows = KVBatch(cache, mask)
            if self._batch is None:
                self._batch = new_rows
            else:
                self._batch.extend(new_rows)
        except Exception as exc:
            if self._batch is not None and self._batch.rows != len(self._running):
                raise  # the running batch was half-extended: nothing in it can be trusted
            raise _PrefillFailed(group) from exc
        self._running.extend(group)
        now = time.perf_counter()
        self._account(group, [s.prompt_len for s in group], now - started, energy_before, "prefill")
        for seq, token in zip(group, tokens, strict=True):
            seq.first_token_at = now
            self._advance(seq, token)
        self._retire_finished()

    def _prefill_chunk(self, seq: _Sequence) -> None:
        """The next chunk of a long prompt; after the last, the sequence joins the running batch."""
        assert self.prefill_chunk_tokens is not None
        device = self.loaded.device
        start = seq.prefilled
        end = min(start + self.prefill_chunk_tokens, seq.prompt_len)
        ids = torch.tensor([seq.request.prompt_ids[start:end]], dtype=torch.long, device=device)
        positions = torch.arange(start, end, dtype=torch.long, device=device).unsqueeze(0)
        mask = torch.ones((1, end), dtype=torch.long, device=device)
        started, energy_before = time.perf_counter(), self._read_energy()
        try:
            cache = seq.partial or DynamicCache(config=self.loaded.model.config)
            logits = self._forward(ids, mask, positions, cache)
            seq.partial, seq.prefilled = cache, end
            last = end == seq.prompt_len
            if last:
                (token,) = sample_next_tokens(logits, [seq.sampler])
                new_rows = KVBatch(cache, mask)
                if self._batch is None:
                    self._batch = new_rows
                else:
                    self._batch.extend(new_rows)
        except Exception as exc:
            self._chunking, seq.partial = None, None
            if self._batch is not None and self._batch.rows != len(self._running):
                raise
            raise _PrefillFailed([seq]) from exc
        self._account([seq], [end - start], time.perf_counter() - started, energy_before, "prefill")
        if not last:
            return
        self._chunking, seq.partial = None, None
        self._running.append(seq)
        seq.first_token_at = time.perf_counter()
        self._advance(seq, token)
        self._retire_finished()

    def _decode(self) -> None:
        batch = self._batch
        assert batch is not None and batch.rows == len(self._running)
        device = self.loaded.device
        started, energy_before = time.perf_counter(), self._read_energy()
        ids = torch.tensor([[s.last_token] for s in self._running], dtype=torch.long, device=device)
        positions = batch.next_positions()
        mask = batch.append_step()
        logits = self._forward(ids, mask, positions, batch.cache)
        tokens = sample_next_tokens(logits, [s.sampler for s in self._running])
        elapsed = time.perf_counter() - started
        self._account(self._running, [1] * len(self._running), elapsed, energy_before, "decode")
        for seq, token in zip(self._running, tokens, strict=True):
            self._advance(seq, token)
        self._retire_finished()

    # -- bookkeeping ---------------------------------------------------------------------------

    def _read_energy(self) -> float | None:
        if self._energy_reader is None:
            return None
        if self.loaded.device.type == "cuda":
            torch.cuda.synchronize(self.loaded.device)
        return self._energy_reader()

    def _account(
        self, seqs: list[_Sequence], tokens: list[int], elapsed: float, energy_before: float | None, kind: str
    ) -> None:
        energy_after = self._read_energy() if energy_before is not None else None
        for seq, share in zip(seqs, attribute_step_time(elapsed, tokens), strict=True):
            seq.gpu_seconds += share
            seq.batch_size_sum += len(seqs)
            seq.steps += 1
        if energy_before is not None and energy_after is not None:
            delta = max(0.0, energy_after - energy_before)
            for seq, share in zip(seqs, attribute_step_time(delta, tokens), strict=True):
                seq.energy_joules = (seq.energy_joules or 0.0) + share
            self.stats.energy_joules_total = (self.stats.energy_joules_total or 0.0) + delta
        self.stats.steps_total += 1
        self.stats.busy_seconds_total += elapsed
        self.stats.last_batch_size = len(seqs)
        if kind == "prefill":
            self.stats.prompt_tokens_total += sum(tokens)
        if self._on_step is not None:
            self._on_step(kind, len(seqs), elapsed)

    def _advance(self, seq: _Sequence, token: int) -> None:
        """Take one generated token: emit its text, and decide whether the sequence is done."""
        seq.generated += 1
        seq.last_token = token
        self.stats.completion_tokens_total += 1
        params = seq.request.params
        if token in self.loaded.eos_token_ids and not params.ignore_eos:
            seq.finish_reason = "stop"
            return
        delta = seq.detokenizer.add(token)
        if delta:
            self._emit(seq, TokenDelta(delta, seq.generated))
        if seq.detokenizer.stopped:
            seq.finish_reason = "stop"
        elif seq.generated >= params.max_tokens or seq.prompt_len + seq.generated >= self.loaded.max_context:
            seq.finish_reason = "length"

    def _retire_finished(self) -> None:
        keep = [i for i, s in enumerate(self._running) if s.finish_reason is None]
        if len(keep) == len(self._running):
            return
        done = [s for s in self._running if s.finish_reason is not None]
        self._running = [self._running[i] for i in keep]
        if self._batch is not None:
            if keep:
                self._batch.select(keep)
            else:
                self._batch = None
        for seq in done:
            self._finish(seq, seq.finish_reason or "stop")

    def _finish(self, seq: _Sequence, reason: str, error: str | None = None) -> None:
        if reason in ("stop", "length"):
            tail = seq.detokenizer.finish()
            if tail:
                self._emit(seq, TokenDelta(tail, seq.generated))
        self._emit(
            seq,
            GenerationResult(
                text=seq.detokenizer.text,
                finish_reason=reason,
                prompt_tokens=seq.prompt_len,
                completion_tokens=seq.generated,
                submitted_at=seq.submitted_at,
                first_token_at=seq.first_token_at,
                finished_at=time.perf_counter(),
                gpu_seconds=seq.gpu_seconds,
                energy_joules=seq.energy_joules,
                mean_batch_size=seq.batch_size_sum / seq.steps if seq.steps else None,
                error=error,
            ),
        )

    def _fail_all(self, message: str, reason: str = "error") -> None:
        with self._cond:
            self._waiting.extend(self._inbox)
            self._inbox.clear()
        if self._chunking is not None:
            self._waiting.appendleft(self._chunking)
            self._chunking = None
        for seq in [*self._running, *self._waiting, *self._paused]:
            seq.kv, seq.partial = None, None
            self._finish(seq, reason, error=message if reason == "error" else None)
        self._running, self._paused, self._batch = [], [], None
        self._waiting.clear()
        self._publish_stats()

    def _emit(self, seq: _Sequence, output: EngineOutput) -> None:
        try:
            seq.sink(output)
        except Exception:  # the listener went away (event loop closed): nobody is waiting
            seq.handle.cancelled.set()

    def _publish_stats(self) -> None:
        self.stats.running = len(self._running)
        self.stats.waiting = len(self._waiting) + len(self._inbox) + (self._chunking is not None)
        self.stats.paused = len(self._paused)
        held = [b for b in (self._batch, *(s.kv for s in self._paused)) if b is not None]
        self.stats.kv_tokens_held = sum(b.tokens_held() for b in held) + (
            self._chunking.prefilled if self._chunking is not None else 0)
