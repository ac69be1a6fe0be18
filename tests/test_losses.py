"""Losses: hand-derived values, aggregation against loops, gradients, stats and input checks."""

import math

import pytest
import torch
import torch.nn.functional as F

from rlcore import (
    AGGREGATION_MODES,
    DPO_LOSS_TYPES,
    aggregate,
    dpo_loss,
    f_divergence_score,
    length_desensitized_logps,
    log_sum_squared_probs,
    policy_loss,
    reward_pairwise_loss,
    sft_loss,
    sft_loss_from_logprobs,
    simpo_loss,
    value_loss,
    wpo_log_weights,
)


def softplus(x):
    """-log sigma(-x) = log(1 + e^x), for hand-derived values."""
    return math.log1p(math.exp(x))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def _ragged(batch=5, length=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    per_token = torch.randn(batch, length, generator=generator, dtype=torch.float64)
    mask = torch.rand(batch, length, generator=generator) < 0.7
    mask[0] = True
    mask[1, 2:] = False
    mask[2] = False  # an empty row
    return per_token, mask


# ---------------------------------------------------------------- aggregate


def _aggregate_loop(per_token, mask, mode, max_len):
    row_sums, row_means = [], []
    for b in range(per_token.shape[0]):
        valid = [per_token[b, t].item() for t in range(per_token.shape[1]) if mask[b, t]]
        row_sums.append(sum(valid))
        if valid:
            row_means.append(sum(valid) / len(valid))
    if mode == "token_mean":
        return per_token[mask].sum().item() / mask.sum().item()
    if mode == "seq_mean_token_mean":
        return sum(row_means) / len(row_means)  # rows without tokens are left out
    if mode == "seq_mean_token_sum":
        return sum(row_sums) / len(row_sums)
    return sum(row_sums) / len(row_sums) / max_len


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_aggregate_matches_loop(mode):
    per_token, mask = _ragged()
    assert aggregate(per_token, mask, mode).item() == pytest.approx(_aggregate_loop(per_token, mask, mode, 6))
    if mode == "seq_mean_token_sum_norm":
        assert aggregate(per_token, mask, mode, max_len=10).item() == pytest.approx(
            _aggregate_loop(per_token, mask, mode, 10)
        )


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_aggregate_normalizer_sums_micro_batches_to_the_full_batch(mode):
    # Gradient accumulation: two micro-batches with the full batch's count as normalizer add up to the
    # loss of the full batch (the empty row 2 is in the first half; row counts exclude it only for
    # seq_mean_token_mean, which averages over rows that have tokens).
    per_token, mask = _ragged(batch=6)
    full = aggregate(per_token, mask, mode)
    if mode == "token_mean":
        normalizer = mask.sum()
    elif mode == "seq_mean_token_mean":
        normalizer = mask.any(-1).sum()
    else:
        normalizer = torch.tensor(6.0)
    halves = [aggregate(per_token[s], mask[s], mode, normalizer=normalizer) for s in (slice(0, 3), slice(3, 6))]
    torch.testing.assert_close(halves[0] + halves[1], full)


def test_aggregate_unknown_mode_lists_valid_ones():
    per_token, mask = _ragged()
    with pytest.raises(ValueError, match="unknown agg mode 'mean'; valid values: token_mean, seq_mean_token_mean"):
        aggregate(per_token, mask, "mean")


# ---------------------------------------------------------------- policy loss


def test_policy_loss_clipping_by_hand():
    # One token each, clip_low = clip_high = 0.2, dual_clip = 3:
    #   ratio 1.5, A = +1: -min(1.5, 1.2) = -1.2      clipped high (no gradient)
    #   ratio 0.5, A = -1: -min(-0.5, -0.8) = 0.8     clipped low (no gradient)
    #   ratio 1.1, A = +2: -min(2.2, 2.2) = -2.2      inside the clip range
    #   ratio 5.0, A = -1: -min(-5, -1.2) = 5 -> dual clip min(5, 3 * 1) = 3 (no gradient)
    ratios = torch.tensor([[1.5], [0.5], [1.1], [5.0]], dtype=torch.float64)
    old_logp = torch.full((4, 1), -1.0, dtype=torch.float64)
    logp = (old_logp + ratios.log()).requires_grad_()
    advantages = torch.tensor([1.0, -1.0, 2.0, -1.0], dtype=torch.float64)
    mask = torch.ones(4, 1)
    loss, stats = policy_loss(logp, old_logp, advantages, mask, dual_clip=3.0, agg="token_mean")
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2 + 3.0) / 4)
    loss.backward()
    # Only the unclipped token has a gradient: d/dlogp (-ratio * A) / 4 = -1.1 * 2 / 4.
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0], [0.0], [-0.55], [0.0]], dtype=torch.float64))
    assert stats["clip_frac_high"].item() == 0.25
    assert stats["clip_frac_low"].item() == 0.25
    assert stats["dual_clip_frac"].item() == 0.25
    assert stats["ratio_max"].item() == pytest.approx(5.0)
    assert stats["ratio_min"].item() == pytest.approx(0.5)
    # approx_kl is k3 of KL(old || new) on tokens sampled from old, r = new / old = rho: mean of rho - 1 - log rho.
    expected_kl = sum(r - 1 - math.log(r) for r in (1.5, 0.5, 1.1, 5.0)) / 4
    assert stats["approx_kl"].item() == pytest.approx(expected_kl)


