"""KTO, ORPO and CPO (rlcore.preference): hand-derived values, a per-row reference loop, gradients."""

import math

import pytest
import torch

from rlcore import cpo_loss, kto_loss, kto_reference_point, log1mexp, orpo_loss, simpo_loss


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------- KTO


def test_kto_by_hand():
    # r = logps - ref = [-1 - -2, -2 - -2, -3 - -1] = [1, 0, -2]; labels desirable, undesirable, undesirable.
    # Mismatched pairs: kl_logps - ref_kl_logps = [0, 1], mean 0.5 = z0 (>= 0, kept).
    # beta = 0.5, w_D = 2, w_U = 1:
    #   row 0 (desirable):   2 * (1 - sigmoid(0.5 * (1 - 0.5)))  = 2 * (1 - sigmoid(0.25))
    #   row 1 (undesirable): 1 - sigmoid(0.5 * (0.5 - 0))        = 1 - sigmoid(0.25)
    #   row 2 (undesirable): 1 - sigmoid(0.5 * (0.5 - -2))       = 1 - sigmoid(1.25)
    #   loss = mean of the three = (3 * 0.4378235 + 0.2227001) / 3 = 0.5120568
    logps, ref = torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-2.0, -2.0, -1.0])
    labels = torch.tensor([True, False, False])
    kl, ref_kl = torch.tensor([-1.0, -3.0]), torch.tensor([-1.0, -4.0])
    loss, stats = kto_loss(logps, ref, labels, kl, ref_kl, beta=0.5, desirable_weight=2.0, undesirable_weight=1.0)
    expected = (3 * (1 - sigmoid(0.25)) + (1 - sigmoid(1.25))) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6) and expected == pytest.approx(0.5120568, rel=1e-6)
    assert stats["kl"].item() == pytest.approx(0.5)
    assert stats["rewards/chosen"].item() == pytest.approx(0.5)  # beta * 1
    assert stats["rewards/rejected"].item() == pytest.approx(-0.5)  # beta * mean(0, -2)
    assert stats["rewards/margins"].item() == pytest.approx(1.0)
    assert stats["logps/rejected"].item() == pytest.approx(-2.5)
    assert stats["num_desirable"].item() == 1 and stats["num_undesirable"].item() == 2


def test_kto_reference_point_is_clamped_and_detached():
    # mean(kl - ref_kl) = mean(-1, -3) = -2 < 0: z0 = 0, and the loss is that of no reference point
    kl = torch.tensor([-2.0, -4.0], requires_grad=True)
    assert kto_reference_point(kl, torch.tensor([-1.0, -1.0])).item() == 0.0
    logps = torch.tensor([-1.0, -2.0], requires_grad=True)
    ref, labels = torch.tensor([-1.5, -1.0]), torch.tensor([1, 0])
    loss, _ = kto_loss(logps, ref, labels, kl, torch.tensor([-1.0, -1.0]))
    assert loss.item() == pytest.approx(kto_loss(logps, ref, labels)[0].item())
    # a positive reference point: no gradient reaches the mismatched pairs' log-probs
    loss, stats = kto_loss(logps, ref, labels, kl, torch.tensor([-3.0, -6.0]))
    assert stats["kl"].item() == pytest.approx(1.5)
    loss.backward()
    assert kl.grad is None and logps.grad is not None


def test_kto_apo_zero_unpaired_by_hand():
    # r = [1, -1], beta = 1: desirable 1 - sigmoid(1), undesirable sigmoid(-1) = 1 - sigmoid(1); mean = 1 - sigmoid(1)
    loss, stats = kto_loss(
        torch.tensor([0.0, -2.0]),
        torch.tensor([-1.0, -1.0]),
        torch.tensor([True, False]),
        torch.tensor([5.0]),  # ignored: this loss has no reference point
        torch.tensor([0.0]),
        beta=1.0,
        loss_type="apo_zero_unpaired",
    )
    assert loss.item() == pytest.approx(1 - sigmoid(1.0), rel=1e-6) and stats["kl"].item() == 0.0


def test_kto_matches_a_per_row_loop():
    generator = torch.Generator().manual_seed(0)
    logps, ref = -torch.rand(9, generator=generator, dtype=torch.float64) * 5, -torch.rand(9, dtype=torch.float64) * 5
    labels = torch.rand(9, generator=generator) > 0.4
    kl, ref_kl = -torch.rand(9, dtype=torch.float64) * 5, -torch.rand(9, dtype=torch.float64) * 5 - 1
    beta, w_d, w_u = 0.3, 1.2, 0.8
    z0 = max(0.0, sum((kl - ref_kl).tolist()) / 9)
    total = 0.0
    for i in range(9):
        r = (logps[i] - ref[i]).item()
        total += w_d * (1 - sigmoid(beta * (r - z0))) if labels[i] else w_u * (1 - sigmoid(beta * (z0 - r)))
    loss, _ = kto_loss(logps, ref, labels, kl, ref_kl, beta=beta, desirable_weight=w_d, undesirable_weight=w_u)
    assert loss.item() == pytest.approx(total / 9, rel=1e-12)


