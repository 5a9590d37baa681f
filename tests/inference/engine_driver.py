"""Drive an ``Engine`` from test code: submit, then read each sequence's outputs from a queue."""

from __future__ import annotations

import queue
from dataclasses import dataclass, field

from inference.engine.engine import Engine, GenerationRequest, GenerationResult, SequenceHandle, TokenDelta
from inference.engine.sampling import SamplingParams


@dataclass
class Submitted:
    handle: SequenceHandle
    outputs: queue.Queue = field(default_factory=queue.Queue)
    deltas: list[TokenDelta] = field(default_factory=list)

    def result(self, timeout: float = 60.0) -> GenerationResult:
        while True:
            output = self.outputs.get(timeout=timeout)
            if isinstance(output, GenerationResult):
                return output
            self.deltas.append(output)


def submit(engine: Engine, prompt_ids: list[int], **params: object) -> Submitted:
    params.setdefault("temperature", 0.0)
    params.setdefault("max_tokens", 8)
    outputs: queue.Queue = queue.Queue()
    handle = engine.submit(GenerationRequest(list(prompt_ids), SamplingParams(**params)), outputs.put)  # type: ignore[arg-type]
    return Submitted(handle, outputs)
