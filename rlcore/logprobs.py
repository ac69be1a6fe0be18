"""Per-token log-probabilities and entropies, computed without a full log-softmax copy of the batch.

A batch of logits ``[B, T, V]`` is the largest tensor of post-training (64 x 1024 x 152k bf16 is 20 GB).
``torch.log_softmax(logits, -1).gather(...)`` makes a second copy of that size (twice that in float32)
and autograd keeps it for the backward pass. The functions here instead work on blocks of rows:

- ``gather_logprobs`` (from logits): the forward keeps one float32 log-normaliser per position; the
  backward rebuilds ``softmax`` block by block. Extra memory: one float32 block of rows.
- ``chunked_logprobs`` (from hidden states and the LM-head weight): never holds ``[N, V]`` logits at all,
  in the forward or the backward pass; it recomputes each chunk's logits in the backward pass.

Conventions: log-probs are float32 (float64 for float64 inputs) whatever the input dtype, since PPO-style
ratios ``exp(logp - old_logp)`` need the precision; the softmax reductions are done in that dtype too.
``temperature`` divides the logits (never in place); ``logits[..., t, :]`` scores ``tokens[..., t]``, so
shift before calling (``logits[:, :-1]`` against ``input_ids[:, 1:]``). Tokens must be valid ids in
``[0, V)`` everywhere, padding included (replace an ignore label such as -100 by any id, e.g. 0, and mask
the position out afterwards).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops import check_ndim

__all__ = [
    "gather_logprobs",
    "entropy_from_logits",
    "log_sum_squared_probs",
    "chunked_logprobs",
    "length_desensitized_logps",
]

# Rows per block when the caller gives none: a float32 block of about 2**24 elements (64 MiB).
_BLOCK_ELEMENTS = 2**24


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for low-precision inputs (bf16, fp16), else the input's own dtype (float32, float64)."""
    return torch.promote_types(dtype, torch.float32)


def _check_logits_tokens(logits: torch.Tensor, tokens: torch.Tensor) -> None:
    if logits.ndim < 2:
        raise ValueError(f"logits must be [..., V] with at least 2 dimensions, got shape {tuple(logits.shape)}")
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(
            f"shape mismatch: logits has shape {tuple(logits.shape)} so tokens must have shape "
            f"{tuple(logits.shape[:-1])}, but tokens has shape {tuple(tokens.shape)}"
        )
    if tokens.is_floating_point() or tokens.is_complex():
        raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")


def _row_blocks(num_rows: int, block_rows: int):
    """Slices that cover ``range(num_rows)`` in blocks of ``block_rows``."""
    for start in range(0, num_rows, block_rows):
        yield slice(start, min(start + block_rows, num_rows))


def _as_rows(logits: torch.Tensor) -> torch.Tensor:
    """View ``[..., S, V]`` as ``[R, S, V]`` (a view for contiguous logits and for ``logits[:, :-1]``)."""
    return logits.reshape(-1, logits.shape[-2], logits.shape[-1])


def _blocks_of(logits_3d: torch.Tensor, block_rows: int):
    """Yield ``(r, s)`` index pairs such that ``logits_3d[r, s]`` are ``[<=block_rows, V]`` views."""
    for r in range(logits_3d.shape[0]):
        for s in _row_blocks(logits_3d.shape[1], block_rows):
            yield r, s