def test_kto_rejects_bad_input():
    logps = torch.zeros(3)
    with pytest.raises(ValueError, match="loss_type"):
        kto_loss(logps, logps, logps.bool(), loss_type="sigmoid")
    with pytest.raises(ValueError, match="both or neither"):
        kto_loss(logps, logps, logps.bool(), kl_logps=logps)
    with pytest.raises(ValueError, match="shape mismatch"):
        kto_loss(logps, logps, torch.zeros(2, dtype=torch.bool))


# ---------------------------------------------------------------- ORPO


def test_log1mexp_against_the_naive_formula_and_its_gradient():
    # where the naive log(1 - e^x) keeps its digits in float64 (x in [-20, -1e-3]), the two agree
    x = torch.cat([-torch.logspace(-3, math.log10(20), 50, dtype=torch.float64), torch.tensor([-math.log(2)])])
    x.requires_grad_(True)
    value = log1mexp(x)
    torch.testing.assert_close(value, torch.log(1 - torch.exp(x.detach())), rtol=1e-6, atol=0)
    value.sum().backward()
    exact = -torch.exp(x.detach()) / (1 - torch.exp(x.detach()))  # d/dx log(1 - e^x)
    torch.testing.assert_close(x.grad, exact, rtol=1e-6, atol=0)
    # beyond it, first-order expansions: 1 - e^x = -x for x -> 0, and log(1 - e^x) = -e^x for x -> -inf
    tiny, huge = torch.tensor([-1e-20, -100.0], dtype=torch.float64)
    assert log1mexp(tiny).item() == pytest.approx(math.log(1e-20), rel=1e-12)
    assert log1mexp(huge).item() == pytest.approx(-math.exp(-100.0), rel=1e-12)


def test_orpo_by_hand():
    # P_c = 0.5: odds 1, log odds 0. P_r = 0.2: odds 0.25. log OR = 0 - log 0.25 = log 4;
    # -log sigmoid(log 4) = -log(4 / 5) = log 1.25. loss = nll + beta * log 1.25 = 0.7 + 0.1 * 0.2231436 = 0.7223144
    chosen, rejected = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.2)])
    loss, stats = orpo_loss(chosen, rejected, torch.tensor(0.7), beta=0.1)
    assert loss.item() == pytest.approx(0.7 + 0.1 * math.log(1.25), rel=1e-6)
    assert stats["log_odds_chosen"].item() == pytest.approx(math.log(4), rel=1e-6)
    assert stats["log_odds_ratio"].item() == pytest.approx(math.log(0.8), rel=1e-6)
    assert stats["nll"].item() == pytest.approx(0.7) and stats["rewards/accuracies"].item() == 1.0


def test_orpo_gradient_against_finite_differences():
    generator = torch.Generator().manual_seed(1)
    chosen = (-torch.rand(4, generator=generator, dtype=torch.float64) * 3 - 0.01).requires_grad_(True)
    rejected = (-torch.rand(4, generator=generator, dtype=torch.float64) * 3 - 0.01).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c, r: orpo_loss(c, r, -c.mean(), beta=0.5)[0], (chosen, rejected))


# ---------------------------------------------------------------- CPO


@pytest.mark.parametrize(
    "loss_type, rejected, expected",
    [
        # beta = 0.5, chosen -1: h = 0.5 * (-1 - -3) = 1; -log sigmoid(1) = log(1 + e^-1) = 0.3132617
        ("sigmoid", -3.0, math.log(1 + math.exp(-1))),
        # h = 0.5 * (-1 - -2) = 0.5; max(0, 1 - 0.5) = 0.5
        ("hinge", -2.0, 0.5),
        # (c - r - 1 / (2 beta))^2 = (2 - 1)^2 = 1
        ("ipo", -3.0, 1.0),
    ],
)
def test_cpo_by_hand(loss_type, rejected, expected):
    # + nll_weight * nll = 0.5 * 2 = 1
    loss, stats = cpo_loss(
        torch.tensor([-1.0]), torch.tensor([rejected]), torch.tensor(2.0), beta=0.5, nll_weight=0.5, loss_type=loss_type
    )
    assert loss.item() == pytest.approx(expected + 1.0, rel=1e-6)
    assert stats["rewards/chosen"].item() == pytest.approx(-0.5) and stats["nll"].item() == 2.0


def test_cpo_label_smoothing_and_no_nll():
    # eps = 0.1, h = 1: 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1)
    loss, stats = cpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), beta=0.5, nll_weight=0.0, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.9 * math.log(1 + math.exp(-1)) + 0.1 * math.log(1 + math.e), rel=1e-6)
    assert "nll" not in stats
    with pytest.raises(ValueError, match="chosen_nll"):
        cpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]))


def test_cpo_sigmoid_is_simpo_without_margin():
    chosen, rejected = torch.tensor([-0.5, -1.5]), torch.tensor([-1.0, -0.7])
    cpo, _ = cpo_loss(chosen, rejected, beta=2.0, nll_weight=0.0)
    simpo, _ = simpo_loss(chosen, rejected, beta=2.0, gamma_beta_ratio=0.0)
    assert cpo.item() == pytest.approx(simpo.item(), rel=1e-7)
