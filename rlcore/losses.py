"""Losses: policy gradient (PPO / GRPO / DAPO / GSPO / CISPO, truncated importance sampling), value, the DPO
family, SimPO, reward model, SFT.

Every ``*_loss`` returns ``(loss, stats)``: a scalar tensor to call ``.backward()`` on and a dict of
detached tensors for logging (nothing here calls ``.item()``, so nothing forces a host sync). Shapes are
[B, T] per token and [B] per sequence; masks are 1 where a position counts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .kl import kl_estimate
from .logprobs import gather_logprobs
from .ops import check_choice, check_ndim, check_same_shape, masked_mean, masked_sum, masked_var

__all__ = [
    "AGGREGATION_MODES",
    "LOSS_TYPE_AGGREGATION",
    "loss_normalizer",
    "DPO_LOSS_TYPES",
    "parse_loss_types",
    "F_DIVERGENCES",
    "f_divergence_score",
    "wpo_log_weights",
    "aggregate",
    "IMPORTANCE_SAMPLING_LEVELS",
    "TIS_MODES",
    "policy_loss",
    "importance_ratio",
    "cispo_loss",
    "surrogate_for",
    "truncated_importance_weights",
    "value_loss",
    "dpo_loss",
    "simpo_loss",
    "reward_pairwise_loss",
    "sft_loss",
    "sft_loss_from_logprobs",
]

AGGREGATION_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")

# TRL's GRPO ``loss_type`` names -> the aggregation each one means. bnpo and dapo are both token means; they
# differ in the normaliser under gradient accumulation (see loss_normalizer).
LOSS_TYPE_AGGREGATION = {
    "grpo": "seq_mean_token_mean",  # every sequence weighs the same (the GRPO paper)
    "bnpo": "token_mean",  # every token of a micro-batch weighs the same
    "dr_grpo": "seq_mean_token_sum_norm",  # token sums over a constant: no length bias (Dr. GRPO)
    "dapo": "token_mean",  # every token of the whole optimizer step weighs the same (DAPO)
    "cispo": "token_mean",  # CISPO's clipped-weight REINFORCE (cispo_loss), averaged as DAPO
}


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    max_len: int | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a [B, T] per-token loss to a scalar; the choice of average is part of the algorithm.

        token_mean:              sum_{b,t} m l / sum_{b,t} m               (DAPO, arXiv 2503.14476: every
                                                                            token weighs the same)
        seq_mean_token_mean:     mean_b [ sum_t m l / sum_t m ]            (GRPO, arXiv 2402.03300: every
                                                                            sequence weighs the same)
        seq_mean_token_sum:      mean_b [ sum_t m l ]
        seq_mean_token_sum_norm: mean_b [ sum_t m l ] / max_len            (Dr. GRPO, arXiv 2503.20783: a
                                                                            constant normaliser, no length bias)

    Rows with no valid token are left out of ``seq_mean_token_mean`` (their mean is undefined) but count
    as 0 in the two ``token_sum`` modes, whose normaliser is meant to be constant.

    Gradient accumulation: a micro-batch's own token or row count is the wrong normaliser when the
    optimizer step spans several micro-batches (the DAPO/TRL normalisation issue). Pass ``normalizer``,
    the count over the whole step: total valid tokens for ``token_mean``, total rows (or rows with a valid
    token, for ``seq_mean_token_mean``) otherwise; then summing the micro-batch losses gives the loss of
    the whole step.

    Args:
        per_token: [B, T] per-token losses.
        mask: [B, T] 1 on tokens that count.
        mode: one of ``AGGREGATION_MODES``.
        max_len: the constant of ``seq_mean_token_sum_norm`` (default T, the padded length); ignored by
            the other modes.
        normalizer: replaces the denominator (see above); a float or a 0-d tensor.

    Returns:
        0-d tensor.
    """
    check_ndim("per_token", per_token, 2, "[B, T]")
    check_same_shape(per_token=per_token, mask=mask)
    check_choice("agg mode", mode, AGGREGATION_MODES)
    if mode == "token_mean":
        if normalizer is None:
            return masked_mean(per_token, mask)
        return masked_sum(per_token, mask) / normalizer
    if mode == "seq_mean_token_mean":
        seq_losses = masked_mean(per_token, mask, dim=-1)  # [B]
        rows_with_tokens = mask.bool().any(dim=-1)  # [B]
        if normalizer is None:
            return masked_mean(seq_losses, rows_with_tokens)
        return masked_sum(seq_losses, rows_with_tokens) / normalizer
    seq_losses = masked_sum(per_token, mask, dim=-1)  # [B]
    if mode == "seq_mean_token_sum_norm":
        seq_losses = seq_losses / (per_token.shape[1] if max_len is None else max_len)
    return seq_losses.mean() if normalizer is None else seq_losses.sum() / normalizer


def loss_normalizer(
    loss_type: str, step_mask: torch.Tensor, micro_mask: torch.Tensor, micro_batches: int
) -> torch.Tensor:
    """The ``normalizer`` of :func:`aggregate` that makes the micro-batch losses of one optimizer step add
    up to the loss of the whole step, for a ``LOSS_TYPE_AGGREGATION`` loss type:

        dapo     sum of step_mask                     (valid tokens of the whole step; cispo the same)
        bnpo     sum of micro_mask * micro_batches    (each micro-batch normalised by its own tokens)
        grpo     rows of step_mask with a valid token
        dr_grpo  rows of step_mask

    Args:
        step_mask: [N, T] completion mask of every row of the step.
        micro_mask: [n, T] the rows of the current micro-batch.
        micro_batches: micro-batches per optimizer step.

    Returns:
        0-d float tensor (at least 1 for the token and row counts).
    """
    check_choice("loss_type", loss_type, tuple(LOSS_TYPE_AGGREGATION))
    if loss_type == "bnpo":
        return micro_mask.sum().clamp(min=1).float() * micro_batches
    if loss_type in ("dapo", "cispo"):
        return step_mask.sum().clamp(min=1).float()
    if loss_type == "grpo":
        return step_mask.bool().any(dim=1).sum().clamp(min=1).float()
    return torch.tensor(float(step_mask.shape[0]), device=step_mask.device)