def _default_block_rows(vocab_size: int) -> int:
    return max(1, _BLOCK_ELEMENTS // vocab_size)


def _scaled(logits: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """``logits / temperature`` in ``dtype``, out of place; the caller's tensor itself when nothing changes."""
    logits = logits.to(dtype)
    return logits if temperature == 1.0 else logits / temperature


def _scaled_(owned_logits: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """``_scaled`` that may overwrite its argument: pass only a tensor made here, never a caller's."""
    z = owned_logits.to(dtype)
    return z if temperature == 1.0 else z.div_(temperature)


def _logsumexp_(z: torch.Tensor) -> torch.Tensor:
    """``logsumexp(z, -1)`` computed in ``z``'s own memory (z is destroyed); [n, V] -> [n].

    torch.logsumexp allocates two [n, V] temporaries; this allocates none.
    """
    row_max = z.amax(dim=-1, keepdim=True)  # [n, 1]
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)  # rows of -inf stay -inf, not nan
    return z.sub_(row_max).exp_().sum(dim=-1).log_() + row_max.squeeze(-1)


def _logsumexp_and_entropy(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logsumexp(z, -1), entropy of softmax(z))`` of finite ``[n, V]`` logits, z left unchanged:
    ``H = lse - sum_v p_v z_v`` with ``p = e / S``, ``e = exp(z - max z)``, ``S = sum e``, ``lse = log S + max z``."""
    row_max = z.amax(dim=-1, keepdim=True)  # [n, 1]
    weights = (z - row_max).exp_()  # [n, V]
    total = weights.sum(dim=-1)  # [n]
    lse = total.log() + row_max.squeeze(-1)
    return lse, lse - weights.mul_(z).sum(dim=-1) / total


def _softmax_minus_onehot_grad_(
    z: torch.Tensor, lse: torch.Tensor, tokens: torch.Tensor, grad_out: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Gradient of ``sum_n g_n * log_softmax(logits_n / temperature)[token_n]`` with respect to the logits.

        d/d logits_nv = g_n * (onehot(token_n)_v - softmax(z_n)_v) / temperature,   z = logits / temperature

    Written over z (no [n, V] allocation): z: [n, V] float32/64 made here, lse: [n] = logsumexp(z),
    tokens: [n], grad_out: [n]. Returns z.
    """
    scale = (grad_out.to(z.dtype) / temperature).unsqueeze(-1)  # [n, 1]
    softmax = z.sub_(lse.unsqueeze(-1)).exp_()  # [n, V]
    return softmax.mul_(-scale).scatter_add_(1, tokens.unsqueeze(-1), scale)


class _GatherLogprobs(torch.autograd.Function):
    """log_softmax(logits / temperature)[token] by blocks of rows, with a softmax-recomputing backward."""

    @staticmethod
    def forward(ctx, logits, tokens, temperature, block_rows):
        dtype = _accumulation_dtype(logits.dtype)
        logits_3d = _as_rows(logits)  # [R, S, V]
        tokens_2d = tokens.reshape(logits_3d.shape[:2]).long()  # [R, S]
        lse = torch.empty(tokens_2d.shape, dtype=dtype, device=logits.device)  # [R, S]
        picked = torch.empty_like(lse)  # [R, S]
        for r, s in _blocks_of(logits_3d, block_rows):
            z = _scaled(logits_3d[r, s], temperature, dtype)  # [n, V]
            lse[r, s] = torch.logsumexp(z, dim=-1)
            picked[r, s] = z.gather(-1, tokens_2d[r, s].unsqueeze(-1)).squeeze(-1)
            del z  # free this block before the next one is made
        ctx.save_for_backward(logits, tokens_2d, lse)
        ctx.temperature, ctx.block_rows = temperature, block_rows
        return (picked - lse).reshape(tokens.shape)

    @staticmethod
    def backward(ctx, grad_logprobs):
        logits, tokens_2d, lse = ctx.saved_tensors
        logits_3d = _as_rows(logits)  # [R, S, V]
        grad_2d = grad_logprobs.reshape(tokens_2d.shape)  # [R, S]
        grad_logits = torch.empty(logits_3d.shape, dtype=logits.dtype, device=logits.device)  # [R, S, V]
        for r, s in _blocks_of(logits_3d, ctx.block_rows):
            z = _scaled_(logits_3d[r, s].to(lse.dtype, copy=True), ctx.temperature, lse.dtype)  # [n, V]
            grad_z = _softmax_minus_onehot_grad_(z, lse[r, s], tokens_2d[r, s], grad_2d[r, s], ctx.temperature)
            grad_logits[r, s] = grad_z
            del z, grad_z  # free this block before the next one is made
        return grad_logits.reshape(logits.shape), None, None, None


def gather_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, block_rows: int | None = None
) -> torch.Tensor:
    """Selective log-softmax: the log-probability of each token under its logits.

        log p(token_t) = z_t[token_t] - logsumexp_v z_t[v],     z_t = logits_t / temperature

    Works on blocks of ``block_rows`` positions, so it never holds a log-softmax copy of the batch: the
    forward pass keeps one float32 logsumexp per position, the backward pass recomputes the softmax block
    by block and returns the exact gradient ``g * (onehot - softmax) / temperature``. Reductions are done
    in float32 for bf16/fp16 logits. Double backward is not supported.

    Args:
        logits: [B, T, V] (any number of leading dimensions), any float dtype. Not modified.
        tokens: [B, T] integer ids in [0, V), aligned with ``logits`` (position t scores token t).
        temperature: sampling temperature the tokens were drawn with; divides the logits.
        block_rows: positions per block (default: about 2**24 / V, a 64 MiB float32 block).

    Returns:
        [B, T] log-probs, float32 (float64 for float64 logits).
    """
    _check_logits_tokens(logits, tokens)
    block_rows = block_rows or _default_block_rows(logits.shape[-1])
    return _GatherLogprobs.apply(logits, tokens, float(temperature), block_rows)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0, block_rows: int | None = None) -> torch.Tensor:
    """Entropy of the softmax distribution at each position.

        H_t = -sum_v p_t[v] log p_t[v] = logsumexp(z_t) - sum_v p_t[v] z_t[v],   p_t = softmax(z_t),
        z_t = logits_t / temperature

    Computed by blocks of ``block_rows`` positions in float32 (float64 for float64 logits). Differentiable
    through plain autograd, which keeps each block's softmax: use it under ``torch.no_grad()`` when it is
    only a metric, as it usually is.

    Args:
        logits: [B, T, V] (any number of leading dimensions). Not modified.
        temperature: divides the logits.
        block_rows: positions per block (default: about 2**24 / V).

    Returns:
        [B, T] entropies in nats, float32 (float64 for float64 logits).
    """
    if logits.ndim < 2:
        raise ValueError(f"logits must be [..., V] with at least 2 dimensions, got shape {tuple(logits.shape)}")
    dtype = _accumulation_dtype(logits.dtype)
    block_rows = block_rows or _default_block_rows(logits.shape[-1])
    logits_3d = _as_rows(logits)  # [R, S, V]
    entropies = []
    for r, s in _blocks_of(logits_3d, block_rows):
        z = _scaled(logits_3d[r, s], temperature, dtype)  # [n, V]
        probs = torch.softmax(z, dim=-1)  # [n, V]
        entropies.append(torch.logsumexp(z, dim=-1) - (probs * z).sum(-1))  # [n]
        del z, probs  # without autograd, free this block before the next one is made
    return torch.cat(entropies).reshape(logits.shape[:-1])


