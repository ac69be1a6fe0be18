"""Preference losses beyond the paired, reference-based DPO family: KTO (unpaired, binary labels) and the
reference-free ORPO and CPO (SimPO is ``rlcore.losses.simpo_loss``).

Conventions as in ``rlcore.losses``: every ``*_loss`` returns ``(loss, stats)``, a scalar tensor and a dict
of detached tensors; [B] per sequence; nothing calls ``.item()``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .losses import _check_pairs, _preference_stats
from .ops import check_choice, check_ndim, check_same_shape, masked_mean

__all__ = ["KTO_LOSS_TYPES", "CPO_LOSS_TYPES", "kto_reference_point", "kto_loss", "log1mexp", "orpo_loss", "cpo_loss"]

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def kto_reference_point(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0: a batch estimate of KL(pi || pi_ref), detached and clamped at 0.

        z0 = max(0, mean_j [ log pi(y'_j | x_j) - log pi_ref(y'_j | x_j) ])

    The pairs (x_j, y'_j) are *mismatched*: each prompt with the completion of another row of the batch
    (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306, Sec. 4.1; TRL pairs prompt i with
    completion i - 1, rotating the completions by one). No gradient flows through z0.

    Args:
        kl_logps, ref_kl_logps: [M] summed completion log-probs of the mismatched pairs under the policy and
            the reference.

    Returns:
        0-d tensor, >= 0.
    """
    check_ndim("kl_logps", kl_logps, 1, "[M]")
    check_same_shape(kl_logps=kl_logps, ref_kl_logps=ref_kl_logps)
    return (kl_logps - ref_kl_logps).detach().mean().clamp(min=0)


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl_logps: torch.Tensor | None = None,
    ref_kl_logps: torch.Tensor | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Kahneman-Tversky optimisation: a loss on single completions labelled desirable or undesirable.

    With the log-ratio r = logps - ref_logps of each completion, the reference point z0
    (:func:`kto_reference_point` of the mismatched pairs; 0 without them) and sigma the logistic function:

        kto                desirable:    w_D * (1 - sigma(beta * (r - z0)))
                           undesirable:  w_U * (1 - sigma(beta * (z0 - r)))
        apo_zero_unpaired  desirable:    w_D * (1 - sigma(beta * r))
                           undesirable:  w_U * sigma(beta * r)
        loss = mean over all B rows

    KTO: Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306, Eq. 7 (the loss is lambda_y - v(x, y) with
    the constant lambda_y dropped, as TRL does). ``apo_zero_unpaired``: the unpaired APO-zero loss, D'Oosterlinck
    et al. 2024, https://arxiv.org/abs/2408.06266; it has no reference point. The weights w_D, w_U balance
    unequal numbers of desirable and undesirable rows: the paper recommends w_D n_D / (w_U n_U) in [1, 4/3].
    As TRL's ``KTOTrainer``: the mean is over all rows (not weighted by w), z0 is detached and clamped at 0.

    Args:
        logps: [B] summed completion log-probs under the policy (with gradient).
        ref_logps: [B] the same under the reference model.
        labels: [B] bool (or 0/1), True for a desirable completion.
        kl_logps, ref_kl_logps: [M] log-probs of mismatched prompt-completion pairs (see
            :func:`kto_reference_point`), or both None for z0 = 0 (TRL's ``calculate_KL=False``).
        beta: inverse temperature of the implicit reward.
        desirable_weight, undesirable_weight: w_D, w_U.
        loss_type: one of ``KTO_LOSS_TYPES``.

    Returns:
        (loss, stats); stats (detached): ``kl`` = z0, ``rewards/chosen`` and ``rewards/rejected`` (mean
        beta * r over the desirable and the undesirable rows; 0 where there are none), ``rewards/margins``
        (their difference), ``logps/chosen``, ``logps/rejected``, ``num_desirable``, ``num_undesirable``.
    """
    _check_pairs(logps=logps, ref_logps=ref_logps, labels=labels)
    check_choice("loss_type", loss_type, KTO_LOSS_TYPES)
    if (kl_logps is None) != (ref_kl_logps is None):
        raise ValueError("kl_logps and ref_kl_logps go together: pass both or neither")
    desirable = labels.bool()  # [B]
    logratios = logps - ref_logps.detach()  # [B]
    if kl_logps is None or loss_type == "apo_zero_unpaired":
        reference_point = torch.zeros((), dtype=logps.dtype, device=logps.device)
    else:
        reference_point = kto_reference_point(kl_logps, ref_kl_logps.detach())
    if loss_type == "kto":
        desirable_losses = 1 - torch.sigmoid(beta * (logratios - reference_point))  # [B]
        undesirable_losses = 1 - torch.sigmoid(beta * (reference_point - logratios))  # [B]
    else:
        desirable_losses = 1 - torch.sigmoid(beta * logratios)
        undesirable_losses = torch.sigmoid(beta * logratios)
    losses = torch.where(desirable, desirable_weight * desirable_losses, undesirable_weight * undesirable_losses)  # [B]
    with torch.no_grad():
        rewards = beta * logratios
        stats = {
            "kl": reference_point.detach(),
            "rewards/chosen": masked_mean(rewards, desirable),
            "rewards/rejected": masked_mean(rewards, ~desirable),
            "logps/chosen": masked_mean(logps, desirable),
            "logps/rejected": masked_mean(logps, ~desirable),
            "num_desirable": desirable.sum(),
            "num_undesirable": (~desirable).sum(),
        }
        stats["rewards/margins"] = stats["rewards/chosen"] - stats["rewards/rejected"]
    return losses.mean(), stats


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate everywhere (Maechler 2012, "Accurately Computing log(1 - exp(-|a|))"):

        log(-expm1(x))      for x > -log 2   (1 - e^x is small: expm1 keeps its digits)
        log1p(-exp(x))      otherwise        (e^x is small: log1p keeps its digits)

    Shape: any; elementwise. x = 0 gives -inf (a completion of probability 1 has infinite odds).
    """
    # each branch sees a value it is safe on, so neither produces nan in the gradient of the other
    near_zero = x > -math.log(2)
    safe_near = torch.where(near_zero, x, -1.0)
    safe_far = torch.where(near_zero, -1.0, x)
    return torch.where(near_zero, torch.log(-torch.expm1(safe_near)), torch.log1p(-torch.exp(safe_far)))


def orpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_nll: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO: supervised fine-tuning plus an odds-ratio penalty on the rejected completion; no reference model.

        odds(y | x) = P(y | x) / (1 - P(y | x)),       P(y | x) = exp(logps) (length-averaged, see below)
        log OR      = log odds(y_c) - log odds(y_r)
                    = (logps_c - logps_r) - (log(1 - exp(logps_c)) - log(1 - exp(logps_r)))
        loss        = chosen_nll + beta * mean_b [ -log sigma(log OR) ]

    Hong et al. 2024, https://arxiv.org/abs/2403.07691, Eqs. 4-7 (beta is the paper's lambda, TRL's ``beta``).
    ``logps`` must be the *average* per-token log-probs of each completion (``masked_mean``), as the paper's
    P(y | x) = exp(mean_t log p) and TRL's ORPOTrainer take them; log(1 - e^x) is :func:`log1mexp`.

    Args:
        chosen_logps, rejected_logps: [B] length-averaged completion log-probs under the policy (< 0).
        chosen_nll: 0-d NLL of the chosen completions, e.g. ``sft_loss_from_logprobs(token_logps, mask)[0]``
            (a mean per token: TRL's; the paper's per-sequence average is ``-chosen_logps.mean()``). Note that
            TRL's ORPOTrainer computes it over prompt *and* completion tokens; the paper and rlcore's recipe
            over the completion.
        beta: weight of the odds-ratio term (lambda).

    Returns:
        (loss, stats); stats (detached) as ``dpo_loss`` with rewards beta * logps, plus ``nll``,
        ``log_odds_ratio`` (mean of log sigma(log OR)) and ``log_odds_chosen`` (mean of log OR).
    """
    _check_pairs(chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    check_ndim("chosen_nll", chosen_nll, 0, "a 0-d tensor")
    log_odds = (chosen_logps - rejected_logps) - (log1mexp(chosen_logps) - log1mexp(rejected_logps))  # [B]
    log_sigmoid_odds = F.logsigmoid(log_odds)  # [B]
    loss = chosen_nll - beta * log_sigmoid_odds.mean()
    stats = _preference_stats(beta * chosen_logps, beta * rejected_logps, chosen_logps, rejected_logps)
    stats.update(
        nll=chosen_nll.detach(),
        log_odds_ratio=log_sigmoid_odds.detach().mean(),
        log_odds_chosen=log_odds.detach().mean(),
    )
    return loss, stats


def cpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_nll: torch.Tensor | None = None,
    beta: float = 0.1,
    nll_weight: float = 1.0,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CPO: DPO with the reference model dropped (pi_ref uniform), plus a behaviour-cloning NLL term.

    With h = beta * (chosen_logps - rejected_logps) and eps = label_smoothing:

        sigmoid  -(1 - eps) log sigma(h) - eps log sigma(-h)      (CPO, Eq. 3; eps > 0 as cDPO)
        hinge    max(0, 1 - h)
        ipo      (chosen_logps - rejected_logps - 1 / (2 beta))^2
        loss     = mean_b [ per-pair loss ] + nll_weight * chosen_nll

    Xu et al. 2024, "Contrastive Preference Optimization", https://arxiv.org/abs/2401.08417, Eqs. 3-5 (the paper
    has nll_weight 1; TRL's ``cpo_alpha``). Summed log-probs for sigmoid and hinge, length-averaged for ipo, as
    TRL's CPOTrainer. SimPO (TRL's ``loss_type="simpo"``) is :func:`rlcore.simpo_loss`, to which CPO-SimPO
    adds the same ``nll_weight * chosen_nll``. TRL's AlphaPO reward transform (``alpha``) is not here.

    Args:
        chosen_logps, rejected_logps: [B] completion log-probs under the policy.
        chosen_nll: 0-d token-mean NLL of the chosen completions (``sft_loss_from_logprobs``); None only
            with ``nll_weight=0``.
        beta: inverse temperature of the implicit reward beta * logps.
        nll_weight: weight of the NLL term.
        loss_type: one of ``CPO_LOSS_TYPES``.
        label_smoothing: eps above (sigmoid only).

    Returns:
        (loss, stats); stats (detached) as ``dpo_loss`` with rewards beta * logps, plus ``nll`` when given.
    """
    _check_pairs(chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    check_choice("loss_type", loss_type, CPO_LOSS_TYPES)
    if chosen_nll is None and nll_weight != 0:
        raise ValueError(f"cpo_loss needs chosen_nll when nll_weight != 0 (got {nll_weight})")
    difference = chosen_logps - rejected_logps  # [B]
    h = beta * difference
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    elif loss_type == "hinge":
        losses = torch.relu(1 - h)
    else:
        losses = (difference - 1 / (2 * beta)) ** 2
    loss = losses.mean()
    stats = _preference_stats(beta * chosen_logps, beta * rejected_logps, chosen_logps, rejected_logps)
    if chosen_nll is not None:
        check_ndim("chosen_nll", chosen_nll, 0, "a 0-d tensor")
        loss = loss + nll_weight * chosen_nll
        stats["nll"] = chosen_nll.detach()
    return loss, stats
