"""The native decode step (rlcore.decode) against transformers: generate, the model's forward path in
rlcore.rollout, and a teacher-forced forward pass.

Mock models: rlcore's tiny Llama (4 query heads over 2 key/value heads, tied embeddings), a Llama with 4
query heads per key/value head, untied head, MLP biases and linear rope scaling, and a small Qwen2 (q/k/v
biases). Biases and norm weights are randomised (transformers initialises them to 0 and 1), so a step that
dropped or misplaced them would decode different tokens.
"""

import copy
import os

import pytest
import torch
from helpers import PAD, VOCAB, ragged_prompts, small_qwen2_config
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2ForCausalLM

from rlcore import gather_logprobs
from rlcore.decode import LlamaDecodeStep, _attend, native_decode_unsupported, prompt_attention_mask
from rlcore.lora import apply_lora
from rlcore.rollout import _prefill, generate
from rlcore.toy import tiny_model


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random biases and norm weights (around 1), in place; eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith("bias"):
                parameter.copy_(0.5 * noise)
            elif "norm" in name:
                parameter.copy_(1 + 0.3 * noise)
    return model.eval()


def llama_wide_groups() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        mlp_bias=True,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    )
    return randomised(LlamaForCausalLM(config))


def small_qwen2() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return randomised(Qwen2ForCausalLM(small_qwen2_config()))


MODELS = {
    "tiny-llama": lambda: randomised(tiny_model(seed=0)),
    "llama-4-heads-per-kv-rope-scaled": llama_wide_groups,
    "qwen2-qkv-bias": small_qwen2,
}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return MODELS[request.param]()


def sample(model, native_step, seed=0, **kwargs):
    ids, mask = ragged_prompts(batch=6)
    settings = dict(
        max_new_tokens=14, eos_token_ids=[], pad_token_id=PAD, generator=torch.Generator().manual_seed(seed)
    )
    return generate(model, ids, mask, native_step=native_step, **{**settings, **kwargs})


def test_the_mock_models_are_supported(model):
    assert native_decode_unsupported(model) is None


def test_greedy_equals_transformers_generate_and_the_forward_path(model):
    ids, mask = ragged_prompts(batch=6)
    native = sample(model, True, temperature=0.0, num_samples=2)
    forward_path = sample(model, False, temperature=0.0, num_samples=2)
    expected = model.generate(
        ids, attention_mask=mask, max_new_tokens=14, do_sample=False, eos_token_id=None, pad_token_id=PAD
    )
    assert torch.equal(native.sequences, expected.repeat_interleave(2, dim=0))
    assert torch.equal(native.sequences, forward_path.sequences)
    torch.testing.assert_close(native.logprobs, forward_path.logprobs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_teacher_forced_forward(model, temperature):
    rollout = sample(model, True, temperature=temperature, num_samples=2)
    mask = rollout.attention_mask
    with torch.no_grad():
        logits = model(
            input_ids=rollout.sequences, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)
        ).logits
    prompt_len = rollout.prompt_mask.shape[1]
    expected = gather_logprobs(
        logits[:, prompt_len - 1 : -1], rollout.completion_ids, temperature=temperature
    )  # [N, T]
    torch.testing.assert_close(rollout.logprobs, expected, rtol=0, atol=1e-5)


def test_same_seed_same_samples_as_the_forward_path(model):
    settings = dict(temperature=0.9, top_k=30, top_p=0.95, num_samples=3, seed=7)
    native, forward_path = sample(model, True, **settings), sample(model, False, **settings)
    assert torch.equal(native.completion_ids, forward_path.completion_ids)
    torch.testing.assert_close(native.logprobs, forward_path.logprobs, rtol=0, atol=1e-5)


def test_stops_at_eos_like_the_forward_path():
    model = randomised(tiny_model(seed=0))
    common = sample(model, False, temperature=0.0).completion_ids[:, 3].tolist()  # a token some rows emit
    settings = dict(temperature=0.0, eos_token_ids=common[:2], max_new_tokens=20)
    native, forward_path = sample(model, True, **settings), sample(model, False, **settings)
    assert native.truncated[:2].logical_not().all()  # rows 0 and 1 stopped by step 3
    for field in ("sequences", "completion_mask", "truncated"):
        assert torch.equal(getattr(native, field), getattr(forward_path, field)), field


def test_lora_wrapped_model_falls_back_to_its_forward():
    model = apply_lora(randomised(tiny_model(seed=0)), r=4, targets=["q_proj", "v_proj", "down_proj"])
    with torch.no_grad():  # B starts at 0: make the adapters change the outputs
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    reason = native_decode_unsupported(model)
    assert reason is not None and "LoRALinear" in reason and "q_proj" in reason
    ids, mask = ragged_prompts(batch=6)
    rollout = sample(model, None, temperature=0.0)  # auto: the forward path
    expected = model.generate(
        ids, attention_mask=mask, max_new_tokens=14, do_sample=False, eos_token_id=None, pad_token_id=PAD
    )
    assert torch.equal(rollout.sequences, expected)
    base_model_tokens = sample(randomised(tiny_model(seed=0)), True, temperature=0.0).completion_ids
    assert not torch.equal(rollout.completion_ids, base_model_tokens)  # the adapters were used
    with pytest.raises(ValueError, match="native_step=True.*LoRALinear"):
        sample(model, True)


