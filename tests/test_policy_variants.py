"""GSPO's sequence-level ratio, CISPO, truncated importance sampling and pass@k: by hand, by loops, by autograd."""

import itertools
import math

import pytest
import torch

from rlcore import cispo_loss, importance_ratio, policy_loss, truncated_importance_weights
from rlcore.evaluation import pass_at_k

MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])


def test_sequence_ratio_by_hand_and_by_loop():
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.2, 0.4, 99.0], [-0.3, 0.0, 0.0]])  # the padding's 99 must not count
    # row 0: mean log-ratio (0.2 + 0.4) / 2 = 0.3; row 1: (-0.3 + 0 + 0) / 3 = -0.1
    expected = torch.tensor([[math.exp(0.3)], [math.exp(-0.1)]])
    torch.testing.assert_close(importance_ratio(logp, old, MASK, "sequence"), expected)
    loop = []
    for b in range(2):
        log_ratios = [(logp[b, t] - old[b, t]).item() for t in range(3) if MASK[b, t]]
        loop.append(math.exp(sum(log_ratios) / len(log_ratios)))
    torch.testing.assert_close(importance_ratio(logp, old, MASK, "sequence").squeeze(1), torch.tensor(loop))
    torch.testing.assert_close(importance_ratio(logp, old, MASK, "token")[0, :2], torch.tensor([0.2, 0.4]).exp())


