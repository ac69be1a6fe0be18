"""LoRA / QLoRA: the equation, zero-init, merge, adapters off, PEFT file format both ways, export, nf4."""

import json
import math
import os

import bitsandbytes as bnb
import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
)

from rlcore.lora import (
    DEFAULT_TARGETS,
    LoRALinear,
    adapter_names,
    apply_lora,
    disable_adapters,
    export_merged,
    has_lora,
    load_adapter,
    load_adapters,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    prepare_model,
    quantize_4bit,
    read_adapter_heads,
    reference_context,
    save_adapter,
    save_adapters,
    unmerge_lora,
    use_adapter,
)
from rlcore.toy import tiny_model, tiny_tokenizer

peft = pytest.importorskip("peft")

VOCAB = 96


def qwen_model(seed: int = 0) -> Qwen2ForCausalLM:
    """A small random Qwen2 (q/k/v biases, tied embeddings), in eval mode, the same for the same seed."""
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(config).eval()


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))  # [B, T]


def train_steps(model: nn.Module, input_ids: torch.Tensor, steps: int = 3, lr: float = 1e-2) -> None:
    """A few AdamW steps on the language-modelling loss, so that every lora_B moves away from zero."""
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=lr)
    for _ in range(steps):
        model(input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@torch.no_grad()
def logits_of(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids).logits  # [B, T, V]


# ------------------------------------------------------------------------------------------------------
# The layer
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_linear_computes_the_equation(use_rslora):
    # h = W x + b + scaling * B A x, with scaling = alpha / r = 8 / 4 = 2, or alpha / sqrt(r) = 8 / 2 = 4.
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, r=4, alpha=8, use_rslora=use_rslora)
    assert layer.scaling == (4.0 if use_rslora else 2.0)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(4, 6))
        layer.lora_B.copy_(torch.randn(5, 4))
    x = torch.randn(3, 6)
    expected = x @ base.weight.T + base.bias + layer.scaling * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), layer.scaling * layer.lora_B @ layer.lora_A)


def test_lora_init_is_peft_init():
    # B = 0. A ~ kaiming_uniform(a=sqrt(5)): gain = sqrt(2 / (1 + a^2)) = sqrt(1/3), bound = gain *
    # sqrt(3 / fan_in) = 1 / sqrt(fan_in) = 1/16 for in = 256; uniform on [-1/16, 1/16] has std 1/(16 sqrt 3).
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(256, 32), r=64, alpha=16)
    assert layer.lora_A.shape == (64, 256) and layer.lora_B.shape == (32, 64)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    assert torch.all(layer.lora_B == 0)
    assert layer.lora_A.abs().max() <= 1 / 16
    assert abs(layer.lora_A.std().item() - 1 / (16 * math.sqrt(3))) < 0.002  # 16384 samples: std error ~ 0.0002