def log_sum_squared_probs(
    logits: torch.Tensor, temperature: float = 1.0, block_rows: int | None = None
) -> torch.Tensor:
    """Log of the squared-probability mass at each position, the normaliser of WPO's weights.

        log sum_v p_t[v]^2 = logsumexp(2 z_t) - 2 logsumexp(z_t),   p_t = softmax(z_t),  z_t = logits_t / temperature

    WPO (Zhou et al. 2024, https://arxiv.org/abs/2406.11827, Eq. 2 as TRL's ``use_weighting`` computes it)
    weighs a completion by exp(mean_t [log p_t(y_t) - log sum_v p_t[v]^2]): each token's probability
    relative to the probability that the policy would sample the token it sampled. Computed by blocks in
    float32 (float64 for float64 logits), without gradient (a weight, never differentiated).

    Args:
        logits: [B, T, V] (any number of leading dimensions). Not modified.
        temperature: divides the logits.
        block_rows: positions per block (default: about 2**24 / V).

    Returns:
        [B, T], detached, float32 (float64 for float64 logits); always <= 0.
    """
    if logits.ndim < 2:
        raise ValueError(f"logits must be [..., V] with at least 2 dimensions, got shape {tuple(logits.shape)}")
    dtype = _accumulation_dtype(logits.dtype)
    block_rows = block_rows or _default_block_rows(logits.shape[-1])
    logits_3d = _as_rows(logits.detach())  # [R, S, V]
    values = []
    for r, s in _blocks_of(logits_3d, block_rows):
        z = _scaled(logits_3d[r, s], temperature, dtype)  # [n, V]
        values.append(torch.logsumexp(2 * z, dim=-1) - 2 * torch.logsumexp(z, dim=-1))  # [n]
        del z
    return torch.cat(values).reshape(logits.shape[:-1])


