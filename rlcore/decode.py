"""A native one-token decode step (and prompt prefill) for Llama-layout causal LMs, on the model's own weights.

For a small policy on CPU, much of a transformers forward pass for one token is Python: module calls, the
attention interface, mask and cache bookkeeping, ~60 dispatched ops per layer (most of the step of a 1M
model at batch 1-16; at batch 64, and for a 20M model, matmuls and reading the KV cache dominate, see
``rlcore.rollout``). :class:`LlamaDecodeStep` computes the same function with few tensor ops, for the
layout shared by ``LlamaForCausalLM`` and ``Qwen2ForCausalLM``::

    x = embed(token)                                                    # [N, E]
    for each layer:
        h = rms_norm(x) * w_in                                          # RMSNorm (Zhang & Sennrich 2019)
        q, k, v = h W_q + b_q, h W_k + b_k, h W_v + b_v                  # biases where present (Qwen2)
        q, k = q cos_p + rotate_half(q) sin_p, k cos_p + rotate_half(k) sin_p   # RoPE at position p
        K[:, :, slot], V[:, :, slot] = k, v                             # the KV cache, written in place
        x = x + softmax(q K^T / sqrt(d) + mask) V W_o                   # grouped-query attention
        h = rms_norm(x) * w_post
        x = x + (silu(h W_gate) * (h W_up)) W_down                      # SwiGLU MLP
    logits = (rms_norm(x) * w_final) W_head                              # W_head may be tied to embed

RoPE: Su et al. 2021, https://arxiv.org/abs/2104.09864; GQA: Ainslie et al. 2023,
https://arxiv.org/abs/2305.13245; SwiGLU: Shazeer 2020, https://arxiv.org/abs/2002.05202.

Where the ops go:

- **Rotary tables once.** ``cos``/``sin`` come from the model's own rotary module, called once for
  positions ``0 .. max_len - 1`` (so rope scaling and ``attention_scaling`` are whatever the model
  does); a step gathers the rows of its positions once for all layers. ``rotate_half(x) * sin`` is
  ``flip_halves(x) * sin_signed`` with the sign folded into the table.
- **Grouped-query attention without repeating keys.** The H query heads of a token are laid out as
  ``[kv_heads, H / kv_heads]``: the queries that share a key/value head become that head's query rows, so one
  ``scaled_dot_product_attention`` call attends ``[N, kv_heads, H / kv_heads, D]`` queries to the
  ``[N, kv_heads, L, D]`` cache (the same head pairing as transformers' ``repeat_kv``). (Two batched
  matmuls and a softmax instead of sdpa ran isolated calls of these shapes faster at two threads on CPU,
  but ``benchmarks/generate.py --batch-sizes 64`` measured no difference end to end, so sdpa stays.)
- **Fused q/k/v.** The q/k/v weights are concatenated once per :class:`LlamaDecodeStep` (a temporary for
  one ``generate`` call; the model's parameters are read, never changed): one matmul instead of three,
  and RoPE rotates queries and keys in one go. (Fusing gate and up was measured slower: a ``[2 I, E]``
  matmul at N = 16-64 runs 5-10% below two ``[I, E]`` ones on this CPU.)
- **Contiguous transposed weights on CPU.** Every matmul is ``x @ W^T`` against a ``[in, out]`` copy of
  the weight made once per :class:`LlamaDecodeStep` (the model's weights are not changed; on other devices
  the transposed view): ``F.linear``'s ``x @ W.t()`` took 1.23-1.42x the time of MKL's
  ``[64, in] @ [in, out]`` for the benchmark models' shapes (``benchmarks/profile_decode.py --matmuls``,
  one thread), the same values within float rounding. It holds a second copy of the weights for the length of a ``generate`` call.
- **In-place KV cache.** Each step writes one slot of preallocated ``[N, kv_heads, max_len, head_dim]``
  buffers and attends over a view of the filled slots: nothing is concatenated or reallocated.
- **Short softmax rows written out.** torch's CPU softmax runs a scalar loop on rows under 16 floats (the
  toy's caches of 11-19 slots); there :func:`_softmax_` subtracts the row maximum, exponentiates and
  divides in place (the same values up to rounding): torch 53-87 us, written out 21-29 us for ``[64, 2, 2, L]``
  scores at L = 8-15 (torch 15 us at L = 16; ``python benchmarks/profile_decode.py --models --softmax``).
- **The prefill on the same tensors.** :meth:`LlamaDecodeStep.prefill` runs the left-padded prompts
  through the same layer code (:func:`_prefill_prompts`, every query row of a key/value head's group
  attending under a causal, padding-aware mask, :func:`prompt_attention_mask`) and writes their keys and
  values into the buffers, each prompt's into its G rows: no transformers forward, mask building or
  ``DynamicCache`` before the first token.

The computation is :func:`_decode_token`, a pure function of tensors; :class:`LlamaDecodeStep` gathers
its arguments once and runs it eager, or with ``compile=True`` through ``torch.compile`` (inductor: fused
C++ loops on CPU). The compiled step keeps the growing cache: the cache length is marked dynamic, so one
compilation serves every step and every prompt length (a new batch size compiles again), and attention
is written as two reductions (:func:`_attend_by_reductions`) that inductor fuses into loops, instead of
sdpa's CPU kernel. Figures, compile cost and when it pays: docs/results.md, "Compiling the decode step on
CPU". (An earlier fixed-shape variant, attention over every cache slot, masked, gained nothing measurable
at batch 64.)

Supported (:func:`native_decode_unsupported` says why not otherwise): exactly ``LlamaForCausalLM`` or
``Qwen2ForCausalLM``, plain ``nn.Linear``/``nn.Embedding`` layers (LoRA-wrapped or quantised layers are
not), SiLU MLPs, no module hooks, one dtype and device, and a rotary embedding whose frequencies do not
depend on the sequence length (not ``dynamic``/``longrope``). The caller checks that attention spans the
whole sequence (sliding windows).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM, Qwen2ForCausalLM

from .models import position_ids_from_mask

__all__ = ["LlamaDecodeStep", "compiled_decode_token", "native_decode_unsupported"]

SUPPORTED_MODELS = (LlamaForCausalLM, Qwen2ForCausalLM)
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def native_decode_unsupported(model: nn.Module) -> str | None:
    """Why :class:`LlamaDecodeStep` cannot run ``model`` (a sentence), or None when it can."""
    if type(model) not in SUPPORTED_MODELS:
        return f"{type(model).__name__} is not one of {[cls.__name__ for cls in SUPPORTED_MODELS]}"
    config = model.config
    if config.hidden_act != "silu":
        return f"hidden_act is {config.hidden_act!r}, not 'silu'"
    rope_type = getattr(model.model.rotary_emb, "rope_type", None)
    if not isinstance(rope_type, str) or any(kind in rope_type for kind in _LENGTH_DEPENDENT_ROPE):
        return f"rope_type {rope_type!r} has frequencies that depend on the sequence length"
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            return f"module {name or 'model'} has forward hooks"
    epsilons = {norm.variance_epsilon for norm in _norms(model.model)}
    if len(epsilons) != 1:
        return f"the RMSNorm epsilons differ between layers: {sorted(epsilons)}"
    for name, module in _weight_modules(model):
        if type(module) not in (nn.Linear, nn.Embedding):
            return f"{name} is a {type(module).__name__}, not a plain nn.Linear/nn.Embedding"
    tensors = list(model.parameters()) + list(model.buffers())
    placements = {(tensor.dtype, tensor.device) for tensor in model.parameters()}
    if len(placements) != 1 or any(tensor.is_meta for tensor in tensors):
        return f"parameters are not all on one device in one dtype: {sorted(map(str, placements))}"
    return None


def _weight_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    modules = [("model.embed_tokens", model.model.embed_tokens), ("lm_head", model.lm_head)]
    for index, layer in enumerate(model.model.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            modules.append((f"model.layers.{index}.self_attn.{name}", getattr(layer.self_attn, name)))
        for name in ("gate_proj", "up_proj", "down_proj"):
            modules.append((f"model.layers.{index}.mlp.{name}", getattr(layer.mlp, name)))
    return modules


def _fused_linear(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One ``[sum out, in]`` weight (and bias, zeros where a layer has none) for several Linear layers."""
    weight = torch.cat([linear.weight for linear in linears])
    if all(linear.bias is None for linear in linears):
        return weight, None
    biases = [
        linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features) for linear in linears
    ]
    return weight, torch.cat(biases)


