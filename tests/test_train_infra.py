"""Training infrastructure: config parsing, optimisation, checkpoints, metrics, data order."""

import json
import math
from dataclasses import dataclass, field

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlcore.checkpoint import (
    ADAPTER_DIR_NAME,
    TRAINING_STATE_NAME,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    save_final_model,
)
from rlcore.config import RUN_CONFIG_NAME, TrainConfig, parse_config, save_config
from rlcore.lora import prepare_model
from rlcore.optim import build_optimizer, build_scheduler, loss_tokens, lr_multiplier, optimizer_step
from rlcore.runtime import step_batches
from rlcore.toy import tiny_model, tiny_tokenizer
from rlcore.tracking import Tracker, read_metrics


@dataclass
class ExampleConfig(TrainConfig):
    beta: float = 0.1  # an example recipe flag
    packing: bool = False  # an example bool flag
    tag: str | None = None  # an optional string
    resume: str | None = field(default=None, metadata={"flag_const": "auto"})


# ---------------------------------------------------------------- config


def test_defaults_and_cli_overrides():
    config = parse_config(ExampleConfig, [])
    assert config == ExampleConfig()
    config = parse_config(ExampleConfig, ["--lr", "3e-4", "--beta", "0.5", "--max_steps", "7", "--tag", "x"])
    assert (config.lr, config.beta, config.max_steps, config.tag) == (3e-4, 0.5, 7, "x")
    assert isinstance(config.max_steps, int) and isinstance(config.lr, float)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--packing"], True),
        (["--no-packing"], False),
        (["--packing", "false"], False),
        (["--packing", "1"], True),
        (["--packing", "yes"], True),
        ([], False),
    ],
)
def test_bool_flags(argv, expected):
    assert parse_config(ExampleConfig, argv).packing is expected


def test_optional_values_and_const():
    config = parse_config(ExampleConfig, ["--max_seconds", "none", "--bf16", "true", "--resume"])
    assert config.max_seconds is None and config.bf16 is True and config.resume == "auto"
    assert parse_config(ExampleConfig, ["--resume", "out/checkpoint-4"]).resume == "out/checkpoint-4"
    assert parse_config(ExampleConfig, ["--max_grad_norm", "none"]).max_grad_norm is None


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"lr": 0.01, "beta": 2, "packing": True, "max_seconds": None}))
    config = parse_config(ExampleConfig, ["--config", str(path), "--beta", "0.3"])
    assert config.lr == 0.01 and config.packing is True and config.max_seconds is None
    assert config.beta == 0.3  # the flag wins over the file
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text("lr: 0.02\nwarmup_steps: 5\n")
    config = parse_config(ExampleConfig, ["--config", str(yaml_path)])
    assert (config.lr, config.warmup_steps) == (0.02, 5)


def test_saved_config_reproduces_the_run(tmp_path):
    config = parse_config(ExampleConfig, ["--lr", "0.5", "--tag", "t", "--no-packing", "--max_seconds", "none"])
    path = save_config(config, tmp_path)
    assert path.name == RUN_CONFIG_NAME
    assert parse_config(ExampleConfig, ["--config", str(path)]) == config


def test_unknown_flag_is_one_line_with_suggestions(capsys):
    with pytest.raises(SystemExit) as raised:
        parse_config(ExampleConfig, ["--learning_rate", "1", "--betta", "2"])
    assert raised.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error  # one line
    # TRL's name for --lr, then the spelling neighbour of --betta; --help for the full list
    assert "--learning_rate" in error and "did you mean --lr, --beta?" in error and "--help" in error


def test_bad_values_are_named(capsys, tmp_path):
    with pytest.raises(SystemExit):
        parse_config(ExampleConfig, ["--lr", "fast"])
    assert "--lr expects float" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--batch_size must be > 0"):
        parse_config(ExampleConfig, ["--batch_size", "0"])
    with pytest.raises(ValueError, match="--lr_schedule must be one of"):
        parse_config(ExampleConfig, ["--lr_schedule", "step"])
    with pytest.raises(ValueError, match="needs --lora_r > 0"):
        parse_config(ExampleConfig, ["--load_in_4bit"])
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"lr": 0.1, "learning_rate": 2}))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['learning_rate'\]; valid fields"):
        parse_config(ExampleConfig, ["--config", str(path)])
    path.write_text(json.dumps({"max_steps": "many"}))
    with pytest.raises(ValueError, match="bad.json: --max_steps expects int, got 'many'"):
        parse_config(ExampleConfig, ["--config", str(path)])
    path.write_text(json.dumps({"packing": 3}))
    with pytest.raises(ValueError, match="field 'packing' expects bool"):
        parse_config(ExampleConfig, ["--config", str(path)])