def test_clip_higher_widens_the_upper_range_only():
    # DAPO: clip_high = 0.28 lets ratio 1.25 with A > 0 through (it was clipped at 1.2 before).
    old_logp = torch.zeros(1, 1, dtype=torch.float64)
    logp = old_logp + math.log(1.25)
    advantages = torch.ones(1, dtype=torch.float64)
    mask = torch.ones(1, 1)
    symmetric, _ = policy_loss(logp, old_logp, advantages, mask, clip_low=0.2)
    higher, stats = policy_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.28)
    assert symmetric.item() == pytest.approx(-1.2) and higher.item() == pytest.approx(-1.25)
    assert stats["clip_frac"].item() == 0.0


@pytest.mark.parametrize("agg", AGGREGATION_MODES)
@pytest.mark.parametrize("token_level", [False, True])
def test_policy_loss_at_ratio_one(agg, token_level):
    # rho = 1: loss = aggregate(-A) and the gradient is that of aggregate(-A * logp), not zero.
    _, mask = _ragged()
    generator = torch.Generator().manual_seed(1)
    logp = torch.randn(*mask.shape, generator=generator, dtype=torch.float64).requires_grad_()
    shape = mask.shape if token_level else mask.shape[:1]
    advantages = torch.randn(*shape, generator=generator, dtype=torch.float64)
    per_token_advantages = advantages if token_level else advantages.unsqueeze(-1).expand(mask.shape)
    loss, stats = policy_loss(logp, logp.detach(), advantages, mask, agg=agg)
    torch.testing.assert_close(loss, aggregate(-per_token_advantages, mask, agg))
    (gradient,) = torch.autograd.grad(loss, logp)
    (expected,) = torch.autograd.grad(aggregate(-per_token_advantages * logp, mask, agg), logp)
    torch.testing.assert_close(gradient, expected)
    assert gradient.abs().sum() > 0
    assert stats["clip_frac"].item() == 0.0 and stats["approx_kl"].item() == 0.0


def test_policy_loss_ignores_garbage_padding():
    mask = torch.tensor([[1, 1, 0]])
    logp = torch.tensor([[-1.0, -2.0, float("-inf")]], requires_grad=True)
    old_logp = torch.tensor([[-1.0, -2.0, 0.0]])
    loss, stats = policy_loss(logp, old_logp, torch.tensor([1.0]), mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all() and logp.grad[0, 2] == 0
    assert stats["ratio_max"].item() == 1.0


def test_policy_loss_errors():
    logp, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"advantages must be \[B\] or \[B, T\] = \(2, 3\), got \(3,\)"):
        policy_loss(logp, logp, torch.zeros(3), mask)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        policy_loss(logp, logp, torch.zeros(2), mask, dual_clip=0.5)
    with pytest.raises(ValueError, match=r"logp has shape \(2, 3\) but old_logp has shape \(2, 2\)"):
        policy_loss(logp, logp[:, :2], torch.zeros(2), mask)


# ---------------------------------------------------------------- value loss


