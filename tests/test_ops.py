"""Masked statistics: hand-derived values, loops over the valid entries, padding that holds garbage."""

import pytest
import torch

from rlcore import check_choice, check_same_shape, masked_mean, masked_sum, masked_var, masked_whiten

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_masked_stats_by_hand():
    # Valid entries 1, 2, 4: sum 7, mean 7/3; squared deviations (16 + 1 + 25) / 9 = 42/9.
    assert masked_sum(X, MASK).item() == 7.0
    assert masked_mean(X, MASK).item() == pytest.approx(7 / 3)
    assert masked_var(X, MASK).item() == pytest.approx(42 / 9 / 2)  # Bessel: divide by n - 1 = 2
    assert masked_var(X, MASK, unbiased=False).item() == pytest.approx(42 / 9 / 3)
    # Per row: row 0 has 1, 2 -> sum 3, mean 1.5; row 1 has 4 -> sum 4, mean 4.
    torch.testing.assert_close(masked_sum(X, MASK, dim=1), torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(masked_mean(X, MASK, dim=1), torch.tensor([1.5, 4.0]))
    # Per column: column 0 has 1, 4 -> 2.5; column 1 has 2; column 2 has nothing -> 0, not nan.
    torch.testing.assert_close(masked_mean(X, MASK, dim=0), torch.tensor([2.5, 2.0, 0.0]))


def test_padding_may_hold_inf_and_nan():
    garbage = X.clone()
    garbage[0, 2], garbage[1, 1] = float("inf"), float("nan")
    garbage.requires_grad_(True)
    assert masked_mean(garbage, MASK).item() == pytest.approx(7 / 3)
    (masked_var(garbage, MASK) + masked_whiten(garbage, MASK).sum()).backward()
    assert torch.isfinite(garbage.grad).all()
    assert garbage.grad[0, 2] == 0 and garbage.grad[1, 1] == 0


def test_empty_mask_and_single_entry_give_zero_not_nan():
    empty = torch.zeros_like(MASK)
    assert masked_mean(X, empty).item() == 0.0
    assert masked_var(X, empty).item() == 0.0
    single = torch.tensor([[0, 1, 0], [0, 0, 0]])
    assert masked_var(X, single).item() == 0.0  # Bessel divisor n - 1 = 0 is clamped to 1


def test_matches_torch_on_the_valid_entries():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=generator, dtype=torch.float64)
    mask = torch.rand(5, 7, generator=generator) < 0.6
    valid = x[mask]
    torch.testing.assert_close(masked_mean(x, mask), valid.mean())
    torch.testing.assert_close(masked_var(x, mask), valid.var())
    torch.testing.assert_close(masked_var(x, mask, unbiased=False), valid.var(unbiased=False))
    whitened = masked_whiten(x, mask)
    torch.testing.assert_close(whitened[mask], (valid - valid.mean()) / torch.sqrt(valid.var() + 1e-8))
    assert (whitened[~mask] == 0).all()
    kept_mean = masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(kept_mean[mask], whitened[mask] + valid.mean())
    float_mask = mask.double()  # a 0/1 float mask means the same as a bool one
    torch.testing.assert_close(masked_mean(x, float_mask, dim=1), masked_mean(x, mask, dim=1))


def test_inputs_not_modified():
    x, mask = X.clone(), MASK.clone()
    masked_whiten(x, mask)
    masked_var(x, mask)
    assert torch.equal(x, X) and torch.equal(mask, MASK)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"x has shape \(2, 3\) but mask has shape \(2, 2\)"):
        masked_mean(X, MASK[:, :2])
    with pytest.raises(ValueError, match=r"logp has shape \(2,\) but ref has shape \(3,\)"):
        check_same_shape(logp=torch.zeros(2), ref=torch.zeros(3))
    with pytest.raises(ValueError, match="unknown mode 'avg'; valid values: a, b"):
        check_choice("mode", "avg", ("a", "b"))
