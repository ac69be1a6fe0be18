"""Memory at scale: gradient checkpointing, weight dtypes, 4-bit loading, bitsandbytes optimizers, the chunked
LM head, parameter counts."""

import functools
import gc
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import load_benchmark, load_recipe, lora_reward_model_dir, tiny_cache  # noqa: F401 (tiny_cache: an autouse fixture)
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlcore import lora, models, optim
from rlcore.config import TrainConfig
from rlcore.run import Run
from rlcore.tracking import read_metrics

REPO = Path(__file__).resolve().parents[1]
SMALL_RUN = ["--num_train_rows", "64", "--num_eval_rows", "16", "--max_seconds", "none", "--logging_steps", "1"]


def batch(seed: int = 0, rows: int = 3, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, length] ids with the first row left-padded by 3 tokens."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 101, (rows, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0
    return input_ids, attention_mask


def gradients(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------- gradient checkpointing


def policy_loss_gradients(model, input_ids, attention_mask) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    logp, _ = models.token_logprobs(model, input_ids, attention_mask, last=6, chunk_size=0)  # [B, 6]
    (logp * torch.linspace(-1, 1, 6)).sum().backward()
    return gradients(model)


@pytest.mark.parametrize("lora_r", [0, 4])
def test_gradient_checkpointing_gives_the_same_policy_gradients(lora_r):
    input_ids, attention_mask = batch()
    model, _ = models.load_policy("tiny")
    model = lora.prepare_model(model, lora_r=lora_r, lora_dropout=0.0).train()
    if lora_r:  # B = 0 at the start would leave A without a gradient: move B off zero
        torch.manual_seed(0)
        for parameter in lora.lora_parameters(model)[1::2]:
            parameter.data.normal_(std=0.02)
    plain = policy_loss_gradients(model, input_ids, attention_mask)
    models.enable_gradient_checkpointing(model)
    assert model.model.gradient_checkpointing
    checkpointed = policy_loss_gradients(model, input_ids, attention_mask)
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=1e-6, msg=name)


def test_gradient_checkpointing_saves_a_fraction_of_the_activations():
    """Bytes autograd saves for the backward pass during the forward (a saved-tensors hook counts them): with
    checkpointing only each layer's input [B, T, H] is kept (the layers' insides are recomputed), so the
    activations shrink by more than the issue's 3x (19x measured for this 4-layer model at 4 x 64 tokens)."""
    input_ids, attention_mask = batch(seed=8, rows=4, length=64)
    model, _ = models.load_policy("tiny")
    model.train()

    def saved_bytes() -> int:
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            logp, _ = models.token_logprobs(model, input_ids, attention_mask, last=32)
        logp.sum().backward()
        return total

    plain = saved_bytes()
    models.enable_gradient_checkpointing(model)
    assert saved_bytes() * 10 < plain


def test_gradient_checkpointing_gives_the_same_value_and_reward_gradients():
    input_ids, attention_mask = batch(seed=1)
    value_model = models.ValueModel.from_pretrained("tiny").train()
    torch.nn.init.normal_(value_model.value_head.weight, std=0.1)  # a zero head passes no gradient to the body
    reward_model, _ = models.load_reward_model("tiny")
    reward_model.train()

    def value_gradients():
        value_model.zero_grad(set_to_none=True)
        models.completion_values(value_model, input_ids, attention_mask, 5).square().sum().backward()
        return gradients(value_model)

    def reward_gradients():
        reward_model.zero_grad(set_to_none=True)
        models.sequence_scores(reward_model, input_ids, attention_mask).square().sum().backward()
        return gradients(reward_model)

    plain_value, plain_reward = value_gradients(), reward_gradients()
    models.enable_gradient_checkpointing(value_model)
    models.enable_gradient_checkpointing(reward_model)
    for plain, checkpointed in ((plain_value, value_gradients()), (plain_reward, reward_gradients())):
        assert plain.keys() == checkpointed.keys() and len(plain) > 10
        for name in plain:
            torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=1e-6, msg=name)


def test_gradient_checkpointing_with_a_4bit_lora_base():
    pytest.importorskip("bitsandbytes")
    input_ids, attention_mask = batch(seed=2)
    model, _ = models.load_policy("tiny", load_in_4bit=True)
    model = lora.prepare_model(model, lora_r=4, load_in_4bit=True).train()
    torch.manual_seed(0)
    for parameter in lora.lora_parameters(model)[1::2]:
        parameter.data.normal_(std=0.02)
    plain = policy_loss_gradients(model, input_ids, attention_mask)
    models.enable_gradient_checkpointing(model)
    checkpointed = policy_loss_gradients(model, input_ids, attention_mask)
    assert plain.keys() == {f"{n}" for n, p in model.named_parameters() if p.requires_grad}
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=1e-6, msg=name)