# ---------------------------------------------------------------- schedule and optimizer


def test_schedule_values_by_hand():
    # warmup 2, total 6: steps 0, 1 warm up to 1/2, 2/2; then p = (step - 2) / 4 = 0, 1/4, 1/2, 3/4.
    cosine = [lr_multiplier(s, warmup_steps=2, total_steps=6) for s in range(7)]
    expected = [0.5, 1.0, 1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2, 0.0]
    assert cosine == pytest.approx(expected, abs=1e-12)
    linear = [lr_multiplier(s, warmup_steps=0, total_steps=4, schedule="linear", min_lr_ratio=0.2) for s in range(5)]
    # 0.2 + 0.8 * (1 - s / 4)
    assert linear == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2], abs=1e-12)
    assert [lr_multiplier(s, warmup_steps=4, total_steps=8, schedule="constant") for s in (0, 3, 7)] == [0.25, 1.0, 1.0]
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_multiplier(0, warmup_steps=0, total_steps=1, schedule="step")


def test_scheduler_drives_the_optimizer_learning_rate():
    parameter = torch.nn.Parameter(torch.zeros(2, 2))
    optimizer = torch.optim.AdamW([parameter], lr=0.1)
    scheduler = build_scheduler(optimizer, warmup_steps=2, total_steps=6)
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        parameter.grad = torch.ones_like(parameter)
        optimizer_step([parameter], optimizer, scheduler, max_grad_norm=None)
    assert seen == pytest.approx([0.1 * lr_multiplier(s, warmup_steps=2, total_steps=6) for s in range(6)])


def test_optimizer_decays_only_matrices_and_skips_frozen():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    model[2].requires_grad_(False)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    decayed, not_decayed = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and [p.shape for p in decayed["params"]] == [(4, 3)]
    assert not_decayed["weight_decay"] == 0.0 and len(not_decayed["params"]) == 3  # bias, norm weight and bias
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, lr=1e-3)


def test_optimizer_is_fused_on_cpu_and_updates_as_the_per_tensor_loop():
    """On the CPU build_optimizer takes torch's fused AdamW; five steps of it equal the per-tensor loop
    (foreach=False, fused=False) with the same groups up to float rounding."""
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3)) for _ in "ab"]
    models[1].load_state_dict(models[0].state_dict())
    fused = build_optimizer(models[0], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99))
    assert fused.defaults["fused"] is True
    start = [p.detach().clone() for p in models[0].parameters()]
    parameters = list(models[1].parameters())
    groups = [
        {"params": [p for p in parameters if p.ndim >= 2], "weight_decay": 0.1},
        {"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0},
    ]
    loop = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.99), foreach=False, fused=False)
    for step in range(5):
        for model, optimizer in zip(models, (fused, loop)):
            generator = torch.Generator().manual_seed(step)
            for parameter in model.parameters():
                parameter.grad = torch.randn(parameter.shape, generator=generator)
            optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert all((p - p0).abs().max() > 1e-3 for p, p0 in zip(models[0].parameters(), start))  # they did move


def test_optimizer_step_clips_and_returns_the_norm():
    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    parameter.grad = torch.tensor([3.0, 4.0])  # norm 5
    norm = optimizer_step([parameter], optimizer, None, max_grad_norm=1.0)
    assert norm.item() == pytest.approx(5.0)
    assert parameter.detach().tolist() == pytest.approx([-0.6, -0.8])  # the gradient scaled to norm 1
    assert parameter.grad is None