def test_value_loss_clip_by_hand():
    # old V = 1, clip = 0.2, so the clipped value lies in [0.8, 1.2]:
    #   V = 1.5, R = 2: errors (1.5-2)^2 = 0.25, clipped (1.2-2)^2 = 0.64 -> 0.5 * 0.64 = 0.32 (clipped, no grad)
    #   V = 0.5, R = 0: errors 0.25, clipped (0.8-0)^2 = 0.64 -> 0.32 (clipped, no grad)
    #   V = 1.1, R = 2: both (1.1-2)^2 = 0.81 -> 0.405, gradient (V - R) / 3 = -0.3
    values = torch.tensor([[1.5, 0.5, 1.1]], dtype=torch.float64, requires_grad=True)
    old_values = torch.ones(1, 3, dtype=torch.float64)
    returns = torch.tensor([[2.0, 0.0, 2.0]], dtype=torch.float64)
    loss, stats = value_loss(values, old_values, returns, torch.ones(1, 3), clip=0.2)
    assert loss.item() == pytest.approx((0.32 + 0.32 + 0.405) / 3)
    loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.0, -0.3]], dtype=torch.float64))
    assert stats["clip_frac"].item() == pytest.approx(2 / 3)
    unclipped, _ = value_loss(values, old_values, returns, torch.ones(1, 3), clip=None)
    assert unclipped.item() == pytest.approx(0.5 * (0.25 + 0.25 + 0.81) / 3)


def test_value_loss_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    mask = torch.ones(1, 4)
    # Perfect prediction -> 1; predicting the mean -> Var(R - mean) / Var(R) = 1 -> 0.
    _, perfect = value_loss(returns.clone(), returns, returns, mask)
    _, constant = value_loss(torch.full_like(returns, 2.5), returns, returns, mask)
    assert perfect["explained_variance"].item() == pytest.approx(1.0)
    assert constant["explained_variance"].item() == pytest.approx(0.0)


# ---------------------------------------------------------------- DPO family, SimPO, reward model


def test_dpo_sigmoid_is_log2_when_policy_equals_reference():
    # c = r = 0, so h = 0 and -log sigma(0) = log 2; the implicit rewards are all 0.
    logps = torch.tensor([-3.0, -10.0, -0.5])
    loss, stats = dpo_loss(logps, logps - 1, logps.clone(), logps - 1)
    assert loss.item() == pytest.approx(math.log(2))
    assert stats["rewards/margins"].item() == 0.0 and stats["rewards/accuracies"].item() == 0.0