def _per_token_advantages(advantages: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Accept [B] (one advantage per sequence, broadcast over T) or [B, T]; return [B, T]-broadcastable."""
    if advantages.shape == logp.shape:
        return advantages
    if advantages.shape == logp.shape[:1]:
        return advantages.unsqueeze(-1)  # [B, 1]
    raise ValueError(
        f"shape mismatch: advantages must be [B] or [B, T] = {tuple(logp.shape)}, got {tuple(advantages.shape)}"
    )


def _fraction(condition: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fraction of valid positions where ``condition`` holds (detached float)."""
    return masked_mean(condition.float(), mask).detach()


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    agg: str = "token_mean",
    dual_clip: float | None = None,
    max_len: int | None = None,
    normalizer: float | torch.Tensor | None = None,
    importance_sampling_level: str = "token",
    importance_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate policy-gradient loss (PPO, GRPO, DAPO clip-higher, dual clip, GSPO).

        rho_t  = exp(logp_t - old_logp_t)                    (importance_sampling_level "token")
               = exp(mean_t' m_t' (logp_t' - old_logp_t'))   ("sequence", GSPO: one ratio per row)
        l_t    = -min(rho_t A_t, clip(rho_t, 1 - clip_low, 1 + clip_high) A_t)
        dual:  l_t = min(l_t, -dual_clip * A_t)   where A_t < 0
        l_t    = w_t l_t                                     (with ``importance_weights`` w, detached)
        loss   = aggregate(l, mask, agg)

    PPO: Schulman et al. 2017, https://arxiv.org/abs/1707.06347. Clip-higher (``clip_high > clip_low``,
    e.g. 0.28 vs 0.2): DAPO, Yu et al. 2025, https://arxiv.org/abs/2503.14476. Dual clip (``dual_clip`` =
    c > 1): Ye et al. 2019, https://arxiv.org/abs/1912.09729, which bounds the loss of a token with a
    negative advantage whose ratio has grown large. At rho = 1 (the first step on fresh samples) the loss
    equals -aggregate(A) and its gradient is -A * d logp. Sequence-level ratios (GSPO, Zheng et al. 2025,
    https://arxiv.org/abs/2507.18071, see :func:`importance_ratio`) clip whole rows; the paper pairs them
    with ``agg="seq_mean_token_mean"`` and much smaller clip ranges (3e-4 / 4e-4). ``importance_weights``
    corrects for a sampler whose numerics differ from the trainer's (:func:`truncated_importance_weights`).

    Args:
        logp: [B, T] log-probs of the sampled tokens under the current policy (with gradient).
        old_logp: [B, T] log-probs under the policy that sampled them (no gradient needed).
        advantages: [B] (broadcast over tokens, as GRPO) or [B, T].
        mask: [B, T] 1 on completion tokens. Padding may hold any value, even inf.
        clip_low: epsilon of the lower clip, ratio >= 1 - clip_low.
        clip_high: epsilon of the upper clip, ratio <= 1 + clip_high (default: clip_low).
        agg: aggregation mode, see ``aggregate``.
        dual_clip: c > 1 for dual clipping, or None.
        max_len, normalizer: passed to ``aggregate``.
        importance_sampling_level: "token" or "sequence" (GSPO), see :func:`importance_ratio`.
        importance_weights: [B, T] or [B, 1] weights multiplying each token's loss (no gradient), or None.

    Returns:
        (loss, stats) with stats (detached, over valid tokens): ``clip_frac_low`` (A < 0 and ratio below
        1 - clip_low), ``clip_frac_high`` (A > 0 and ratio above 1 + clip_high), ``clip_frac`` (either),
        ``dual_clip_frac`` (A < 0 and ratio above c), ``approx_kl`` (k3 estimate of KL(old || current)),
        ``ratio_mean``, ``ratio_min``, ``ratio_max``.
    """
    check_ndim("logp", logp, 2, "[B, T]")
    check_same_shape(logp=logp, old_logp=old_logp, mask=mask)
    advantages = _per_token_advantages(advantages, logp).detach()  # [B, T] or [B, 1]
    clip_high = clip_low if clip_high is None else clip_high
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    valid = mask.bool()
    ratio = importance_ratio(logp, old_logp, mask, importance_sampling_level).expand_as(logp)  # [B, T]
    unclipped = -ratio * advantages  # [B, T]
    clipped = -ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages  # [B, T]
    per_token = torch.maximum(unclipped, clipped)  # [B, T]
    clipped_low = (ratio < 1.0 - clip_low) & (advantages < 0)
    clipped_high = (ratio > 1.0 + clip_high) & (advantages > 0)
    stats = {"clip_frac_low": _fraction(clipped_low, valid), "clip_frac_high": _fraction(clipped_high, valid)}
    stats["clip_frac"] = stats["clip_frac_low"] + stats["clip_frac_high"]
    if dual_clip is not None:
        dual_bound = -dual_clip * advantages
        per_token = torch.where(advantages < 0, torch.minimum(per_token, dual_bound), per_token)
        stats["dual_clip_frac"] = _fraction((ratio > dual_clip) & (advantages < 0), valid)
    per_token = _weighted(per_token, importance_weights, logp)  # [B, T]
    loss = aggregate(per_token, mask, agg, max_len=max_len, normalizer=normalizer)
    stats.update(_ratio_stats(logp, old_logp, ratio, valid))
    return loss, stats


def _weighted(per_token: torch.Tensor, weights: torch.Tensor | None, logp: torch.Tensor) -> torch.Tensor:
    """``per_token * weights`` (weights [B, T] or [B, 1], detached), broadcast to logp's [B, T]."""
    if weights is not None:
        if weights.shape not in (logp.shape, logp.shape[:1] + (1,)):
            raise ValueError(
                f"importance_weights must be [B, T] = {tuple(logp.shape)} or [B, 1], got {tuple(weights.shape)}"
            )
        per_token = per_token * weights.detach()
    return per_token.expand_as(logp)


def _ratio_stats(logp, old_logp, ratio, valid) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {
            "approx_kl": masked_mean(kl_estimate(old_logp, logp, kind="k3"), valid),
            "ratio_mean": masked_mean(ratio, valid),
            "ratio_min": torch.where(valid, ratio, torch.inf).amin(),
            "ratio_max": torch.where(valid, ratio, -torch.inf).amax(),
        }


IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def importance_ratio(
    logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, level: str = "token"
) -> torch.Tensor:
    """The importance ratio of the current policy to the one that sampled, per token or per sequence.

        token:     rho_t = exp(logp_t - old_logp_t)                                     [B, T]
        sequence:  s_i   = exp( sum_t m_t (logp_t - old_logp_t) / max(1, sum_t m_t) )   [B, 1]

    The sequence ratio is GSPO's (Zheng et al. 2025, https://arxiv.org/abs/2507.18071, eq. 7): the
    length-normalised likelihood ratio of the whole completion, so one token's noisy ratio no longer
    decides its own clip. Its gradient reaches every token of the row: ds_i = s_i * mean_t m_t d logp_t.
    ``old_logp`` is detached; padding counts as a log-ratio of 0 (ratio 1), so it may hold any value.

    Args:
        logp: [B, T] log-probs under the current policy (with gradient).
        old_logp: [B, T] log-probs under the sampling policy.
        mask: [B, T] 1 on completion tokens.
        level: "token" or "sequence".

    Returns:
        [B, T] (token) or [B, 1] (sequence) ratios.
    """
    check_ndim("logp", logp, 2, "[B, T]")
    check_same_shape(logp=logp, old_logp=old_logp, mask=mask)
    check_choice("importance_sampling_level", level, IMPORTANCE_SAMPLING_LEVELS)
    log_ratio = torch.where(mask.bool(), logp - old_logp.detach(), 0.0)  # [B, T]; 0 on padding
    if level == "sequence":
        log_ratio = log_ratio.sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1)  # [B, 1]
    return torch.exp(log_ratio)