# ---------------------------------------------------------------- the chunked LM head


class CountingWrapper(torch.nn.Module):
    """Stands for DDP: forwards to the model; counts its own forward calls."""

    def __init__(self, module):
        super().__init__()
        self.module, self.calls = module, 0

    def forward(self, **kwargs):
        self.calls += 1
        return self.module(**kwargs)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_log_probs_equal_the_full_logits_path(temperature):
    """Same log-probs, entropies and gradients from both paths; the chunked one calls the top-level forward."""
    input_ids, attention_mask = batch(seed=3, rows=4, length=14)
    model, _ = models.load_policy("tiny")
    model.train()

    def run(forward, chunk_size):
        model.zero_grad(set_to_none=True)
        logp, entropy = models.token_logprobs(
            forward, input_ids, attention_mask, 7, temperature, with_entropy=True, chunk_size=chunk_size
        )
        (logp * torch.linspace(-1, 2, 7)).sum().backward()
        return logp.detach(), entropy, gradients(model)

    full = run(model, 0)
    wrapper = CountingWrapper(model)
    chunked = run(wrapper, 5)  # 28 positions in chunks of 5: a partial last chunk
    assert wrapper.calls == 1  # through the wrapper's forward, once
    torch.testing.assert_close(chunked[0], full[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked[1], full[1], rtol=0, atol=1e-5)
    for name in full[2]:  # tied embeddings: the head's gradient and the embedding's arrive in one tensor
        torch.testing.assert_close(chunked[2][name], full[2][name], rtol=1e-4, atol=1e-5, msg=name)


def test_chunked_path_never_builds_full_logits():
    """The LM head module runs once, on zero positions: its output is [rows, 0, V] (one row of the scored
    positions' states where the last layer runs at those alone, rlcore.last_layer)."""
    input_ids, attention_mask = batch(seed=4)
    model, _ = models.load_policy("tiny")
    shapes = []
    model.lm_head.register_forward_hook(lambda module, args, output: shapes.append(tuple(output.shape)))
    models.sequence_logprobs(model, input_ids, attention_mask, torch.ones(3, 11), chunk_size=4)
    assert len(shapes) == 1 and shapes[0][1:] == (0, 101)


def test_held_out_sft_metrics_equal_on_both_paths():
    """rlcore.evaluation.sft_metrics: the chunked head at the loss positions gives the full-logits figures (a
    wrapper that is no transformers model takes the full-logits path)."""
    from rlcore.data import tokenize_sft
    from rlcore.evaluation import sft_metrics
    from rlcore.toy import toy_dataset

    model, tokenizer = models.load_policy("tiny")
    rows = tokenize_sft(toy_dataset("prompt_completion", n=12, seed=1), tokenizer, 64)
    chunked = sft_metrics(model, rows, tokenizer.pad_token_id, batch_size=5)
    full = sft_metrics(CountingWrapper(model), rows, tokenizer.pad_token_id, batch_size=5)
    assert chunked["loss"] == pytest.approx(full["loss"], rel=1e-5)
    assert chunked["token_accuracy"] == pytest.approx(full["token_accuracy"], abs=1e-6)


def test_log_probs_and_values_from_one_trunk_pass():
    """token_logprobs_and_values = token_logprobs and the value head applied to the same states that
    completion_values reads (the state before each scored token), from one forward pass."""
    input_ids, attention_mask = batch(seed=7, rows=3, length=10)
    model, _ = models.load_policy("tiny")
    head = models.new_value_head(128)
    torch.nn.init.normal_(head.weight)
    logp, entropy, values = models.token_logprobs_and_values(model, head, input_ids, attention_mask, 4, 0.9, True)
    expected_logp, expected_entropy = models.token_logprobs(model, input_ids, attention_mask, 4, 0.9, True, 0)
    hidden = model.model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=models.position_ids_from_mask(attention_mask)
    ).last_hidden_state  # [3, 10, 128]
    expected_values = head(hidden).squeeze(-1)[:, -5:-1]  # [3, 4]: the states before the last 4 tokens
    torch.testing.assert_close(logp, expected_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, expected_entropy, rtol=0, atol=1e-5)
    torch.testing.assert_close(values, expected_values, rtol=0, atol=1e-5)