@pytest.mark.compile
def test_lora_linear_eager_matches_compiled():
    if not torch.cuda.is_available() and os.environ.get("RLCORE_TEST_COMPILE") != "1":
        pytest.skip("torch.compile checks run on CUDA, or on CPU with RLCORE_TEST_COMPILE=1")
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8), r=4, alpha=8)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(torch.compile(layer)(x), layer(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------
# apply_lora on a model
# ------------------------------------------------------------------------------------------------------


def test_zero_init_adapters_keep_logits_and_a_step_changes_only_adapters(input_ids):
    base_logits = logits_of(qwen_model(), input_ids)
    model = apply_lora(qwen_model(), r=4, alpha=8)
    assert torch.equal(logits_of(model, input_ids), base_logits)  # B = 0: the update is exactly zero

    wrapped = [name for name, module in model.named_modules() if isinstance(module, LoRALinear)]
    assert len(wrapped) == 2 * len(DEFAULT_TARGETS)  # 2 layers x 7 projections
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.adapters.default.lora_{ab}" for name in wrapped for ab in "AB"}
    # r (in + out) per layer: q 64+64, k 64+32, v 64+32, o 64+64, gate 64+128, up 64+128, down 128+64.
    assert sum(p.numel() for p in lora_parameters(model)) == 2 * 4 * (128 + 96 + 96 + 128 + 192 + 192 + 192)

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train_steps(model, input_ids, steps=1)
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            assert not torch.equal(p, before[name]), f"{name} did not move"
        elif not name.endswith("lora_A"):
            assert torch.equal(p, before[name]), f"frozen {name} changed"


def test_merge_unmerge_and_adapters_off(input_ids):
    base_logits = logits_of(qwen_model(), input_ids)
    model = apply_lora(qwen_model(), r=4, alpha=8)
    train_steps(model, input_ids)
    base_weight = model.model.layers[0].self_attn.q_proj.base.weight.detach().clone()
    lora_logits = logits_of(model, input_ids)
    assert (lora_logits - base_logits).abs().max() > 0.1  # the adapters do something

    with disable_adapters(model):
        assert torch.equal(logits_of(model, input_ids), base_logits)
    torch.testing.assert_close(logits_of(model, input_ids), lora_logits, rtol=0, atol=0)  # switched back on

    merge_lora(model)
    torch.testing.assert_close(logits_of(model, input_ids), lora_logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="merged"):
        with disable_adapters(model):
            pass
    unmerge_lora(model)
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.base.weight, base_weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits_of(model, input_ids), lora_logits, rtol=1e-5, atol=1e-5)


def test_reference_context(input_ids):
    base_logits = logits_of(qwen_model(), input_ids)
    model = apply_lora(qwen_model(), r=4, alpha=8)
    train_steps(model, input_ids)
    with reference_context(model) as reference:
        assert reference is model and not torch.is_grad_enabled()
        assert torch.equal(reference(input_ids).logits, base_logits)
    assert torch.is_grad_enabled()
    ref_model = qwen_model(seed=1)
    with reference_context(model, ref_model) as reference:
        assert reference is ref_model
    with pytest.raises(ValueError, match="no ref_model"):
        with reference_context(qwen_model()):
            pass


def test_targets_suffixes_regex_and_errors():
    model = apply_lora(qwen_model(), targets=["q_proj", "mlp.down_proj"])
    assert sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear)) == [
        "model.layers.0.mlp.down_proj",
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    model = apply_lora(qwen_model(), targets=r".*layers\.1\..*_proj")
    assert sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))[0] == "model.layers.1.mlp.down_proj"
    assert not isinstance(model.model.layers[0].self_attn.q_proj, LoRALinear)

    with pytest.raises(ValueError, match=r"'qproj'.*matched no nn.Linear.*model.layers.0.self_attn.q_proj"):
        apply_lora(qwen_model(), targets=["qproj"])
    with pytest.raises(ValueError, match="tied to.*embed_tokens"):
        apply_lora(qwen_model(), targets=["lm_head"])
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model)
    with pytest.raises(ValueError, match="r must be a positive integer"):
        apply_lora(qwen_model(), r=0)


def test_prepare_model_flags():
    model = qwen_model()
    assert prepare_model(model) is model and not has_lora(model)  # lora_r = 0: full fine-tuning
    assert all(p.requires_grad for p in model.parameters())

    model = prepare_model(qwen_model(), lora_r=2, lora_targets="q_proj, v_proj")  # the CLI form
    layer = model.model.layers[0].self_attn.q_proj
    assert (layer.r, layer.alpha, layer.scaling) == (2, 4, 2.0)  # alpha defaults to 2 r
    assert len(lora_parameters(model)) == 2 * 2 * 2

    with pytest.raises(ValueError, match="load_in_4bit=True needs LoRA adapters"):
        prepare_model(qwen_model(), load_in_4bit=True)
    with pytest.raises(ValueError, match="double_quant=True only applies with load_in_4bit"):
        prepare_model(qwen_model(), lora_r=4, double_quant=True)


# ------------------------------------------------------------------------------------------------------
# Files: PEFT's adapter format, merged export
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("targets", [None, r".*layers\.0\.self_attn\.(q|v)_proj"])
def test_saved_adapter_loads_in_peft_and_back(tmp_path, input_ids, targets):
    model = apply_lora(qwen_model(), r=4, alpha=16, targets=targets, use_rslora=True)
    train_steps(model, input_ids)
    lora_logits = logits_of(model, input_ids)
    save_adapter(model, str(tmp_path), base_model_name_or_path="qwen-test")

    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_rslora"]) == ("LORA", 4, 16, True)
    expected_targets = (
        sorted(DEFAULT_TARGETS)
        if targets is None
        else ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    )  # a regex that picks only some layers is saved as the full names it picked
    assert config["target_modules"] == expected_targets

    peft_model = peft.PeftModel.from_pretrained(qwen_model(), str(tmp_path)).eval()
    torch.testing.assert_close(logits_of(peft_model, input_ids), lora_logits, rtol=1e-6, atol=1e-6)
    reloaded = load_adapter(qwen_model(), str(tmp_path))
    torch.testing.assert_close(logits_of(reloaded, input_ids), lora_logits, rtol=0, atol=0)
    assert lora_state_dict(reloaded).keys() == lora_state_dict(model).keys()