def test_gspo_clips_whole_rows_and_its_gradient_spreads_over_the_row():
    old = torch.zeros(2, 3, dtype=torch.float64)
    logp = torch.tensor([[0.2, 0.4, 0.0], [-0.3, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    advantages = torch.tensor([1.0, 1.0], dtype=torch.float64)
    loss, stats = policy_loss(
        logp,
        old,
        advantages,
        MASK.double(),
        clip_low=0.2,
        agg="seq_mean_token_mean",
        importance_sampling_level="sequence",
    )
    # row 0: s = e^0.3 = 1.35 > 1.2 with A > 0: the loss is -1.2 at each token, no gradient;
    # row 1: s = e^-0.1 = 0.905 inside the clip range: loss -s, gradient -A s / 3 at each of its 3 tokens.
    s1 = math.exp(-0.1)
    torch.testing.assert_close(loss, torch.tensor((-1.2 - s1) / 2, dtype=torch.float64))
    (grad,) = torch.autograd.grad(loss, logp)
    expected = torch.tensor([[0.0, 0.0, 0.0], [-s1 / 3 / 2] * 3], dtype=torch.float64)
    torch.testing.assert_close(grad, expected)
    assert stats["clip_frac_high"].item() == pytest.approx(2 / 5)  # row 0's two tokens of the five valid ones


def test_cispo_keeps_the_gradient_of_clipped_tokens():
    old = torch.zeros(1, 3, dtype=torch.float64)
    logp = torch.tensor([[0.5, -1.0, -0.3]], dtype=torch.float64, requires_grad=True)
    advantages = torch.tensor([2.0], dtype=torch.float64)
    loss, stats = cispo_loss(logp, old, advantages, torch.ones(1, 3), clip_high=0.2, agg="token_mean")
    # weights sg(min(ratio, 1.2)), no lower bound: e^0.5 = 1.65 -> 1.2; e^-1 = 0.368; e^-0.3 = 0.741
    weights = [1.2, math.exp(-1.0), math.exp(-0.3)]
    expected = sum(-w * 2.0 * lp for w, lp in zip(weights, [0.5, -1.0, -0.3])) / 3
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, torch.tensor([[-w * 2.0 / 3 for w in weights]], dtype=torch.float64))
    assert stats["clip_frac"].item() == pytest.approx(1 / 3)
    # PPO's clip would give the first token no gradient at all
    (ppo_grad,) = torch.autograd.grad(policy_loss(logp, old, advantages, torch.ones(1, 3))[0], logp)
    assert ppo_grad[0, 0] == 0
    # a lower bound 1 - 0.2 lifts the second and third weights (0.368, 0.741) to 0.8
    low, _ = cispo_loss(logp, old, advantages, torch.ones(1, 3), clip_low=0.2, clip_high=0.2)
    expected_low = sum(-w * 2.0 * lp for w, lp in zip([1.2, 0.8, 0.8], [0.5, -1.0, -0.3])) / 3
    torch.testing.assert_close(low, torch.tensor(expected_low, dtype=torch.float64))


def test_cispo_and_the_clipped_surrogate_share_the_gradient_at_ratio_one():
    torch.manual_seed(0)
    logp = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    advantages, mask = torch.randn(3, dtype=torch.float64), torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    for level in ("token", "sequence"):
        grads = [
            torch.autograd.grad(fn(logp, logp.detach(), advantages, mask, importance_sampling_level=level)[0], logp)[0]
            for fn in (cispo_loss, policy_loss)
        ]
        torch.testing.assert_close(grads[0], grads[1])


def test_truncated_importance_weights_by_hand_and_by_loop():
    train = torch.log(torch.tensor([[3.0, 0.5, 7.0]]))
    sampler = torch.zeros(1, 3)
    mask = torch.tensor([[1, 1, 0]])  # the third token is padding: r = 1
    # token ratios (3, 0.5); the sequence ratio 3 * 0.5 = 1.5
    cases = {
        ("token_truncate", 2.0): [[2.0, 0.5, 1.0]],
        ("token_mask", 2.0): [[0.0, 0.5, 1.0]],
        ("sequence_truncate", 2.0): [[1.5]],
        ("sequence_truncate", 1.2): [[1.2]],
        ("sequence_mask", 2.0): [[1.5]],
        ("sequence_mask", 1.2): [[0.0]],
    }
    for (mode, cap), expected in cases.items():
        weights = truncated_importance_weights(train, sampler, mask, cap=cap, mode=mode)
        torch.testing.assert_close(weights, torch.tensor(expected), msg=f"{mode} {cap}")
    torch.manual_seed(0)
    train, sampler, mask = torch.randn(4, 5), torch.randn(4, 5), (torch.rand(4, 5) > 0.3).long()
    weights = truncated_importance_weights(train, sampler, mask, cap=1.5, mode="sequence_mask")
    for b in range(4):
        ratio = math.exp(sum((train[b, t] - sampler[b, t]).item() for t in range(5) if mask[b, t]))
        assert weights[b, 0].item() == pytest.approx(ratio if ratio <= 1.5 else 0.0, rel=1e-5)


def test_importance_weights_scale_each_tokens_loss():
    logp = torch.zeros(2, 2, requires_grad=True)
    weights = torch.tensor([[2.0, 0.5], [0.0, 1.0]])
    loss, _ = policy_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), torch.ones(2, 2), importance_weights=weights)
    # ratio 1: per-token loss -A, weighted: (-2 - 0.5 + 0 + 1) / 4
    torch.testing.assert_close(loss, torch.tensor(-1.5 / 4))
    with pytest.raises(ValueError, match="importance_weights"):
        policy_loss(logp, logp.detach(), torch.ones(2), torch.ones(2, 2), importance_weights=torch.ones(3))


def test_pass_at_k_by_hand_and_by_enumeration():
    # n = 5 samples, c = 2 correct, k = 2: 1 - C(3, 2) / C(5, 2) = 1 - 3/10
    assert pass_at_k(torch.tensor([2]), 5, 2).item() == pytest.approx(0.7)
    assert pass_at_k(torch.tensor([2]), 5, 1).item() == pytest.approx(2 / 5)  # pass@1 = c / n
    assert pass_at_k(torch.tensor([0, 5]), 5, 3).tolist() == [0.0, 1.0]
    for n, k in [(6, 3), (4, 4), (7, 2)]:
        for c in range(n + 1):
            outcomes = [1] * c + [0] * (n - c)  # every k-subset of the n samples, counting those with a pass
            subsets = list(itertools.combinations(outcomes, k))
            expected = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_k(torch.tensor([c]), n, k).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="k"):
        pass_at_k(torch.tensor([1]), 3, 4)