def test_ppo_on_one_lora_base(tmp_path, capsys):
    """--value_on_policy --lora_r: policy, reference and value function on one base; trains and saves the head."""
    main = load_recipe("ppo").main
    results = main(
        ["--output_dir", str(tmp_path), "--warm_start_steps", "0", "--max_steps", "2", "--batch_size", "4"]
        + ["--num_ppo_epochs", "1", "--max_new_tokens", "4", "--eval_steps", "0", "--save_steps", "2", *SMALL_RUN]
        + ["--value_on_policy", "--lora_r", "4", "--gradient_checkpointing", "--eval_split", "none"]
    )
    # trainable: the adapters (r=4: 45,056 = 90,112 / 2) and the value head (128 + 1) = 45,185
    assert "parameters: 45.19K trainable of 1.04M total" in capsys.readouterr().out
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss/value" in r]
    assert len(records) == 2 and all(map(lambda r: abs(r["loss/value"]) < float("inf"), records))
    assert (tmp_path / "checkpoint-2" / "value_head.safetensors").exists()
    assert (tmp_path / "value_head" / "value_head.safetensors").exists()
    assert results is not None


# ---------------------------------------------------------------- dtype and 4-bit loading


def test_dtype_policy_keeps_heads_and_adapters_in_float32():
    policy, _ = models.load_policy("tiny", dtype="bfloat16")
    policy = lora.prepare_model(policy, lora_r=4)
    assert policy.model.layers[0].mlp.up_proj.base.weight.dtype == torch.bfloat16
    assert policy.model.layers[0].mlp.up_proj.lora_A.dtype == torch.float32
    reward_model, _ = models.load_reward_model("tiny", dtype="bfloat16")
    value_model = models.ValueModel.from_pretrained("tiny", dtype="bfloat16")
    assert reward_model.score.weight.dtype == value_model.value_head.weight.dtype == torch.float32
    input_ids, attention_mask = batch(seed=5)
    assert models.sequence_scores(reward_model, input_ids, attention_mask).dtype == torch.float32
    assert models.completion_values(value_model, input_ids, attention_mask, 4).dtype == torch.float32
    logp, _ = models.token_logprobs(policy, input_ids, attention_mask, 4)
    assert logp.dtype == torch.float32 and logp.isfinite().all()


def test_config_refuses_float16_full_fine_tuning_and_unknown_values():
    with pytest.raises(ValueError, match="float16"):
        TrainConfig(dtype="float16")
    TrainConfig(dtype="float16", lora_r=8)
    with pytest.raises(ValueError, match="--optim"):
        TrainConfig(optim="sgd")
    with pytest.raises(ValueError, match="--load_in_4bit"):
        TrainConfig(bnb_double_quant=True)


def test_4bit_loading_quantises_the_body_and_keeps_the_heads():
    bnb = pytest.importorskip("bitsandbytes")
    policy, _ = models.load_policy("tiny", load_in_4bit=True, double_quant=True)
    reward_model, _ = models.load_reward_model("tiny", load_in_4bit=True)
    value_model = models.ValueModel.from_pretrained("tiny", load_in_4bit=True)
    for model in (policy, reward_model, value_model):
        assert isinstance(model.get_submodule(_body_prefix(model) + "layers.0.mlp.up_proj"), bnb.nn.Linear4bit)
    assert type(policy.lm_head) is torch.nn.Linear and type(reward_model.score) is torch.nn.Linear
    assert reward_model.score.weight.dtype == torch.float32
    # a 4-bit weight counts its logical size, so the total is the float model's (997,120); still trainable until
    # prepare_model freezes the base: the embeddings 101 x 128 = 12,928 and 9 norms x 128 = 1,152 -> 14,080
    assert models.parameter_counts(policy) == (14_080, 997_120)


def _body_prefix(model) -> str:
    return "backbone." if isinstance(model, models.ValueModel) else "model."


