"""The rollout engine: batched sampling from any transformers causal LM with a KV cache.

``generate(model, prompt_ids, prompt_mask, ...)`` samples ``num_samples`` (G) completions for each of B
left-padded prompts and returns a :class:`Rollout`: the N = B * G sequences, their completion ids and
masks, the log-probs of the sampled tokens and which rows were truncated. The G completions of one prompt
are G consecutive rows, rlcore's group convention.

How it runs (following gpt-fast's ``generate.py`` and nanochat's ``engine.py``):

1. **Prefill once per prompt.** One forward pass over the B prompts (position ids from the mask, so left
   padding changes nothing) fills a KV cache and gives the logits of the first completion token. With the
   native step (below) the step runs the prompts itself (:meth:`rlcore.decode.LlamaDecodeStep.prefill`, on
   the weights it has already gathered, straight into its buffers): no transformers forward, mask building
   or ``DynamicCache`` (the toy GRPO step's figures: docs/results.md, "Native prefill").
2. **Share it G times.** The prompt keys/values are copied into a KV cache of N = B * G rows, each prompt's
   block repeated G times; the first logits are repeated the same way. No prompt is prefilled twice.
3. **Decode one token at a time** into preallocated buffers: sample from the last logits, write the
   token, feed it back. Two KV caches are available:

   - *growing* (default on CPU): buffers ``[N, kv_heads, P + max_new_tokens, head_dim]`` allocated once;
     attention reads only the filled prefix (a view), and a step writes one slot. transformers'
     ``DynamicCache`` instead concatenates (copies) the whole cache at every step. With ``compile=True``
     the native step (below) is compiled with the cache length dynamic (``rlcore.decode``).
   - *static* (default on CUDA): transformers' ``StaticCache``, fixed shapes, so the one-token decode step
     can be compiled with ``torch.compile(mode="reduce-overhead")`` (CUDA graphs; the default mode on
     CPU, where it measured slower than the eager native step, docs/results.md). Attention then reads
     every slot and masks the empty ones. (Under ``torch.compile`` transformers' sdpa integration repeats
     grouped key/value heads (``repeat_kv``) whenever a mask is given, a copy of the cache per layer and
     step that grows with batch x cache length; eager decoding attends on the grouped heads directly.)

   The attention mask is one preallocated ``[N, P + max_new_tokens]`` buffer; a step sets one column.
   For sdpa attention it is handed to the model as a ready ``[N, 1, 1, L]`` additive float mask (0 or
   -inf), which transformers passes through untouched: no mask is rebuilt per step, and sdpa does not
   convert a boolean mask at every layer. Other attention implementations get the 2-D mask.
4. **Stop early without a host sync per token.** Rows that emitted an EOS keep being decoded (their tokens
   are discarded), so shapes never change; a per-row ``stopped`` flag is updated on the device, and every
   ``stop_check_interval`` steps one ``stopped.all()`` read (a host-device sync on CUDA) ends the loop.
   On CUDA the default interval is 16, so at most 15 steps are wasted; on CPU, where reading a tensor is
   no sync, it is every step. The result never depends on the interval.

**The step.** For Llama and Qwen2 models in a plain state (no adapters, no quantised layers, no hooks)
the default step is :class:`rlcore.decode.LlamaDecodeStep`: the same function as the model's forward for
one token, on the model's own weights, written as ~20 tensor ops per layer (one fused q/k/v matmul,
rotary tables gathered once per step, grouped-query attention without repeating keys) straight
into the growing cache; it also prefills the prompts. Any other model, or ``native_step=False``, runs the
model's forward for both.

Where the time goes on CPU (transformers 5.23, ``benchmarks/generate.py``, one thread): ``model.generate``
adds, per step, ``DynamicCache``'s concatenation of the whole cache, the rebuilt 4-D mask, input
preparation, logits processors and stopping criteria; transformers' forward adds module calls, the
attention interface and rotary recomputation per layer. The native step removes both: on the tiny model
2.5x ``model.generate`` at batch 1, 1.9x at 16, 1.5x at 64; on a 19M-parameter one 1.3x, 1.15x, 1.1x.
What remains at batch 64 is the arithmetic: matmuls (~42% of a tiny-model step, ~77% of a 19M one; they
run at 60-80 GFLOP/s on one core, near its peak) and attention's read of the KV cache
(~33% / ~15%), which no rewrite of the step in eager PyTorch removes; sampling is ~0.1 ms per step.
``benchmarks/profile_decode.py`` splits a step with torch.profiler (figures in docs/results.md, "Rollout
throughput").

Sampling (:func:`sample_tokens`) applies, in the order transformers' ``generate`` does, temperature, then
top-k, top-p and min-p (:func:`filter_logits`), and draws with the exponential-race (Gumbel-max) trick
``argmax_i p_i / E_i, E_i = -log U_i ~ Exp(1)``, which needs no sort and no host sync. The log-probs
returned are those of the distribution actually sampled from: ``log_softmax`` of the tempered, filtered
logits (renormalised over the kept tokens). Greedy decoding (``temperature=0``) is a point mass whose log-prob is
always 0; it returns the model's own log-probs (temperature 1, no filtering) of the argmax tokens instead.

The model runs in eval mode (no dropout) under ``torch.inference_mode``; every submodule's training flag
is restored afterwards and nothing else about the model (parameters, ``requires_grad``, config) is
touched. Models whose layers use sliding-window or chunked attention are accepted only when the window
covers the whole sequence (then it is full attention); a rolling cache for longer windows is not built.
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs

from . import distributed
from .decode import LlamaDecodeStep, native_decode_unsupported, repeat_rows_into
from .models import eval_mode, position_ids_from_mask
from .ops import check_ndim

__all__ = ["Rollout", "generate", "sample_tokens", "filter_logits", "release_static_caches"]


@dataclass(frozen=True)
class Rollout:
    """The output of :func:`generate`. N = B * G rows (G consecutive rows per prompt), P prompt columns
    (left-padded), T completion columns (the longest completion; right-padded).

    Attributes:
        sequences: ``[N, P + T]`` prompt ids followed by completion ids.
        attention_mask: ``[N, P + T]`` long, 1 on real prompt tokens and on completion tokens up to and
            including the stop token: ``cat([prompt_mask, completion_mask], dim=1)``.
        prompt_mask: ``[N, P]`` long, the prompt mask repeated G times per prompt.
        completion_ids: ``[N, T]`` sampled tokens; ``pad_token_id`` after the stop token.
        completion_mask: ``[N, T]`` long, 1 up to and including the first EOS (all ones for a truncated row).
        logprobs: ``[N, T]`` float32, log-prob of each sampled token under the distribution it was sampled
            from (see :func:`sample_tokens`); 0 where ``completion_mask`` is 0.
        truncated: ``[N]`` bool, True where the row emitted no EOS within ``max_new_tokens``.
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    logprobs: torch.Tensor
    truncated: torch.Tensor


