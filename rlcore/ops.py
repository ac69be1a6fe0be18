"""Masked statistics and the input checks shared by the math modules.

Conventions used everywhere in rlcore:

- a mask is 1 (or True) where a position counts and 0 (or False) where it is padding; float masks must
  hold only 0 and 1 (they are not weights);
- masked positions are read through ``torch.where``, so padding may hold anything, even ``inf`` or
  ``nan``, without leaking into a statistic or its gradient;
- an empty mask gives a mean of 0, never ``nan``: denominators are clamped to at least 1.

Checks here only look at shapes and dtypes, which never forces a host-device synchronisation.
"""

from __future__ import annotations

import torch

__all__ = [
    "check_same_shape",
    "check_ndim",
    "check_choice",
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "last_valid_index",
]


def check_same_shape(**tensors: torch.Tensor) -> None:
    """Raise ``ValueError`` unless every named tensor has the same shape as the first one.

    Example: ``check_same_shape(logp=logp, mask=mask)`` raises
    ``ValueError: shape mismatch: logp has shape (2, 5) but mask has shape (2, 4)``.
    """
    (first_name, first), *others = tensors.items()
    for name, tensor in others:
        if tensor.shape != first.shape:
            raise ValueError(
                f"shape mismatch: {first_name} has shape {tuple(first.shape)} "
                f"but {name} has shape {tuple(tensor.shape)}"
            )


def check_ndim(name: str, tensor: torch.Tensor, ndim: int, layout: str) -> None:
    """Raise ``ValueError`` unless ``tensor`` has ``ndim`` dimensions; ``layout`` names them, e.g. "[B, T]"."""
    if tensor.ndim != ndim:
        raise ValueError(f"{name} must be {layout} ({ndim}-D), got shape {tuple(tensor.shape)}")


def check_choice(argument: str, value: str, valid: tuple[str, ...]) -> None:
    """Raise ``ValueError`` listing the valid values unless ``value`` is one of them."""
    if value not in valid:
        raise ValueError(f"unknown {argument} {value!r}; valid values: {', '.join(valid)}")


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over the positions where ``mask`` is 1: ``sum_i m_i x_i``.

    Args:
        x: any shape.
        mask: same shape as ``x``; bool or 0/1.
        dim: dimension to reduce; ``None`` reduces everything to a scalar.

    Returns:
        ``x`` summed over ``dim`` (a 0-d tensor when ``dim`` is None). Masked entries count as 0 whatever
        they hold.
    """
    check_same_shape(x=x, mask=mask)
    kept = _zero_masked(x, mask)
    return kept.sum() if dim is None else kept.sum(dim)


def _zero_masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with masked entries replaced by 0 (a select, so inf/nan there cannot leak into gradients)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _count(mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Number of valid positions (int64), over ``dim`` or everything."""
    valid = mask.bool()
    return valid.sum() if dim is None else valid.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1: ``sum_i m_i x_i / max(1, sum_i m_i)``.

    Args:
        x: any shape.
        mask: same shape as ``x``; bool or 0/1.
        dim: dimension to reduce; ``None`` reduces everything to a scalar.

    Returns:
        The masked mean over ``dim``; 0 where no position is valid (the count is clamped to at least 1).
    """
    return masked_sum(x, mask, dim) / _count(mask, dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all positions where ``mask`` is 1 (a scalar).

        var = sum_i m_i (x_i - mean)^2 / (n - 1)   with n = sum_i m_i   (unbiased=True, Bessel, as torch.var)
        var = sum_i m_i (x_i - mean)^2 / n                               (unbiased=False)

    The divisor is clamped to at least 1, so one valid position gives 0 and an empty mask gives 0 (no
    ``nan``, no host sync to check for it).

    Args:
        x: any shape.
        mask: same shape as ``x``; bool or 0/1.
        unbiased: apply Bessel's correction (divide by n - 1).

    Returns:
        0-d tensor.
    """
    centered = _zero_masked(x - masked_mean(x, mask), mask)
    count = _count(mask)
    divisor = count - 1 if unbiased else count
    return (centered**2).sum() / divisor.clamp(min=1)


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    unbiased: bool = True,
) -> torch.Tensor:
    """Normalise ``x`` to zero mean and unit variance over the valid positions.

        whiten(x) = (x - mean) / sqrt(var + eps)            (shift_mean=True)
        whiten(x) = (x - mean) / sqrt(var + eps) + mean     (shift_mean=False: rescale only)

    ``mean`` and ``var`` are ``masked_mean`` and ``masked_var(unbiased=unbiased)`` over every valid
    position of the batch; ``eps`` is added to the variance, inside the square root (as TRL's
    ``masked_whiten``).

    Args:
        x: any shape.
        mask: same shape as ``x``; bool or 0/1.
        shift_mean: subtract the mean (True) or keep it (False).
        eps: added to the variance before the square root.
        unbiased: Bessel's correction in the variance.

    Returns:
        Same shape as ``x``; 0 at masked positions.
    """
    check_same_shape(x=x, mask=mask)
    mean = masked_mean(x, mask)
    centered = _zero_masked(x - mean, mask)
    whitened = centered * torch.rsqrt(masked_var(x, mask, unbiased=unbiased) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_masked(whitened, mask)


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position where ``mask`` is 1 in each row of a [B, T] mask (0 for an empty row)."""
    positions = torch.arange(1, mask.shape[-1] + 1, device=mask.device)  # [T]: 1..T, 0 where masked below
    return (mask.bool() * positions).argmax(dim=-1)  # [B]