def test_load_adapter_saved_by_peft(tmp_path, input_ids):
    peft_config = peft.LoraConfig(
        r=2,
        lora_alpha=6,
        lora_dropout=0.1,
        target_modules=["q_proj", "down_proj"],
        use_rslora=True,
        init_lora_weights=False,  # random B, so the adapter changes the logits
    )
    peft_model = peft.get_peft_model(qwen_model(), peft_config).eval()
    peft_model.save_pretrained(str(tmp_path))
    model = load_adapter(qwen_model(), str(tmp_path)).eval()
    assert model.model.layers[0].mlp.down_proj.dropout.p == 0.1
    torch.testing.assert_close(logits_of(model, input_ids), logits_of(peft_model, input_ids), rtol=1e-6, atol=1e-6)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if ".lora_" in n
    }


def test_load_adapter_errors(tmp_path):
    save_adapter(apply_lora(qwen_model(), r=4, targets=["q_proj"]), str(tmp_path))
    with pytest.raises(ValueError, match=r"does not fit the model: 4 missing keys.*v_proj"):
        load_adapter(apply_lora(qwen_model(), r=4, targets=["q_proj", "v_proj"]), str(tmp_path))
    with pytest.raises(ValueError, match=r"q_proj.lora_A.weight: the model has shape \(8, 64\), the file \(4, 64\)"):
        load_adapter(apply_lora(qwen_model(), r=8, targets=["q_proj"]), str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="does not implement.*use_dora"):
        load_adapter(qwen_model(), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not an adapter directory"):
        load_adapter(qwen_model(), str(tmp_path / "missing"))


def test_export_merged_loads_as_a_plain_model(tmp_path, input_ids):
    model = apply_lora(tiny_model(), r=4, alpha=8)  # Llama, tied embeddings
    train_steps(model, input_ids)
    lora_logits = logits_of(model, input_ids)
    export_merged(model, tiny_tokenizer(), str(tmp_path))
    assert has_lora(model) and not model.model.layers[0].self_attn.q_proj.merged  # left as it was

    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert not any(isinstance(m, LoRALinear) for m in exported.modules())
    torch.testing.assert_close(logits_of(exported, input_ids), lora_logits, rtol=1e-5, atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tokenizer("37+85=").input_ids == tiny_tokenizer()("37+85=").input_ids


# ------------------------------------------------------------------------------------------------------
# QLoRA: nf4 base through bitsandbytes (its CPU backend)
# ------------------------------------------------------------------------------------------------------


def dequantized_copy(model: nn.Module) -> nn.Module:
    """A float model whose linear layers hold the dequantised nf4 weights of ``model``'s Linear4bit layers."""
    float_model = qwen_model()
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            float_model.get_submodule(name).weight.data.copy_(weight)
    return float_model


@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_4bit_error_is_the_nf4_error(input_ids, double_quant):
    float_model = qwen_model()
    float_logits = logits_of(float_model, input_ids)
    model = quantize_4bit(qwen_model(), double_quant=double_quant)
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7 and isinstance(model.lm_head, nn.Linear)  # lm_head skipped (tied anyway)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.split(".weight")[0] in quantized)

    # Per weight: nf4 rounds w / absmax(block of 64) to the nearest of 16 levels; the widest gap between
    # neighbouring levels is 1 - 0.6962 = 0.3038 (bitsandbytes' nf4 code), so |w - q(w)| <= 0.152 absmax.
    # Double quantisation also rounds the absmax (8-bit, relative error < 1%): allow 0.16.
    bound = 0.16 if double_quant else 0.1520
    for name in quantized:
        original = float_model.get_submodule(name).weight.reshape(-1, 64)  # [blocks, 64]
        module = model.get_submodule(name)
        error = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).reshape(-1, 64) - original
        assert torch.all(error.abs() <= bound * original.abs().amax(dim=1, keepdim=True) + 1e-7), name

    # The 4-bit forward is the float forward with dequantised weights, up to float32 rounding.
    quantized_logits = logits_of(model, input_ids)
    torch.testing.assert_close(quantized_logits, logits_of(dequantized_copy(model), input_ids), rtol=1e-5, atol=1e-5)
    # Against the original float model: nf4 on Gaussian weights has a relative rms error of ~0.09 per
    # layer, and the logits of this 2-layer model come out ~0.09 off (relative Frobenius norm); 0.2 leaves
    # room for the seed, while a wrong scale or layout would be off by ~1.
    relative_error = (quantized_logits - float_logits).norm() / float_logits.norm()
    assert relative_error < 0.2


def test_qlora_training_step_on_cpu(tmp_path, input_ids):
    model = prepare_model(qwen_model(), lora_r=4, lora_alpha=8, load_in_4bit=True).train()
    assert isinstance(model.model.layers[0].mlp.up_proj.base, bnb.nn.Linear4bit)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n for n in lora_before)

    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)  # 4-bit bytes too
    assert all(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if n.endswith("lora_B"))

    # Merging into 4-bit is refused; export writes the dequantised base plus the update as a float model.
    # An eval-mode forward without gradients first (as a rollout does): on AVX512-BF16 CPUs bitsandbytes
    # would repack the weights there and compute in bfloat16 (logits ~2e-3 off); rlcore keeps that off.
    with pytest.raises(ValueError, match="4-bit base"):
        merge_lora(model)
    model.eval()
    quantized_logits = logits_of(model, input_ids)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    export_merged(model, None, str(tmp_path))
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    # Both are float32: W x + s B (A x) against (W + s B A) x differ by rounding alone.
    torch.testing.assert_close(logits_of(exported, input_ids), quantized_logits, rtol=1e-5, atol=1e-5)