# One pair, beta = 0.25, eps = label_smoothing = 0.1:
#   c = chosen - ref_chosen = -3 - (-4) = 1,  r = rejected - ref_rejected = -7 - (-5) = -2,
#   c - r = 3,  h = beta (c - r) = 0.75,  beta c = 0.25,  beta r = -0.5,  1 / (2 beta) = 2.
# With softplus(x) = -log sigma(-x) and log(1 + e^x) = x + log(1 + e^-x):
HAND_DPO = {
    # -(1 - eps) log s(h) - eps log s(-h) = 0.9 softplus(-0.75) + 0.1 softplus(0.75)
    "sigmoid": 0.9 * softplus(-0.75) + 0.1 * softplus(0.75),
    # (0.9 softplus(-0.75) - 0.1 softplus(0.75)) / 0.8
    "robust": (0.9 * softplus(-0.75) - 0.1 * softplus(0.75)) / 0.8,
    # (c - r - 1/(2 beta))^2 = (3 - 2)^2
    "ipo": 1.0,
    # max(0, 1 - h)
    "hinge": 0.25,
    # s(h) (log s(h) - log 0.9) + s(-h) (log s(-h) - log 0.1)
    "exo_pair": sigmoid(0.75) * (math.log(sigmoid(0.75)) - math.log(0.9))
    + sigmoid(-0.75) * (math.log(sigmoid(-0.75)) - math.log(0.1)),
    # -log s(0.25) - 0.5 log s(-0.25) - 0.5 log s(0.5)
    "nca_pair": softplus(-0.25) + 0.5 * softplus(0.25) + 0.5 * softplus(-0.5),
    # (c - 2)^2 + (r + 2)^2 = 1 + 0
    "sppo_hard": 1.0,
    # 1 - s(0.25) + s(-0.5)
    "apo_zero": 1 - sigmoid(0.25) + sigmoid(-0.5),
    # s(0.25) + 1 - s(0.75)
    "apo_down": sigmoid(0.25) + 1 - sigmoid(0.75),
    # -log s(beta c) - log s(-beta r) = softplus(-0.25) + softplus(-0.5)
    "bco_pair": softplus(-0.25) + softplus(-0.5),
    # one pair, nothing to sort: d = (chosen - rejected) - (ref_chosen - ref_rejected) = 4 - 1 = c - r = 3, so the
    # cDPO sigmoid of beta d = 0.75: 0.9 softplus(-0.75) + 0.1 softplus(0.75)
    "aot": 0.9 * softplus(-0.75) + 0.1 * softplus(0.75),
    # sort(c) - sort(r) = c - r for one pair: the same
    "aot_unpaired": 0.9 * softplus(-0.75) + 0.1 * softplus(0.75),
    # m = s(h / tau) = s(0.75 / 0.05) = s(15);  -log s(h) (1 - m) + e^-h m
    "discopop": softplus(-0.75) * (1 - sigmoid(15)) + math.exp(-0.75) * sigmoid(15),
    # lengths n_c = 2, n_r = 4: c / 2 - r / 4 = 0.5 + 0.5 = 1;  -log s(beta * 1) = softplus(-0.25)
    "sigmoid_norm": softplus(-0.25),
    # the given chosen NLL, 1.5
    "sft": 1.5,
}
# What a loss type needs beyond the four log-probs (hand values above).
HAND_DPO_EXTRA = {
    "sigmoid_norm": {"chosen_lengths": torch.tensor([2]), "rejected_lengths": torch.tensor([4])},
    "sft": {"chosen_nll": torch.tensor(1.5, dtype=torch.float64)},
}


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_loss_types_by_hand(loss_type):
    pair = [torch.tensor([value], dtype=torch.float64) for value in (-3.0, -7.0, -4.0, -5.0)]
    extra = HAND_DPO_EXTRA.get(loss_type, {})
    loss, stats = dpo_loss(*pair, beta=0.25, loss_type=loss_type, label_smoothing=0.1, **extra)
    assert loss.item() == pytest.approx(HAND_DPO[loss_type], rel=1e-12)
    assert stats["rewards/chosen"].item() == pytest.approx(0.25)
    assert stats["rewards/rejected"].item() == pytest.approx(-0.5)
    assert stats["rewards/margins"].item() == pytest.approx(0.75)
    assert stats["rewards/accuracies"].item() == 1.0
    assert stats["logps/chosen"].item() == -3.0


def test_dpo_plain_sigmoid_and_gradients_flow_to_policy_only():
    chosen = torch.tensor([-3.0, -2.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-7.0, -1.0], dtype=torch.float64, requires_grad=True)
    ref_chosen = torch.tensor([-4.0, -2.0], dtype=torch.float64, requires_grad=True)
    ref_rejected = torch.tensor([-5.0, -1.0], dtype=torch.float64, requires_grad=True)
    loss, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.25)
    # Row 0: h = 0.75 -> softplus(-0.75); row 1: h = 0 -> log 2.
    assert loss.item() == pytest.approx((softplus(-0.75) + math.log(2)) / 2)
    loss.backward()
    # d/dc -log s(beta (c - r)) = -beta s(-h) per row, / 2 for the mean.
    torch.testing.assert_close(chosen.grad, torch.tensor([-0.125 * sigmoid(-0.75), -0.125 * 0.5], dtype=torch.float64))
    torch.testing.assert_close(rejected.grad, -chosen.grad)
    assert ref_chosen.grad is None and ref_rejected.grad is None


def test_dpo_errors():
    logps = torch.zeros(3)
    with pytest.raises(ValueError, match="unknown loss_type 'kto'; valid values: sigmoid, robust, ipo"):
        dpo_loss(logps, logps, logps, logps, loss_type="kto")
    with pytest.raises(ValueError, match="exo_pair needs 0 < label_smoothing < 1"):
        dpo_loss(logps, logps, logps, logps, loss_type="exo_pair")
    with pytest.raises(ValueError, match=r"chosen_logps has shape \(3,\) but ref_rejected_logps has shape \(2,\)"):
        dpo_loss(logps, logps, logps, logps[:2])