def test_unsupported_models_and_settings_are_named():
    model = tiny_model(seed=0)
    handle = model.model.layers[1].mlp.register_forward_hook(lambda *args: None)
    assert "model.layers.1.mlp has forward hooks" in native_decode_unsupported(model)
    handle.remove()
    dynamic = tiny_model(seed=0, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    assert "depend on the sequence length" in native_decode_unsupported(dynamic)
    with pytest.raises(ValueError, match="native_step=True.*static_cache=False"):
        sample(model, True, static_cache=True)


def test_bfloat16_model_decodes_like_its_forward():
    """The step keeps transformers' dtype rules (RMSNorm in float32, rotary tables cast to the model dtype),
    so a bfloat16 model gives the forward path's tokens and log-probs."""
    model = randomised(tiny_model(seed=0)).to(torch.bfloat16)
    native, forward_path = (
        sample(model, True, temperature=0.0, num_samples=2),
        sample(model, False, temperature=0.0, num_samples=2),
    )
    assert torch.equal(native.sequences, forward_path.sequences)
    torch.testing.assert_close(native.logprobs, forward_path.logprobs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_norm_is_transformers_bit_for_bit_and_matmuls_within_rounding(dtype):
    """The step's RMSNorm (scale fused into the kernel in float32) and its matmuls against contiguous
    transposed weights give exactly transformers' LlamaRMSNorm; the matmuls give F.linear's values within
    float rounding (the two lay out the same sum differently)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from rlcore.decode import _linear, _operand, _rms_norm

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, generator=generator).to(dtype)
    norm = LlamaRMSNorm(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(64, generator=generator))
        assert torch.equal(_rms_norm(x, norm.weight, 1e-5), norm(x))
        linear = torch.nn.Linear(64, 48).to(dtype)
        tolerance = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(_linear(x, _operand(linear.weight), linear.bias), linear(x), **tolerance)
        torch.testing.assert_close(_linear(x, _operand(linear.weight), None), x @ linear.weight.T, **tolerance)


@pytest.mark.parametrize("slots", [7, 23])  # the softmax written out (rows under 16 floats), torch's softmax
def test_cpu_attention_of_the_step_equals_sdpa(slots):
    """The float32 CPU step attends with two matmuls and a softmax: sdpa's values within rounding, masked
    slots (-inf) left out, for grouped queries (2 query heads per key/value head)."""
    generator = torch.Generator().manual_seed(0)
    query, keys, values = (
        torch.randn(shape, generator=generator) for shape in ((5, 2, 2, 8), (5, 2, slots, 8), (5, 2, slots, 8))
    )
    mask = torch.zeros(5, 1, 1, slots)
    mask[1, ..., :3] = float("-inf")  # left padding of row 1
    expected = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=8**-0.5)
    torch.testing.assert_close(_attend(query, keys, values, mask, 8**-0.5), expected, rtol=1e-5, atol=1e-6)
    shifted = keys.clone()
    shifted[1, :, :3] += 100.0  # row 1's masked slots change nothing
    torch.testing.assert_close(
        _attend(query, shifted, values, mask, 8**-0.5), _attend(query, keys, values, mask, 8**-0.5)
    )


def test_prompt_attention_mask_by_hand():
    """Prompt [pad, a, b]: a sees a; b sees a and b; the padding query sees only itself (a finite row)."""
    inf = float("-inf")
    expected = torch.tensor([[0.0, inf, inf], [inf, 0.0, inf], [inf, 0.0, 0.0]])
    assert torch.equal(prompt_attention_mask(torch.tensor([[0, 1, 1]]), torch.float32), expected[None, None])


def test_native_prefill_equals_the_model_forward(model):
    """``LlamaDecodeStep.prefill`` against transformers' forward with a ``DynamicCache`` (float64, left-padded
    prompts): the next-token logits and every real prompt slot of every layer's keys and values, the latter
    copied into each prompt's G = 3 rows."""
    model = copy.deepcopy(model).double()
    ids, mask = ragged_prompts(batch=4)
    group, slots = 3, ids.shape[1] + 5
    with torch.inference_mode():
        expected_logits, cache = _prefill(model, ids, mask)
        attention = model.model.layers[0].self_attn
        shape = (4 * group, model.config.num_key_value_heads, slots, attention.head_dim)
        step = LlamaDecodeStep(model, *([torch.zeros(shape, dtype=torch.float64) for _ in cache.layers] for _ in "kv"))
        logits = step.prefill(ids, mask)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-10)
    real = mask.bool().repeat_interleave(group, dim=0)  # [N, P]
    for layer, keys, values in zip(cache.layers, step.keys, step.values):
        for ours, theirs in ((keys, layer.keys), (values, layer.values)):
            ours, theirs = ours[:, :, : ids.shape[1]], theirs.repeat_interleave(group, dim=0)  # [N, K, P, D]
            torch.testing.assert_close(ours.transpose(1, 2)[real], theirs.transpose(1, 2)[real], rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------------------------------
# The compiled step (generate(compile=True) on the growing cache)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_by_reductions_equals_sdpa_and_a_loop(dtype):
    """The compiled step's attention (two broadcast sums) against sdpa and a per-row, per-head loop of
    softmax(q . k_l * scale + mask_l) weights over the slots; two slots per row masked with -inf."""
    from rlcore.decode import _attend_by_reductions

    generator = torch.Generator().manual_seed(0)
    rows, kv_heads, group, slots, head_dim, scale = 3, 2, 2, 7, 8, 0.3
    query = torch.randn(rows, kv_heads, group, head_dim, generator=generator, dtype=dtype)
    keys = torch.randn(rows, kv_heads, slots, head_dim, generator=generator, dtype=dtype)
    values = torch.randn(rows, kv_heads, slots, head_dim, generator=generator, dtype=dtype)
    mask = torch.zeros(rows, 1, 1, slots, dtype=dtype)
    mask[0, ..., :2] = mask[2, ..., 3:5] = -torch.inf
    result = _attend_by_reductions(query, keys, values, attn_mask=mask, scale=scale)
    expected = torch.empty_like(result)
    for n in range(rows):
        for k in range(kv_heads):
            for g in range(group):
                weights = torch.softmax((keys[n, k] @ query[n, k, g]) * scale + mask[n, 0, 0], dim=0)  # [L]
                expected[n, k, g] = weights @ values[n, k]
    sdpa = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale)
    tolerance = dict(rtol=0, atol=1e-6) if dtype == torch.float32 else dict(rtol=0, atol=1e-12)
    torch.testing.assert_close(result, expected, **tolerance)
    torch.testing.assert_close(sdpa, expected, **tolerance)


