"""Per-token estimators of KL(pi || ref) and the KL-shaped reward of RLHF-style PPO."""

from __future__ import annotations

import torch

from .ops import check_choice, check_ndim, check_same_shape, last_valid_index

__all__ = ["KL_KINDS", "kl_estimate", "kl_shaped_rewards"]

KL_KINDS = ("k1", "k2", "k3")


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi.

    With log r = ref_logp - logp (the log-ratio ref / pi at the sampled token), John Schulman's three
    estimators (http://joschu.net/blog/kl-approx.html) are

        k1 = -log r                  = logp - ref_logp      unbiased, high variance, can be negative
        k2 = (log r)^2 / 2                                   biased, low variance, >= 0
        k3 = (r - 1) - log r         = exp(ref_logp - logp) - (ref_logp - logp) - 1
                                                             unbiased, low variance, >= 0 (r - 1 is a
                                                             control variate with zero mean under pi)

    Differentiated as a loss on samples from pi, they do not all give the KL gradient: per token, E[grad k1]
    = 0, E[grad k2] = grad KL(pi || ref), E[grad k3] = grad KL(ref || pi) (the forward KL), and none sees
    the effect of a token on later tokens (Tang & Munos 2025, "On a few pitfalls in KL divergence gradient
    estimation for RL", https://arxiv.org/abs/2506.09477). As a detached reward penalty any of them works.

    verl's ``low_var_kl`` is k3 with the log-ratio clamped to [-20, 20] and the result to [-10, 10]; it is
    not accepted here as an alias because the clamps change the values: clamp ``kl_estimate(..., "k3")``
    yourself if you want them.

    Args:
        logp: [B, T] (any shape) log pi(token) of the sampled tokens.
        ref_logp: same shape, log ref(token) of the same tokens.
        kind: "k1", "k2" or "k3".

    Returns:
        Elementwise estimate, same shape; padding positions are not masked here (mask afterwards).
    """
    check_same_shape(logp=logp, ref_logp=ref_logp)
    check_choice("kind", kind, KL_KINDS)
    log_ratio = ref_logp - logp  # log r
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    return torch.expm1(log_ratio) - log_ratio


def kl_shaped_rewards(
    scores: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
    kind: str = "k1",
) -> torch.Tensor:
    """Per-token rewards of RLHF PPO: a KL penalty on every valid token plus the score at the last one.

        r_t = -kl_coef * KL_t + [t == last valid token] * score,     KL_t = kl_estimate(logp, ref_logp, kind)

    (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593; Ouyang et al. 2022,
    https://arxiv.org/abs/2203.02155). k1 is the usual choice here: its sum over a sequence is an unbiased
    estimate of the sequence KL.

    Args:
        scores: [B] sequence-level scores (reward model, verifier).
        logp: [B, T] log-probs of the completion tokens under the policy that sampled them.
        ref_logp: [B, T] log-probs of the same tokens under the reference model.
        mask: [B, T] completion mask (1 on completion tokens); rows with no valid token get no score.
        kl_coef: penalty coefficient (a float, or a 0-d tensor so a changing value does not recompile).
        kind: KL estimator, see ``kl_estimate``.

    Returns:
        [B, T] rewards (dtype of ``logp``), 0 at masked positions, detached (rewards are constants).
    """
    check_ndim("logp", logp, 2, "[B, T]")
    check_same_shape(logp=logp, ref_logp=ref_logp, mask=mask)
    if scores.shape != logp.shape[:1]:
        raise ValueError(f"scores must be [B={logp.shape[0]}], got shape {tuple(scores.shape)}")
    valid = mask.bool()
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    kl = kl_estimate(logp.detach(), ref_logp.detach(), kind)  # [B, T]
    rewards = torch.where(valid, -kl_coef * kl, zero)  # [B, T]
    row_has_token = valid.any(dim=-1)  # [B]
    score_at_last = torch.where(row_has_token, scores.to(logp.dtype), zero).unsqueeze(-1)  # [B, 1]
    return rewards.scatter_add(-1, last_valid_index(mask).unsqueeze(-1), score_at_last)