def _operand(weight: torch.Tensor) -> torch.Tensor:
    """A Linear weight ``[out, in]`` as the right operand ``W^T`` ``[in, out]`` of ``x W^T``: a contiguous
    copy on CPU, where MKL multiplies ``[N, in] @ [in, out]`` 15-30% faster than against the transposed
    view ``F.linear`` uses (N = 16-64, ``benchmarks/profile_decode.py --matmuls``); the view elsewhere."""
    return weight.t().contiguous() if weight.device.type == "cpu" else weight.t()


def _linear(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x W^T + b`` from the operand :func:`_operand` made: ``[N, in] -> [N, out]``."""
    return torch.mm(x, weight_t) if bias is None else torch.addmm(bias, x, weight_t)


class _Layer(NamedTuple):
    """One decoder layer's tensors: the model's norms and biases, its weights as matmul operands (:func:`_operand`)."""

    norm_in: torch.Tensor  # [E]
    qkv_weight: torch.Tensor  # [E, (H + 2 K) D], the operands W^T of _operand
    qkv_bias: torch.Tensor | None
    o_weight: torch.Tensor  # [H D, E]
    o_bias: torch.Tensor | None
    norm_post: torch.Tensor  # [E]
    gate_weight: torch.Tensor  # [E, I]
    gate_bias: torch.Tensor | None
    up_weight: torch.Tensor  # [E, I]
    up_bias: torch.Tensor | None
    down_weight: torch.Tensor  # [I, E]
    down_bias: torch.Tensor | None


class _Shape(NamedTuple):
    kv_heads: int
    group: int  # query heads per key/value head
    head_dim: int
    scaling: float
    eps: float


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: normalise in float32, cast back, then scale. In float32 the scale goes into
    the same kernel (one op fewer; the same products in the same order, so the same bits)."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps=eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _rotate(heads: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """RoPE on ``[N, heads, D]`` with ``[N, 1, D]`` tables: ``x cos + rotate_half(x) sin``."""
    flipped = heads.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # [N, heads, D] = cat(x2, x1)
    return heads * cos + flipped * sin_signed


def _attend(query, keys, values, attn_mask, scale) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for one new token per row: ``[N, K, H/K, D]`` queries (the H/K query
    heads that share a key/value head stand where sdpa reads query positions), ``[N, K, L, D]`` keys and values,
    ``[N, 1, 1, L]`` additive mask. Written out as two matmuls: on the CPU, sdpa's kernel (tiled for long
    sequences) costs more on these few keys; the same attention up to float rounding. Elsewhere, and in other
    dtypes than float32 (whose rounding the forward path's sdpa fixes), sdpa."""
    if query.device.type != "cpu" or query.dtype != torch.float32:
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=attn_mask, scale=scale)
    scores = torch.matmul(query, keys.transpose(-1, -2)).mul_(scale).add_(attn_mask)  # [N, K, H/K, L]
    return torch.matmul(_softmax_(scores), values)  # [N, K, H/K, D]


