"""The rollout engine against transformers' generate and a teacher-forced forward pass.

Mock models: rlcore's tiny Llama (the embedded default) and a small random Qwen2 built from a config, so
both the sdpa fast path (a ready 4-D mask) and the 2-D mask path (eager attention) are exercised.
"""

import math
import os
import warnings

import pytest
import torch
from helpers import PAD, VOCAB, ragged_prompts, small_qwen2_config
from torch import nn
from transformers import Qwen2ForCausalLM
from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from rlcore import gather_logprobs
from rlcore.rollout import Rollout, filter_logits, generate, release_static_caches, sample_tokens
from rlcore.toy import tiny_model


def small_qwen2(attn_implementation: str = "sdpa") -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(small_qwen2_config(attn_implementation=attn_implementation)).eval()


MODELS = {
    "llama": lambda: tiny_model(seed=0).eval(),
    "qwen2": small_qwen2,
    "qwen2-eager-attention": lambda: small_qwen2("eager"),
}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return MODELS[request.param]()


@pytest.fixture(scope="module")
def llama():
    return tiny_model(seed=0).eval()


def sample(model, ids, mask, seed=0, **kwargs) -> Rollout:
    settings = dict(
        max_new_tokens=12, eos_token_ids=[], pad_token_id=PAD, generator=torch.Generator().manual_seed(seed)
    )
    return generate(model, ids, mask, **{**settings, **kwargs})


def teacher_forced_logits(model, rollout: Rollout) -> torch.Tensor:
    """Logits that score each completion token, [N, T, V], from one forward pass over the sequences."""
    mask = rollout.attention_mask
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=rollout.sequences, attention_mask=mask, position_ids=position_ids).logits
    prompt_len = rollout.prompt_mask.shape[1]
    return logits[:, prompt_len - 1 : -1].float()  # position t scores token t + 1


# ----------------------------------------------------------------------------------------------------
# Against transformers' generate
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("static_cache", [False, True], ids=["growing-cache", "static-cache"])
def test_greedy_equals_transformers_generate_on_ragged_prompts(model, static_cache):
    ids, mask = ragged_prompts()
    rollout = sample(model, ids, mask, temperature=0.0, max_new_tokens=15, static_cache=static_cache)
    expected = model.generate(
        ids, attention_mask=mask, max_new_tokens=15, do_sample=False, eos_token_id=None, pad_token_id=PAD
    )
    assert torch.equal(rollout.sequences, expected)
    assert rollout.completion_mask.all() and rollout.truncated.all()


def test_top_k_1_is_greedy_with_log_prob_0(llama):
    ids, mask = ragged_prompts()
    greedy = sample(llama, ids, mask, temperature=0.0)
    top1 = sample(llama, ids, mask, temperature=1.3, top_k=1)
    assert torch.equal(top1.completion_ids, greedy.completion_ids)
    # top-1 renormalises to a point mass: log 1 = 0. Greedy reports the model's own log-probs instead.
    assert torch.equal(top1.logprobs, torch.zeros_like(top1.logprobs))
    assert (greedy.logprobs < 0).all()


# ----------------------------------------------------------------------------------------------------
# Log-probs of the distribution actually sampled from
# ----------------------------------------------------------------------------------------------------


SAMPLING = {
    "greedy": dict(temperature=0.0),
    "t1": dict(temperature=1.0),
    "t0.7": dict(temperature=0.7),
    "top_k": dict(temperature=0.7, top_k=5),
    "top_p": dict(temperature=1.0, top_p=0.6),
    "min_p": dict(temperature=1.0, min_p=0.5),
    "all_filters": dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05),
}


