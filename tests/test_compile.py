"""Eager against torch.compile: the losses and chunked_logprobs give the same values and gradients.

Always run on CUDA; on CPU only with RLCORE_TEST_COMPILE=1 (compiling takes a while on small machines).
"""

import os

import pytest
import torch

from rlcore import (
    AGGREGATION_MODES,
    DPO_LOSS_TYPES,
    chunked_logprobs,
    dpo_loss,
    gae,
    gather_logprobs,
    group_advantages,
    policy_loss,
    reward_pairwise_loss,
    sft_loss,
    value_loss,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = [
    pytest.mark.compile,
    pytest.mark.skipif(
        DEVICE == "cpu" and os.environ.get("RLCORE_TEST_COMPILE") != "1",
        reason="compile tests run on CUDA, or on CPU with RLCORE_TEST_COMPILE=1",
    ),
]


@pytest.fixture(autouse=True)
def _fresh_compile_cache():
    torch._dynamo.reset()


def _assert_same(eager, compiled):
    """Same nested structure of tensors, equal to rounding (float32: 1e-5; bf16: torch's bf16 defaults)."""
    if isinstance(eager, torch.Tensor):
        tolerance = {} if eager.dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
        torch.testing.assert_close(compiled, eager, **tolerance)
    elif eager is None:  # an input that gets no gradient (e.g. old_logp)
        assert compiled is None
    elif isinstance(eager, dict):
        assert eager.keys() == compiled.keys()
        for key in eager:
            _assert_same(eager[key], compiled[key])
    else:
        for a, b in zip(eager, compiled, strict=True):
            _assert_same(a, b)


def _check(function, *inputs, **kwargs):
    """Outputs and input gradients of ``function`` eager and compiled (the first output is backpropagated)."""
    results = []
    for fn in (function, torch.compile(function, fullgraph=True)):
        leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
        output = fn(*leaves, **kwargs)
        loss = output[0] if isinstance(output, tuple) else output
        loss.float().sum().backward()
        results.append((output, [leaf.grad for leaf in leaves if leaf.requires_grad]))
    _assert_same(*results)


def _batch(seed=0, batch=4, length=6):
    generator = torch.Generator().manual_seed(seed)
    logp = -torch.rand(batch, length, generator=generator) * 3
    old_logp = logp + 0.3 * torch.randn(batch, length, generator=generator)
    mask = torch.rand(batch, length, generator=generator) < 0.8
    mask[:, 0] = True
    advantages = torch.randn(batch, generator=generator)
    return [x.to(DEVICE) for x in (logp, old_logp, advantages, mask)]


@pytest.mark.parametrize("agg", AGGREGATION_MODES)
def test_policy_loss(agg):
    logp, old_logp, advantages, mask = _batch()
    _check(policy_loss, logp, old_logp, advantages, mask, clip_high=0.28, agg=agg, dual_clip=3.0)


def test_value_loss():
    values, old_values, returns, mask = _batch(1)
    _check(value_loss, values, old_values, returns.unsqueeze(-1).expand_as(values), mask)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_loss(loss_type):
    pairs = [x.sum(-1) for x in _batch(2)[:2] + _batch(3)[:2]]
    lengths = torch.tensor([1, 3, 2, 6], device=DEVICE)
    extra = {"chosen_lengths": lengths, "rejected_lengths": lengths.flip(0), "chosen_nll": pairs[0].mean().neg()}
    # sft alone reads only chosen_nll (not an input leaf here): pair it with sigmoid so the loss has a gradient
    loss_types = ["sft", "sigmoid"] if loss_type == "sft" else loss_type
    _check(dpo_loss, *pairs, beta=0.1, loss_type=loss_types, label_smoothing=0.1, **extra)


@pytest.mark.parametrize("divergence", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_dpo_loss_f_divergence_wpo_mpo(divergence):
    pairs = [x.sum(-1) for x in _batch(4)[:2] + _batch(5)[:2]]
    weights = {"chosen_wpo_logweights": pairs[0] / 6, "rejected_wpo_logweights": pairs[1] / 6}
    _check(
        dpo_loss, *pairs, loss_type=["sigmoid", "hinge"], loss_weights=[0.7, 0.3], f_divergence=divergence, **weights
    )


def test_reward_and_advantages():
    logp, old_logp, advantages, mask = _batch(4)
    _check(reward_pairwise_loss, logp[:, 0], old_logp[:, 0], margin=advantages, center_coef=0.01)
    eager, compiled = gae(logp, old_logp, mask), torch.compile(gae, fullgraph=True)(logp, old_logp, mask)
    _assert_same(eager, compiled)
    _assert_same(group_advantages(logp[:, 0], 2), torch.compile(group_advantages, fullgraph=True)(logp[:, 0], 2))


def test_sft_loss_and_gather_logprobs():
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 5, 11, generator=generator).to(DEVICE)
    labels = torch.randint(0, 11, (3, 5), generator=generator).to(DEVICE)
    _check(sft_loss, logits, labels, labels > 2)
    _check(gather_logprobs, logits, labels, temperature=0.7, block_rows=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_logprobs(dtype):
    generator = torch.Generator().manual_seed(6)
    hidden = torch.randn(2, 9, 16, generator=generator).to(DEVICE, dtype)
    weight = torch.randn(37, 16, generator=generator).to(DEVICE, dtype)
    tokens = torch.randint(0, 37, (2, 9), generator=generator).to(DEVICE)
    _check(chunked_logprobs, hidden, weight, tokens, chunk_size=5, temperature=0.9)