def test_dpo_cdpo_switch_gives_trls_sigmoid():
    # TRL's sigmoid ignores label smoothing: cdpo=False with eps = 0.1 is the plain sigmoid, softplus(-0.75).
    pair = [torch.tensor([value], dtype=torch.float64) for value in (-3.0, -7.0, -4.0, -5.0)]
    loss, _ = dpo_loss(*pair, beta=0.25, label_smoothing=0.1, cdpo=False)
    assert loss.item() == pytest.approx(softplus(-0.75), rel=1e-12)


def test_ipo_with_lengths_averages_the_log_ratios():
    # c = 1, r = -2 over n_c = 2, n_r = 4 tokens, beta = 0.25: (1/2 + 2/4 - 1/(2 beta))^2 = (1 - 2)^2 = 1;
    # with n_c = 1, n_r = 3: (1 + 2/3 - 2)^2 = 1/9.
    pair = [torch.tensor([value], dtype=torch.float64) for value in (-3.0, -7.0, -4.0, -5.0)]
    for lengths, expected in (((2, 4), 1.0), ((1, 3), 1 / 9)):
        n_c, n_r = (torch.tensor([n]) for n in lengths)
        loss, _ = dpo_loss(*pair, beta=0.25, loss_type="ipo", chosen_lengths=n_c, rejected_lengths=n_r)
        assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_f_divergence_scores_by_hand():
    # u = pi / pi_ref: forward KL 1 - 1/u, JS log(2u / (1 + u)), alpha (u^(a-1) - 1) / (a - 1), reverse KL log u.
    log_u = torch.tensor([math.log(2.0), 0.0, math.log(3.0), math.log(4.0)], dtype=torch.float64)
    torch.testing.assert_close(f_divergence_score(log_u, "reverse_kl"), log_u)
    torch.testing.assert_close(
        f_divergence_score(log_u, "forward_kl"), torch.tensor([0.5, 0.0, 2 / 3, 0.75], dtype=torch.float64)
    )
    torch.testing.assert_close(
        f_divergence_score(log_u, "js_divergence"),
        torch.tensor([math.log(4 / 3), 0.0, math.log(1.5), math.log(1.6)], dtype=torch.float64),
    )
    # alpha = 0.5 at u = 4: (1/2 - 1) / (-1/2) = 1; at u = 2: (2^-0.5 - 1) / (-0.5) = 2 - sqrt(2)
    alpha = f_divergence_score(log_u, "alpha_divergence", alpha=0.5)
    assert alpha[3].item() == pytest.approx(1.0) and alpha[0].item() == pytest.approx(2 - math.sqrt(2))
    torch.testing.assert_close(f_divergence_score(log_u, "alpha_divergence", alpha=1.0), log_u)  # the limit