def _softmax_(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension, in place where that is faster. torch's CPU kernel takes a scalar
    loop for rows shorter than a 16-float vector (at 15 floats a row, 6x its time at 16 on an AVX-512 CPU),
    which the toy's short caches and prompts hit; there the shifted exponentials and their sum, a few
    vectorised ops, are written out (``benchmarks/profile_decode.py --softmax``). The same function up to
    float rounding."""
    if scores.shape[-1] >= 16:
        return scores.softmax(dim=-1)
    weights = scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()  # the row maximum is finite: one key is seen
    return weights.div_(weights.sum(dim=-1, keepdim=True))


def _attend_by_reductions(query, keys, values, attn_mask, scale):
    """``softmax(q K^T scale + mask) V`` as a sum over ``head_dim`` and one over the cache slots.

    The same function as ``F.scaled_dot_product_attention(query, keys, values, attn_mask=attn_mask,
    scale=scale)`` (softmax in float32 at least), for a compiled step: inductor fuses the scores, the softmax and the
    weighted sum into loops over the cache, where sdpa's CPU kernel runs small matmuls per head and block. Eager, the
    broadcast products would be materialised: the eager step keeps :func:`_attend`.

    Args:
        query: ``[N, K, G, D]``; keys, values: ``[N, K, L, D]``; attn_mask: ``[N, 1, 1, L]`` additive.
    Returns:
        ``[N, K, G, D]``.
    """
    scores = (query[:, :, :, None, :] * keys[:, :, None]).sum(-1) * scale + attn_mask  # [N, K, G, L]
    weights = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(values.dtype)
    return (weights[..., None] * values[:, :, None]).sum(-2)  # [N, K, G, D]


def _decode_token(layers, final, tokens, positions, attention_mask, keys, values, shape: _Shape, attend=_attend):
    """The step as a pure function of tensors (see :meth:`LlamaDecodeStep.__call__`). ``final`` =
    (embedding, final norm, lm_head weight, lm_head bias, cos table, signed sin table); ``attend``: :func:`_attend`
    (sdpa, or two matmuls for float32 on the CPU), or :func:`_attend_by_reductions` when compiled."""
    embedding, final_norm, head_weight, head_bias, cos_table, sin_table = final
    num_rows, slot = tokens.shape[0], attention_mask.shape[-1] - 1
    query_width = shape.kv_heads * shape.group * shape.head_dim
    cos, sin_signed = cos_table[positions][:, None], sin_table[positions][:, None]  # [N, 1, D]
    x = F.embedding(tokens, embedding)  # [N, E]
    for layer, layer_keys, layer_values in zip(layers, keys, values):
        qkv = _linear(_rms_norm(x, layer.norm_in, shape.eps), layer.qkv_weight, layer.qkv_bias)  # [N, (H + 2 K) D]
        heads = qkv.unflatten(-1, (-1, shape.head_dim))  # [N, H + 2 K, D]
        query_key = _rotate(heads[:, : -shape.kv_heads], cos, sin_signed)  # [N, H + K, D]
        layer_keys.select(2, slot).copy_(query_key[:, -shape.kv_heads :])  # [N, K, D] into slot
        layer_values.select(2, slot).copy_(heads[:, -shape.kv_heads :])
        query = query_key[:, : -shape.kv_heads].unflatten(1, (shape.kv_heads, shape.group))  # [N, K, H/K, D]
        attended = attend(
            query,
            layer_keys[:, :, : slot + 1],
            layer_values[:, :, : slot + 1],
            attn_mask=attention_mask,
            scale=shape.scaling,
        )  # [N, K, H/K, D]
        x = x + _linear(attended.reshape(num_rows, query_width), layer.o_weight, layer.o_bias)
        normed = _rms_norm(x, layer.norm_post, shape.eps)
        gate, up = (
            _linear(normed, layer.gate_weight, layer.gate_bias),
            _linear(normed, layer.up_weight, layer.up_bias),
        )
        x = x + _linear(F.silu(gate) * up, layer.down_weight, layer.down_bias)  # SwiGLU, [N, I] -> [N, E]
    return _linear(_rms_norm(x, final_norm, shape.eps), head_weight, head_bias)  # [N, V]


def repeat_rows_into(buffer: torch.Tensor, prompt_states: torch.Tensor, group_size: int) -> None:
    """Copy ``prompt_states`` [B, H, P, D] into the first P slots of ``buffer`` [B * G, H, L, D], each row G
    times in a row (a broadcast copy: no repeated tensor is materialised)."""
    batch, heads, prompt_len, head_dim = prompt_states.shape
    grouped = buffer.view(batch, group_size, heads, buffer.shape[2], head_dim)  # [B, G, H, L, D]
    grouped[:, :, :, :prompt_len].copy_(prompt_states[:, None])


def prompt_attention_mask(prompt_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, P]`` 1-on-real-token mask of left-padded prompts -> ``[B, 1, P, P]`` additive mask (0 = attend,
    -inf = not) for a prefill: query i sees the real keys j <= i. A padding query also sees itself (its
    row would otherwise be all -inf, and its NaN key/value would poison the cache); real tokens never see it."""
    length = prompt_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=prompt_mask.device).tril_()  # [P, P]
    seen = causal & (prompt_mask.bool()[:, None, :] | torch.eye(length, dtype=torch.bool, device=prompt_mask.device))
    return torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill_(~seen, -torch.inf)[:, None]


