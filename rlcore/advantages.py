"""Advantage estimators: GAE (PPO), group baselines (GRPO, RLOO) and REINFORCE++.

Shapes: [B, T] per token, [B] per sequence; a group of G completions of one prompt is G consecutive rows.
Masks are 1 on the tokens that count. Masked positions are skipped: they get 0 and their rewards and values
are ignored, so the valid tokens of a row form the trajectory even when padding sits between them.
"""

from __future__ import annotations

import torch

from .ops import check_choice, check_ndim, check_same_shape, last_valid_index, masked_whiten

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "GROUP_SCALES",
    "estimate_advantages",
    "gae",
    "group_advantages",
    "rloo_advantages",
    "reinforce_pp_advantages",
]

GROUP_SCALES = ("group", "batch", "none")


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the valid tokens of each row.

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                        (the value target, "returns")

    (Schulman et al. 2016, https://arxiv.org/abs/1506.02438.) ``t+1`` means the next *valid* token of the
    row; after the last valid token, V and A are 0 (the episode ends with the completion). A reverse scan
    over T, vectorised over the batch.

    Args:
        rewards: [B, T] per-token rewards (e.g. from ``kl_shaped_rewards``).
        values: [B, T] value estimates V_t. Treated as constants (no gradient flows through them).
        mask: [B, T] 1 on valid tokens.
        gamma: discount.
        lam: GAE lambda (1: Monte-Carlo returns minus V; 0: one-step TD error).

    Returns:
        (advantages, returns): both [B, T], 0 at masked positions, detached.
    """
    check_ndim("rewards", rewards, 2, "[B, T]")
    check_same_shape(rewards=rewards, values=values, mask=mask)
    rewards, values, valid = rewards.detach(), values.detach(), mask.bool()
    advantages = torch.zeros_like(rewards)  # [B, T]
    next_value = torch.zeros_like(rewards[:, 0])  # [B]
    next_advantage = torch.zeros_like(rewards[:, 0])  # [B]
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # [B]
        advantage = delta + gamma * lam * next_advantage  # [B]
        advantages[:, t] = torch.where(valid[:, t], advantage, 0.0)
        next_value = torch.where(valid[:, t], values[:, t], next_value)
        next_advantage = torch.where(valid[:, t], advantage, next_advantage)
    returns = torch.where(valid, advantages + values, 0.0)
    return advantages, returns


def _grouped(rewards: torch.Tensor, group_size: int, min_group_size: int = 1) -> torch.Tensor:
    """Check [B] rewards and view them as [B / group_size, group_size]."""
    check_ndim("rewards", rewards, 1, "[B]")
    if group_size < min_group_size:
        raise ValueError(f"group_size must be >= {min_group_size} here, got {group_size}")
    if rewards.shape[0] % group_size != 0:
        raise ValueError(
            f"batch of {rewards.shape[0]} rows is not divisible by group_size={group_size}: "
            "each prompt needs exactly group_size consecutive completions"
        )
    return rewards.view(-1, group_size)  # [num_groups, G]


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages: each reward minus its group's mean, optionally divided by a standard deviation.

        A_i = (r_i - mean_group(r)) / (std + eps)

    with ``scale`` choosing std:

    - "group": the std of the reward's own group (GRPO, Shao et al. 2024, https://arxiv.org/abs/2402.03300);
    - "batch": the std of all rewards of the batch, as TRL's ``scale_rewards="batch"`` ("group mean, batch
      std" of Liu et al. 2025, "Tricks or Traps?", https://arxiv.org/abs/2508.08221);
    - "none": no division (Dr. GRPO, Liu et al. 2025, https://arxiv.org/abs/2503.20783, which shows the
      std division biases towards too easy / too hard prompts).

    std is Bessel-corrected (``torch.std``, divide by n - 1) as in TRL; ``eps`` is added to the std, outside
    the square root, as in TRL. A group whose rewards are all equal gets advantage 0.

    Args:
        rewards: [B] one scalar reward per completion, B = num_prompts * group_size.
        group_size: G, completions per prompt (consecutive rows); >= 2 for scale="group".
        scale: "group", "batch" or "none".
        eps: added to the std.

    Returns:
        [B] advantages (same dtype), detached.
    """
    check_choice("scale", scale, GROUP_SCALES)
    grouped = _grouped(rewards.detach(), group_size, min_group_size=2 if scale == "group" else 1)  # [P, G]
    centered = grouped - grouped.mean(dim=1, keepdim=True)  # [P, G]
    if scale == "group":
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centered = centered / (rewards.detach().std() + eps)
    return centered.reshape(-1)  # [B]


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out: each reward minus the mean reward of the other members of its group.

        A_i = r_i - 1/(G-1) sum_{j != i} r_j = G/(G-1) * (r_i - mean_group(r))

    (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free!"; Ahmadian et al. 2024,
    https://arxiv.org/abs/2402.14740.) The baseline excludes r_i, so the estimator stays unbiased.

    Args:
        rewards: [B] one scalar reward per completion (may already include a sequence-level KL penalty).
        group_size: G >= 2 completions per prompt (consecutive rows).

    Returns:
        [B] advantages (same dtype), detached.
    """
    grouped = _grouped(rewards.detach(), group_size, min_group_size=2)  # [P, G]
    others_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)  # [P, G]
    return (grouped - others_mean).reshape(-1)  # [B]


def reinforce_pp_advantages(
    rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, eps: float = 1e-8
) -> torch.Tensor:
    """REINFORCE++ advantages: token-level returns whitened over all valid tokens of the batch.

        G_t = sum_{s >= t} gamma^(s-t) r_s          (over valid tokens of the row)
        A_t = (G_t - mean(G)) / sqrt(var(G) + eps)  (mean, var over every valid token of the batch)

    (Hu 2025, https://arxiv.org/abs/2501.03262.) No critic and no per-prompt baseline: the batch-wide
    normalisation is the baseline. The per-token rewards are usually ``kl_shaped_rewards(scores, logp,
    ref_logp, mask, kl_coef, kind="k1")`` (score at the last token, -kl_coef * KL on every token, gamma=1
    as in the paper); pass plain [B] scores for REINFORCE++ without a KL reward penalty (for instance with
    a KL loss term instead). var is the biased (1/n) variance, as OpenRLHF; ``eps`` is added to it inside
    the square root.

    Args:
        rewards: [B, T] per-token rewards, or [B] sequence scores (placed at each row's last valid token).
        mask: [B, T] 1 on completion tokens.
        gamma: discount (1.0 in the paper).
        eps: added to the variance.

    Returns:
        [B, T] advantages, 0 at masked positions, detached.
    """
    check_ndim("mask", mask, 2, "[B, T]")
    if rewards.ndim == 1:
        if rewards.shape[0] != mask.shape[0]:
            raise ValueError(f"rewards [B] must have B={mask.shape[0]} rows like mask, got {tuple(rewards.shape)}")
        token_rewards = torch.zeros(mask.shape, dtype=rewards.dtype, device=rewards.device)  # [B, T]
        score = torch.where(mask.bool().any(dim=-1), rewards, 0.0).unsqueeze(-1)  # [B, 1]
        rewards = token_rewards.scatter(-1, last_valid_index(mask).unsqueeze(-1), score)
    check_same_shape(rewards=rewards, mask=mask)
    _, returns = gae(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0)  # [B, T]
    return masked_whiten(returns, mask, eps=eps, unbiased=False)


ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "reinforce_pp")


def estimate_advantages(
    estimator: str, rewards: torch.Tensor, mask: torch.Tensor, group_size: int, scale: str = "group"
) -> torch.Tensor:
    """The advantages of one of ``ADVANTAGE_ESTIMATORS`` (GRPO's ``--advantage_estimator``).

    Args:
        estimator: "grpo" (``group_advantages`` with ``scale``), "rloo" (``rloo_advantages``) or "reinforce_pp"
            (``reinforce_pp_advantages``).
        rewards: [B] one reward per completion, the G completions of a prompt consecutive.
        mask: [B, T] completion mask (reinforce_pp broadcasts over it).
        group_size: G.

    Returns:
        [B] (grpo, rloo) or [B, T] (reinforce_pp) advantages.
    """
    if estimator == "grpo":
        return group_advantages(rewards, group_size, scale=scale)
    if estimator == "rloo":
        return rloo_advantages(rewards, group_size)
    return reinforce_pp_advantages(rewards, mask)