def test_dpo_forward_kl_by_hand():
    # c = log 2, r = -log 2: forward-KL scores 1 - 1/2 = 0.5 and 1 - 2 = -1, h = beta * 1.5 = 0.15 (beta 0.1).
    chosen = torch.tensor([math.log(2.0)], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    loss, stats = dpo_loss(chosen, -chosen, zero, zero, f_divergence="forward_kl")
    assert loss.item() == pytest.approx(softplus(-0.15), rel=1e-12)
    assert stats["rewards/chosen"].item() == pytest.approx(0.1 * math.log(2.0))  # rewards stay beta * log ratio


def test_wpo_weights_by_hand():
    # log w = mean over completion tokens of (log p - log sum p^2): row 0 ((-1 + 0.5) + (-2 + 1)) / 2 = -0.75,
    # row 1 (-0.5 + 0.25) / 1 = -0.25 (its padding holds garbage). The pair weight is w_c w_r = e^-1.
    token_logps = torch.tensor([[-1.0, -2.0, 9.0], [-0.5, 9.0, 9.0]], dtype=torch.float64)
    log_sum_sq = torch.tensor([[-0.5, -1.0, 9.0], [-0.25, 9.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    log_weights = wpo_log_weights(token_logps, log_sum_sq, mask)
    torch.testing.assert_close(log_weights, torch.tensor([-0.75, -0.25], dtype=torch.float64))
    # Pair c = 1, r = -2, beta 0.25: e^-1 * softplus(-0.75); the weight carries no gradient.
    pair = [torch.tensor([value], dtype=torch.float64, requires_grad=True) for value in (-3.0, -7.0, -4.0, -5.0)]
    weights = [log_weights[:1].requires_grad_(), log_weights[1:].clone().requires_grad_()]
    loss, stats = dpo_loss(*pair, beta=0.25, chosen_wpo_logweights=weights[0], rejected_wpo_logweights=weights[1])
    assert loss.item() == pytest.approx(math.exp(-1) * softplus(-0.75), rel=1e-12)
    assert stats["wpo_weight"].item() == pytest.approx(math.exp(-1))
    loss.backward()
    assert pair[0].grad.item() == pytest.approx(-math.exp(-1) * 0.25 * sigmoid(-0.75))
    assert weights[0].grad is None


def test_log_sum_squared_probs_by_hand_and_against_softmax():
    # logits log [1, 1, 2]: p = [1/4, 1/4, 1/2], sum p^2 = 1/16 + 1/16 + 1/4 = 3/8.
    logits = torch.tensor([[[0.0, 0.0, math.log(2.0)]]], dtype=torch.float64)
    assert log_sum_squared_probs(logits).item() == pytest.approx(math.log(3 / 8))
    # temperature 2 halves the logits: p ~ [1, 1, sqrt 2], sum p^2 = (1 + 1 + 2) / (2 + sqrt 2)^2
    assert log_sum_squared_probs(logits, temperature=2.0).item() == pytest.approx(math.log(4 / (2 + math.sqrt(2)) ** 2))
    generator = torch.Generator().manual_seed(5)
    logits = 3 * torch.randn(3, 4, 11, generator=generator, dtype=torch.float64)
    expected = torch.softmax(logits, -1).pow(2).sum(-1).log()
    torch.testing.assert_close(log_sum_squared_probs(logits, block_rows=5), expected)


def test_length_desensitized_logps_by_hand():
    # Chosen: 3 completion tokens after one prompt position; rejected: 2. Shared length 2, ld_alpha 0.5:
    #   chosen = -1 - 2 + 0.5 * (-4) = -5;  rejected = -0.5 - 1 = -1.5 (nothing beyond the shared length).
    # Row 1: chosen 1 token, rejected 3: shared 1, rejected = -1 + 0.5 (-2 - 3) = -3.5.
    chosen = torch.tensor([[7.0, -1.0, -2.0, -4.0], [-2.0, 7.0, 7.0, 7.0]], dtype=torch.float64)
    chosen_mask = torch.tensor([[0, 1, 1, 1], [1, 0, 0, 0]])
    rejected = torch.tensor([[7.0, -0.5, -1.0, 7.0], [-1.0, -2.0, -3.0, 7.0]], dtype=torch.float64)
    rejected_mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 0]])
    ld_chosen, ld_rejected = length_desensitized_logps(chosen, chosen_mask, rejected, rejected_mask, 0.5)
    torch.testing.assert_close(ld_chosen, torch.tensor([-5.0, -2.0], dtype=torch.float64))
    torch.testing.assert_close(ld_rejected, torch.tensor([-1.5, -3.5], dtype=torch.float64))
    # ld_alpha = 1: the plain sums
    full = length_desensitized_logps(chosen, chosen_mask, rejected, rejected_mask, 1.0)
    torch.testing.assert_close(full[0], (chosen * chosen_mask).sum(-1))
    torch.testing.assert_close(full[1], (rejected * rejected_mask).sum(-1))
    with pytest.raises(ValueError, match=r"ld_alpha must be in \[0, 1\]"):
        length_desensitized_logps(chosen, chosen_mask, rejected, rejected_mask, 1.5)


def _aot_loop(chosen, rejected, ref_chosen, ref_rejected, beta, eps, unpaired):
    """AOT by hand: sort in Python, then the cDPO logistic loss of each rank's difference."""
    if unpaired:
        first = sorted(c - rc for c, rc in zip(chosen, ref_chosen))
        second = sorted(r - rr for r, rr in zip(rejected, ref_rejected))
    else:
        first = sorted(c - r for c, r in zip(chosen, rejected))
        second = sorted(rc - rr for rc, rr in zip(ref_chosen, ref_rejected))
    losses = [(1 - eps) * softplus(-beta * (a - b)) + eps * softplus(beta * (a - b)) for a, b in zip(first, second)]
    return sum(losses) / len(losses)


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
def test_aot_matches_sorting_loop(loss_type):
    generator = torch.Generator().manual_seed(6)
    logps = [torch.randn(7, generator=generator, dtype=torch.float64) * 3 for _ in range(4)]
    loss, _ = dpo_loss(*logps, beta=0.3, loss_type=loss_type, label_smoothing=0.1)
    lists = [x.tolist() for x in logps]
    assert loss.item() == pytest.approx(_aot_loop(*lists, 0.3, 0.1, loss_type == "aot_unpaired"), rel=1e-12)


def test_mpo_weighted_sum_and_rpo_alpha():
    # MPO: 0.8 sigmoid + 0.2 bco_pair + 1.0 sft is the weighted sum of the single-type losses; rpo_alpha = 0.5
    # appends 0.5 sft.
    generator = torch.Generator().manual_seed(7)
    logps = [torch.randn(5, generator=generator, dtype=torch.float64) for _ in range(4)]
    nll = torch.tensor(2.0, dtype=torch.float64)
    single = {t: dpo_loss(*logps, loss_type=t, chosen_nll=nll)[0] for t in ("sigmoid", "bco_pair", "sft")}
    mixed, stats = dpo_loss(
        *logps, loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], chosen_nll=nll
    )
    torch.testing.assert_close(mixed, 0.8 * single["sigmoid"] + 0.2 * single["bco_pair"] + single["sft"])
    torch.testing.assert_close(stats["loss/bco_pair"], single["bco_pair"])
    rpo, _ = dpo_loss(*logps, chosen_nll=nll, rpo_alpha=0.5)
    torch.testing.assert_close(rpo, single["sigmoid"] + 0.5 * nll)