# ----------------------------------------------------------------------------------------------------
# Sampling: pure functions on logits
# ----------------------------------------------------------------------------------------------------


def filter_logits(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Set to ``-inf`` the logits outside the top-k, top-p (nucleus) and min-p sets, in that order.

    With ``p = softmax(logits)`` over the tokens still kept at each stage:

    - top-k keeps the k largest logits (ties with the k-th are kept too; 0 = off);
    - top-p keeps the smallest prefix of the tokens sorted by decreasing p whose mass reaches ``top_p``:
      token i is kept iff the mass of the tokens ranked above it is < top_p, so the most likely token is
      always kept (Holtzman et al. 2020, https://arxiv.org/abs/1904.09751; 1.0 = off, no sort);
    - min-p keeps tokens with ``p_i >= min_p * max_j p_j``, i.e. ``logit_i >= max_j logit_j + log(min_p)``
      (Nguyen et al. 2024, https://arxiv.org/abs/2407.01082; 0 = off).

    These are the rules (and the order) of transformers' ``TopKLogitsWarper``, ``TopPLogitsWarper`` and
    ``MinPLogitsWarper``. Apply the temperature before calling.

    Args:
        logits: ``[N, V]`` (any float dtype; not modified).
    Returns:
        ``[N, V]``, same dtype: the kept logits unchanged, the others ``-inf``. The input itself when every
        filter is off.
    """
    check_ndim("logits", logits, 2, "[N, V]")
    vocab_size = logits.shape[-1]
    if 0 < top_k < vocab_size:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [N, 1]
        logits = logits.masked_fill(logits < kth_largest, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [N, V]
        sorted_probs = torch.softmax(sorted_logits.float(), dim=-1)
        mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs  # [N, V] mass of the better-ranked tokens
        remove_sorted = mass_above >= top_p
        logits = logits.masked_fill(remove_sorted.scatter(-1, order, remove_sorted), -math.inf)
    if min_p > 0.0:
        threshold = logits.amax(dim=-1, keepdim=True) + math.log(min_p)  # [N, 1]
        logits = logits.masked_fill(logits < threshold, -math.inf)
    return logits


def sample_tokens(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    generator: torch.Generator | None = None,
    draws: tuple[torch.Tensor, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row and return it with its log-prob under the distribution sampled from.

    The distribution is ``q = softmax(filter_logits(logits / temperature, top_k, top_p, min_p))``, computed
    in float32: tokens outside the kept set have probability 0 and the kept ones are renormalised. The
    draw is ``argmax_i q_i / E_i`` with ``E_i = -log U_i ~ Exp(1)``, ``U_i ~ Uniform[0, 1)`` i.i.d. (the
    exponential race, equivalent to the Gumbel-max trick ``argmax_i log q_i + G_i``): the smallest of the
    independent ``E_i / q_i ~ Exp(q_i)`` is index i with probability ``q_i``. No sort, no host sync
    (``torch.multinomial`` may sync on CUDA). The returned log-prob is ``log q_token``.

    ``temperature == 0`` is greedy: ``argmax logits`` (the filters cannot change it). Its distribution
    is a point mass with log-prob 0, which carries no information, so the log-prob returned is instead
    the model's own ``log softmax(logits)[token]`` at temperature 1, without filtering: what a
    teacher-forced forward pass scores.

    Args:
        logits: ``[N, V]`` (not modified).
        generator: a ``torch.Generator`` on ``logits.device`` for reproducible draws; None = global RNG.
            Each call draws exactly N * V uniforms, row by row, so the same seed and the same logits
            give the same tokens.
        draws: ``(rows [N], total)``: draw the uniforms of ``total`` rows instead and use rows ``rows``, so
            that these N rows sample what they would as those rows of a batch of ``total`` (one process's
            share of a global batch samples as the single process does; ``rlcore.distributed``).
    Returns:
        ``(tokens, logprobs)``: ``[N]`` long and ``[N]`` float32.
    """
    check_ndim("logits", logits, 2, "[N, V]")
    logits = logits.float()
    if temperature == 0:
        tokens = logits.argmax(dim=-1)  # [N]
        logprobs = torch.log_softmax(logits, dim=-1)
    else:
        scaled = logits if temperature == 1.0 else logits / temperature
        logprobs = torch.log_softmax(filter_logits(scaled, top_k=top_k, top_p=top_p, min_p=min_p), dim=-1)
        if draws is None:
            uniform = torch.rand(logprobs.shape, generator=generator, device=logprobs.device)  # [N, V]
        else:
            rows, total = draws
            uniform = torch.rand((total, logprobs.shape[1]), generator=generator, device=logprobs.device)[rows]
        race = uniform.log_().neg_()  # E_i = -log U_i ~ Exp(1) (4x faster than exponential_ on CPU)
        tokens = (logprobs.exp() / race).argmax(dim=-1)  # [N]
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


# ----------------------------------------------------------------------------------------------------
# KV caches for decoding
# ----------------------------------------------------------------------------------------------------


class _GrowingLayer(CacheLayerMixin):
    """One layer's keys and values in buffers allocated once, ``[N, kv_heads, max_len, head_dim]``.

    ``update`` writes the new positions into the next slots and returns views of the filled prefix, so
    attention reads only what is there and nothing is ever reallocated or copied.
    """

    supports_early_init = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__()
        self.keys, self.values, self.length = keys, values, length
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a growing cache layer is built with its buffers")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        start, end = self.length, self.length + key_states.shape[-2]
        self.keys[:, :, start:end] = key_states
        self.values[:, :, start:end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return self.keys.shape[-2]


# One StaticCache per model, reused while the shapes stay the same: a compiled decode step (CUDA graphs)
# is captured against the cache's buffers, so a fresh cache per call would capture a new graph each time.
_STATIC_CACHES: weakref.WeakKeyDictionary[nn.Module, StaticCache] = weakref.WeakKeyDictionary()


def _growing_cache(prefill: DynamicCache, group_size: int, max_len: int) -> Cache:
    layers = []
    for layer in prefill.layers:
        batch, heads, prompt_len, head_dim = layer.keys.shape
        keys = layer.keys.new_empty(batch * group_size, heads, max_len, head_dim)  # [N, H, L, D]
        values = layer.values.new_empty(batch * group_size, heads, max_len, layer.values.shape[-1])
        repeat_rows_into(keys, layer.keys, group_size)
        repeat_rows_into(values, layer.values, group_size)
        layers.append(_GrowingLayer(keys, values, prompt_len))
    return Cache(layers=layers)


def _static_cache(model: nn.Module, prefill: DynamicCache, group_size: int, max_len: int, reuse: bool) -> StaticCache:
    prompt_keys = prefill.layers[0].keys  # [B, H, P, D]
    num_rows = prompt_keys.shape[0] * group_size
    cache = _STATIC_CACHES.get(model) if reuse else None
    kept = cache.layers[0].keys if cache is not None else None  # [N, H, L, D]
    wanted = (num_rows, max_len, prompt_keys.dtype, prompt_keys.device)
    if kept is None or (kept.shape[0], kept.shape[2], kept.dtype, kept.device) != wanted:
        cache = StaticCache(config=model.config, max_cache_len=max_len)
        for layer, filled in zip(cache.layers, prefill.layers):
            shape_like = filled.keys[:1].expand(num_rows, -1, -1, -1)  # [N, H, P, D], no memory
            layer.lazy_initialization(shape_like, filled.values[:1].expand(num_rows, -1, -1, -1))
        if reuse:
            _STATIC_CACHES[model] = cache
    for layer, filled in zip(cache.layers, prefill.layers):
        repeat_rows_into(layer.keys, filled.keys, group_size)
        repeat_rows_into(layer.values, filled.values, group_size)
        layer.cumulative_length.fill_(filled.keys.shape[-2])  # the next token goes to slot P
    return cache


def release_static_caches() -> None:
    """Free the KV caches kept between calls for the compiled decode step (see ``generate(compile=...)``)."""
    _STATIC_CACHES.clear()


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------


def _check_attention_span(model: nn.Module, total_len: int) -> None:
    """Raise unless every layer attends to the whole sequence (windows at least ``total_len`` long)."""
    config = model.config.get_text_config(decoder=True)
    layer_types, layer_kwargs = get_layer_types_and_kwargs(config)
    for index, (layer_type, kwargs) in enumerate(zip(layer_types, layer_kwargs)):
        window = kwargs.get("sliding_window")
        if layer_type == "full_attention" or (window is not None and window >= total_len):
            continue
        if window is None:
            raise ValueError(f"layer {index} is a {layer_type!r} layer: rlcore.rollout decodes attention-only models")
        raise ValueError(
            f"layer {index} uses {layer_type!r} attention (window {window}) shorter than prompt + max_new_tokens "
            f"= {total_len}: rlcore.rollout decodes full attention only; lower max_new_tokens"
        )


def _takes_ready_mask(model: nn.Module) -> bool:
    """sdpa attention takes a ready ``[N, 1, 1, L]`` mask as is; other attention implementations get the
    2-D mask and build their own."""
    return model.config._attn_implementation == "sdpa"


def _attention_dtype(cache: Cache) -> torch.dtype:
    return cache.layers[0].keys.dtype


def _cache_argument(model: nn.Module) -> str:
    """The keyword under which ``model.forward`` takes its KV cache: ``cache``, or ``past_key_values`` for a
    forward that names only that (transformers before the rename, where ``cache=`` would be swallowed by
    ``**kwargs``; transformers 5.24 still accepts ``past_key_values`` but warns that it is deprecated)."""
    parameters = inspect.signature(model.forward).parameters
    return "past_key_values" if "past_key_values" in parameters and "cache" not in parameters else "cache"


def _prefill(
    model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
) -> tuple[torch.Tensor, DynamicCache]:
    """Forward the prompts once: (logits of the next token [B, V], the filled cache)."""
    position_ids = position_ids_from_mask(prompt_mask)  # [B, P] 0 at the first real token
    cache = DynamicCache()  # plain full-length layers, whatever the config says
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    extra[_cache_argument(model)] = cache
    output = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids, use_cache=True, **extra)
    return output.logits[:, -1], cache


def _use_native_step(model: nn.Module, native_step: bool | None, static_cache: bool) -> bool:
    """Resolve ``generate(native_step=...)``: None = whenever possible, True = required."""
    if native_step is False:
        return False
    reason = (
        "it decodes into the growing cache (static_cache=False)" if static_cache else native_decode_unsupported(model)
    )
    if reason is not None and native_step:
        raise ValueError(f"native_step=True, but {reason}")
    return reason is None


def _decode_step(model, input_ids, position_ids, attention_mask, cache, cache_argument: str) -> torch.Tensor:
    """One token per row through the model: [N, 1] ids and positions -> next-token logits [N, V].
    ``cache_argument``: the forward's keyword for the cache (:func:`_cache_argument`)."""
    output = model(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        use_cache=True,
        **{cache_argument: cache},
    )
    return output.logits[:, -1]


_compiled_decode_steps: dict[str, object] = {}


def _compiled_step(model, *args) -> torch.Tensor:
    """``_decode_step`` compiled once per process and device type, with fixed shapes (a new batch size or
    cache length compiles again). On CUDA, mode ``reduce-overhead`` (CUDA graphs): the logits of the
    previous step are dead by the time this runs, which ``cudagraph_mark_step_begin`` tells the CUDA-graph
    runtime so that it may reuse their memory. Elsewhere the default mode (inductor's C++ on CPU)."""
    device_type = next(model.parameters()).device.type
    if device_type not in _compiled_decode_steps:
        mode = "reduce-overhead" if device_type == "cuda" else "default"
        _compiled_decode_steps[device_type] = torch.compile(_decode_step, mode=mode, dynamic=False)
    if device_type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()
    return _compiled_decode_steps[device_type](model, *args)


# ----------------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------------


def _check_generate_inputs(model, prompt_ids, prompt_mask, eos_token_ids, generator, **settings) -> None:
    check_ndim("prompt_ids", prompt_ids, 2, "[B, P]")
    if prompt_ids.is_floating_point() or prompt_ids.is_complex() or prompt_ids.dtype == torch.bool:
        raise ValueError(f"prompt_ids must hold integer token ids, got dtype {prompt_ids.dtype}")
    if prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt_mask has shape {tuple(prompt_mask.shape)}, prompt_ids {tuple(prompt_ids.shape)}")
    if 0 in prompt_ids.shape:
        raise ValueError(f"prompt_ids is empty: shape {tuple(prompt_ids.shape)}")
    device = next(model.parameters()).device
    if prompt_ids.device != device or prompt_mask.device != device:
        raise ValueError(
            f"prompt_ids ({prompt_ids.device}) and prompt_mask ({prompt_mask.device}) must be on the model's device {device}"
        )
    if generator is not None and generator.device != device:
        raise ValueError(f"generator is on {generator.device}, the model on {device}")
    for name, lowest in (("max_new_tokens", 1), ("num_samples", 1), ("stop_check_interval", 1), ("top_k", 0)):
        value = settings[name]
        if not isinstance(value, int) or value < lowest:
            raise ValueError(f"{name} must be an integer >= {lowest}, got {value!r}")
    if not (math.isfinite(settings["temperature"]) and settings["temperature"] >= 0):
        raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {settings['temperature']}")
    if not 0 < settings["top_p"] <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {settings['top_p']}")
    if not 0 <= settings["min_p"] <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {settings['min_p']}")
    vocab_size = model.get_input_embeddings().num_embeddings
    for name, token in [("pad_token_id", settings["pad_token_id"])] + [("eos_token_ids", t) for t in eos_token_ids]:
        if not isinstance(token, int) or not 0 <= token < vocab_size:
            raise ValueError(f"{name} must hold integer ids in [0, {vocab_size}), got {token!r}")
    _check_prompt_values(prompt_ids, prompt_mask, vocab_size)


def _check_prompt_values(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, vocab_size: int) -> None:
    """Left padding (every row is 0...0 1...1 with at least one 1) and ids in range; one host sync."""
    mask = prompt_mask.long()
    bad_value = (mask != 0) & (mask != 1)
    not_left_padded = (mask[:, :-1] > mask[:, 1:]).any(dim=1) | (mask[:, -1] != 1)  # [B]
    bad_id = (prompt_ids < 0) | (prompt_ids >= vocab_size)
    if bool(bad_value.any()):
        raise ValueError(f"prompt_mask must hold 0 and 1 only; row {int(bad_value.any(dim=1).nonzero()[0])} does not")
    if bool(not_left_padded.any()):
        row = int(not_left_padded.nonzero()[0])
        raise ValueError(
            f"prompt row {row} is not left-padded with at least one token: its mask is {mask[row].tolist()}, "
            "expected zeros then ones ending in 1"
        )
    if bool(bad_id.any()):
        row = int(bad_id.any(dim=1).nonzero()[0])
        raise ValueError(f"prompt row {row} holds token ids outside [0, {vocab_size}): {prompt_ids[row].tolist()}")


def generate(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_ids: int | Sequence[int],
    pad_token_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    draws: tuple[torch.Tensor, int] | None = None,
    static_cache: bool | None = None,
    compile: bool | None = None,
    native_step: bool | None = None,
    stop_check_interval: int | None = None,
) -> Rollout:
    """Sample ``num_samples`` completions per prompt with a KV cache; see the module docstring.

    Args:
        model: a transformers causal LM (any architecture whose layers attend to the whole sequence;
            adapters wrapped around its Linear layers are fine), on the prompts' device.
        prompt_ids: ``[B, P]`` token ids, left-padded (padding ids may be anything in the vocabulary).
        prompt_mask: ``[B, P]`` 1 on real tokens, 0 on left padding; every row ends in a real token.
        max_new_tokens: completion length limit; a row that reaches it without EOS is ``truncated``.
        eos_token_ids: id or ids that end a completion (the EOS is kept inside the completion mask);
            empty = never stop (a fixed-length rollout).
        pad_token_id: written into ``completion_ids`` after the stop token.
        temperature, top_k, top_p, min_p: the sampling distribution (:func:`sample_tokens`);
            ``temperature=0`` is greedy.
        num_samples: G completions per prompt, G consecutive output rows, sharing one prefill.
        generator: ``torch.Generator`` on the model's device; with a fixed seed the samples are
            reproducible, and G samples of one prompt equal the samples of that prompt repeated G times
            under the same seed (the random draws are laid out per output row either way).
        draws: ``(rows [N], total)``, see :func:`sample_tokens`: these N output rows sample as rows ``rows``
            of a batch of ``total`` rows would (``rlcore.distributed.sampling_draws``).
        static_cache: transformers' ``StaticCache`` (fixed shapes) instead of the growing cache.
            Default: on CUDA only.
        compile: decode through ``torch.compile``. With ``static_cache``: the model's forward, fixed
            shapes, ``mode="reduce-overhead"`` (CUDA graphs) on CUDA and the default mode elsewhere; the
            first calls for a new batch size or length compile, the cache is then kept between calls
            (``release_static_caches()`` frees it) and its length rounded up to a multiple of 64 so that
            new prompt lengths rarely recompile. With the growing cache (CPU's default): the native step
            (:func:`rlcore.decode.compiled_decode_token`; inductor's C++ on CPU), compiled once per model
            shape and batch size, whatever the prompt length; it needs the native step. Default: on CUDA
            only. Compiling takes tens of seconds to minutes on CPU (docs/results.md, "Compiling the
            decode step on CPU").
        native_step: decode with :class:`rlcore.decode.LlamaDecodeStep` (the model's own weights, a few
            tensor ops per layer) instead of the model's forward. Default: whenever the model supports it
            (:func:`rlcore.decode.native_decode_unsupported`: plain Llama/Qwen2 layers, no adapters or
            quantised layers) and the cache is the growing one. True raises if it cannot; False never.
        stop_check_interval: decode steps between two checks that every row has stopped. On CUDA each
            check is a host-device sync: default 16 there. Default 1 on CPU, where reading a tensor
            costs no sync. The result does not depend on it.
    Returns:
        a :class:`Rollout` with N = B * num_samples rows.
    """
    eos_token_ids = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
    on_cuda = prompt_ids.device.type == "cuda"
    if stop_check_interval is None:
        stop_check_interval = 16 if on_cuda else 1
    _check_generate_inputs(
        model,
        prompt_ids,
        prompt_mask,
        eos_token_ids,
        generator,
        max_new_tokens=max_new_tokens,
        num_samples=num_samples,
        stop_check_interval=stop_check_interval,
        top_k=top_k,
        temperature=temperature,
        top_p=top_p,
        min_p=min_p,
        pad_token_id=pad_token_id,
    )
    static_cache = on_cuda if static_cache is None else static_cache
    total_len = prompt_ids.shape[1] + max_new_tokens
    _check_attention_span(model, total_len)
    compile = on_cuda and static_cache if compile is None else compile
    native_step = _use_native_step(model, native_step, static_cache)
    if compile and not (static_cache or native_step):
        reason = native_decode_unsupported(model) or "native_step=False"
        raise ValueError(
            f"compile=True with the growing cache compiles the native decode step, but {reason}; "
            "pass static_cache=True to compile the model's forward instead"
        )
    max_len = -(-total_len // 64) * 64 if compile and static_cache else total_len  # cache slots
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, generator=generator, draws=draws)
    eos = torch.tensor(eos_token_ids, device=prompt_ids.device, dtype=torch.long)

    # FSDP2 (rlcore.distributed): the full parameters are gathered once here, not at every token and layer
    with distributed.full_parameters(model), eval_mode(model), torch.inference_mode():
        if native_step:  # the prompts and the steps through rlcore.decode, into buffers allocated once
            first_logits, step = _native_prefill(model, prompt_ids, prompt_mask, num_samples, max_len, compile)
            ready_mask, attention_dtype = True, step.keys[0].dtype
            step = _native_step_call(step)
        else:
            first_logits, prefill = _prefill(model, prompt_ids, prompt_mask)  # [B, V]
            if static_cache:
                cache = _static_cache(model, prefill, num_samples, max_len, reuse=compile)
            else:
                cache = _growing_cache(prefill, num_samples, max_len)
            del prefill
            step, ready_mask = _model_step(model, cache, compile)
            attention_dtype = _attention_dtype(cache)
        prompt_mask_rows = prompt_mask.long().repeat_interleave(num_samples, dim=0)  # [N, P]
        completion_ids, logprobs = _decode(
            step,
            ready_mask,
            attention_dtype,
            static_cache,
            first_logits.repeat_interleave(num_samples, dim=0),
            prompt_mask_rows,
            max_len,
            max_new_tokens,
            eos,
            stop_check_interval,
            **sampling,
        )
        rollout = _finish(prompt_ids, prompt_mask_rows, completion_ids, logprobs, eos, pad_token_id, num_samples)
    # Tensors made under inference_mode cannot enter autograd later (e.g. as inputs of the training
    # forward pass); these copies are ordinary tensors.
    return Rollout(**{name: tensor.clone() for name, tensor in vars(rollout).items()})


def _native_prefill(model, prompt_ids, prompt_mask, group_size: int, max_len: int, compile: bool):
    """(``[B, V]`` logits of the first new token, the :class:`rlcore.decode.LlamaDecodeStep`): the prompts
    forwarded by the native step's own prefill into ``[B * G, kv_heads, max_len, head_dim]`` key/value buffers."""
    attention, embedding = model.model.layers[0].self_attn, model.model.embed_tokens.weight
    shape = (prompt_ids.shape[0] * group_size, model.config.num_key_value_heads, max_len, attention.head_dim)
    keys, values = ([embedding.new_empty(shape) for _ in model.model.layers] for _ in range(2))
    step = LlamaDecodeStep(model, keys, values, compile=compile, checked=True)  # by _use_native_step
    return step.prefill(prompt_ids, prompt_mask), step


def _native_step_call(native: LlamaDecodeStep):
    """The native step as the decode loop calls a step: ``(tokens [N, 1], positions [N, 1], mask) -> [N, V]``."""
    return lambda tokens, positions, mask: native(tokens[:, 0], positions[:, 0], mask)


def _model_step(model, cache, compile: bool):
    """The model's forward as the decode loop's one-token step, ``step(tokens [N, 1], positions [N, 1], mask)
    -> logits [N, V]``, and whether its mask is the ready ``[N, 1, 1, L]`` float mask (else the 2-D boolean one)."""
    model_step, cache_argument = _compiled_step if compile else _decode_step, _cache_argument(model)
    return (
        lambda tokens, positions, mask: model_step(model, tokens, positions, mask, cache, cache_argument),
        _takes_ready_mask(model),
    )


def _decode(
    step,
    ready_mask,
    attention_dtype,
    all_slots,
    logits,
    prompt_mask_rows,
    max_len,
    max_new_tokens,
    eos,
    stop_check_interval,
    **sampling,
):
    """The decode loop: returns ([N, steps] sampled ids, [N, steps] their log-probs), steps <= max_new_tokens.
    ``all_slots``: the step attends to every cache slot (masked), not only the filled ones."""
    num_rows, prompt_len = prompt_mask_rows.shape
    device = prompt_mask_rows.device
    # sdpa gets an additive float mask (0 = attend, -inf = not) in the attention dtype, which it uses
    # without converting a boolean one at every layer; other implementations get a 2-D boolean mask.
    keep, drop, dtype = (0.0, -math.inf, attention_dtype) if ready_mask else (True, False, torch.bool)
    attend = torch.full((num_rows, max_len), drop, dtype=dtype, device=device)  # [N, L]
    attend[:, :prompt_len].masked_fill_(prompt_mask_rows.bool(), keep)
    next_position = prompt_mask_rows.sum(dim=1, keepdim=True)  # [N, 1] = prompt lengths
    completion_ids = torch.empty(num_rows, max_new_tokens, dtype=torch.long, device=device)  # [N, T]
    logprobs = torch.empty(num_rows, max_new_tokens, dtype=torch.float32, device=device)  # [N, T]
    stopped = torch.zeros(num_rows, dtype=torch.bool, device=device)  # [N] emitted an EOS
    for t in range(max_new_tokens):
        tokens, token_logprobs = sample_tokens(logits, **sampling)  # [N], [N]
        completion_ids[:, t] = tokens
        logprobs[:, t] = token_logprobs
        stopped |= torch.isin(tokens, eos)
        if t + 1 == max_new_tokens or ((t + 1) % stop_check_interval == 0 and bool(stopped.all())):
            break
        slot = prompt_len + t  # cache slot of the token fed now
        attend[:, slot] = keep
        mask = attend if all_slots else attend[:, : slot + 1]  # [N, kv_len]
        logits = step(tokens[:, None], next_position + t, mask[:, None, None, :] if ready_mask else mask)
    return completion_ids[:, : t + 1], logprobs[:, : t + 1]


def _finish(prompt_ids, prompt_mask_rows, completion_ids, logprobs, eos, pad_token_id, num_samples) -> Rollout:
    """Mask everything after the first EOS, trim to the longest completion and assemble the Rollout."""
    is_eos = torch.isin(completion_ids, eos)  # [N, steps]
    after_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0  # [N, steps] strictly after the first EOS
    completion_mask = (~after_eos).long()
    length = int(completion_mask.sum(dim=1).max())  # the one host sync of the epilogue
    completion_mask = completion_mask[:, :length]
    completion_ids = completion_ids[:, :length].masked_fill(after_eos[:, :length], pad_token_id)
    logprobs = logprobs[:, :length].masked_fill(after_eos[:, :length], 0.0)
    return Rollout(
        sequences=torch.cat([prompt_ids.repeat_interleave(num_samples, dim=0), completion_ids], dim=1),
        attention_mask=torch.cat([prompt_mask_rows, completion_mask], dim=1),
        prompt_mask=prompt_mask_rows,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        logprobs=logprobs,
        truncated=~is_eos.any(dim=1),
    )