def test_4bit_layers_keep_float32_and_their_bytes_in_eval_mode(input_ids, monkeypatch):
    # bitsandbytes decides in Linear4bit.__init__, from has_avx512bf16(), whether an eval-mode forward without
    # gradients repacks the weight for its bfloat16 CPU kernel: pretend this CPU has AVX512-BF16.
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
    model = quantize_4bit(qwen_model()).eval()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    before = {n: (m.weight.data.clone(), m.weight.quant_state.absmax.clone()) for n, m in layers.items()}
    quantized_logits = logits_of(model, input_ids)
    for name, module in layers.items():
        assert torch.equal(module.weight.data, before[name][0]), name
        assert torch.equal(module.weight.quant_state.absmax, before[name][1]), name
    torch.testing.assert_close(quantized_logits, logits_of(dequantized_copy(model), input_ids), rtol=1e-5, atol=1e-5)

    layer = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4")  # made outside rlcore
    assert layer.support_avx512bf16_for_cpu
    LoRALinear(layer, r=2, alpha=4)
    assert not layer.support_avx512bf16_for_cpu


# ------------------------------------------------------------------------------------------------------
# Several named adapters on one base
# ------------------------------------------------------------------------------------------------------

REWARD_TARGETS = ["q_proj", "up_proj", "down_proj"]  # overlaps the default adapter's q/v only on q_proj