def test_dpo_new_option_errors():
    logps = torch.zeros(3)
    lengths = torch.ones(3)
    with pytest.raises(ValueError, match="sigmoid_norm needs chosen_lengths and rejected_lengths"):
        dpo_loss(logps, logps, logps, logps, loss_type="sigmoid_norm")
    with pytest.raises(ValueError, match="need chosen_nll"):
        dpo_loss(logps, logps, logps, logps, rpo_alpha=1.0)
    with pytest.raises(ValueError, match="WPO weights do not apply to aot"):
        dpo_loss(
            logps, logps, logps, logps, loss_type="aot", chosen_wpo_logweights=logps, rejected_wpo_logweights=logps
        )
    with pytest.raises(ValueError, match="f_divergence 'js_divergence' only works with loss types sigmoid"):
        dpo_loss(logps, logps, logps, logps, loss_type="bco_pair", f_divergence="js_divergence")
    with pytest.raises(ValueError, match="unknown f_divergence 'kl'"):
        dpo_loss(logps, logps, logps, logps, f_divergence="kl")
    with pytest.raises(ValueError, match=r"loss_weights has 1 values for 2 loss types"):
        dpo_loss(logps, logps, logps, logps, loss_type=["sigmoid", "ipo"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="pass both chosen_lengths and rejected_lengths"):
        dpo_loss(logps, logps, logps, logps, chosen_lengths=lengths)


def test_simpo_by_hand():
    # Length-averaged logps -1.0 and -1.5, beta = 2, gamma / beta = 0.5: h = 2 * 0.5 - 2 * 0.5 = 0 -> log 2.
    # Second pair -1.0 vs -3.0: h = 2 * 2 - 1 = 3 -> softplus(-3).
    loss, stats = simpo_loss(torch.tensor([-1.0, -1.0]), torch.tensor([-1.5, -3.0]))
    assert loss.item() == pytest.approx((math.log(2) + softplus(-3)) / 2, rel=1e-6)
    assert stats["rewards/chosen"].item() == pytest.approx(-2.0)
    smoothed, _ = simpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(0.9 * softplus(-3) + 0.1 * softplus(3), rel=1e-6)


def test_reward_pairwise_loss_by_hand():
    # r_c = 2, r_r = 1, margin 0.5: -log s(2 - 1 - 0.5) = softplus(-0.5); centering 0.01 * (2 + 1)^2 = 0.09.
    # Second pair r_c = 0, r_r = 1, margin 0: softplus(1); centering 0.01 * 1.
    chosen, rejected = torch.tensor([2.0, 0.0], dtype=torch.float64), torch.tensor([1.0, 1.0], dtype=torch.float64)
    loss, stats = reward_pairwise_loss(chosen, rejected, margin=torch.tensor([0.5, 0.0]), center_coef=0.01)
    assert loss.item() == pytest.approx((softplus(-0.5) + softplus(1)) / 2 + (0.09 + 0.01) / 2)
    assert stats["accuracy"].item() == 0.5 and stats["margin_mean"].item() == 0.0
    plain, _ = reward_pairwise_loss(chosen, rejected)
    assert plain.item() == pytest.approx((softplus(-1) + softplus(1)) / 2)


# ---------------------------------------------------------------- SFT


def test_sft_loss_by_hand():
    # Uniform logits over V = 4 tokens: every valid token costs log 4; -100 labels under the mask are fine.
    logits = torch.zeros(2, 3, 4, requires_grad=True)
    labels = torch.tensor([[1, 2, -100], [3, -100, -100]])
    mask = labels != -100
    loss, stats = sft_loss(logits, labels, mask)
    assert loss.item() == pytest.approx(math.log(4))
    assert stats["num_tokens"].item() == 3 and stats["nll"].item() == pytest.approx(math.log(4))
    loss.backward()
    assert logits.grad[0, 2].abs().sum() == 0


def test_sft_loss_matches_cross_entropy_and_normalizer():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 7, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 7, (3, 5), generator=generator)
    mask = torch.rand(3, 5, generator=generator) < 0.6
    mask[0, 0] = True
    loss, stats = sft_loss(logits, labels, mask)
    expected = F.cross_entropy(logits[mask], labels[mask])
    torch.testing.assert_close(loss, expected)
    accuracy = (logits.argmax(-1) == labels)[mask].double().mean()
    torch.testing.assert_close(stats["token_accuracy"], accuracy.float())
    # A normalizer covering two micro-batches: the halves add up to the whole batch's mean NLL.
    logp = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    halves = [sft_loss_from_logprobs(logp[s], mask[s], normalizer=mask.sum())[0] for s in (slice(0, 1), slice(1, 3))]
    torch.testing.assert_close(halves[0] + halves[1], expected)