def test_parameter_counts_by_hand():
    """LoRA r=8 on q,k,v,o,gate,up,down of the tiny model (hidden 128, 2 kv heads of 32, MLP 512, 4 layers):
    r * (in + out) per layer: q, o 8 * 256; k, v 8 * 192; gate, up, down 8 * 640 -> 22,528 x 4 = 90,112."""
    model, _ = models.load_policy("tiny")
    assert models.parameter_counts(model) == (997_120, 997_120)
    lora.prepare_model(model, lora_r=8)
    assert models.parameter_counts(model) == (90_112, 997_120 + 90_112)
    assert models.describe_parameters(model) == "parameters: 90.11K trainable of 1.09M total (8.29%)"


def test_qlora_reward_model_trains_saves_and_exports(tmp_path, capsys):
    """The reward model with --lora_r 8 --load_in_4bit (the score head used to be quantised, then asked to
    require grad): it trains, and the merged export scores as the trained 4-bit model does."""
    pytest.importorskip("bitsandbytes")
    main = load_recipe("reward_model").main
    flags = ["--lora_r", "8", "--load_in_4bit", "--bnb_double_quant", "--gradient_checkpointing"]
    results = main(
        ["--output_dir", str(tmp_path), "--warm_start_steps", "0", "--max_steps", "4", "--batch_size", "8"]
        + ["--lr", "1e-2", "--eval_steps", "0", *SMALL_RUN, *flags]
    )
    assert "parameters: 90.24K trainable of 1.09M total" in capsys.readouterr().out  # adapters + the score head
    assert "eval/accuracy" in results
    assert json.loads((tmp_path / "config.json").read_text()).get("quantization_config") is None
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert not any(p.dtype == torch.uint8 for p in exported.parameters())
    # the adapter checkpoint, reloaded onto a 4-bit base, scores as the exported float model
    trained, _ = models.load_reward_model("tiny", load_in_4bit=True, double_quant=True)
    trained = lora.load_adapter(lora.prepare_model(trained, 0), str(tmp_path / "adapter"))
    trained.score.load_state_dict({"weight": exported.score.weight})
    input_ids, attention_mask = batch(seed=6)
    with torch.no_grad():
        torch.testing.assert_close(
            models.sequence_scores(exported, input_ids, attention_mask),
            models.sequence_scores(trained, input_ids, attention_mask),
            rtol=0,
            atol=1e-4,
        )


# ---------------------------------------------------------------- optimizers


def tensor_dtypes(value) -> set[torch.dtype]:
    """The dtypes of every tensor inside nested dicts, lists and tuples (bitsandbytes nests its state)."""
    if torch.is_tensor(value):
        return {value.dtype}
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return set().union(*map(tensor_dtypes, items))