def _prefill_prompts(layers, final, tokens, positions, attention_mask, shape: _Shape):
    """The prompts' forward pass as a pure function of tensors (see :meth:`LlamaDecodeStep.prefill`): ``[B, P]``
    tokens and rotary positions, ``[B, 1, P, P]`` additive mask (:func:`prompt_attention_mask`) -> (``[B, V]``
    logits of the next token, per layer ``[B, K, P, D]`` keys and values). Grouped-query attention as in the
    step: the H / K query heads of a key/value head stand as ``[H / K * P]`` query rows of that head."""
    embedding, final_norm, head_weight, head_bias, cos_table, sin_table = final
    batch, length = tokens.shape
    kv_heads, group, head_dim = shape.kv_heads, shape.group, shape.head_dim
    cos, sin_signed = cos_table[positions][:, :, None], sin_table[positions][:, :, None]  # [B, P, 1, D]
    mask = attention_mask.repeat(1, 1, group, 1)  # [B, 1, H/K * P, P], row g * P + i is query i
    x = F.embedding(tokens.flatten(), embedding)  # [B P, E]
    keys, values = [], []
    for layer in layers:
        qkv = _linear(_rms_norm(x, layer.norm_in, shape.eps), layer.qkv_weight, layer.qkv_bias)  # [B P, (H + 2 K) D]
        heads = qkv.view(batch, length, -1, head_dim)  # [B, P, H + 2 K, D]
        query_key = _rotate(heads[:, :, :-kv_heads], cos, sin_signed).transpose(1, 2)  # [B, H + K, P, D]
        keys.append(query_key[:, -kv_heads:])  # [B, K, P, D]
        values.append(heads[:, :, -kv_heads:].transpose(1, 2))
        query = query_key[:, :-kv_heads].reshape(batch, kv_heads, group * length, head_dim)  # [B, K, H/K P, D]
        attended = _attend(query, keys[-1], values[-1], attn_mask=mask, scale=shape.scaling)  # [B, K, H/K P, D]
        attended = attended.view(batch, -1, length, head_dim).transpose(1, 2).reshape(batch * length, -1)  # [B P, H D]
        x = x + _linear(attended, layer.o_weight, layer.o_bias)
        normed = _rms_norm(x, layer.norm_post, shape.eps)
        gate, up = _linear(normed, layer.gate_weight, layer.gate_bias), _linear(normed, layer.up_weight, layer.up_bias)
        x = x + _linear(F.silu(gate) * up, layer.down_weight, layer.down_bias)
    last = x.view(batch, length, -1)[:, -1]  # [B, E]: left padding puts every prompt's last token here
    return _linear(_rms_norm(last, final_norm, shape.eps), head_weight, head_bias), keys, values


