"""KL estimators, KL-shaped rewards and advantage estimators: hand-derived values and slow loops."""

import math
import statistics

import pytest
import torch

from rlcore import (
    gae,
    group_advantages,
    kl_estimate,
    kl_shaped_rewards,
    reinforce_pp_advantages,
    rloo_advantages,
)


def _ragged_mask(batch=6, length=9, seed=0):
    """Random right padding, left padding and holes, plus one empty row."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, length, generator=generator) < 0.75
    mask[0, 5:] = False  # right padding
    mask[1, :3] = False  # left padding
    mask[2] = False  # empty row
    return mask


def _valid_indices(mask_row):
    return [t for t in range(len(mask_row)) if mask_row[t]]


# ---------------------------------------------------------------- KL


def test_kl_estimators_by_hand():
    # logp = -1, ref = -1.5: log r = ref - logp = -0.5.
    #   k1 = -log r = 0.5;  k2 = (log r)^2 / 2 = 0.125;  k3 = r - 1 - log r = e^-0.5 - 0.5 = 0.10653...
    # logp = -2, ref = -1: log r = 1.
    #   k1 = -1;  k2 = 0.5;  k3 = e - 1 - 1 = 0.71828...
    logp, ref_logp = torch.tensor([-1.0, -2.0], dtype=torch.float64), torch.tensor([-1.5, -1.0], dtype=torch.float64)
    expected = {"k1": [0.5, -1.0], "k2": [0.125, 0.5], "k3": [math.exp(-0.5) - 0.5, math.e - 2.0]}
    for kind, values in expected.items():
        torch.testing.assert_close(kl_estimate(logp, ref_logp, kind), torch.tensor(values, dtype=torch.float64))


def test_kl_properties():
    generator = torch.Generator().manual_seed(1)
    logp, ref_logp = torch.randn(4, 50, generator=generator) * 3, torch.randn(4, 50, generator=generator) * 3
    assert (kl_estimate(logp, ref_logp, "k3") >= 0).all()
    assert (kl_estimate(logp, ref_logp, "k2") >= 0).all()
    for kind in ("k1", "k2", "k3"):
        assert (kl_estimate(logp, logp.clone(), kind) == 0).all()
    with pytest.raises(ValueError, match="unknown kind 'low_var_kl'; valid values: k1, k2, k3"):
        kl_estimate(logp, ref_logp, "low_var_kl")


def test_k1_k3_unbiased_on_a_categorical():
    # E_{x~p}[k1] = E_{x~p}[k3] = KL(p || q) exactly, computed as sums over the support.
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    true_kl = (p * (p / q).log()).sum()
    for kind in ("k1", "k3"):
        torch.testing.assert_close((p * kl_estimate(p.log(), q.log(), kind)).sum(), true_kl)


def test_kl_shaped_rewards_by_hand_and_loop():
    # One row, 3 valid tokens then padding; k1 = logp - ref = [0.5, -0.2, 0.1]; kl_coef = 0.1; score 2.
    # rewards = [-0.05, 0.02, -0.01 + 2, 0]
    logp = torch.tensor([[-1.0, -2.0, -0.5, -3.0]], dtype=torch.float64)
    ref_logp = torch.tensor([[-1.5, -1.8, -0.6, -9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    rewards = kl_shaped_rewards(torch.tensor([2.0], dtype=torch.float64), logp, ref_logp, mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.02, 1.99, 0.0]], dtype=torch.float64))

    mask = _ragged_mask()
    generator = torch.Generator().manual_seed(2)
    logp, ref_logp = torch.randn(*mask.shape, generator=generator), torch.randn(*mask.shape, generator=generator)
    scores = torch.randn(mask.shape[0], generator=generator)
    for kind in ("k1", "k3"):
        got = kl_shaped_rewards(scores, logp, ref_logp, mask, kl_coef=torch.tensor(0.05), kind=kind)
        kl = kl_estimate(logp, ref_logp, kind)
        expected = torch.zeros_like(logp)
        for b in range(mask.shape[0]):
            valid = _valid_indices(mask[b])
            for t in valid:
                expected[b, t] = -0.05 * kl[b, t]
            if valid:
                expected[b, valid[-1]] += scores[b]
        torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------- GAE


def test_gae_three_steps_by_hand():
    # r = [0, 0, 1], V = [0.5, 0.6, 0.7], gamma = 0.9, lam = 0.8 (gamma * lam = 0.72); V after the end is 0.
    #   delta_2 = 1 + 0.9 * 0   - 0.7 = 0.3     A_2 = 0.3
    #   delta_1 = 0 + 0.9 * 0.7 - 0.6 = 0.03    A_1 = 0.03 + 0.72 * 0.3   = 0.246
    #   delta_0 = 0 + 0.9 * 0.6 - 0.5 = 0.04    A_0 = 0.04 + 0.72 * 0.246 = 0.21712
    #   returns = A + V = [0.71712, 0.846, 1.0]
    # Row 1 is the same trajectory with padding before, inside and after it (values there are garbage).
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0], [5.0, 0.0, 7.0, 0.0, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.6, 0.7, 0.0, 0.0], [9.0, 0.5, 9.0, 0.6, 0.7]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 0, 1, 1]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    expected = torch.tensor([[0.21712, 0.246, 0.3, 0, 0], [0, 0.21712, 0, 0.246, 0.3]], dtype=torch.float64)
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns[0], torch.tensor([0.71712, 0.846, 1.0, 0, 0], dtype=torch.float64))


def _gae_loop(rewards, values, mask, gamma, lam):
    """Textbook GAE on each row's valid tokens, compacted into a list."""
    advantages, returns = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        steps = _valid_indices(mask[b])
        next_value, next_advantage = 0.0, 0.0
        for t in reversed(steps):
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            next_advantage = delta + gamma * lam * next_advantage
            next_value = values[b, t].item()
            advantages[b, t], returns[b, t] = next_advantage, next_advantage + next_value
    return advantages, returns


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0)])
def test_gae_matches_loop(gamma, lam):
    mask = _ragged_mask()
    generator = torch.Generator().manual_seed(3)
    rewards = torch.randn(*mask.shape, generator=generator, dtype=torch.float64)
    values = torch.randn(*mask.shape, generator=generator, dtype=torch.float64)
    for got, want in zip(gae(rewards, values, mask, gamma, lam), _gae_loop(rewards, values, mask, gamma, lam)):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------- group baselines