# ---------------------------------------------------------------- purity


def test_losses_do_not_modify_inputs():
    per_token, mask = _ragged()
    generator = torch.Generator().manual_seed(4)
    logp, old_logp, values = (torch.randn(*mask.shape, generator=generator) for _ in range(3))
    scores = [torch.randn(mask.shape[0], generator=generator) for _ in range(4)]
    logits = torch.randn(*mask.shape, 7, generator=generator)
    labels = torch.randint(0, 7, mask.shape, generator=generator)
    tensors = [per_token, mask, logp, old_logp, values, *scores, logits, labels]
    copies = [x.clone() for x in tensors]
    aggregate(per_token, mask, "seq_mean_token_mean")
    policy_loss(logp, old_logp, scores[0], mask, dual_clip=3.0)
    value_loss(values, old_logp, logp, mask)
    lengths = torch.tensor([3, 1, 2, 5, 4])
    for loss_type in DPO_LOSS_TYPES:
        dpo_loss(*scores, loss_type=loss_type, label_smoothing=0.1, chosen_lengths=lengths, rejected_lengths=lengths,
                 chosen_nll=scores[0].mean(), f_divergence="reverse_kl")  # fmt: skip
    dpo_loss(*scores, f_divergence="js_divergence", chosen_wpo_logweights=scores[1], rejected_wpo_logweights=scores[2])
    simpo_loss(scores[0], scores[1])
    reward_pairwise_loss(scores[0], scores[1], margin=scores[2], center_coef=0.1)
    sft_loss(logits, labels, mask)
    assert all(torch.equal(x, y) for x, y in zip(tensors, copies))


def test_surrogate_for_names_the_loss_function_and_its_clip():
    from rlcore import cispo_loss, policy_loss, surrogate_for

    assert surrogate_for("cispo", 0.2, None) == (cispo_loss, {"clip_high": 0.2})  # epsilon_high falls back
    assert surrogate_for("cispo", 0.2, 0.28) == (cispo_loss, {"clip_high": 0.28})
    assert surrogate_for("dapo", 0.2, 0.28) == (policy_loss, {"clip_low": 0.2, "clip_high": 0.28})