def length_desensitized_logps(
    chosen_token_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_token_logps: torch.Tensor,
    rejected_mask: torch.Tensor,
    ld_alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs of LD-DPO: the tokens beyond the shorter completion's length count ``ld_alpha`` times.

        l      = min(|y_c|, |y_r|)                              (completion tokens, per pair)
        logp_y = sum_{k <= l} log p(y_k) + ld_alpha * sum_{k > l} log p(y_k)

    where k counts the completion's valid tokens (mask 1) from its first one. ld_alpha = 1 gives the plain
    sums, ld_alpha = 0 truncates both completions to their shared length. LD-DPO (Liu et al. 2024,
    https://arxiv.org/abs/2409.06411) damps DPO's preference for the longer answer; TRL's ``ld_alpha``
    computes the same for the policy and the reference.

    Args:
        chosen_token_logps, rejected_token_logps: [B, T] per-token log-probs (with gradient, if any).
        chosen_mask, rejected_mask: [B, T] 1 on completion tokens.
        ld_alpha: weight of the tokens beyond the shared length, in [0, 1].

    Returns:
        ([B] chosen, [B] rejected) sequence log-probs.
    """
    check_ndim("chosen_token_logps", chosen_token_logps, 2, "[B, T]")
    if not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(f"ld_alpha must be in [0, 1], got {ld_alpha}")
    shared_length = torch.minimum(chosen_mask.sum(-1), rejected_mask.sum(-1)).unsqueeze(-1)  # [B, 1]
    out = []
    for token_logps, mask in ((chosen_token_logps, chosen_mask), (rejected_token_logps, rejected_mask)):
        if token_logps.shape != mask.shape or token_logps.shape[0] != shared_length.shape[0]:
            raise ValueError(
                f"shape mismatch: token log-probs {tuple(token_logps.shape)} and masks {tuple(mask.shape)} must "
                f"all be [B, T] with B = {shared_length.shape[0]}"
            )
        valid = mask.bool()
        position = valid.long().cumsum(-1)  # [B, T]: 1 on the first completion token, 2 on the second, ...
        weight = torch.where(position <= shared_length, 1.0, ld_alpha)  # [B, T]
        out.append(torch.where(valid, token_logps * weight.to(token_logps.dtype), 0.0).sum(-1))  # [B]
    return out[0], out[1]


class _ChunkedLogprobs(torch.autograd.Function):
    """log_softmax((hidden @ weight.T + bias) / temperature)[token], one chunk of positions at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, chunk_size, temperature, with_statistics):
        dtype = _accumulation_dtype(hidden.dtype)
        lse = torch.empty(tokens.shape, dtype=dtype, device=hidden.device)  # [N]
        picked = torch.empty_like(lse)  # [N]
        statistics = (
            lse.new_empty(tokens.shape if with_statistics else 0),
            tokens.new_empty(tokens.shape if with_statistics else 0),
        )  # entropy [N], argmax [N] (empty when not asked)
        for c in _row_blocks(hidden.shape[0], chunk_size):
            z = _scaled_(F.linear(hidden[c], weight, bias), temperature, dtype)  # [n, V]
            picked[c] = z.gather(-1, tokens[c].unsqueeze(-1)).squeeze(-1)
            if with_statistics:  # from the same logits: no second LM-head pass
                lse[c], statistics[0][c] = _logsumexp_and_entropy(z)
                statistics[1][c] = z.argmax(dim=-1)
            else:
                lse[c] = _logsumexp_(z)
            del z  # free this chunk's logits before the next chunk's are made
        ctx.save_for_backward(hidden, weight, bias, tokens, lse)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        ctx.mark_non_differentiable(*statistics)
        return picked - lse, *statistics

    @staticmethod
    def backward(ctx, grad_logprobs, *_):
        hidden, weight, bias, tokens, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None  # [N, H]
        # Weight and bias gradients are summed over chunks in float32 (or float64) whatever their dtype.
        grad_weight = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=lse.dtype, device=weight.device) if need_bias else None
        for c in _row_blocks(hidden.shape[0], ctx.chunk_size):
            z = _scaled_(F.linear(hidden[c], weight, bias), ctx.temperature, lse.dtype)  # [n, V]
            grad_z = _softmax_minus_onehot_grad_(z, lse[c], tokens[c], grad_logprobs[c], ctx.temperature)  # [n, V]
            if need_bias:
                grad_bias += grad_z.sum(0)
            grad_logits = grad_z.to(weight.dtype)  # [n, V]; no copy for float32 weights
            if need_hidden:
                grad_hidden[c] = grad_logits @ weight  # [n, H]
            if need_weight:
                _add_matmul_(grad_weight, grad_logits.t(), hidden[c])  # [V, H]
            del z, grad_z, grad_logits  # free this chunk's buffers before the next chunk's logits are made
        return grad_hidden, _cast(grad_weight, weight), _cast(grad_bias, bias), None, None, None, None