@pytest.mark.parametrize("optim", ["adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
def test_bitsandbytes_optimizers_step_save_and_resume(tmp_path, optim):
    """SFT in full (the embeddings and MLP matrices have >= 4096 entries: 8-bit state), 6 steps straight vs
    3 + resume + 3: the same losses and weights."""
    pytest.importorskip("bitsandbytes")
    main = load_recipe("sft").main
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["--max_steps", "6", "--batch_size", "4", "--lr", "1e-3", "--save_steps", "3", "--save_total_limit", "0"]
    common += ["--eval_split", "none", "--optim", optim, *SMALL_RUN]
    main(["--output_dir", str(straight), *common])
    state = torch.load(straight / "checkpoint-3" / "training_state.pt", weights_only=False)["optimizer"]["state"]
    assert (torch.uint8 in tensor_dtypes(state)) == optim.endswith("8bit")  # the moments, as saved
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    shutil.copy(straight / "metrics.jsonl", resumed / "metrics.jsonl")
    main(["--output_dir", str(resumed), "--resume", *common])
    losses = [[r["loss"] for r in read_metrics(d / "metrics.jsonl") if "loss" in r] for d in (straight, resumed)]
    assert len(losses[0]) == 6 and losses[1] == pytest.approx(losses[0], rel=1e-6, abs=1e-7)
    a = AutoModelForCausalLM.from_pretrained(straight).state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed).state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


# ---------------------------------------------------------------- float32 master weights for bfloat16 training


def adamw_steps(weight: torch.Tensor, steps: int, **options) -> tuple[torch.nn.Parameter, torch.optim.Optimizer]:
    """``steps`` AdamW updates at lr 1e-4 on a copy of ``weight`` with a constant gradient of 1."""
    parameter = torch.nn.Parameter(weight.clone())
    optimizer = optim.build_optimizer(torch.nn.ParameterList([parameter]), lr=1e-4, **options)
    for _ in range(steps):
        parameter.grad = torch.ones_like(parameter)
        optimizer.step()
        optimizer.zero_grad()
    return parameter, optimizer


def test_master_weights_keep_tiny_updates_that_bfloat16_weights_round_away():
    # AdamW moves each weight by ~lr = 1e-4 per step (m / sqrt(v) = 1 for a constant gradient). Just below 1.0
    # bfloat16's spacing is 2^-8 = 0.0039, so in place every update rounds back to 1.0: 100 steps, no
    # change. With float32 master weights the 100 updates add up to -0.01 and the bfloat16 weight follows.
    weight = torch.ones(4, 4, dtype=torch.bfloat16)
    plain, plain_optimizer = adamw_steps(weight, 100)
    assert torch.equal(plain, weight) and plain_optimizer.state[plain]["exp_avg"].dtype == torch.bfloat16
    mastered, optimizer = adamw_steps(weight, 100, master_weights="float32")
    reference, _ = adamw_steps(weight.float(), 100)  # the same updates on float32 weights
    (master,) = optimizer.param_groups[0]["params"]
    assert master.dtype == torch.float32 and torch.equal(master, reference)  # exactly the float32 run
    assert torch.equal(mastered, reference.to(torch.bfloat16)) and mastered.dtype == torch.bfloat16
    assert (
        abs(reference[0, 0].item() - 0.99) < 1e-4 and mastered[0, 0].item() == 0.98828125
    )  # 1 - 3 * 2^-8: nearest 0.99

    # the master weights are in the optimizer state: a resumed run continues from them, not from the rounding
    resumed, _ = adamw_steps(mastered.detach(), 0, master_weights="float32")
    resumed_optimizer = optim.build_optimizer(torch.nn.ParameterList([resumed]), lr=1e-4, master_weights="float32")
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    assert torch.equal(resumed_optimizer.param_groups[0]["params"][0], reference)
    with pytest.raises(ValueError, match="resume with the --master_weights the run was saved with"):
        resumed_optimizer.load_state_dict(plain_optimizer.state_dict())
    with pytest.raises(ValueError, match="--master_weights must be float32"):
        TrainConfig(master_weights="float32", optim="adamw_8bit")
    float32_parameter, float32_optimizer = adamw_steps(weight.float(), 1, master_weights="float32")
    assert float32_optimizer.param_groups[0]["params"][0] is float32_parameter  # no copy of float32 weights


# ---------------------------------------------------------------- peak memory of 4-bit loading

BUILD = """
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from rlcore.toy import tiny_tokenizer
tiny_tokenizer().save_pretrained(sys.argv[1])
config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=12,
                     num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False)
LlamaForCausalLM(config).save_pretrained(sys.argv[1])
"""

MEASURE = """
import json, resource, sys, threading, time
from rlcore import models

peak_anonymous = 0
def sample():  # the high-water mark of anonymous memory (RssAnon), sampled every millisecond
    global peak_anonymous
    while True:
        with open("/proc/self/status") as status:
            kib = next(int(line.split()[1]) for line in status if line.startswith("RssAnon:"))
        peak_anonymous = max(peak_anonymous, kib * 1024)
        time.sleep(0.001)

threading.Thread(target=sample, daemon=True).start()
model, _ = models.load_policy(sys.argv[1], load_in_4bit=sys.argv[2] == "4bit")
if sys.argv[2] == "float":  # touch every weight: a lazily mapped float model is not in memory until used
    total = sum(float(p.detach().float().sum()) for p in model.parameters())
time.sleep(0.01)
print(json.dumps({"peak_anonymous": peak_anonymous, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "params": models.parameter_counts(model)[1]}))
"""


@pytest.mark.slow
def test_4bit_loading_peak_memory_stays_under_the_float_model(tmp_path):
    """A 0.27B-parameter Llama (0.99 GiB in float32) written to a temporary directory, loaded in a fresh
    process. With 4-bit quantisation while loading, the peak of the process's anonymous memory (RssAnon,
    sampled every millisecond: interpreter, torch, transformers and bitsandbytes included) stays under the
    size of the float32 weights alone. The peak RSS (``ru_maxrss``) also counts the safetensors file's pages,
    memory-mapped and read during loading (page cache, released with the mapping): it is printed, not
    bounded."""
    pytest.importorskip("bitsandbytes")
    env = {**os.environ, "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": "131072"}
    subprocess.run([sys.executable, "-c", BUILD, str(tmp_path)], check=True, env=env, timeout=600)
    float_bytes = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))

    def peak(mode: str) -> dict:
        output = subprocess.run(
            [sys.executable, "-c", MEASURE, str(tmp_path), mode], check=True, env=env, timeout=600, capture_output=True
        ).stdout
        return json.loads(output.strip().splitlines()[-1])

    quantized, full = peak("4bit"), peak("float")
    assert quantized["params"] == full["params"] and full["params"] * 4 == pytest.approx(float_bytes, rel=1e-3)
    gib = 2**30
    print(
        f"float32 weights {float_bytes / gib:.2f} GiB; 4-bit load: peak anonymous {quantized['peak_anonymous'] / gib:.2f}"
        f" GiB, peak RSS {quantized['peak_rss'] / gib:.2f} GiB; float load: peak anonymous "
        f"{full['peak_anonymous'] / gib:.2f} GiB, peak RSS {full['peak_rss'] / gib:.2f} GiB"
    )
    assert quantized["peak_anonymous"] < float_bytes


