"""The engine's own forward pass for Llama-architecture models (SmolLM2, the tiny test model).

The engine calls a model as ``forward(ids, mask, positions, cache)`` and gets back each row's
next-token logits; the KV cache is the transformers ``DynamicCache`` that ``KVBatch`` pads, splits
and joins. ``hf_forward`` does that through the model's own ``forward``. For a ``LlamaForCausalLM``
on the CPU, ``LlamaForward`` does it with the same weights and modules, but with less around them,
because at one stream a decode step is short enough that what surrounds the matrix products
dominates it. On a 2-core AMD EPYC with SmolLM2 in ``--quantization int4`` (issue 20), a decode
step took 20 ms through transformers' forward, of which the products were about 6:

- the attention mask is built once per step from the batch's padding mask (transformers builds it
  again per call, with its general machinery);
- the residual stream, the norms, the rotary embedding and attention run in float32 whatever the
  weights' dtype: bf16's small batched products and norms take a path several times slower on a CPU
  (a 1-token attention product 48 µs in bf16 against 7 µs in fp32), and the KV cache is fp32 too;
- decode attention is two plain products with the key/value heads shared across their query
  heads, no kernel dispatch for a one-row query;
- 4-bit query/key/value projections are one kernel call, and so are gate/up
  (``Int4Linear.stacked``), called straight, not through their modules; inputs of more rows than
  the 4-bit kernel handles well (prefill, wide batches) go through the dense weights instead;
- keys and values are written into buffers with room to grow (``kv_buffers``) instead of being
  concatenated, which copied the whole cache every step (16 rows at 400 tokens: 73 ms a step
  against 97);
- under ``--quantization int4``, a decode step of up to ``q4_decode.MAX_ROWS`` rows is one call to a
  compiled kernel (``q4_decode``) where the machine has a C compiler.

Prefill (many tokens per row) uses PyTorch's scaled-dot-product attention with a boolean mask, and
every other layer goes through the model's own modules, so quantized layers (``--quantization``)
work unchanged. The logits agree with transformers' forward to float32 rounding
(``tests/inference/test_llama_forward.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache, LlamaForCausalLM, PreTrainedModel

from inference.engine import q4_decode
from inference.engine.kv_buffers import append
from inference.engine.quantization import INT4_GROUP, Int4Linear, Int8Linear

ModelForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, DynamicCache], torch.Tensor]
"""``(ids [rows, new], mask [rows, cached + new], positions [rows, new], cache)`` -> the logits of
each row's last new token, [rows, vocab]; ``cache`` grows by the new tokens."""