def _cast(grad: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    return None if grad is None else grad.to(like.dtype)


def _add_matmul_(accumulator: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``accumulator += a @ b`` in place; ``a @ b`` is computed in a's dtype, summed in the accumulator's."""
    if accumulator.dtype == a.dtype:
        accumulator.addmm_(a, b)
    else:
        accumulator.add_(a @ b)


def _check_chunked_inputs(hidden, weight, tokens, chunk_size: int, bias) -> None:
    if hidden.shape[:-1] != tokens.shape:
        raise ValueError(
            f"shape mismatch: hidden has shape {tuple(hidden.shape)} so tokens must have shape "
            f"{tuple(hidden.shape[:-1])}, but tokens has shape {tuple(tokens.shape)}"
        )
    check_ndim("weight", weight, 2, "[V, H]")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H={hidden.shape[-1]}] to match hidden, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V={weight.shape[0]}], got {tuple(bias.shape)}")
    if tokens.is_floating_point() or tokens.is_complex():
        raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def chunked_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-probs of ``tokens`` from the last hidden states and the LM head, never materialising [N, V].

        logits_n = hidden_n @ weight.T + bias,    z_n = logits_n / temperature
        log p(token_n) = z_n[token_n] - logsumexp_v z_n[v]

    A fused "linear + selective log-softmax" with its own ``torch.autograd.Function``, the idea of the
    fused linear cross-entropy of Liger-Kernel (Hsu et al. 2024, https://arxiv.org/abs/2410.10989):

    - forward: for each chunk of ``chunk_size`` positions, compute its logits, keep only its float32
      logsumexp ([N] in all) and the picked logit;
    - backward: recompute each chunk's logits, form ``g * (onehot - softmax) / temperature`` and
      accumulate ``grad_hidden = G @ weight`` and ``grad_weight += G.T @ hidden`` (and ``grad_bias``).

    Gradients are exact (not an approximation); the price is one more ``[N, H] x [H, V]`` matmul in the
    backward pass. Logits are computed in the inputs' dtype (as the model's own LM head would), softmax
    statistics and the weight/bias gradient sums in float32 (float64 for float64 inputs). Peak extra
    memory: a few ``[chunk_size, V]`` float32 buffers plus the weight gradient. Double backward is not
    supported.

    Args:
        hidden: [..., H] final hidden states (after the final norm), float32/bf16/fp16/float64. Not modified.
        weight: [V, H] LM-head weight, same dtype as ``hidden`` (tied embeddings work the same way).
        tokens: [...] integer ids in [0, V); position n of ``hidden`` scores ``tokens[n]``.
        chunk_size: positions per chunk (memory ~ chunk_size * V floats).
        temperature: divides the logits.
        bias: optional [V] LM-head bias.

    Returns:
        [...] (the shape of ``tokens``) log-probs, float32 (float64 for float64 inputs).
    """
    return _chunked(hidden, weight, tokens, chunk_size, temperature, bias, with_statistics=False)[0]


def chunked_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`chunked_logprobs` and, from the same chunks of logits, two detached statistics per position:

        H_n = logsumexp(z_n) - sum_v softmax(z_n)_v z_n[v]     (entropy, nats; as ``entropy_from_logits``)
        a_n = argmax_v z_n[v]                                    (the most likely token)

    Reading them in the forward pass's chunks saves the second ``[N, H] x [H, V]`` LM-head pass that computing
    them afterwards costs (GRPO logs the entropy of every scored token). The log-probs and their gradient are
    those of :func:`chunked_logprobs`; the statistics carry no gradient.

    Returns:
        (log-probs [...] with gradient, entropy [...] float32 (float64 for float64 inputs), argmax [...] long).
    """
    logprobs, entropy, argmax = _chunked(hidden, weight, tokens, chunk_size, temperature, bias, with_statistics=True)
    return logprobs, entropy, argmax


def _chunked(hidden, weight, tokens, chunk_size, temperature, bias, with_statistics: bool) -> list[torch.Tensor]:
    """Check the inputs and run :class:`_ChunkedLogprobs` on the flattened positions: [log-probs] or, with
    statistics, [log-probs, entropy, argmax], each in the shape of ``tokens``."""
    _check_chunked_inputs(hidden, weight, tokens, chunk_size, bias)
    flat_hidden, flat_tokens = hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1).long()  # [N, H], [N]
    outputs = _ChunkedLogprobs.apply(
        flat_hidden, weight, bias, flat_tokens, chunk_size, float(temperature), with_statistics
    )
    return [output.reshape(tokens.shape) for output in outputs[: 3 if with_statistics else 1]]