@pytest.mark.parametrize("settings", SAMPLING.values(), ids=SAMPLING.keys())
def test_logprobs_equal_teacher_forced_forward(model, settings):
    ids, mask = ragged_prompts()
    rollout = sample(model, ids, mask, num_samples=2, **settings)
    logits = teacher_forced_logits(model, rollout)  # [N, T, V]
    temperature = settings["temperature"]
    if temperature == 0.0 or not {"top_k", "top_p", "min_p"} & settings.keys():
        expected = gather_logprobs(logits, rollout.completion_ids, temperature=temperature or 1.0)
    else:  # the truncated, renormalised distribution
        filters = {name: value for name, value in settings.items() if name != "temperature"}
        filtered = filter_logits((logits / temperature).flatten(0, 1), **filters).view_as(logits)
        expected = gather_logprobs(filtered, rollout.completion_ids)
    assert rollout.logprobs.dtype == torch.float32
    expected = torch.where(rollout.completion_mask.bool(), expected, 0.0)
    torch.testing.assert_close(rollout.logprobs, expected, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Seeds and the shared prefill
# ----------------------------------------------------------------------------------------------------


def test_fixed_seed_reproduces_samples_and_another_seed_does_not(llama):
    ids, mask = ragged_prompts()
    first, again, other = (sample(llama, ids, mask, seed=seed, max_new_tokens=20) for seed in (3, 3, 4))
    assert torch.equal(first.sequences, again.sequences) and torch.equal(first.logprobs, again.logprobs)
    assert not torch.equal(first.completion_ids, other.completion_ids)


@pytest.mark.parametrize("static_cache", [False, True], ids=["growing-cache", "static-cache"])
def test_shared_prefill_equals_prompts_repeated_g_times(llama, static_cache):
    ids, mask = ragged_prompts(batch=3)
    group_size = 4
    shared = sample(llama, ids, mask, num_samples=group_size, static_cache=static_cache)
    repeated = sample(
        llama, ids.repeat_interleave(group_size, 0), mask.repeat_interleave(group_size, 0), static_cache=static_cache
    )
    assert shared.sequences.shape[0] == 3 * group_size
    assert torch.equal(shared.sequences, repeated.sequences)
    assert torch.equal(shared.prompt_mask, mask.repeat_interleave(group_size, 0))
    torch.testing.assert_close(shared.logprobs, repeated.logprobs, rtol=0, atol=1e-5)
    # The G rows of one prompt are different samples, not copies.
    assert not torch.equal(shared.completion_ids[0], shared.completion_ids[1])


def test_static_cache_gives_the_same_samples_as_the_growing_cache(llama):
    ids, mask = ragged_prompts()
    growing = sample(llama, ids, mask, num_samples=2, max_new_tokens=20)
    static = sample(llama, ids, mask, num_samples=2, max_new_tokens=20, static_cache=True)
    assert torch.equal(growing.sequences, static.sequences)
    torch.testing.assert_close(growing.logprobs, static.logprobs, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Stopping
# ----------------------------------------------------------------------------------------------------


def test_rows_stop_at_their_first_eos_and_the_rest_are_truncated(llama):
    ids, mask = ragged_prompts(batch=6)
    free = sample(llama, ids, mask, max_new_tokens=10)  # no EOS at all: 10 tokens per row
    # Same seed, same draws: with a stop token the rows equal `free` up to their first stop token. Row 0's
    # fourth token is made the stop token, so row 0 stops within 4 tokens.
    stop_token = int(free.completion_ids[0, 3])
    stopped = sample(llama, ids, mask, max_new_tokens=10, eos_token_ids=[stop_token], stop_check_interval=2)
    for row in range(6):
        hits = (free.completion_ids[row] == stop_token).nonzero()
        length = int(hits[0]) + 1 if len(hits) else 10  # up to and including the EOS
        expected_mask = torch.arange(stopped.completion_ids.shape[1]) < length
        assert torch.equal(stopped.completion_mask[row], expected_mask.long())
        assert torch.equal(stopped.completion_ids[row, :length], free.completion_ids[row, :length])
        assert (stopped.completion_ids[row, length:] == PAD).all()
        assert (stopped.logprobs[row, length:] == 0).all()
        torch.testing.assert_close(stopped.logprobs[row, :length], free.logprobs[row, :length], rtol=0, atol=0)
        assert bool(stopped.truncated[row]) == (len(hits) == 0)
    assert stopped.truncated.any() and not stopped.truncated.all()  # both kinds of rows occur
    assert torch.equal(stopped.attention_mask, torch.cat([stopped.prompt_mask, stopped.completion_mask], dim=1))


@pytest.mark.parametrize("interval, decode_steps", [(4, 3), (None, 0)], ids=["every-4", "cpu-default-every-step"])
def test_decoding_ends_early_once_every_row_stopped(llama, interval, decode_steps):
    """Every token is an EOS: each row stops after one token. The loop notices at the first check, after
    `interval` sampled tokens (every token on CPU by default), not after max_new_tokens."""
    ids, mask = ragged_prompts()
    forward_calls = []
    hook = llama.register_forward_pre_hook(lambda module, args: forward_calls.append(1))
    try:
        rollout = sample(
            llama, ids, mask, max_new_tokens=50, eos_token_ids=list(range(VOCAB)), stop_check_interval=interval
        )
    finally:
        hook.remove()
    assert len(forward_calls) == 1 + decode_steps  # the prefill, then the steps before the first check
    assert rollout.completion_ids.shape == (5, 1)  # trimmed to the longest completion
    assert rollout.completion_mask.all() and not rollout.truncated.any()


# ----------------------------------------------------------------------------------------------------
# The caller's model
# ----------------------------------------------------------------------------------------------------


class LowRankAdapter(nn.Module):
    """LoRA-style wrapper: base(x) + B(A(dropout(x))), a plain module around an nn.Linear."""

    def __init__(self, base: nn.Linear, rank: int = 4, dropout: float = 0.5):
        super().__init__()
        self.base = base
        self.dropout = nn.Dropout(dropout)
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features) * 0.1)
        self.lora_B = nn.Parameter(torch.randn(base.out_features, rank) * 0.1)

    def forward(self, x):
        return self.base(x) + self.dropout(x) @ self.lora_A.T @ self.lora_B.T


