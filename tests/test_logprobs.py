"""gather_logprobs, entropy_from_logits and chunked_logprobs against a naive float64 log_softmax.

Values and gradients (hidden, weight, bias, logits) must match to 1e-10 in float64, with ragged masks,
temperature != 1 and chunk sizes that do not divide the number of positions; bf16 must stay close to
float32.
"""

import math

import pytest
import torch

from rlcore import chunked_logprobs, chunked_logprobs_and_entropy, entropy_from_logits, gather_logprobs

B, T, H, V = 3, 7, 8, 13  # N = 21 positions: chunk sizes 4 and 5 do not divide it


def _inputs(dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=generator, dtype=dtype)
    weight = torch.randn(V, H, generator=generator, dtype=dtype)
    bias = torch.randn(V, generator=generator, dtype=dtype)
    tokens = torch.randint(0, V, (B, T), generator=generator)
    mask = torch.ones(B, T)
    mask[0, 5:] = 0  # right padding
    mask[1, :2] = 0  # left padding
    mask[2, 3] = 0  # a hole
    grad_out = torch.randn(B, T, generator=generator, dtype=dtype)
    return hidden, weight, bias, tokens, mask, grad_out


def _naive_logprobs(logits, tokens, temperature=1.0):
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _grads(output, inputs, mask, grad_out):
    """Gradients of the masked weighted sum sum_bt m g logp: only valid positions send gradient."""
    return torch.autograd.grad((output * mask * grad_out).sum(), inputs)


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_logprobs_matches_naive_float64(chunk_size, temperature, with_bias):
    hidden, weight, bias, tokens, mask, grad_out = _inputs()
    inputs = [hidden.requires_grad_(), weight.requires_grad_()] + ([bias.requires_grad_()] if with_bias else [])
    logprobs = chunked_logprobs(
        hidden, weight, tokens, chunk_size=chunk_size, temperature=temperature, bias=bias if with_bias else None
    )
    logits = hidden @ weight.T + (bias if with_bias else 0.0)
    expected = _naive_logprobs(logits, tokens, temperature)
    assert logprobs.shape == (B, T) and logprobs.dtype == torch.float64
    torch.testing.assert_close(logprobs, expected, rtol=0, atol=1e-10)
    for got, want in zip(_grads(logprobs, inputs, mask, grad_out), _grads(expected, inputs, mask, grad_out)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_statistics_equal_the_full_logits_float64(chunk_size, temperature):
    """The entropy and argmax read from the forward's chunks equal those of the full logits; the log-probs and
    their gradients equal chunked_logprobs' (the statistics are detached)."""
    hidden, weight, bias, tokens, mask, grad_out = _inputs()
    inputs = [hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()]
    logprobs, entropy, argmax = chunked_logprobs_and_entropy(hidden, weight, tokens, chunk_size, temperature, bias)
    expected = chunked_logprobs(hidden, weight, tokens, chunk_size, temperature, bias)
    logits = (hidden @ weight.T + bias).detach()
    torch.testing.assert_close(logprobs, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(entropy, entropy_from_logits(logits, temperature), rtol=0, atol=1e-10)
    assert torch.equal(argmax, logits.argmax(-1)) and not entropy.requires_grad and not argmax.requires_grad
    for got, want in zip(_grads(logprobs, inputs, mask, grad_out), _grads(expected, inputs, mask, grad_out)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_chunked_entropy_by_hand():
    """Logits (0, 0, log 2): p = (1/4, 1/4, 1/2), H = 2 * (1/4) log 4 + (1/2) log 2 = 1.5 log 2; argmax 2."""
    hidden, weight = torch.tensor([[1.0]], dtype=torch.float64), torch.tensor([[0.0], [0.0], [math.log(2)]])
    _, entropy, argmax = chunked_logprobs_and_entropy(hidden, weight.double(), torch.tensor([0]))
    torch.testing.assert_close(entropy, torch.tensor([1.5 * math.log(2)], dtype=torch.float64))
    assert argmax.tolist() == [2]


def test_chunked_logprobs_gradcheck():
    hidden, weight, bias, tokens, _, _ = _inputs()
    hidden, weight, bias, tokens = hidden[:2, :3], weight[:5], bias[:5], tokens[:2, :3] % 5
    inputs = (hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_())

    def function(hidden, weight, bias):
        return chunked_logprobs(hidden, weight, tokens, chunk_size=4, temperature=1.3, bias=bias)

    assert torch.autograd.gradcheck(function, inputs)


def test_chunked_logprobs_only_requested_gradients():
    hidden, weight, _, tokens, _, _ = _inputs()
    hidden.requires_grad_()  # a frozen LM head: only the hidden states need a gradient
    chunked_logprobs(hidden, weight, tokens, chunk_size=4).sum().backward()
    expected = torch.autograd.grad(_naive_logprobs(hidden @ weight.T, tokens).sum(), hidden)[0]
    torch.testing.assert_close(hidden.grad, expected, rtol=0, atol=1e-10)
    assert weight.grad is None


@pytest.mark.parametrize("temperature", [1.0, 1.5])
@pytest.mark.parametrize("block_rows", [None, 2, 3])
def test_gather_logprobs_matches_naive_float64(temperature, block_rows):
    hidden, weight, _, tokens, mask, grad_out = _inputs()
    full_logits = (hidden @ weight.T).requires_grad_()  # [B, T, V]
    # The usual call: logits shifted against the next tokens, a non-contiguous view.
    logits, targets = full_logits[:, :-1], tokens[:, 1:]
    logprobs = gather_logprobs(logits, targets, temperature=temperature, block_rows=block_rows)
    expected = _naive_logprobs(logits, targets, temperature)
    torch.testing.assert_close(logprobs, expected, rtol=0, atol=1e-10)
    got = _grads(logprobs, [full_logits], mask[:, 1:], grad_out[:, 1:])[0]
    want = _grads(expected, [full_logits], mask[:, 1:], grad_out[:, 1:])[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_gather_logprobs_gradcheck():
    logits = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    tokens = torch.tensor([[0, 4, 2], [1, 1, 3]])
    assert torch.autograd.gradcheck(lambda x: gather_logprobs(x, tokens, temperature=0.8, block_rows=2), (logits,))


def test_bf16_close_to_float32():
    hidden, weight, _, tokens, _, _ = _inputs(torch.float32)
    logits = hidden @ weight.T  # [B, T, V]
    reference = gather_logprobs(logits, tokens)
    from_bf16 = gather_logprobs(logits.bfloat16(), tokens)
    assert from_bf16.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: logits of size ~10 are off by up to ~0.03 each.
    torch.testing.assert_close(from_bf16, reference, rtol=0, atol=0.1)
    bf16_hidden = hidden.bfloat16().requires_grad_()
    bf16_weight = weight.bfloat16().requires_grad_()
    chunked = chunked_logprobs(bf16_hidden, bf16_weight, tokens, chunk_size=4)
    torch.testing.assert_close(chunked, reference, rtol=0, atol=0.2)
    chunked.sum().backward()
    float_weight = weight.clone().requires_grad_()
    chunked_logprobs(hidden, float_weight, tokens, chunk_size=4).sum().backward()
    assert bf16_weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(bf16_weight.grad.float(), float_weight.grad, rtol=0.05, atol=0.05)


def test_entropy_matches_naive():
    logits = torch.randn(B, T, V, dtype=torch.float64)
    for temperature, block_rows in [(1.0, None), (0.6, 4)]:
        probs = torch.softmax(logits / temperature, dim=-1)
        expected = -(probs * probs.log()).sum(-1)
        got = entropy_from_logits(logits, temperature=temperature, block_rows=block_rows)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    # Hand-derived: uniform logits over V tokens have entropy log V.
    uniform = entropy_from_logits(torch.zeros(1, 2, V))
    torch.testing.assert_close(uniform, torch.full((1, 2), float(torch.log(torch.tensor(V)))))


def test_inputs_not_modified():
    hidden, weight, bias, tokens, _, _ = _inputs()
    logits = hidden @ weight.T
    copies = [x.clone() for x in (hidden, weight, bias, tokens, logits)]
    chunked_logprobs(hidden, weight, tokens, chunk_size=4, temperature=0.5, bias=bias)
    gather_logprobs(logits, tokens, temperature=0.5)
    entropy_from_logits(logits, temperature=0.5)
    for original, copy in zip((hidden, weight, bias, tokens, logits), copies):
        assert torch.equal(original, copy)


def test_errors_name_the_problem():
    hidden, weight, _, tokens, _, _ = _inputs()
    with pytest.raises(ValueError, match=r"tokens must have shape \(3, 7\), but tokens has shape \(3, 6\)"):
        chunked_logprobs(hidden, weight, tokens[:, 1:])
    with pytest.raises(ValueError, match=r"weight must be \[V, H=8\]"):
        chunked_logprobs(hidden, weight[:, :4], tokens)
    with pytest.raises(ValueError, match="share a dtype"):
        chunked_logprobs(hidden, weight.float(), tokens)
    with pytest.raises(ValueError, match=r"logits has shape \(3, 7, 13\) so tokens must have shape \(3, 7\)"):
        gather_logprobs(hidden @ weight.T, tokens[:1])
    with pytest.raises(ValueError, match="integer ids"):
        gather_logprobs(hidden @ weight.T, tokens.double())