def test_compile_plumbing_with_the_compiled_form_run_eager(monkeypatch):
    """generate(compile=True) on the growing cache runs the step's compiled form (attention by reductions,
    dynamic cache length); here that form runs eager, so this checks its math and plumbing without the
    compilation (tests/test_decode.py::test_compiled_step_equals_eager compiles)."""
    import rlcore.decode as decode

    monkeypatch.setattr(decode, "compiled_decode_token", lambda: decode._decode_token_by_reductions)
    model = randomised(tiny_model(seed=0))
    for settings in (dict(temperature=0.0), dict(temperature=0.9, top_k=30, seed=3)):
        eager, compiled_form = sample(model, True, **settings), sample(model, True, compile=True, **settings)
        assert torch.equal(eager.completion_ids, compiled_form.completion_ids)
        torch.testing.assert_close(eager.logprobs, compiled_form.logprobs, rtol=0, atol=1e-5)


def test_compile_on_the_growing_cache_needs_the_native_step():
    model = tiny_model(seed=0)
    with pytest.raises(ValueError, match="compiles the native decode step, but native_step=False; pass static_cache"):
        sample(model, False, compile=True)
    lora = apply_lora(tiny_model(seed=0), r=2, alpha=4)
    with pytest.raises(ValueError, match="compiles the native decode step, but .* not a plain nn.Linear"):
        sample(lora, None, compile=True)


@pytest.mark.slow
@pytest.mark.compile
@pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("RLCORE_TEST_COMPILE") != "1",
    reason="compile tests run on CUDA, or on CPU with RLCORE_TEST_COMPILE=1",
)
def test_compiled_step_equals_eager():
    """One compilation (about a minute on 2 busy CPU cores) serves both calls: the second has longer
    prompts and more new tokens (other cache lengths), and recompiling there is an error. Greedy and
    seeded sampling give the eager step's tokens; log-probs agree within float rounding."""
    torch._dynamo.reset()
    model = randomised(tiny_model(seed=0))
    eager, compiled = sample(model, True, temperature=0.0), sample(model, True, temperature=0.0, compile=True)
    assert torch.equal(eager.completion_ids, compiled.completion_ids)
    torch.testing.assert_close(eager.logprobs, compiled.logprobs, rtol=0, atol=1e-5)
    ids, mask = ragged_prompts(batch=6, length=13, seed=1)
    settings = dict(max_new_tokens=20, eos_token_ids=[], pad_token_id=PAD, temperature=0.9, top_p=0.95)
    runs = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for compile in (False, True):
            generator = torch.Generator().manual_seed(5)
            runs.append(generate(model, ids, mask, generator=generator, compile=compile, **settings))
    assert torch.equal(runs[0].completion_ids, runs[1].completion_ids)
    torch.testing.assert_close(runs[0].logprobs, runs[1].logprobs, rtol=0, atol=1e-5)