def with_adapters(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    for layer in model.model.layers:
        layer.self_attn.q_proj = LowRankAdapter(layer.self_attn.q_proj)
        layer.self_attn.v_proj = LowRankAdapter(layer.self_attn.v_proj)
    return model


def test_wrapped_linear_layers_in_train_mode_sample_without_dropout():
    """Adapters with dropout 0.5 and attention dropout 0.5, model in train mode: sampling must see the
    dropout-free model, so greedy equals transformers' generate in eval mode and the log-probs equal an
    eval-mode teacher-forced pass."""
    model = with_adapters(tiny_model(seed=0, attention_dropout=0.5)).train()
    ids, mask = ragged_prompts()
    greedy = sample(model, ids, mask, temperature=0.0)
    sampled = sample(model, ids, mask, temperature=1.0, num_samples=2)
    model.eval()
    expected = model.generate(
        ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=PAD
    )
    assert torch.equal(greedy.sequences, expected)
    expected_logprobs = gather_logprobs(teacher_forced_logits(model, sampled), sampled.completion_ids)
    torch.testing.assert_close(sampled.logprobs, expected_logprobs * sampled.completion_mask, rtol=0, atol=1e-5)


def test_model_state_restored_and_no_grad_recorded():
    model = with_adapters(tiny_model(seed=0, attention_dropout=0.5)).train()
    model.model.layers[0].mlp.eval()
    model.model.embed_tokens.weight.requires_grad_(False)
    training_before = {name: module.training for name, module in model.named_modules()}
    requires_grad_before = {name: p.requires_grad for name, p in model.named_parameters()}
    config_before = model.config.to_dict()
    ids, mask = ragged_prompts()

    rollout = sample(model, ids, mask, num_samples=2)

    assert {name: module.training for name, module in model.named_modules()} == training_before
    assert {name: p.requires_grad for name, p in model.named_parameters()} == requires_grad_before
    assert model.config.to_dict() == config_before
    assert all(p.grad is None for p in model.parameters())
    for name, tensor in vars(rollout).items():
        assert not tensor.requires_grad and not tensor.is_inference(), name
    # The outputs feed the training forward pass: autograd works through them.
    model(input_ids=rollout.sequences, attention_mask=rollout.attention_mask).logits.sum().backward()
    assert model.model.layers[0].self_attn.q_proj.lora_A.grad is not None


def test_runs_inside_no_grad_and_inference_mode(llama):
    ids, mask = ragged_prompts()
    expected = sample(llama, ids, mask)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            assert torch.equal(sample(llama, ids, mask).sequences, expected.sequences)


STEPS = {
    "growing-cache": dict(static_cache=False),  # the native step where the model allows it
    "growing-cache-model-forward": dict(static_cache=False, native_step=False),
    "static-cache": dict(static_cache=True),
}


@pytest.mark.parametrize("settings", STEPS.values(), ids=STEPS.keys())
def test_no_deprecation_warnings(model, settings):
    """Every call into transformers uses its current API: sampling emits no FutureWarning or DeprecationWarning
    (e.g. transformers 5.24's "`past_key_values` is deprecated ... Use `cache` instead")."""
    ids, mask = ragged_prompts()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sample(model, ids, mask, num_samples=2, max_new_tokens=4, **settings)
    deprecated = (FutureWarning, DeprecationWarning)
    deprecations = [f"{w.category.__name__}: {w.message}" for w in caught if issubclass(w.category, deprecated)]
    assert deprecations == []


class PastKeyValuesForward(nn.Module):
    """A causal LM whose forward names its cache ``past_key_values`` only, as before transformers renamed it
    ``cache`` (its ``**kwargs``, if it had them, would swallow a ``cache=`` argument)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def get_input_embeddings(self) -> nn.Module:
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, attention_mask, position_ids, past_key_values, use_cache):
        return self.inner(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=past_key_values,
            use_cache=use_cache,
        )


@pytest.mark.parametrize("static_cache", [False, True], ids=["growing-cache", "static-cache"])
def test_a_forward_that_names_the_cache_past_key_values_gets_it_under_that_name(llama, static_cache):
    ids, mask = ragged_prompts()
    expected = sample(llama, ids, mask, num_samples=2, native_step=False, static_cache=static_cache)
    rollout = sample(PastKeyValuesForward(llama), ids, mask, num_samples=2, static_cache=static_cache)
    assert torch.equal(rollout.sequences, expected.sequences)
    # the wrapper has no logits_to_keep: its prefill multiplies every position by the LM head, not only the
    # last, and that matmul's shape may round the first token's log-probs differently (~5e-7 on some CPUs)
    torch.testing.assert_close(rollout.logprobs, expected.logprobs, rtol=0, atol=2e-6)


# ----------------------------------------------------------------------------------------------------
# Sampling functions
# ----------------------------------------------------------------------------------------------------


def test_filter_logits_by_hand():
    """p = [0.4, 0.3, 0.15, 0.1, 0.05] (logits = log p).
    top_k=2 keeps {0, 1}. top_p=0.8: the mass ranked above each token is [0, .4, .7, .85, .95], kept while
    < 0.8: {0, 1, 2}. min_p=0.3: keep p >= 0.3 * 0.4 = 0.12: {0, 1, 2}. min_p=0.5: p >= 0.2: {0, 1}.
    top_k=4 then top_p=0.8 (renormalised over 0.95: mass above = [0, .42, .74, .89]) keeps {0, 1, 2}."""
    logits = torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05]]).log()
    kept = lambda **kw: (filter_logits(logits, **kw) > -math.inf)[0].nonzero().flatten().tolist()  # noqa: E731
    assert kept(top_k=2) == [0, 1]
    assert kept(top_p=0.8) == [0, 1, 2]
    assert kept(min_p=0.3) == [0, 1, 2]
    assert kept(min_p=0.5) == [0, 1]
    assert kept(top_k=4, top_p=0.8) == [0, 1, 2]
    assert kept() == [0, 1, 2, 3, 4] and filter_logits(logits) is logits
    torch.testing.assert_close(filter_logits(logits, top_k=2)[0, :2], logits[0, :2])  # kept values unchanged


def test_filter_logits_matches_transformers_warpers():
    logits = torch.randn(64, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    original = logits.clone()
    for top_k, top_p, min_p in [(10, 1.0, 0.0), (0, 0.7, 0.0), (0, 1.0, 0.1), (30, 0.9, 0.05)]:
        expected = logits
        if top_k:
            expected = TopKLogitsWarper(top_k)(None, expected)
        if top_p < 1:
            expected = TopPLogitsWarper(top_p)(None, expected)
        if min_p:
            expected = MinPLogitsWarper(min_p)(None, expected)
        ours = filter_logits(logits, top_k=top_k, top_p=top_p, min_p=min_p)
        assert torch.equal(ours == -math.inf, expected == -math.inf), (top_k, top_p, min_p)
    assert torch.equal(logits, original)  # input not modified


def test_sample_tokens_frequencies_match_the_renormalised_distribution():
    """p = [0.5, 0.3, 0.15, 0.05] with top_k=3 samples from q = [0.5, 0.3, 0.15] / 0.95. With n = 40000
    draws each frequency is within 5 standard errors sqrt(q (1 - q) / n) <= 0.0025 of q."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 40_000
    tokens, logprobs = sample_tokens(probs.log().expand(n, -1), top_k=3, generator=torch.Generator().manual_seed(0))
    expected = torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95
    frequencies = torch.bincount(tokens, minlength=4).double() / n
    assert (frequencies - expected).abs().max() < 5 * 0.0025
    torch.testing.assert_close(logprobs, expected[tokens].log().float())


def test_sample_tokens_temperature_by_hand():
    """Logits [0, log 3] at temperature 0.5 become [0, 2 log 3]: q = [1, 9] / 10, so log q = log 0.1, log 0.9."""
    logits = torch.tensor([[0.0, math.log(3.0)]]).expand(20_000, -1)
    tokens, logprobs = sample_tokens(logits, temperature=0.5, generator=torch.Generator().manual_seed(0))
    assert abs(tokens.float().mean().item() - 0.9) < 5 * math.sqrt(0.09 / 20_000)
    torch.testing.assert_close(logprobs, torch.tensor([0.1, 0.9]).log()[tokens])


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda ids, mask: (ids, mask.flip(1)), "row 0 is not left-padded"),
        (lambda ids, mask: (ids, mask * 2), "0 and 1 only"),
        (lambda ids, mask: (ids + 200, mask), "outside \\[0, 101\\)"),
        (lambda ids, mask: (ids.float(), mask), "integer token ids"),
        (lambda ids, mask: (ids, mask[:, 1:]), "prompt_mask has shape"),
    ],
)
def test_bad_prompts_are_named(llama, change, message):
    ids, mask = change(*ragged_prompts())
    with pytest.raises(ValueError, match=message):
        sample(llama, ids, mask)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
        (dict(top_p=0.0), "top_p must be in"),
        (dict(temperature=-1.0), "temperature must be"),
        (dict(eos_token_ids=[500]), "eos_token_ids must hold integer ids"),
        (dict(compile=True, static_cache=False, native_step=False), "compile=True with the growing cache"),
    ],
)
def test_bad_settings_are_named(llama, settings, message):
    ids, mask = ragged_prompts()
    with pytest.raises(ValueError, match=message):
        sample(llama, ids, mask, **settings)