def cispo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float | None = None,
    clip_high: float = 0.2,
    agg: str = "token_mean",
    max_len: int | None = None,
    normalizer: float | torch.Tensor | None = None,
    importance_sampling_level: str = "token",
    importance_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO: REINFORCE with a clipped, detached importance weight, so that no token loses its gradient.

        rho_t  = exp(logp_t - old_logp_t)                     (or GSPO's sequence ratio, see importance_ratio)
        w_t    = sg( clip(rho_t, 1 - clip_low, 1 + clip_high) )   (clip_low None: no lower bound)
        l_t    = -w_t A_t logp_t
        loss   = aggregate(l, mask, agg)

    MiniMax-M1, Chen et al. 2025, https://arxiv.org/abs/2506.13585, eq. 4-5: PPO's clip zeroes the gradient
    of a token whose ratio left the trust region (often the rare "reflective" tokens); CISPO clips the
    weight instead and keeps every token's gradient -w_t A_t d logp_t. At rho = 1 the gradient equals the
    clipped surrogate's, -A d logp. TRL's ``loss_type="cispo"`` caps the ratio at ``epsilon_high`` itself
    with no lower bound: its epsilon_high E is ``clip_high = E - 1`` here.

    Args:
        logp, old_logp, advantages, mask: as in :func:`policy_loss`.
        clip_low: the weight is >= 1 - clip_low; None (the paper's choice) for no lower bound.
        clip_high: the weight is <= 1 + clip_high.
        agg, max_len, normalizer: passed to ``aggregate``.
        importance_sampling_level, importance_weights: as in :func:`policy_loss`.

    Returns:
        (loss, stats) with stats (detached, over valid tokens): ``clip_frac`` (ratio above 1 + clip_high or
        below 1 - clip_low), ``approx_kl``, ``ratio_mean``, ``ratio_min``, ``ratio_max``.
    """
    check_ndim("logp", logp, 2, "[B, T]")
    check_same_shape(logp=logp, old_logp=old_logp, mask=mask)
    advantages = _per_token_advantages(advantages, logp).detach()  # [B, T] or [B, 1]
    valid = mask.bool()
    ratio = importance_ratio(logp, old_logp, mask, importance_sampling_level).expand_as(logp)  # [B, T]
    low = None if clip_low is None else 1.0 - clip_low
    weight = ratio.detach().clamp(min=low, max=1.0 + clip_high)  # [B, T]
    per_token = -weight * advantages * torch.where(valid, logp, 0.0)  # [B, T]
    per_token = _weighted(per_token, importance_weights, logp)  # [B, T]
    loss = aggregate(per_token, mask, agg, max_len=max_len, normalizer=normalizer)
    clipped = ratio > 1.0 + clip_high
    if low is not None:
        clipped = clipped | (ratio < low)
    stats = {"clip_frac": _fraction(clipped, valid), **_ratio_stats(logp, old_logp, ratio, valid)}
    return loss, stats


def surrogate_for(loss_type: str, epsilon: float = 0.2, epsilon_high: float | None = None) -> tuple:
    """(loss function, its clip keyword arguments) of a ``--loss_type``: :func:`cispo_loss` clipping the detached
    weight from above only (at ``epsilon_high``, or ``epsilon`` when None) for ``"cispo"``; :func:`policy_loss`
    with ``clip_low=epsilon, clip_high=epsilon_high`` for every other name of ``LOSS_TYPE_AGGREGATION``."""
    if loss_type == "cispo":
        return cispo_loss, {"clip_high": epsilon_high or epsilon}
    return policy_loss, {"clip_low": epsilon, "clip_high": epsilon_high}


TIS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def truncated_importance_weights(
    train_logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    mask: torch.Tensor,
    cap: float = 2.0,
    mode: str = "token_truncate",
) -> torch.Tensor:
    """Importance weights that correct for a sampler whose numerics differ from the trainer's.

    The rollout engine returns the log-probs it sampled with (``Rollout.logprobs``: bf16 sampling, a
    compiled or another engine, top-k/top-p filtering); the trainer recomputes them. With
    r = pi_train / pi_sampler,

        token_truncate:     w_t = min(r_t, C)                          r_t = exp(train_logp_t - sampler_logp_t)
        token_mask:         w_t = r_t if r_t <= C else 0
        sequence_truncate:  w_i = min(R_i, C)                          R_i = exp(sum_t m_t (train_logp_t - sampler_logp_t))
        sequence_mask:      w_i = R_i if R_i <= C else 0               (a row too far off-policy is dropped)

    Truncated importance sampling (TIS): Yao et al. 2025, "Your efficient RL framework secretly brings you
    off-policy RL training" (https://fengyao.notion.site/off-policy-rl); the sequence variants follow
    TRL's ``vllm_importance_sampling_mode`` (same names, sums over the row as TRL does). Multiply each
    token's policy loss by w (``policy_loss(..., importance_weights=w)``). No gradient flows through w.

    Args:
        train_logp: [B, T] log-probs of the sampled tokens under the trainer's policy at sampling time
            (pi_old; detached here).
        sampler_logp: [B, T] log-probs the sampler reported for the same tokens.
        mask: [B, T] 1 on completion tokens (padding counts as r = 1).
        cap: C > 0.
        mode: one of ``TIS_MODES``.

    Returns:
        [B, T] (token modes) or [B, 1] (sequence modes) detached weights.
    """
    check_ndim("train_logp", train_logp, 2, "[B, T]")
    check_same_shape(train_logp=train_logp, sampler_logp=sampler_logp, mask=mask)
    check_choice("tis mode", mode, TIS_MODES)
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    with torch.no_grad():
        log_ratio = torch.where(mask.bool(), train_logp - sampler_logp, 0.0)  # [B, T]
        if mode.startswith("sequence"):
            log_ratio = log_ratio.sum(dim=1, keepdim=True)  # [B, 1]
        ratio = torch.exp(log_ratio)
        if mode.endswith("truncate"):
            return ratio.clamp(max=cap)
        return torch.where(ratio <= cap, ratio, 0.0)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None = 0.2,
    agg: str = "token_mean",
    max_len: int | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value regression of PPO.

        V_clip = old_V + clip(V - old_V, -clip, clip)
        l_t    = 0.5 * max((V - R)^2, (V_clip - R)^2)          (clip=None: 0.5 * (V - R)^2)
        loss   = aggregate(l, mask, agg)

    The clip keeps the new value within ``clip`` of the value at sampling time, as in OpenAI's baselines
    PPO2 and Ziegler et al. 2019 (https://arxiv.org/abs/1909.08593). Note that ``clip`` is in the units of
    the rewards, unlike the policy ratio clip.

    Args:
        values: [B, T] current value predictions (with gradient).
        old_values: [B, T] value predictions at sampling time.
        returns: [B, T] value targets (e.g. from ``gae``).
        mask: [B, T] 1 on completion tokens.
        clip: clip range, or None for plain squared error.
        agg, max_len, normalizer: see ``aggregate``.

    Returns:
        (loss, stats) with stats (detached, over valid tokens): ``clip_frac`` (fraction of tokens where the
        clipped error is the larger one), ``explained_variance`` = 1 - Var(R - V) / Var(R) (Bessel; 1 is
        perfect, 0 no better than a constant; Var(R) clamped to >= 1e-8), ``values_mean``, ``returns_mean``.
    """
    check_ndim("values", values, 2, "[B, T]")
    check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    old_values, returns = old_values.detach(), returns.detach()
    squared_error = (values - returns) ** 2  # [B, T]
    if clip is None:
        per_token = 0.5 * squared_error
        clip_active = torch.zeros_like(squared_error, dtype=torch.bool)
    else:
        clipped_values = old_values + (values - old_values).clamp(-clip, clip)
        clipped_error = (clipped_values - returns) ** 2  # [B, T]
        per_token = 0.5 * torch.maximum(squared_error, clipped_error)
        clip_active = clipped_error > squared_error
    loss = aggregate(per_token, mask, agg, max_len=max_len, normalizer=normalizer)
    with torch.no_grad():
        residual_var = masked_var(returns - values, mask)
        stats = {
            "clip_frac": _fraction(clip_active, mask),
            "explained_variance": 1.0 - residual_var / masked_var(returns, mask).clamp(min=1e-8),
            "values_mean": masked_mean(values, mask),
            "returns_mean": masked_mean(returns, mask),
        }
    return loss, stats


DPO_LOSS_TYPES = (
    "sigmoid",
    "robust",
    "ipo",
    "hinge",
    "exo_pair",
    "nca_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "bco_pair",
    "aot",
    "aot_unpaired",
    "discopop",
    "sigmoid_norm",
    "sft",
)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# Loss types that read the policy/reference scores only through their chosen - rejected difference, the only ones
# the f-DPO reparameterisation holds for (its beta log Z(x) term cancels in that difference alone).
_F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")


def f_divergence_score(logratios: torch.Tensor, divergence: str = "reverse_kl", alpha: float = 0.5) -> torch.Tensor:
    """f'(u) at u = pi / pi_ref: the implicit reward of DPO under an f-divergence regulariser (f-DPO).

        reverse_kl        f'(u) = log u                                   (standard DPO)
        forward_kl        f'(u) = 1 - 1/u          = -expm1(-log u)
        js_divergence     f'(u) = log (2u / (1 + u)) = log 2 + log sigma(log u)
        alpha_divergence  f'(u) = (u^(alpha - 1) - 1) / (alpha - 1)  = expm1((alpha - 1) log u) / (alpha - 1)
                          (alpha = 1 is the limit log u)

    Wang et al. 2023, "Beyond Reverse KL", https://arxiv.org/abs/2309.16240 (Table 1). TRL's
    ``f_divergence_type``/``f_alpha_divergence_coef``, with one difference: TRL clamps (alpha - 1) log u at 80
    (float32/bf16) before the exponential and has no float64 case; here nothing is clamped (float32 overflows
    to inf beyond (alpha - 1) log u = 88).

    Args:
        logratios: [B] log u = log pi(y|x) - log pi_ref(y|x).
        divergence: one of ``F_DIVERGENCES``.
        alpha: the alpha of ``alpha_divergence``.

    Returns:
        [B] scores, with gradient.
    """
    check_choice("f_divergence", divergence, F_DIVERGENCES)
    if divergence == "forward_kl":
        return -torch.expm1(-logratios)
    if divergence == "js_divergence":
        return math.log(2.0) + F.logsigmoid(logratios)
    if divergence == "alpha_divergence" and abs(alpha - 1.0) >= 1e-6:
        return torch.expm1((alpha - 1.0) * logratios) / (alpha - 1.0)
    return logratios


def wpo_log_weights(token_logps: torch.Tensor, log_sum_sq_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence log-weight of WPO: the length-normalised log-probability, aligned to the policy's own sampling.

        log w(y|x) = (1 / |y|) sum_t m_t [log p_t(y_t) - log sum_v p_t[v]^2]

    Zhou et al. 2024, https://arxiv.org/abs/2406.11827 (Eq. 2 with the alignment TRL's ``use_weighting``
    uses): a pair weighs w(y_c|x) w(y_r|x), so pairs the current policy would likely produce count more.
    ``log_sum_sq_probs`` comes from ``rlcore.logprobs.log_sum_squared_probs`` of the policy's logits. Detached.

    Args:
        token_logps: [B, T] the policy's log-probs of the completion tokens.
        log_sum_sq_probs: [B, T] log sum_v p_t[v]^2 at the same positions.
        mask: [B, T] 1 on completion tokens (|y| = its row sum, at least 1).

    Returns:
        [B] log-weights (pass as ``chosen_wpo_logweights`` / ``rejected_wpo_logweights`` of ``dpo_loss``).
    """
    check_ndim("token_logps", token_logps, 2, "[B, T]")
    check_same_shape(token_logps=token_logps, log_sum_sq_probs=log_sum_sq_probs, mask=mask)
    with torch.no_grad():
        aligned = masked_sum(token_logps - log_sum_sq_probs, mask, dim=-1)  # [B]
        return aligned / mask.sum(-1).clamp(min=1).to(aligned.dtype)


def parse_loss_types(text: str) -> tuple[list[str], list[float]]:
    """``"sigmoid"`` -> (["sigmoid"], [1.0]); ``"sigmoid:0.8,bco_pair:0.2,sft"`` -> the names and weights (MPO),
    the ``loss_type`` and ``loss_weights`` of ``dpo_loss`` (the ``--loss_type`` flag of recipes/dpo.py)."""
    names, weights = [], []
    for name, _, weight in (item.strip().partition(":") for item in text.split(",")):
        if name not in DPO_LOSS_TYPES:
            raise ValueError(
                f"--loss_type: {name!r} is not one of {', '.join(DPO_LOSS_TYPES)} (MPO: sigmoid:0.8,sft:1)"
            )
        try:
            names, weights = [*names, name], [*weights, float(weight or 1.0)]
        except ValueError:
            raise ValueError(f"--loss_type: the weight of {name!r} must be a number, got {weight!r}") from None
    return names, weights


def _cdpo_sigmoid(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Conservative-DPO logistic loss -(1 - eps) log sigma(x) - eps log sigma(-x)."""
    return -(1 - eps) * F.logsigmoid(delta) - eps * F.logsigmoid(-delta)


def _dpo_per_pair_loss(
    loss_type: str,
    scores: tuple[torch.Tensor, torch.Tensor],
    logratios: tuple[torch.Tensor, torch.Tensor],
    logps: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    lengths: tuple[torch.Tensor, torch.Tensor] | None,
    chosen_nll: torch.Tensor | None,
    beta: float,
    eps: float,
    cdpo: bool,
    discopop_tau: float,
) -> torch.Tensor:
    """[B] per-pair loss of one ``loss_type`` of ``dpo_loss``; see its docstring for the equations.

    scores = the f-divergence scores (s_c, s_r), logratios = (c, r), logps = (policy chosen, policy rejected,
    ref chosen, ref rejected), lengths = completion token counts (n_c, n_r) or None.
    """
    c, r = logratios
    delta = scores[0] - scores[1]  # [B]
    h = beta * delta  # [B], the implicit reward margin
    if loss_type == "sigmoid":
        return _cdpo_sigmoid(h, eps if cdpo else 0.0)
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(h) + eps * F.logsigmoid(-h)) / (1 - 2 * eps)
    if loss_type in ("ipo", "sigmoid_norm"):
        if lengths is not None:  # length-average the scores (TRL: by the completion token counts)
            delta = scores[0] / lengths[0] - scores[1] / lengths[1]
        if loss_type == "ipo":
            return (delta - 1 / (2 * beta)) ** 2
        return -F.logsigmoid(beta * delta)
    if loss_type == "hinge":
        return torch.relu(1 - h)
    if loss_type == "exo_pair":
        return torch.sigmoid(h) * (F.logsigmoid(h) - math.log1p(-eps)) + torch.sigmoid(-h) * (
            F.logsigmoid(-h) - math.log(eps)
        )
    if loss_type == "nca_pair":
        return -F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * r)
    if loss_type == "sppo_hard":
        return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return (1 - torch.sigmoid(beta * c)) + torch.sigmoid(beta * r)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * c) + (1 - torch.sigmoid(beta * (c - r)))
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * c) - F.logsigmoid(-beta * r)
    if loss_type == "aot":  # sorted policy margins against sorted reference margins
        chosen, rejected, ref_chosen, ref_rejected = logps
        policy_margins = torch.sort(chosen - rejected).values  # [B], ascending
        ref_margins = torch.sort(ref_chosen - ref_rejected).values  # [B], ascending
        return _cdpo_sigmoid(beta * (policy_margins - ref_margins), eps)
    if loss_type == "aot_unpaired":  # sorted chosen log-ratios against sorted rejected log-ratios
        return _cdpo_sigmoid(beta * (torch.sort(c).values - torch.sort(r).values), eps)
    if loss_type == "discopop":
        mix = torch.sigmoid(h / discopop_tau)  # [B]
        return -F.logsigmoid(h) * (1 - mix) + torch.exp(-h) * mix
    # sft: the chosen completions' NLL, the same for every pair
    return chosen_nll.expand(c.shape)