def base_copies(model: torch.nn.Module) -> int:
    """How many distinct storages in the whole process hold a tensor shaped as ``model``'s input embeddings:
    the number of copies of the base weights alive (frozen under LoRA: no gradient or optimizer state)."""
    shape = model.get_input_embeddings().weight.shape
    gc.collect()
    tensors = [t for t in gc.get_objects() if isinstance(t, torch.Tensor) and t.shape == shape]
    return len({t.untyped_storage().data_ptr() for t in tensors})


@pytest.mark.slow  # two PPO runs: ~30 s on 2 busy CPU cores
def test_ppo_with_lora_holds_one_copy_of_the_base_and_scores_as_the_separate_reward_model(tmp_path, monkeypatch):
    """--lora_r --value_on_policy --reward_on_policy: policy, reference, value and reward share one base. The
    first step samples the same completions as with the separate (merged) reward model and scores them alike."""
    reward_dir = lora_reward_model_dir(tmp_path / "rm")  # on the tiny model, the base of --warm_start_steps 0
    copies = []
    end_step = Run.end_step
    monkeypatch.setattr(
        Run, "end_step", lambda run, stats: (copies.append(base_copies(run.model)), end_step(run, stats))[1]
    )
    main = load_recipe("ppo").main
    common = ["--warm_start_steps", "0", "--max_steps", "1", "--batch_size", "4", "--num_ppo_epochs", "1"]
    common += ["--max_new_tokens", "4", "--eval_split", "none", "--save_steps", "0", *SMALL_RUN]
    common += ["--lora_r", "4", "--value_on_policy", "--reward_model", str(reward_dir), "--reward_funcs", "none"]
    main([*common, "--output_dir", str(tmp_path / "separate")])
    main([*common, "--output_dir", str(tmp_path / "one_base"), "--reward_on_policy"])
    assert copies == [2, 1]  # the separate reward model is the second copy
    first = [read_metrics(tmp_path / name / "metrics.jsonl")[0] for name in ("separate", "one_base")]
    assert first[0]["completions/mean_length"] == first[1]["completions/mean_length"]
    assert abs(first[0]["reward"] - first[1]["reward"]) < 1e-5
    assert first[0]["reward_std"] > 0.01  # the scores differ between rows: the comparison means something
    # the policy's adapter alone is saved; the reward adapter stays where it came from
    assert json.loads((tmp_path / "one_base" / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert not (tmp_path / "one_base" / "adapter" / "reward").exists()


# ---------------------------------------------------------------- benchmarks/memory.py


@functools.cache
def memory_benchmark():
    return load_benchmark("memory")


def test_a_memory_row_that_outlasts_its_timeout_is_an_error_row():
    result = memory_benchmark().subprocess_json(["--row", "sft,0.5B,lora,0"], dict(os.environ), timeout=1)
    assert result == {"error": "timed out after 1 s"}


@pytest.mark.parametrize("variant", ["lora", "qlora"])
def test_memory_benchmark_copies_of_the_first_layer_own_their_bytes(variant):
    """The benchmark draws its first decoder layer and deep-copies it into the others (bitsandbytes quantises
    slowly on CPU): every copy must hold its own storage, 4-bit constants included, or the measured peak would
    count one layer for all of them; and each knows its index."""
    if variant == "qlora":
        pytest.importorskip("bitsandbytes")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128
    )
    config.vocab_size = 256
    model = memory_benchmark().build(Qwen2ForCausalLM, config, variant, "cpu")
    layers = model.model.layers

    def storages(layer) -> set[int]:
        tensors = list(layer.parameters())
        if variant == "qlora":
            tensors += [
                m.weight.quant_state.absmax
                for m in layer.modules()
                if hasattr(getattr(m, "weight", None), "quant_state")
            ]
        return {t.untyped_storage().data_ptr() for t in tensors}

    first, second, third = (storages(layer) for layer in layers)
    assert len(first) == len(second) == len(third) > 0
    assert first.isdisjoint(second) and first.isdisjoint(third) and second.isdisjoint(third)
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2]
    assert torch.isfinite(model(torch.randint(0, 256, (1, 6))).logits.float()).all()


