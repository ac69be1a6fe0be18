"""Knowledge distillation: the generalised Jensen-Shannon divergence between student and teacher, per token.

:func:`generalized_jsd` is the divergence on logits (the reference: it holds whatever logits it is given);
:func:`distillation_loss` is the loss a recipe calls, from the last hidden states and LM-head weights of both
models, chunk by chunk, so that the ``[N, V]`` logits of neither model are ever held for the whole batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .logprobs import _accumulation_dtype, _row_blocks
from .ops import check_ndim

__all__ = ["generalized_jsd", "distillation_loss"]


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> torch.Tensor:
    """Generalised JSD between the student's and the teacher's next-token distributions, per position.

        S = softmax(student_logits / temperature),  T = softmax(teacher_logits / temperature)
        beta = 0:      KL(T || S)                              forward KL (supervised KD)
        beta = 1:      KL(S || T)                              reverse KL (mode seeking)
        0 < beta < 1:  beta KL(T || M) + (1 - beta) KL(S || M),   M = beta T + (1 - beta) S

    GKD, Agarwal et al. 2024, https://arxiv.org/abs/2306.13649, eq. 1 with TRL's ``GKDTrainer`` convention
    for beta (the mixture weight of the teacher; the two ends are the KLs, not the limits of the mixture
    formula, which are 0). ``top_k``: both distributions are renormalised over the teacher's k most likely
    tokens at each position before the divergence (a cheaper, sparser target; k = V is the full one).

    Args:
        student_logits: [..., V] (with gradient).
        teacher_logits: [..., V] (detached here).
        beta: in [0, 1].
        temperature: divides both logits.
        top_k: None (the whole vocabulary) or k >= 1.

    Returns:
        [...] divergences in nats, in float32 (float64 for float64 logits).
    """
    if student_logits.shape != teacher_logits.shape or student_logits.ndim < 1:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} "
            "must both be [..., V]"
        )
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if top_k is not None and not 1 <= top_k <= student_logits.shape[-1]:
        raise ValueError(f"top_k must be in [1, V={student_logits.shape[-1]}] or None, got {top_k}")
    dtype = _accumulation_dtype(student_logits.dtype)
    student = student_logits.to(dtype) / temperature  # [..., V]
    teacher = teacher_logits.detach().to(dtype) / temperature  # [..., V]
    if top_k is not None:
        support = teacher.topk(top_k, dim=-1).indices  # [..., k]
        student, teacher = student.gather(-1, support), teacher.gather(-1, support)  # [..., k] each
    log_s = F.log_softmax(student, dim=-1)  # [..., V]
    log_t = F.log_softmax(teacher, dim=-1)  # [..., V]
    if beta == 0.0:
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    if beta == 1.0:
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))  # [..., V]
    kl_teacher = (log_t.exp() * (log_t - log_m)).sum(-1)
    kl_student = (log_s.exp() * (log_s - log_m)).sum(-1)
    return beta * kl_teacher + (1.0 - beta) * kl_student


class _ChunkedJSD(torch.autograd.Function):
    """generalized_jsd(h_s W_s^T + b_s, h_t W_t^T + b_t) chunk by chunk; the backward pass recomputes each
    chunk's logits and takes the gradient of that chunk alone."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, settings):
        beta, temperature, top_k, chunk_size = settings
        divergence = torch.empty(s_hidden.shape[0], dtype=_accumulation_dtype(s_hidden.dtype), device=s_hidden.device)
        for c in _row_blocks(s_hidden.shape[0], chunk_size):
            student = F.linear(s_hidden[c], s_weight, s_bias)  # [n, V]
            teacher = F.linear(t_hidden[c], t_weight, t_bias)  # [n, V]
            divergence[c] = generalized_jsd(student, teacher, beta, temperature, top_k)
            del student, teacher  # free this chunk's logits before the next chunk's are made
        ctx.save_for_backward(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias)
        ctx.settings = settings
        return divergence

    @staticmethod
    def backward(ctx, grad_divergence):
        s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias = ctx.saved_tensors
        beta, temperature, top_k, chunk_size = ctx.settings
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(s_hidden) if need_hidden else None  # [N, H]
        dtype = grad_divergence.dtype
        grad_weight = torch.zeros(s_weight.shape, dtype=dtype, device=s_weight.device) if need_weight else None
        grad_bias = torch.zeros(s_weight.shape[0], dtype=dtype, device=s_weight.device) if need_bias else None
        for c in _row_blocks(s_hidden.shape[0], chunk_size):
            with torch.enable_grad():
                student = F.linear(s_hidden[c], s_weight, s_bias).to(dtype).detach().requires_grad_(True)  # [n, V]
                teacher = F.linear(t_hidden[c], t_weight, t_bias)  # [n, V]
                divergence = generalized_jsd(student, teacher, beta, temperature, top_k)  # [n]
                (grad_logits,) = torch.autograd.grad(divergence, student, grad_divergence[c])  # [n, V], float32/64
            if need_bias:
                grad_bias += grad_logits.sum(0)
            if need_hidden:
                grad_hidden[c] = grad_logits.to(s_weight.dtype) @ s_weight  # [n, H]
            if need_weight:
                grad_weight += grad_logits.t() @ s_hidden[c].to(dtype)  # [V, H], summed in float32/64
            del student, teacher, divergence, grad_logits
        cast = lambda grad, like: None if grad is None else grad.to(like.dtype)  # noqa: E731
        return grad_hidden, cast(grad_weight, s_weight), cast(grad_bias, s_bias), None, None, None, None


def distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    top_k: int | None = None,
    chunk_size: int = 1024,
    normalizer: float | torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level distillation loss: the generalised JSD between student and teacher, averaged over tokens.

        z^s_n = h^s_n W_s^T + b_s,   z^t_n = h^t_n W_t^T + b_t        (the two LM heads)
        loss  = sum_n JSD_beta(softmax(z^s_n / tau) || softmax(z^t_n / tau)) / normalizer

    with JSD_beta of :func:`generalized_jsd` (beta 0: forward KL, 1: reverse KL; GKD, Agarwal et al. 2024,
    https://arxiv.org/abs/2306.13649). On-policy distillation feeds the positions of completions the
    student sampled (GKD's lambda = 1; Lu and Thinking Machines 2025 use reverse KL, beta = 1).

    Memory: the positions are taken ``chunk_size`` at a time; for each chunk both models' logits are made,
    reduced to one divergence per position and freed, so the ``[N, V]`` logits of neither model are held
    (Liger-Kernel's fused linear JSD, Hsu et al. 2024, https://arxiv.org/abs/2410.10989, works the same
    way). The backward pass recomputes each chunk's logits and differentiates that chunk alone: the
    gradients are exact, at the price of the two LM-head matmuls once more. Gradients reach the student's
    hidden states, weight and bias; the teacher gets none. Double backward is not supported.

    Args:
        student_hidden: [N, H_s] final hidden states (after the final norm) at the scored positions.
        student_weight: [V, H_s] the student's LM head (tied embeddings work the same way).
        teacher_hidden: [N, H_t] the teacher's hidden states at the same positions (no gradient needed).
        teacher_weight: [V, H_t] the teacher's LM head; same vocabulary V as the student.
        beta, temperature, top_k: see :func:`generalized_jsd`.
        chunk_size: positions per chunk. The backward pass differentiates one chunk with autograd, which
            holds some 14-16 [chunk_size, V] float32 buffers at once (benchmarks/distill_memory.py).
        normalizer: divides the sum over positions (default N): pass the token count of the whole
            optimizer step under gradient accumulation.
        student_bias, teacher_bias: optional [V] LM-head biases.

    Returns:
        (loss, stats) with stats (detached): ``jsd`` (mean divergence per position).
    """
    check_ndim("student_hidden", student_hidden, 2, "[N, H]")
    check_ndim("teacher_hidden", teacher_hidden, 2, "[N, H]")
    check_ndim("student_weight", student_weight, 2, "[V, H]")
    check_ndim("teacher_weight", teacher_weight, 2, "[V, H]")
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden {tuple(teacher_hidden.shape)} "
            "must score the same N positions"
        )
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"student and teacher vocabularies differ: {student_weight.shape[0]} and {teacher_weight.shape[0]} rows"
        )
    for name, hidden, weight in (
        ("student", student_hidden, student_weight),
        ("teacher", teacher_hidden, teacher_weight),
    ):
        if weight.shape[1] != hidden.shape[1] or weight.dtype != hidden.dtype:
            raise ValueError(
                f"{name}_weight must be [V, {hidden.shape[1]}] in {hidden.dtype}, got {tuple(weight.shape)} {weight.dtype}"
            )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    settings = (float(beta), float(temperature), top_k, chunk_size)
    divergence = _ChunkedJSD.apply(
        student_hidden,
        student_weight,
        student_bias,
        teacher_hidden.detach(),
        teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
        settings,
    )  # [N]
    total = divergence.sum()
    loss = total / (max(1, divergence.shape[0]) if normalizer is None else normalizer)
    return loss, {"jsd": (total / max(1, divergence.shape[0])).detach()}