def test_sliding_window_only_when_it_covers_the_sequence():
    """A window of 32 is full attention for prompt (9) + 15 new tokens, but not for 9 + 40."""
    torch.manual_seed(0)
    config = small_qwen2_config(use_sliding_window=True, sliding_window=32, max_window_layers=0)
    model = Qwen2ForCausalLM(config).eval()
    ids, mask = ragged_prompts()
    rollout = sample(model, ids, mask, temperature=0.0, max_new_tokens=15)
    expected = model.generate(
        ids, attention_mask=mask, max_new_tokens=15, do_sample=False, eos_token_id=None, pad_token_id=PAD
    )
    assert torch.equal(rollout.sequences, expected)
    with pytest.raises(ValueError, match="layer 0 uses 'sliding_attention' attention \\(window 32\\)"):
        sample(model, ids, mask, max_new_tokens=40)


# ----------------------------------------------------------------------------------------------------
# Eager against compiled
# ----------------------------------------------------------------------------------------------------


@pytest.mark.compile
@pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("RLCORE_TEST_COMPILE") != "1",
    reason="compile tests run on CUDA, or on CPU with RLCORE_TEST_COMPILE=1",
)
def test_compiled_decode_step_equals_eager():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model(seed=0).to(device).eval()
    ids, mask = (tensor.to(device) for tensor in ragged_prompts())
    settings = dict(max_new_tokens=12, eos_token_ids=[], pad_token_id=PAD, num_samples=2, static_cache=True)
    seeded = lambda: torch.Generator(device).manual_seed(0)  # noqa: E731
    eager = generate(model, ids, mask, compile=False, generator=seeded(), **settings)
    for _ in range(2):  # the second call reuses the kept cache and the captured step
        compiled = generate(model, ids, mask, compile=True, generator=seeded(), **settings)
        assert torch.equal(eager.sequences, compiled.sequences)
        torch.testing.assert_close(eager.logprobs, compiled.logprobs, rtol=0, atol=1e-4)
    release_static_caches()
