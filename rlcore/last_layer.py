"""The last decoder layer at the scored positions only, for forwards that read a few final hidden states.

A scored forward (SFT's completion tokens, DPO's chosen and rejected tokens, a rollout's completion) reads
the final hidden state at some positions S of each row and ignores the rest. Every layer but the last must
still run at every position: later positions attend to earlier ones' keys and values. In the last layer
only the keys and values are needed everywhere; the query, the attention output, the output projection and
the MLP are needed at S alone::

    h = rms_norm(x) w_in                                  [B, L, E]   every position
    k, v = rope(h W_k), h W_v                              [B, L, ...] every position (later queries read them)
    q_S = rope(h_S W_q)                                    [|S|, ...]  scored positions only
    y_S = x_S + softmax(q_S k^T * scale + mask_S) v W_o    mask_S: the model's mask, rows S
    y_S = y_S + mlp(rms_norm(y_S) w_post)

That is the same function at S (and the same gradient to every weight and every earlier position) with the
last layer's ``W_q``, ``W_o`` and MLP applied to |S| rows instead of B L: about 87% of a Llama layer's
matmul work (all but the key/value projections) at the unscored positions (~55% of an SFT batch of the
toy, ~50% of a DPO batch). Measured in docs/results.md ("The last layer at the scored positions").

How it runs: :func:`scoring_last_layer` replaces, for one call of the model, the last layer's ``forward``
(an instance attribute, so the layer's own ``__call__`` and hooks of its parents still run) by
:func:`_scored_layer_forward`, which returns the ``[1, |S|, E]`` hidden states of S in the caller's order;
the decoder's final norm then runs on those alone. ``rlcore.models.body_hidden_states`` decides when it
applies (``scored_layer_unsupported``).

Queries are grouped by row: the rows holding a scored position (B') each get Q query slots (Q = most
scored positions in a row); unused slots repeat the row's first scored position (a valid query, its output
dropped before the output projection), so attention runs once on ``[B', H, Q, D]`` queries against the
``[B', K, L, D]`` keys.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import eager_attention_forward, rotate_half

__all__ = ["query_slots", "scoring_last_layer"]


def query_slots(rows: torch.Tensor, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scored positions grouped by row.

    Args:
        rows, columns: [N] the (row, column) of each scored position, in any order, N >= 1.

    Returns:
        (present [B'] the rows holding a scored position (ascending),
         slot_columns [B', Q] the column each query slot reads (unused slots repeat the row's first),
         slot_of [N] the flat index into ``B' * Q`` of each position, in the given order).
    """
    present, inverse, counts = torch.unique(rows, return_inverse=True, return_counts=True)  # [B'], [N], [B']
    width = int(counts.max())
    order = torch.argsort(inverse, stable=True)  # positions grouped by row, given order within a row
    starts = counts.cumsum(0) - counts  # [B'] the first entry of each row in ``order``
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=rows.device) - starts[inverse[order]]  # slot within the row
    slot_of = inverse * width + rank  # [N]
    slot_columns = columns[order[starts]].unsqueeze(1).repeat(1, width)  # [B', Q] the row's first, everywhere
    slot_columns.view(-1)[slot_of] = columns
    return present, slot_columns, slot_of


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``[B, heads, L, D]`` with ``[B, L, D]`` tables: ``x cos + rotate_half(x) sin`` (transformers' own
    ``rotate_half``; queries and keys have different lengths here, so not ``apply_rotary_pos_emb``)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def _rows(tensor: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """``tensor[present]``, without the copy when every row is present (``present`` is sorted and unique)."""
    return tensor if len(present) == tensor.shape[0] else tensor[present]


def _mask_rows(mask, present: torch.Tensor, slot_columns: torch.Tensor, length: int, dtype: torch.dtype):
    """The rows of the queries' attention mask, ``[B', 1, Q, L]``: the model's 4D mask (boolean or additive,
    batch 1 or B) at the slots' columns; for ``None`` (causal, no padding) the causal rows, additive in ``dtype``."""
    if mask is None:
        future = torch.arange(length, device=slot_columns.device) > slot_columns.unsqueeze(-1)  # [B', Q, L]
        return torch.zeros(future.shape, dtype=dtype, device=future.device).masked_fill(future, torch.finfo(dtype).min)[
            :, None
        ]
    mask = _rows(mask, present) if mask.shape[0] > 1 else mask.expand(len(present), -1, -1, -1)  # [B', M, L, L]
    index = slot_columns[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[-1])
    return mask.gather(2, index)  # [B', M, Q, L]


def _scored_layer_forward(
    layer: nn.Module,
    slots: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **_: object,
) -> torch.Tensor:
    """A Llama-layout decoder layer evaluated at the scored positions only: ``[B, L, E]`` in, ``[1, N, E]`` out
    (the N positions of ``slots``, :func:`query_slots`, in their given order)."""
    present, slot_columns, slot_of = slots
    attention = layer.self_attn
    batch, length, width = hidden_states.shape
    head_dim, rows, queries = attention.head_dim, len(present), slot_columns.shape[1]
    x = _rows(hidden_states, present)  # [B', L, E]
    normed = layer.input_layernorm(x)
    cos, sin = (_rows(table.expand(batch, -1, -1), present) for table in position_embeddings)  # [B', L, D] each
    keys = _rotate(attention.k_proj(normed).view(rows, length, -1, head_dim).transpose(1, 2), cos, sin)
    values = attention.v_proj(normed).view(rows, length, -1, head_dim).transpose(1, 2)  # [B', K, L, D]

    def at_slots(tensor: torch.Tensor) -> torch.Tensor:  # [B', L, C] -> [B', Q, C]
        return tensor.gather(1, slot_columns.unsqueeze(-1).expand(-1, -1, tensor.shape[-1]))

    query_input = attention.q_proj(at_slots(normed)).view(rows, queries, -1, head_dim).transpose(1, 2)
    query = _rotate(query_input, at_slots(cos), at_slots(sin))  # [B', H, Q, D]
    mask = _mask_rows(attention_mask, present, slot_columns, length, query.dtype)  # [B', 1, Q, L]
    if attention.config._attn_implementation == "eager":  # transformers' own (its softmax in float32)
        mixed = eager_attention_forward(attention, query, keys, values, mask, scaling=attention.scaling)[0]
    else:
        mixed = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, scale=attention.scaling, enable_gqa=query.shape[1] != keys.shape[1]
        ).transpose(1, 2)  # [B', Q, H, D]
    mixed = mixed.reshape(rows * queries, -1)[slot_of]  # [N, H D]: the used slots, in the given order
    residual = at_slots(x).reshape(rows * queries, width)[slot_of]  # [N, E]
    out = residual + attention.o_proj(mixed)
    out = out + layer.mlp(layer.post_attention_layernorm(out))
    return out.unsqueeze(0)  # [1, N, E]


@contextlib.contextmanager
def scoring_last_layer(layer: nn.Module, rows: torch.Tensor, columns: torch.Tensor) -> Iterator[None]:
    """Within the block, ``layer`` (a Llama-layout decoder layer) returns the ``[1, N, E]`` outputs at the N
    positions ``(rows, columns)`` only (:func:`_scored_layer_forward`); its own ``forward`` afterwards."""
    slots = query_slots(rows, columns)
    layer.forward = lambda hidden_states, *args, **kwargs: _scored_layer_forward(
        layer, slots, hidden_states, *args, **kwargs
    )
    try:
        yield
    finally:
        del layer.forward