def hf_forward(model: PreTrainedModel) -> ModelForward:
    """The engine's call through the model's own ``forward`` (any causal LM with a ``DynamicCache``)."""

    def forward(ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    return forward


def model_forward(model: PreTrainedModel, device: torch.device) -> ModelForward:
    """``LlamaForward`` where it applies, else ``hf_forward``."""
    return LlamaForward(model) if LlamaForward.fits(model, device) else hf_forward(model)


Projection = Callable[[torch.Tensor], torch.Tensor]


def _module(module: torch.nn.Module) -> Projection:
    return module


def direct(module: torch.nn.Module) -> Projection:
    """``module`` as a call straight to its kernel where it is a quantized layer without bias, for an
    input already [tokens, in] in bf16: a module call costs as much as a small product."""
    if isinstance(module, Int4Linear) and module.bias is None:
        packed, scales_and_zeros = module.packed, module.scales_and_zeros

        def int4(x: torch.Tensor) -> torch.Tensor:
            if module.wide(x.shape[0]):
                return module.dense(x)
            return torch._weight_int4pack_mm_for_cpu(x, packed, INT4_GROUP, scales_and_zeros)

        return int4
    if isinstance(module, Int8Linear) and module.bias is None:
        weight, scales = module.weight_int8, module.scales

        def int8(x: torch.Tensor) -> torch.Tensor:
            if module.wide(x.shape[0]):
                return module.dense(x)
            return torch._weight_int8pack_mm(x, weight, scales)

        return int8
    return module


class _Layer:
    """One decoder layer's weights, with the projections stacked where the kernel allows."""

    def __init__(self, layer: torch.nn.Module, *, bf16: bool) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.input_norm = layer.input_layernorm.weight.detach().float()
        self.post_norm = layer.post_attention_layernorm.weight.detach().float()
        self.q, self.k, self.v, self.o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.gate, self.up, self.down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act = mlp.act_fn
        self.qkv: Projection | None = None
        self.gate_up: Projection | None = None
        call = direct if bf16 else _module
        if Int4Linear.stackable([self.q, self.k, self.v]):
            self.qkv = call(Int4Linear.stacked([self.q, self.k, self.v]))
        if Int4Linear.stackable([self.gate, self.up]):
            self.gate_up = call(Int4Linear.stacked([self.gate, self.up]))
        self.o, self.down = call(self.o), call(self.down)

    def project_qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys side by side, and values: [tokens, (heads + kv heads) x d], [tokens, kv heads x d]."""
        if self.qkv is not None and not self.q.wide(h.shape[0]):
            return self.qkv(h).split([self.q.out_features + self.k.out_features, self.v.out_features], dim=-1)
        return torch.cat([self.q(h), self.k(h)], dim=-1), self.v(h)

    def project_gate_up(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.gate_up is not None and not self.gate.wide(h.shape[0]):
            gate, up = self.gate_up(h).split(self.gate.out_features, dim=-1)
            return gate, up
        return self.gate(h), self.up(h)


class LlamaForward:
    """``ModelForward`` for a ``LlamaForCausalLM``: see the module's docstring."""

    def __init__(self, model: LlamaForCausalLM, *, compiled: bool = True) -> None:
        """``compiled=False`` keeps PyTorch's kernels for every step (the compiled step's reference)."""
        config = model.config
        inner = model.model
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = inner.layers[0].self_attn.head_dim
        self.scaling = inner.layers[0].self_attn.scaling
        self.eps = config.rms_norm_eps
        self.dtype = next(model.parameters()).dtype
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        bf16 = self.dtype == torch.bfloat16
        self.layers = [_Layer(layer, bf16=bf16) for layer in inner.layers]
        self.final_norm = inner.norm.weight.detach().float()
        self.head = direct(model.lm_head) if bf16 else model.lm_head
        # rotate_half(x) = cat(-x2, x1) = roll(x, d/2) * sign: the sign goes into the sine once a step.
        half = self.head_dim // 2
        self.rotation_sign = torch.cat([-torch.ones(half), torch.ones(self.head_dim - half)])
        self.compiled = q4_decode.build(model) if compiled else None

    @staticmethod
    def fits(model: PreTrainedModel, device: torch.device) -> bool:
        """A plain Llama on the CPU (on a GPU transformers' fused attention does better), whose
        ``forward`` nobody has wrapped (instrumentation or a test's injected fault is kept)."""
        return (isinstance(model, LlamaForCausalLM) and device.type == "cpu"
                and getattr(model.config, "pretraining_tp", 1) == 1 and "forward" not in vars(model))

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: DynamicCache) -> torch.Tensor:
        rows, new = ids.shape
        tokens, heads, kv_heads, d = rows * new, self.heads, self.kv_heads, self.head_dim
        x = self.embed(ids).reshape(tokens, -1).float()  # the residual stream, [tokens, hidden]
        cos, sin = self.rotary(x, positions)  # [rows, new, d]
        if new == 1 and self.compiled is not None and rows <= q4_decode.MAX_ROWS:
            return self.compiled.step(x.contiguous(), cos.reshape(rows, d).float().contiguous(),
                                      sin.reshape(rows, d).float().contiguous(), mask, cache)
        cos = cos.reshape(tokens, 1, d)
        sin = (sin * self.rotation_sign.to(sin.device)).reshape(tokens, 1, d)
        allowed = _allowed(mask, new)
        for index, layer in enumerate(self.layers):
            h = self._norm(x, layer.input_norm)
            qk, v = layer.project_qkv(h)
            qk = qk.float().view(tokens, heads + kv_heads, d)
            qk = qk * cos + qk.roll(d // 2, dims=-1) * sin
            k = qk[:, heads:].view(rows, new, kv_heads, d).transpose(1, 2)
            v = v.float().view(rows, new, kv_heads, d).transpose(1, 2)
            keys, values = append(cache.layers[index], k, v)
            attended = self._attend(qk[:, :heads], keys, values, allowed, rows, new)
            x.add_(layer.o(attended.to(self.dtype)))
            gate, up = layer.project_gate_up(self._norm(x, layer.post_norm))
            x.add_(layer.down(layer.act(gate) * up))
        last = self._norm(x.view(rows, new, -1)[:, -1], self.final_norm)
        return self.head(last).float()

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMS norm in float32, given back in the weights' dtype for the next product."""
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight).to(self.dtype)

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor | None,
                rows: int, new: int) -> torch.Tensor:
        """``q`` [tokens, heads, d] against the cache's [rows, kv heads, length, d]; [tokens, heads x d]."""
        heads, kv_heads, d = self.heads, self.kv_heads, self.head_dim
        if new == 1:
            # Each kv head's query heads as rows of one product: [rows, kv heads, heads per kv head, d].
            grouped = q.view(rows, kv_heads, heads // kv_heads, d)
            scores = torch.matmul(grouped, keys.transpose(-1, -2)).mul_(self.scaling)
            if allowed is not None:
                scores.masked_fill_(~allowed, float("-inf"))
            out = torch.matmul(torch.softmax(scores, dim=-1), values)
        else:
            queries = q.view(rows, new, heads, d).transpose(1, 2)
            out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=allowed, scale=self.scaling,
                                                 enable_gqa=True).transpose(1, 2)
        return out.reshape(rows * new, heads * d)


def _allowed(mask: torch.Tensor, new: int) -> torch.Tensor | None:
    """Which cached positions each new token may attend to: [rows, 1, new, length] (None: all).

    ``mask`` is [rows, length], 1 for a real token and 0 for left padding; the new tokens are its
    last ``new`` columns. A token sees the real tokens up to itself; a padding token sees itself
    alone, so its (discarded) output stays finite and no NaN reaches a real row."""
    length = mask.shape[1]
    real = mask.bool()
    if new == 1:
        return None if bool(real.all()) else real[:, None, None, :]
    columns = torch.arange(length, device=mask.device)
    own = columns[length - new:, None]  # [new, 1]: each new token's own column
    causal = columns[None, :] <= own  # [new, length]
    allowed = causal[None] & real[:, None, :]
    allowed |= (columns[None, :] == own)[None]
    return allowed[:, None]