def test_rloo_by_hand():
    # One group r = [1, 2, 3, 6]: the mean of the other three is [11/3, 10/3, 3, 2],
    # so A = [1 - 11/3, 2 - 10/3, 0, 4] = [-8/3, -4/3, 0, 4]. A second group of equal rewards gives 0.
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0], dtype=torch.float64)
    expected = torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(rloo_advantages(rewards, group_size=4), expected)


def test_group_advantages_by_hand():
    # Group [0, 1, 1, 2]: mean 1, Bessel std sqrt((1 + 0 + 0 + 1) / 3) = sqrt(2/3) = 0.8165.
    rewards = torch.tensor([0.0, 1.0, 1.0, 2.0], dtype=torch.float64)
    std = math.sqrt(2 / 3)
    expected = torch.tensor([-1.0, 0.0, 0.0, 1.0], dtype=torch.float64) / (std + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, group_size=4), expected)
    torch.testing.assert_close(group_advantages(rewards, 4, scale="none"), expected * (std + 1e-4))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_loop(scale):
    group_size, generator = 4, torch.Generator().manual_seed(4)
    rewards = torch.randint(0, 3, (12,), generator=generator).double()
    rewards[4:8] = 1.0  # a group with zero std gets advantage 0
    batch_std = statistics.stdev(rewards.tolist())
    expected = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size].tolist()
        mean = statistics.mean(group)
        divisor = {"group": statistics.stdev(group) + 1e-4, "batch": batch_std + 1e-4, "none": 1.0}[scale]
        expected += [(reward - mean) / divisor for reward in group]
    got = group_advantages(rewards, group_size, scale=scale)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(got.view(-1, group_size).sum(1), torch.zeros(3, dtype=torch.float64))
    assert (got[4:8] == 0).all()


def test_rloo_matches_loop():
    rewards = torch.randn(15, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    expected = []
    for start in range(0, 15, 5):
        group = rewards[start : start + 5].tolist()
        expected += [r - (sum(group) - r) / 4 for r in group]
    torch.testing.assert_close(rloo_advantages(rewards, 5), torch.tensor(expected, dtype=torch.float64))


def test_group_errors():
    with pytest.raises(ValueError, match="batch of 6 rows is not divisible by group_size=4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="unknown scale 'std'; valid values: group, batch, none"):
        group_advantages(torch.zeros(8), 4, scale="std")
    with pytest.raises(ValueError, match=r"group_size must be >= 2"):
        rloo_advantages(torch.zeros(8), 1)
    with pytest.raises(ValueError, match=r"rewards must be \[B\]"):
        group_advantages(torch.zeros(8, 2), 4)


# ---------------------------------------------------------------- REINFORCE++


def test_reinforce_pp_matches_loop():
    mask = _ragged_mask()
    generator = torch.Generator().manual_seed(6)
    rewards = torch.randn(*mask.shape, generator=generator, dtype=torch.float64)
    gamma = 0.95
    returns = torch.zeros_like(rewards)
    for b in range(mask.shape[0]):
        running = 0.0
        for t in reversed(_valid_indices(mask[b])):
            running = rewards[b, t].item() + gamma * running
            returns[b, t] = running
    valid = returns[mask]
    mean, var = valid.mean(), valid.var(unbiased=False)
    expected = torch.where(mask, (returns - mean) / torch.sqrt(var + 1e-8), 0.0)
    torch.testing.assert_close(reinforce_pp_advantages(rewards, mask, gamma=gamma), expected)


def test_reinforce_pp_sequence_scores():
    # [B] scores sit at the last valid token, so with gamma = 1 every valid token's return is its row's
    # score; whitening over tokens weighs rows by length: returns [1, 1, 1, -1] -> mean 0.5, var 0.75.
    scores = torch.tensor([1.0, -1.0, 7.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [0, 1, 0], [0, 0, 0]])
    expected = torch.tensor([[0.5, 0.5, 0.5], [0, -1.5, 0], [0, 0, 0]], dtype=torch.float64) / math.sqrt(0.75 + 1e-8)
    torch.testing.assert_close(reinforce_pp_advantages(scores, mask), expected)


def test_inputs_not_modified():
    mask = _ragged_mask()
    generator = torch.Generator().manual_seed(7)
    tensors = [torch.randn(*mask.shape, generator=generator) for _ in range(3)] + [mask]
    copies = [x.clone() for x in tensors]
    rewards, values, logp, _ = tensors
    gae(rewards, values, mask)
    kl_shaped_rewards(rewards[:, 0], logp, values, mask, 0.1)
    reinforce_pp_advantages(rewards, mask)
    reinforce_pp_advantages(rewards[:, 0], mask)
    group_advantages(rewards[:, 0], 3)
    rloo_advantages(rewards[:, 0], 3)
    assert all(torch.equal(x, y) for x, y in zip(tensors, copies))