def randomize_adapter(model: nn.Module, adapter_name: str, seed: int) -> None:
    """Give every lora_B of one adapter random values, so that the adapter changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in lora_parameters(model, adapter_name)[1::2]:  # the B matrices
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))


def copy_adapter(source: nn.Module, source_name: str, target: nn.Module, target_name: str = "default") -> None:
    with torch.no_grad():
        for into, value in zip(lora_parameters(target, target_name), lora_parameters(source, source_name), strict=True):
            into.copy_(value)


def two_adapter_model() -> nn.Module:
    """float64 Qwen2 with a default adapter (q, v; r 4) and a "reward" adapter (q, up, down; r 2, rsLoRA)."""
    model = apply_lora(qwen_model().double(), r=4, alpha=8, targets=["q_proj", "v_proj"])
    apply_lora(model, r=2, alpha=3, targets=REWARD_TARGETS, use_rslora=True, adapter_name="reward")
    randomize_adapter(model, "default", seed=1)
    randomize_adapter(model, "reward", seed=2)
    return model


def test_switching_adapters_equals_separate_models_in_values_and_gradients(input_ids):
    model = two_adapter_model()
    assert adapter_names(model) == ["default", "reward"]
    assert all(p.requires_grad for p in lora_parameters(model, "reward") + lora_parameters(model, "default"))
    policy = apply_lora(qwen_model().double(), r=4, alpha=8, targets=["q_proj", "v_proj"])  # separate copies
    reward = apply_lora(qwen_model().double(), r=2, alpha=3, targets=REWARD_TARGETS, use_rslora=True)
    copy_adapter(model, "default", policy)
    copy_adapter(model, "reward", reward)

    for separate, name in ((reward, "reward"), (policy, "default")):
        with use_adapter(model, name):
            loss = model(input_ids, labels=input_ids).loss
        expected = separate(input_ids, labels=input_ids).loss
        assert torch.equal(loss, expected)  # float64, same operations: exactly equal
        loss.backward()
        expected.backward()
        for got, want in zip(lora_parameters(model, name), lora_parameters(separate), strict=True):
            assert torch.equal(got.grad, want.grad)
        other = "default" if name == "reward" else "reward"
        assert all(p.grad is None for p in lora_parameters(model, other))  # only the active adapter is used
        model.zero_grad(set_to_none=True)

    assert all(layer.active == "default" for layer in model.modules() if isinstance(layer, LoRALinear))
    with disable_adapters(model), use_adapter(model, "reward"):  # adapters off wins: the base model
        torch.testing.assert_close(logits_of(model, input_ids), logits_of(qwen_model().double(), input_ids))
    with pytest.raises(ValueError, match=r"no LoRA adapter named 'value'; it has \['default', 'reward'\]"):
        with use_adapter(model, "value"):
            pass
    with pytest.raises(ValueError, match="already has LoRA adapters named 'reward'"):
        apply_lora(model, r=2, targets=["q_proj"], adapter_name="reward")
    with pytest.raises(ValueError, match="cannot merge"):
        merge_lora(model)


def test_several_adapters_saved_in_peft_layout_load_in_peft_and_back(tmp_path, input_ids):
    model = two_adapter_model().float()
    expected = {}
    for name in ("default", "reward"):
        with use_adapter(model, name):
            expected[name] = logits_of(model, input_ids)
    save_adapters(model, str(tmp_path), base_model_name_or_path="qwen-test")
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors", "reward"]
    config = json.loads((tmp_path / "reward" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (2, 3, True)
    assert config["target_modules"] == sorted(REWARD_TARGETS)

    peft_model = peft.PeftModel.from_pretrained(qwen_model(), str(tmp_path)).eval()
    peft_model.load_adapter(str(tmp_path / "reward"), adapter_name="reward")
    for name in ("default", "reward"):
        peft_model.set_adapter(name)
        torch.testing.assert_close(logits_of(peft_model, input_ids), expected[name], rtol=1e-6, atol=1e-6)

    reloaded = load_adapters(qwen_model(), str(tmp_path))
    assert adapter_names(reloaded) == ["default", "reward"]
    for name in ("default", "reward"):
        with use_adapter(reloaded, name):
            assert torch.equal(logits_of(reloaded, input_ids), expected[name])


def test_sequence_classifier_adapter_holds_its_score_head_as_peft_writes_it(tmp_path, input_ids):
    config = qwen_model().config
    config.num_labels, config.pad_token_id = 1, 0

    def classifier():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            return Qwen2ForSequenceClassification(config).eval()

    model = apply_lora(classifier(), r=2, alpha=4, targets=["q_proj", "v_proj"])
    randomize_adapter(model, "default", seed=4)
    with torch.no_grad():
        model.score.weight.normal_()
    save_adapter(model, str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["task_type"], saved["modules_to_save"]) == ("SEQ_CLS", ["score"])
    assert torch.equal(read_adapter_heads(str(tmp_path))["score.weight"], model.score.weight)

    peft_model = peft.PeftModel.from_pretrained(classifier(), str(tmp_path)).eval()
    torch.testing.assert_close(logits_of(peft_model, input_ids), logits_of(model, input_ids), rtol=1e-6, atol=1e-6)
    reloaded = load_adapter(classifier(), str(tmp_path))
    assert torch.equal(logits_of(reloaded, input_ids), logits_of(model, input_ids))
    policy = load_adapter(qwen_model(), str(tmp_path), adapter_name="reward", with_heads=False)
    assert adapter_names(policy) == ["reward"]  # the head is left out of a causal LM: read_adapter_heads
    with pytest.raises(ValueError, match="holds score.weight.*ForSequenceClassification"):
        load_adapter(qwen_model(), str(tmp_path))