class LlamaDecodeStep:
    """One decode token for a batch through a Llama-layout model, writing its keys/values in place.

    Built once per rollout (see the module docstring); call it once per decode step.

    Args:
        model: a model :func:`native_decode_unsupported` accepts (checked here).
        keys, values: one ``[N, kv_heads, max_len, head_dim]`` buffer per layer, the prompt already in
            their first slots; a call writes one slot and reads the filled ones.
        compile: run the step through ``torch.compile`` (:func:`compiled_decode_token`); the first call
            compiles (tens of seconds on CPU), later ones of any cache length reuse it.
        checked: the caller has just found :func:`native_decode_unsupported` None for ``model`` (the check
            walks every module and parameter, 0.5-0.9 ms on the 1M model: once per ``generate`` call is enough).
    """

    def __init__(
        self,
        model: nn.Module,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        *,
        compile: bool = False,
        checked: bool = False,
    ):
        reason = None if checked else native_decode_unsupported(model)
        if reason is not None:
            raise ValueError(f"no native decode step for this model: {reason}")
        config, backbone = model.config, model.model
        if not len(keys) == len(values) == len(backbone.layers):
            raise ValueError(f"{len(keys)} key and {len(values)} value buffers for {len(backbone.layers)} layers")
        attention = backbone.layers[0].self_attn
        self.shape = _Shape(
            kv_heads=config.num_key_value_heads,
            group=config.num_attention_heads // config.num_key_value_heads,
            head_dim=attention.head_dim,
            scaling=attention.scaling,
            eps=backbone.norm.variance_epsilon,
        )
        self.keys, self.values, self.max_len = keys, values, keys[0].shape[2]
        self.layers = [_layer_tensors(layer) for layer in backbone.layers]
        embedding = backbone.embed_tokens.weight  # [V, E]
        self.final = (embedding, backbone.norm.weight, _operand(model.lm_head.weight), model.lm_head.bias)
        self.final += _rotary_tables(backbone.rotary_emb, embedding, self.max_len, self.shape.head_dim)
        self.compile = compile
        if compile:  # one compilation for every cache length: the slot dimension is symbolic
            for tensor in [*keys, *values, *self.final[-2:]]:
                torch._dynamo.maybe_mark_dynamic(tensor, 0 if tensor.ndim == 2 else 2)

    def prefill(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """Forward left-padded prompts once: their keys/values go into the first P slots of the cache, each
        prompt's into G = N / B consecutive rows (the G samples of a prompt share it, copied, not recomputed).

        Args:
            prompt_ids, prompt_mask: ``[B, P]`` ids and 1-on-real-token mask, left padded; rotary positions count
                real tokens only (:func:`rlcore.models.position_ids_from_mask`), as in generation.
        Returns:
            ``[B, V]`` logits of each prompt's next token.
        """
        (batch, length), rows = prompt_ids.shape, self.keys[0].shape[0]
        if rows % batch or length > self.max_len or prompt_mask.shape != prompt_ids.shape:
            raise ValueError(
                f"prompts {tuple(prompt_ids.shape)} (mask {tuple(prompt_mask.shape)}) do not fit a cache of {rows} "
                f"rows x {self.max_len} slots: B must divide the rows and P <= the slots"
            )
        mask = prompt_attention_mask(prompt_mask, self.keys[0].dtype)  # [B, 1, P, P]
        positions = position_ids_from_mask(prompt_mask)  # [B, P]
        logits, keys, values = _prefill_prompts(self.layers, self.final, prompt_ids, positions, mask, self.shape)
        for buffer, states in zip([*self.keys, *self.values], [*keys, *values]):
            repeat_rows_into(buffer, states, rows // batch)
        return logits

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Decode one token per row.

        Args:
            tokens: ``[N]`` the tokens fed now.
            positions: ``[N]`` their rotary positions (real tokens before them: left padding is not counted).
            attention_mask: ``[N, 1, 1, L]`` additive float mask (0 = attend, -inf = not) over cache slots
                ``0 .. L - 1``, ``L <= max_len``; the new token's keys/values go to slot ``L - 1``, which the
                mask must attend.
        Returns:
            ``[N, V]`` next-token logits.
        """
        num_rows = tokens.shape[0]
        if tokens.ndim != 1 or positions.shape != tokens.shape:
            raise ValueError(f"tokens {tuple(tokens.shape)} and positions {tuple(positions.shape)} must both be [N]")
        if (
            attention_mask.ndim != 4
            or attention_mask.shape[:3] != (num_rows, 1, 1)
            or attention_mask.shape[-1] > self.max_len
        ):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected [N={num_rows}, 1, 1, L] with "
                f"L <= {self.max_len} cache slots"
            )
        arguments = (self.layers, self.final, tokens, positions, attention_mask, self.keys, self.values, self.shape)
        if self.compile:
            torch._dynamo.maybe_mark_dynamic(attention_mask, 3)
            return compiled_decode_token()(*arguments)
        return _decode_token(*arguments)


def _decode_token_by_reductions(layers, final, tokens, positions, attention_mask, keys, values, shape):
    """:func:`_decode_token` with :func:`_attend_by_reductions` for attention: the form that is compiled."""
    return _decode_token(
        layers, final, tokens, positions, attention_mask, keys, values, shape, attend=_attend_by_reductions
    )


_compiled_decode_token = None


def compiled_decode_token():
    """``torch.compile`` of the step (default mode: inductor's C++ on CPU, Triton on CUDA), made once per
    process. Only the cache length (the buffers' and the mask's slot dimension, the rotary tables' rows) is
    dynamic, so neither the next step nor a new prompt length recompiles; every other size is static
    (``dynamic=False``): a new model shape or batch size compiles a graph of its own, never a slower
    shape-generic one (dynamo's recompile limit, 8 graphs, applies; beyond it the step runs eager)."""
    global _compiled_decode_token
    if _compiled_decode_token is None:
        _compiled_decode_token = torch.compile(_decode_token_by_reductions, dynamic=False)
    return _compiled_decode_token


def _norms(backbone: nn.Module) -> list[nn.Module]:
    return [backbone.norm] + [
        norm for layer in backbone.layers for norm in (layer.input_layernorm, layer.post_attention_layernorm)
    ]


def _layer_tensors(layer: nn.Module) -> _Layer:
    attention, mlp = layer.self_attn, layer.mlp
    qkv_weight, qkv_bias = _fused_linear(attention.q_proj, attention.k_proj, attention.v_proj)
    return _Layer(
        layer.input_layernorm.weight,
        _operand(qkv_weight),
        qkv_bias,
        _operand(attention.o_proj.weight),
        attention.o_proj.bias,
        layer.post_attention_layernorm.weight,
        _operand(mlp.gate_proj.weight),
        mlp.gate_proj.bias,
        _operand(mlp.up_proj.weight),
        mlp.up_proj.bias,
        _operand(mlp.down_proj.weight),
        mlp.down_proj.bias,
    )


def _rotary_tables(
    rotary: nn.Module, embedding: torch.Tensor, max_len: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` with the first half negated, ``[max_len, head_dim]`` each, from the model's own
    rotary module: ``rotate_half(x) * sin == flip_halves(x) * sin_signed``."""
    positions = torch.arange(max_len, device=embedding.device)[None]  # [1, L]
    cos, sin = rotary(embedding[:1], positions)  # [1, L, D] each, in the model's dtype
    half = head_dim // 2
    return cos[0], torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)