def _check_pairs(**tensors: torch.Tensor) -> None:
    first_name, first = next(iter(tensors.items()))
    check_ndim(first_name, first, 1, "[B]")
    check_same_shape(**tensors)


def _preference_stats(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Batch means of the implicit rewards, their margin and accuracy, and the log-probs (detached)."""
    with torch.no_grad():
        return {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": chosen_logps.mean(),
            "logps/rejected": rejected_logps.mean(),
        }


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str | list[str] | tuple[str, ...] = "sigmoid",
    label_smoothing: float = 0.0,
    *,
    loss_weights: list[float] | tuple[float, ...] | None = None,
    cdpo: bool = True,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    discopop_tau: float = 0.05,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    chosen_nll: torch.Tensor | None = None,
    rpo_alpha: float = 0.0,
    chosen_wpo_logweights: torch.Tensor | None = None,
    rejected_wpo_logweights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO family of preference losses, with TRL's ``loss_type`` names, f-divergences, WPO, RPO and MPO.

    With the log-ratios c = chosen_logps - ref_chosen_logps, r = rejected_logps - ref_rejected_logps, their
    f-divergence scores s_c = f'(c), s_r = f'(r) (``f_divergence_score``; s = c for the default reverse KL),
    h = beta * (s_c - s_r), eps = label_smoothing and sigma the logistic function, the per-pair losses are

        sigmoid    -(1 - eps) log sigma(h) - eps log sigma(-h)   DPO, Rafailov et al. 2023, arXiv 2305.18290;
                                                                 eps > 0: conservative DPO (cDPO, Mitchell 2023,
                                                                 https://ericmitchell.ai/cdpo.pdf)
        robust     (-(1 - eps) log sigma(h) + eps log sigma(-h)) / (1 - 2 eps)
                                                                 Chowdhury et al. 2024, arXiv 2403.00409;
                                                                 unbiased under label-flip rate eps < 0.5
        ipo        (s_c / n_c - s_r / n_r - 1 / (2 beta))^2      IPO, Azar et al. 2023, arXiv 2310.12036
        hinge      max(0, 1 - h)                                 SLiC, Zhao et al. 2023, arXiv 2305.10425
        exo_pair   q(h) (log q(h) - log(1 - eps)) + q(-h) (log q(-h) - log eps),   q = sigma
                                                                 EXO, Ji et al. 2024, arXiv 2402.00856;
                                                                 needs eps > 0 (the paper uses 1e-3)
        nca_pair   -log sigma(beta c) - 0.5 log sigma(-beta c) - 0.5 log sigma(-beta r)
                                                                 NCA, Chen et al. 2024, arXiv 2402.05369
        sppo_hard  (c - 1 / (2 beta))^2 + (r + 1 / (2 beta))^2  SPPO, Wu et al. 2024, arXiv 2405.00675,
                                                                 with hard win probabilities 1 and 0
        apo_zero   (1 - sigma(beta c)) + sigma(beta r)           APO, D'Oosterlinck et al. 2024, arXiv 2408.06266
        apo_down   sigma(beta c) + (1 - sigma(beta (c - r)))     (the same paper)
        bco_pair   -log sigma(beta c) - log sigma(-beta r)       BCO, Jung et al. 2024, arXiv 2404.04656 (the
                                                                 paired form, without BCO's running reward shift)
        aot        -(1 - eps) log sigma(beta d_i) - eps log sigma(-beta d_i),
                   d = sort_B(chosen_logps - rejected_logps) - sort_B(ref_chosen_logps - ref_rejected_logps)
                                                                 AOT, Melnyk et al. 2024, arXiv 2406.05882: the
                                                                 i-th smallest policy margin of the batch against
                                                                 the i-th smallest reference margin
        aot_unpaired  the same with d = sort_B(c) - sort_B(r)    (AOT for unpaired data)
        discopop   -log sigma(h) (1 - m) + exp(-h) m,   m = sigma(h / discopop_tau)
                                                                 DiscoPOP, Chris Lu et al. 2024, arXiv 2406.08414
        sigmoid_norm  -log sigma(beta (s_c / n_c - s_r / n_r))   the sigmoid loss on length-averaged scores
        sft        chosen_nll (the same for every pair)          RPO, Pang et al. 2024, arXiv 2404.19733

    with n_c, n_r = ``chosen_lengths``, ``rejected_lengths`` (completion token counts, clamped to >= 1).
    The loss is sum_k w_k mean_b l_k over the loss types k (one name, or several with ``loss_weights``
    w_k, default 1 each: MPO, Wang et al. 2024, arXiv 2411.10442, combines sigmoid, bco_pair and sft);
    ``rpo_alpha`` > 0 appends ("sft", rpo_alpha). With WPO weights (Zhou et al. 2024, arXiv 2406.11827)
    every per-pair loss, sft included, is multiplied by exp(chosen_wpo_logweights + rejected_wpo_logweights)
    (detached; ``wpo_log_weights``) before its mean. Only sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust,
    discopop and sft accept an f-divergence other than reverse_kl; the others read c and r themselves.

    Inputs are summed log-probs over the completion tokens (for LD-DPO, ``length_desensitized_logps``). For
    ``ipo`` without lengths the inputs are taken as already length-averaged (``masked_mean`` instead of
    ``masked_sum``); ``sigmoid_norm`` needs the lengths.

    Differences from TRL 1.16's ``DPOTrainer`` (same meaning otherwise; tests/test_trl_parity.py checks it):
    - TRL's ``sigmoid`` ignores ``label_smoothing`` (it has no cDPO); here ``sigmoid`` applies it, and
      ``cdpo=False`` gives TRL's. (``robust``, ``exo_pair``, ``aot`` and ``aot_unpaired`` use eps in both.)
    - TRL's ``sft`` term is the token mean of the chosen NLL over the batch; here the caller computes it
      (``sft_loss_from_logprobs``), so its normaliser (e.g. the tokens of the whole optimizer step) is the
      caller's choice.
    - ``alpha_divergence``: see ``f_divergence_score`` (no clamp).

    Args:
        chosen_logps, rejected_logps: [B] sequence log-probs under the policy (with gradient).
        ref_chosen_logps, ref_rejected_logps: [B] the same under the reference model.
        beta: inverse temperature of the implicit reward (the KL strength; tau of IPO).
        loss_type: one of ``DPO_LOSS_TYPES``, or a sequence of them (MPO).
        label_smoothing: eps above, used by sigmoid (with ``cdpo``), robust, exo_pair, aot, aot_unpaired.
        loss_weights: one weight per loss type (default 1 each).
        cdpo: apply ``label_smoothing`` to ``sigmoid`` (False: TRL's sigmoid).
        f_divergence, f_alpha: see ``f_divergence_score``.
        discopop_tau: the temperature of discopop's mixing (the paper's 0.05).
        chosen_lengths, rejected_lengths: [B] completion token counts (ipo, sigmoid_norm).
        chosen_nll: 0-d mean NLL of the chosen completions, with gradient (needed by sft and rpo_alpha).
        rpo_alpha: weight of an appended sft term (0: none).
        chosen_wpo_logweights, rejected_wpo_logweights: [B] WPO log-weights, or None (no weighting).

    Returns:
        (loss, stats); stats (detached batch means): ``rewards/chosen`` = beta c, ``rewards/rejected`` =
        beta r, ``rewards/margins``, ``rewards/accuracies`` (fraction with beta c > beta r),
        ``logps/chosen``, ``logps/rejected``; with several loss types ``loss/<type>`` (unweighted);
        with WPO ``wpo_weight`` (mean pair weight).
    """
    _check_pairs(
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(loss_types) if loss_weights is None else [float(w) for w in loss_weights]
    if len(weights) != len(loss_types) or not loss_types:
        raise ValueError(f"loss_weights has {len(weights)} values for {len(loss_types)} loss types {loss_types}")
    if rpo_alpha:
        loss_types, weights = [*loss_types, "sft"], [*weights, rpo_alpha]
    for name in loss_types:
        check_choice("loss_type", name, DPO_LOSS_TYPES)
    check_choice("f_divergence", f_divergence, F_DIVERGENCES)
    if f_divergence != "reverse_kl" and not set(loss_types) <= set(_F_DIVERGENCE_LOSS_TYPES):
        raise ValueError(
            f"f_divergence {f_divergence!r} only works with loss types {', '.join(_F_DIVERGENCE_LOSS_TYPES)}; "
            f"got {', '.join(loss_types)}"
        )
    if "exo_pair" in loss_types and not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"exo_pair needs 0 < label_smoothing < 1 (the paper uses 1e-3), got {label_smoothing}")
    if "robust" in loss_types and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    if "sft" in loss_types and (chosen_nll is None or chosen_nll.ndim != 0):
        raise ValueError("the sft loss type and rpo_alpha need chosen_nll, the 0-d mean NLL of the chosen completions")
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("pass both chosen_lengths and rejected_lengths, or neither")
    if "sigmoid_norm" in loss_types and chosen_lengths is None:
        raise ValueError("sigmoid_norm needs chosen_lengths and rejected_lengths (completion token counts)")
    wpo = chosen_wpo_logweights is not None or rejected_wpo_logweights is not None
    if wpo and {"aot", "aot_unpaired"} & set(loss_types):
        raise ValueError("WPO weights do not apply to aot / aot_unpaired, which sort the pairs of the batch")
    lengths = None
    if chosen_lengths is not None:
        check_same_shape(chosen_logps=chosen_logps, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
        lengths = tuple(n.clamp(min=1).to(chosen_logps.dtype) for n in (chosen_lengths, rejected_lengths))
    ref_chosen_logps, ref_rejected_logps = ref_chosen_logps.detach(), ref_rejected_logps.detach()
    chosen_logratios = chosen_logps - ref_chosen_logps  # [B]
    rejected_logratios = rejected_logps - ref_rejected_logps  # [B]
    scores = tuple(f_divergence_score(x, f_divergence, f_alpha) for x in (chosen_logratios, rejected_logratios))
    pair_weights = None
    if wpo:
        if chosen_wpo_logweights is None or rejected_wpo_logweights is None:
            raise ValueError("WPO needs both chosen_wpo_logweights and rejected_wpo_logweights")
        check_same_shape(chosen_logps=chosen_logps, chosen_wpo_logweights=chosen_wpo_logweights)
        check_same_shape(chosen_logps=chosen_logps, rejected_wpo_logweights=rejected_wpo_logweights)
        pair_weights = torch.exp(chosen_wpo_logweights + rejected_wpo_logweights).detach()  # [B]
    loss = 0.0
    per_type = {}
    for name, weight in zip(loss_types, weights):
        losses = _dpo_per_pair_loss(
            name,
            scores,
            (chosen_logratios, rejected_logratios),
            (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps),
            lengths,
            chosen_nll,
            beta,
            label_smoothing,
            cdpo,
            discopop_tau,
        )  # [B]
        if pair_weights is not None:
            losses = losses * pair_weights
        per_type[f"loss/{name}"] = losses.mean()
        loss = loss + weight * per_type[f"loss/{name}"]
    stats = _preference_stats(beta * chosen_logratios, beta * rejected_logratios, chosen_logps, rejected_logps)
    if len(loss_types) > 1:
        stats.update({key: value.detach() for key, value in per_type.items()})
    if pair_weights is not None:
        stats["wpo_weight"] = pair_weights.mean()
    return loss, stats


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO: a reference-free DPO whose implicit reward is the length-normalised log-probability.

        h    = beta * (chosen_logps - rejected_logps) - gamma,       gamma = beta * gamma_beta_ratio
        loss = mean_b [ -(1 - eps) log sigma(h) - eps log sigma(-h) ]

    (Meng et al. 2024, https://arxiv.org/abs/2405.14734.) The inputs must be *average* per-token log-probs
    of each completion (``masked_mean``, not ``masked_sum``): the length normalisation is half of the
    method. ``gamma_beta_ratio`` is the SimPO authors' parametrisation (defaults beta=2.0, ratio 0.5); TRL's
    ``CPOTrainer`` takes the margin itself, ``simpo_gamma`` = beta * gamma_beta_ratio.

    Args:
        chosen_logps, rejected_logps: [B] length-averaged log-probs under the policy.
        beta: reward scale.
        gamma_beta_ratio: target margin divided by beta.
        label_smoothing: eps above (0: plain SimPO).

    Returns:
        (loss, stats); stats as ``dpo_loss`` with rewards beta * logps.
    """
    _check_pairs(chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    margin = beta * (chosen_logps - rejected_logps) - beta * gamma_beta_ratio  # [B]
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    stats = _preference_stats(beta * chosen_logps, beta * rejected_logps, chosen_logps, rejected_logps)
    return losses.mean(), stats


def reward_pairwise_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    margin: float | torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry loss of a reward model on preference pairs.

        loss = mean_b [ -log sigma(r_c - r_r - m) ] + center_coef * mean_b [ (r_c + r_r)^2 ]

    Bradley-Terry preference model as used for RLHF reward models (Ouyang et al. 2022,
    https://arxiv.org/abs/2203.02155); the margin m (a [B] preference strength) is Llama 2's (Touvron et
    al. 2023, https://arxiv.org/abs/2307.09288); the centering term, which pins the reward's free offset
    near 0, is Eisenstein et al. 2023 (https://arxiv.org/abs/2312.09244), TRL's
    ``center_rewards_coefficient``.

    Args:
        chosen_scores, rejected_scores: [B] scalar scores of the reward model.
        margin: None, a float, or [B] margins.
        center_coef: weight of the centering term.

    Returns:
        (loss, stats); stats (detached): ``accuracy`` (fraction with r_c > r_r), ``chosen_mean``,
        ``rejected_mean``, ``margin_mean`` (mean of r_c - r_r).
    """
    _check_pairs(chosen_scores=chosen_scores, rejected_scores=rejected_scores)
    difference = chosen_scores - rejected_scores  # [B]
    if margin is not None:
        if isinstance(margin, torch.Tensor) and margin.ndim > 0:
            check_same_shape(chosen_scores=chosen_scores, margin=margin)
        difference = difference - margin
    loss = -F.logsigmoid(difference).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen_scores + rejected_scores) ** 2).mean()
    with torch.no_grad():
        stats = {
            "accuracy": (chosen_scores > rejected_scores).float().mean(),
            "chosen_mean": chosen_scores.mean(),
            "rejected_mean": rejected_scores.mean(),
            "margin_mean": (chosen_scores - rejected_scores).mean(),
        }
    return loss, stats


def sft_loss_from_logprobs(
    logp: torch.Tensor, mask: torch.Tensor, normalizer: float | torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Masked negative log-likelihood from per-token log-probs.

        loss = -sum_{b,t} m_bt logp_bt / normalizer,      normalizer = sum_{b,t} m_bt by default

    With gradient accumulation pass ``normalizer`` = the number of valid tokens of the whole optimizer
    step (all micro-batches): then the sum of the micro-batch losses is the true per-token mean, which a
    per-micro-batch mean is not when lengths differ.

    Args:
        logp: [B, T] log-probs of the target tokens.
        mask: [B, T] 1 on the tokens to learn (e.g. completion tokens).
        normalizer: the denominator (float or 0-d tensor); default the valid tokens of this batch (at least 1).

    Returns:
        (loss, stats); stats (detached): ``nll`` (mean NLL per valid token of this batch), ``num_tokens``.
    """
    check_same_shape(logp=logp, mask=mask)
    total = -masked_sum(logp, mask)
    num_tokens = mask.bool().sum()
    loss = total / (num_tokens.clamp(min=1) if normalizer is None else normalizer)
    stats = {"nll": (total / num_tokens.clamp(min=1)).detach(), "num_tokens": num_tokens}
    return loss, stats


def sft_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Masked negative log-likelihood (cross-entropy) from logits; see ``sft_loss_from_logprobs``.

        loss = -sum_{b,t} m_bt log softmax(logits_bt)[labels_bt] / normalizer

    ``logits[:, t]`` scores ``labels[:, t]``: shift before calling (``logits[:, :-1]``, ``input_ids[:, 1:]``).
    Labels at masked positions may hold anything, an ignore index such as -100 included. Uses
    ``gather_logprobs``, so no log-softmax copy of the logits is kept. The logits of the loss positions
    alone, gathered beforehand (``logits[rows, columns]``: [N, V] with [N] labels and no mask), give the
    same loss without computing a log-softmax anywhere else.

    Args:
        logits: [B, T, V], or [N, V] at the loss positions only.
        labels: [B, T] (or [N]) target ids.
        mask: [B, T] 1 on tokens to learn; None: every position counts.
        normalizer: see ``sft_loss_from_logprobs``.

    Returns:
        (loss, stats); stats (detached): ``nll``, ``num_tokens``, ``token_accuracy`` (argmax == label).
    """
    if logits.dim() == 2:  # [N, V] at the loss positions: one row of N tokens
        logits, labels = logits.unsqueeze(0), labels.unsqueeze(0)
        mask = None if mask is None else mask.unsqueeze(0)
    check_ndim("logits", logits, 3, "[B, T, V]")
    mask = torch.ones_like(labels) if mask is None else mask
    check_same_shape(labels=labels, mask=mask)
    valid = mask.bool()
    safe_labels = torch.where(valid, labels, 0)  # [B, T]; ignore indices become a valid id
    logp = gather_logprobs(logits, safe_labels)  # [B, T]
    loss, stats = sft_loss_from_logprobs(logp, mask, normalizer)
    with torch.no_grad():
        stats["token_accuracy"] = _fraction(logits.argmax(dim=-1) == labels, valid)
    return loss, stats