@pytest.mark.parametrize("max_grad_norm", [0.5, 5.0, 1e9, None])
def test_optimizer_step_equals_clip_grad_norm_and_step(max_grad_norm):
    """The same parameters, bit for bit, as torch's clip_grad_norm_ then AdamW, whether the gradients are scaled
    (norm above the maximum) or not (the scaling by exactly 1 is skipped)."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (3,), (5, 4)]
    starts = [torch.randn(shape, generator=generator) for shape in shapes]
    grads = [torch.randn(shape, generator=generator) for shape in shapes]  # norm ~4.5
    results = []
    for ours in (True, False):
        params = [torch.nn.Parameter(start.clone()) for start in starts]
        optimizer = torch.optim.AdamW(params, lr=0.1)
        for param, grad in zip(params, grads):
            param.grad = grad.clone()
        if ours:
            norm = optimizer_step(params, optimizer, None, max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm(grads)
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
        results.append((norm, [param.detach() for param in params]))
    (norm, params), (expected_norm, expected) = results
    assert torch.equal(norm, expected_norm)
    assert all(torch.equal(a, b) for a, b in zip(params, expected, strict=True))


def test_loss_tokens_counts_the_window():
    # shifted: the first position of each row is never predicted -> 2 + 0 + 3
    assert loss_tokens([[1, 1, 1], [1], [0, 1, 1, 1]]) == 5
    assert loss_tokens([[1, 1, 1], [1]], shift=False) == 4
    assert loss_tokens([[0, 0]]) == 1  # never a zero denominator


# ---------------------------------------------------------------- data order


def test_step_batches_is_a_pure_function_covering_each_epoch():
    first = step_batches(10, batch_size=2, grad_accum_steps=2, seed=3, step=1)
    assert first == step_batches(10, batch_size=2, grad_accum_steps=2, seed=3, step=1)
    assert [len(b) for b in first] == [2, 2]
    # steps 0 and 1 take stream positions 0..7, step 2 positions 8..11 (epoch 0 ends at 9)
    stream = [i for s in range(5) for batch in step_batches(10, 2, 2, 3, s) for i in batch]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]  # a new permutation each epoch
    assert step_batches(10, 2, 2, seed=4, step=0) != step_batches(10, 2, 2, seed=3, step=0)
    with pytest.raises(ValueError, match="no rows"):
        step_batches(0, 2, 1, 0, 0)


# ---------------------------------------------------------------- checkpoints


def small_model(seed: int = 0):
    return tiny_model(
        seed=seed,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )


def train_a_little(model, optimizer, scheduler, steps: int = 2) -> None:
    ids = torch.randint(5, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer_step(model.parameters(), optimizer, scheduler, 1.0)


def test_checkpoint_round_trip(tmp_path):
    model, tokenizer = small_model(), tiny_tokenizer()
    optimizer = build_optimizer(model, lr=1e-2)
    scheduler = build_scheduler(optimizer, warmup_steps=1, total_steps=10)
    train_a_little(model, optimizer, scheduler)
    value_head = torch.nn.Linear(4, 1)
    torch.manual_seed(123)
    path = save_checkpoint(
        tmp_path,
        2,
        model,
        tokenizer,
        optimizer,
        scheduler,
        seed=7,
        extra_modules={"value_head": value_head},
        extra_state={"seconds": 1.5},
    )
    expected_draw = torch.rand(3)

    assert path == tmp_path / "checkpoint-2" and (path / TRAINING_STATE_NAME).exists()
    loaded = AutoModelForCausalLM.from_pretrained(path)  # a from_pretrained directory
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)

    fresh = small_model(seed=1)
    fresh_optimizer = build_optimizer(fresh, lr=1e-2)
    fresh_scheduler = build_scheduler(fresh_optimizer, warmup_steps=1, total_steps=10)
    fresh_head = torch.nn.Linear(4, 1)
    torch.manual_seed(0)
    state = load_checkpoint(
        path, fresh, fresh_optimizer, fresh_scheduler, seed=7, extra_modules={"value_head": fresh_head}
    )
    assert state == {"step": 2, "extra": {"seconds": 1.5}}
    torch.testing.assert_close(torch.rand(3), expected_draw, rtol=0, atol=0)  # RNG restored
    for a, b in [*zip(model.parameters(), fresh.parameters()), *zip(value_head.parameters(), fresh_head.parameters())]:
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(optimizer.state.values(), fresh_optimizer.state.values()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    with pytest.raises(ValueError, match="--seed 7, this run has --seed 8"):
        load_checkpoint(path, fresh, seed=8)


def test_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, tokenizer = small_model(), tiny_tokenizer()
    optimizer = build_optimizer(model, lr=1e-2)
    save_checkpoint(tmp_path, 1, model, tokenizer, optimizer, seed=0)
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint-1").iterdir()}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)  # the training state is written after the model files
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, model, tokenizer, optimizer, seed=0)
    monkeypatch.undo()

    assert (tmp_path / ".tmp-checkpoint-2").exists()  # the partial write, never under the final name
    assert not (tmp_path / "checkpoint-2").exists()
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint-1"]
    assert resolve_resume("auto", tmp_path) == tmp_path / "checkpoint-1"
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoint-1").iterdir()} == before
    load_checkpoint(tmp_path / "checkpoint-1", small_model(seed=2), seed=0)

    save_checkpoint(tmp_path, 2, model, tokenizer, optimizer, seed=0)  # the next save clears the debris
    assert not (tmp_path / ".tmp-checkpoint-2").exists()
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint-1", tmp_path / "checkpoint-2"]


def test_keep_last_and_resume_resolution(tmp_path):
    model = small_model()
    optimizer = build_optimizer(model, lr=1e-2)
    assert resolve_resume("auto", tmp_path) is None and resolve_resume(None, tmp_path) is None
    for step in (5, 10, 15, 20):
        save_checkpoint(tmp_path, step, model, None, optimizer, seed=0, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-15", "checkpoint-20"]
    (tmp_path / "checkpoint-99").mkdir()  # no training state: not a checkpoint
    assert resolve_resume("auto", tmp_path) == tmp_path / "checkpoint-20"
    assert resolve_resume(str(tmp_path / "checkpoint-15"), tmp_path) == tmp_path / "checkpoint-15"
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        resolve_resume(str(tmp_path / "checkpoint-99"), tmp_path)


def test_lora_checkpoint_and_final_model(tmp_path):
    model, tokenizer = prepare_model(small_model(), lora_r=2, lora_alpha=4), tiny_tokenizer()
    optimizer = build_optimizer(model, lr=1e-2)
    train_a_little(model, optimizer, None)
    path = save_checkpoint(tmp_path, 2, model, tokenizer, optimizer, seed=0)
    assert (path / "adapter_model.safetensors").exists() and not (path / "model.safetensors").exists()
    resumed = prepare_model(small_model(), lora_r=2, lora_alpha=4)  # the same base, fresh adapters
    load_checkpoint(path, resumed, build_optimizer(resumed, lr=1e-2), seed=0)
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(resumed(ids).logits, model(ids).logits)

    save_final_model(model, tokenizer, tmp_path)
    assert (tmp_path / ADAPTER_DIR_NAME / "adapter_config.json").exists()
    assert not (tmp_path / "adapter_config.json").exists()  # else from_pretrained would look for PEFT
    merged = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- tracking


def test_tracker_logs_window_means_and_truncates_on_resume(tmp_path):
    tracker = Tracker(tmp_path, total_steps=4)
    for step, loss in enumerate([1.0, 3.0, 5.0, 7.0], start=1):
        tracker.update({"loss": torch.tensor(loss), "lr": 0.1})
        if step % 2 == 0:
            tracker.log(step)
    tracker.log_eval(4, {"accuracy": torch.tensor(0.25)})
    png = tracker.close()
    assert png is not None and png.exists() and png.stat().st_size > 0
    assert read_metrics(tmp_path / "metrics.jsonl") == [
        {"step": 2, "loss": 2.0, "lr": pytest.approx(0.1)},
        {"step": 4, "loss": 6.0, "lr": pytest.approx(0.1)},
        {"step": 4, "eval/accuracy": 0.25},
    ]
    Tracker(tmp_path, total_steps=4, start_step=2).close()  # resuming at step 2 drops the later records
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 2, "loss": 2.0, "lr": pytest.approx(0.1)}]
    Tracker(tmp_path, total_steps=4).close()  # a fresh run starts a fresh file
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def test_tracker_means_count_each_key_over_the_steps_that_reported_it(tmp_path):
    # Three steps; "ratio" is missing from step 2 (a step with nothing to learn reports no ratio).
    # ratio mean = (1.0 + 1.2) / 2 = 1.1, not (1.0 + 1.2) / 3 = 0.733; loss mean = (3 + 0 + 6) / 3 = 3.
    tracker = Tracker(tmp_path, total_steps=3)
    tracker.update({"loss": torch.tensor(3.0), "ratio": torch.tensor(1.0)})
    tracker.update({"loss": 0.0})
    tracker.update({"loss": torch.tensor(6.0), "ratio": torch.tensor(1.2)})
    means = tracker.log(3)
    tracker.close()
    assert means["loss"] == pytest.approx(3.0)
    assert means["ratio"] == pytest.approx(1.1)
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["ratio"] == pytest.approx(1.1)