def test_memory_benchmark_names_an_unknown_row_term():
    check_only = memory_benchmark().check_only
    assert check_only(["dpo:7B:qlora:gc", "sft:*:lora", "1.5B"]) is None
    assert check_only(["dpo:7b"]) == (
        "--only 'dpo:7b': '7b' is not one of ['0.5B', '1.5B', '7B', 'dpo', 'full_bf16', 'full_fp32', 'gc', 'grpo', "
        "'lora', 'nogc', 'ppo', 'qlora', 'sft'] or '*'"
    )


@pytest.mark.parametrize("algorithm", ["sft", "dpo", "grpo", "ppo"])
def test_memory_benchmark_row_runs_at_a_tiny_shape(algorithm, monkeypatch):
    """One row of each algorithm, LoRA with checkpointing, end to end in-process at a tiny shape: a finite loss,
    the activations counted, the adapters (and PPO's value head) the only trained parameters."""
    bench = memory_benchmark()
    tiny = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    monkeypatch.setitem(
        bench.SHAPES, "tiny", tiny | dict(intermediate_size=128, vocab_size=256, tie_word_embeddings=True)
    )
    result = bench.run_row(algorithm, "tiny", "lora", True, 16, "cpu", ppo_reward="adapter")
    # LoRA r=16 adds 16 x (in + out) per projection; head size 16, so k and v map 64 -> 32:
    # q, o 16 x 128; k, v 16 x 96; gate, up, down 16 x 192: 16,384 per layer, two layers
    adapters = 2 * 16 * (2 * 128 + 2 * 96 + 3 * 192)
    assert torch.isfinite(torch.tensor(result["loss"])) and result["saved_activations"] > 0
    assert result["trainable"] == adapters + (64 + 1 if algorithm == "ppo" else 0)


def test_memory_benchmark_prints_a_json_file_as_markdown(tmp_path):
    """``--markdown``: a measured row shows its peak, the others their status with the estimate, in both tables."""
    bench = memory_benchmark()
    rows = []
    for algorithm, shape, variant, on in itertools.product(bench.ALGORITHMS, bench.SHAPES, bench.VARIANTS, (0, 1)):
        row = dict(algorithm=algorithm, shape=shape, variant=variant, checkpointing=bool(on), seq_len=512)
        rows.append(row | dict(estimate_bytes=3 * bench.GIB, status="does not fit"))
    rows[0] |= dict(status="measured", peak_bytes=2 * bench.GIB, backward_growth=bench.GIB // 2, trainable=8_800_000)
    rows[0] |= dict(saved_activations=bench.GIB // 4, seconds=12.0)
    path = tmp_path / "rows.json"
    path.write_text(
        json.dumps({"command": "benchmarks/memory.py --json rows.json", "header": "One step", "rows": rows})
    )
    lines = bench.markdown_tables(str(path)).splitlines()
    assert lines[:3] == ["`benchmarks/memory.py --json rows.json`", "", "One step"]
    assert lines[4] == "| step | variant | 0.5B, seq 512: off / on | 1.5B, seq 512: off / on | 7B, seq 512: off / on |"
    assert (
        "| SFT | full float32 | 2.00 / does not fit (est. 3.0) | does not fit (est. 3.0) / does not fit"
        in "\n".join(lines)
    )
    assert "| SFT | 0.5B | full float32 | off | 8.8M | 3.0 GiB | 2.000 GiB | 0.500 GiB | 0.250 GiB | 12.0 |" in lines
    assert "| PPO | 7B | QLoRA | on | | 3.0 GiB | does not fit | | | |" in lines
    assert len(lines) == 4 + 2 + 16 + 1 + 2 + 96  # the command, the header; 16 by shape; 96 rows
