"""The offline recipes (SFT, reward model, DPO): end to end on tiny budgets, accumulation, resume, options."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import load_recipe, tiny_cache  # noqa: F401 (tiny_cache: an autouse fixture)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlcore import DPO_LOSS_TYPES
from rlcore.toy import tiny_model_dir
from rlcore.tracking import read_metrics

REPO = Path(__file__).resolve().parents[1]
SMALL_RUN = ["--num_train_rows", "64", "--num_eval_rows", "16", "--max_seconds", "none", "--logging_steps", "1"]


MPO_FLAGS = ["--f_divergence", "js_divergence", "--ld_alpha", "0.5", "--use_weighting"]


def run_script(name: str, *args: str, timeout: float = 600) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, str(REPO / "recipes" / f"{name}.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def train_losses(output_dir: Path) -> list[float]:
    return [record["loss"] for record in read_metrics(output_dir / "metrics.jsonl") if "loss" in record]


def weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "model.safetensors")


def assert_same_weights(first: Path, second: Path, atol: float) -> None:
    a, b = weights(first), weights(second)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


# ---------------------------------------------------------------- end to end (subprocess, the way users run them)


def test_sft_end_to_end(tmp_path):
    run_script(
        "sft",
        "--output_dir",
        str(tmp_path),
        "--max_steps",
        "40",
        "--batch_size",
        "16",
        "--lr",
        "1e-3",
        "--warmup_steps",
        "5",
        "--eval_steps",
        "20",
        *SMALL_RUN,
    )
    records = read_metrics(tmp_path / "metrics.jsonl")
    losses = train_losses(tmp_path)
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    assert {"step", "loss", "token_accuracy", "grad_norm", "lr", "time/step"} <= records[1].keys()
    evaluations = [r for r in records if "eval/exact_match" in r]  # the toy task's metric, with loss and token accuracy
    assert [r["step"] for r in evaluations] == [0, 20, 40] and all(
        {"eval/loss", "eval/token_accuracy"} <= r.keys() for r in evaluations
    )
    assert evaluations[-1]["eval/loss"] < evaluations[0]["eval/loss"]
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "run_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.generate(torch.tensor([[22, 23, 16, 22, 24, 34]]), max_new_tokens=2, do_sample=False).shape == (1, 8)


def test_reward_model_end_to_end(tmp_path):
    run_script(
        "reward_model",
        "--output_dir",
        str(tmp_path),
        "--warm_start_steps",
        "0",
        "--max_steps",
        "40",
        "--batch_size",
        "16",
        "--eval_steps",
        "0",
        *SMALL_RUN,
    )
    records = read_metrics(tmp_path / "metrics.jsonl")
    losses = train_losses(tmp_path)
    assert len(losses) == 40 and sum(losses[-10:]) / 10 < sum(losses[:10]) / 10
    assert {"loss", "accuracy", "margin_mean", "chosen_mean", "rejected_mean"} <= records[1].keys()
    assert [r["step"] for r in records if "eval/accuracy" in r] == [0, 40]
    assert {"eval/accuracy", "eval/margin", "eval/loss"} <= records[-1].keys()
    assert (tmp_path / "curves.png").exists()
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None


def test_dpo_end_to_end(tmp_path):
    # The untrained model's own answers as the rejected ones: far from the chosen, separable within 20 steps.
    run_script(
        "dpo",
        "--output_dir",
        str(tmp_path),
        "--warm_start_steps",
        "0",
        "--max_steps",
        "20",
        "--rejected_from_policy",
        "--batch_size",
        "16",
        "--lr",
        "1e-3",
        "--eval_steps",
        "0",
        *SMALL_RUN,
    )
    records = read_metrics(tmp_path / "metrics.jsonl")
    losses = train_losses(tmp_path)
    assert losses[0] == pytest.approx(0.6931, abs=0.01)  # log 2: policy == reference at step 1
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]
    train_records = [r for r in records if "loss" in r]
    assert {"rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"} <= train_records[0].keys()
    assert train_records[-1]["rewards/accuracies"] > 0.9
    assert [r["step"] for r in records if "eval/accuracy" in r] == [0, 20]  # before and after
    assert (tmp_path / "curves.png").exists()
    AutoModelForCausalLM.from_pretrained(tmp_path)


def test_reward_model_head_has_its_own_learning_rate(tmp_path):
    # Adam's first update of a weight with a non-zero gradient g is lr * g / (|g| + eps) = lr * sign(g) (no
    # weight decay here): with --lr 1e-12 the body stays put, and every head weight moves by --head_lr.
    main = load_recipe("reward_model").main
    common = [
        "--warm_start_steps",
        "0",
        "--max_steps",
        "1",
        "--warmup_steps",
        "0",
        "--batch_size",
        "4",
        "--lr",
        "1e-12",
        "--eval_split",
        "none",
        *SMALL_RUN,
    ]
    main(["--output_dir", str(tmp_path / "still"), "--head_lr", "1e-12", *common])
    main(["--output_dir", str(tmp_path / "head"), "--head_lr", "1e-2", *common])
    start, still, head = (
        load_file(Path(tiny_model_dir()) / "model.safetensors"),
        weights(tmp_path / "still"),
        weights(tmp_path / "head"),
    )
    body = [name for name in head if name != "score.weight"]
    assert body
    for name in body:
        torch.testing.assert_close(head[name], start[name], rtol=0, atol=1e-10, msg=name)
        torch.testing.assert_close(still[name], start[name], rtol=0, atol=1e-10, msg=name)
    step = (head["score.weight"] - still["score.weight"]).abs()  # [1, H]
    torch.testing.assert_close(step, torch.full_like(step, 1e-2), rtol=1e-3, atol=0)


# ---------------------------------------------------------------- gradient accumulation


@pytest.mark.parametrize(
    "recipe, extra",
    [
        ("sft", []),
        ("dpo", ["--warm_start_steps", "0", "--rpo_alpha", "1.0"]),  # + token-mean NLL
        # a weighted sum of loss types, f-DPO, LD-DPO log-probs and WPO weights: all per pair (the sft term is the
        # case above; with WPO its weight is the micro-batch's mean pair weight, which does not add up)
        ("dpo", ["--warm_start_steps", "0", "--loss_type", "sigmoid:0.8,ipo:0.2", *MPO_FLAGS]),
        ("reward_model", ["--warm_start_steps", "0"]),
    ],
)
def test_accumulation_gives_the_large_batch_update(tmp_path, recipe, extra):
    main = load_recipe(recipe).main
    common = ["--max_steps", "1", "--lr", "1e-2", "--warmup_steps", "0", "--eval_split", "none", *SMALL_RUN, *extra]
    main(["--output_dir", str(tmp_path / "large"), "--batch_size", "8", "--grad_accum_steps", "1", *common])
    main(["--output_dir", str(tmp_path / "small"), "--batch_size", "2", "--grad_accum_steps", "4", *common])
    large, small = (read_metrics(tmp_path / name / "metrics.jsonl")[0] for name in ("large", "small"))  # step 1
    assert small["loss"] == pytest.approx(large["loss"], rel=1e-6)
    assert small["grad_norm"] == pytest.approx(large["grad_norm"], rel=1e-5)  # the same gradient, before clipping
    # Adam's first step is lr * g / (|g| + eps), about lr * sign(g): float noise (which differs between CPUs'
    # matmul kernels) moves the few weights whose gradient is ~eps by up to 2 lr. So: every other weight takes
    # the same step within 1% of lr, and at most 1 in 10^4 weights may differ more (18 of 997,120 for the
    # reward model on one CPU: a wrong accumulation moves nearly all of them).
    start = load_file(Path(tiny_model_dir()) / "model.safetensors")
    large, small = weights(tmp_path / "large"), weights(tmp_path / "small")
    difference = torch.cat([(large[k] - small[k]).abs().flatten() for k in start])
    moved = torch.cat([(large[k] - start[k]).abs().flatten() for k in start])
    assert moved.max() > 0.5e-2  # the step did move weights, by about lr
    assert (difference > 1e-4).sum() <= difference.numel() * 1e-4, (difference > 1e-4).sum()


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize(
    "recipe, extra",
    [
        ("sft", ["--lora_r", "4", "--lora_dropout", "0.2"]),  # dropout draws random numbers: the RNG state matters
        ("dpo", ["--warm_start_steps", "0"]),  # the reference stays the starting policy
    ],
)
def test_resume_equals_uninterrupted(tmp_path, recipe, extra):
    main = load_recipe(recipe).main
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = [
        "--max_steps",
        "6",
        "--batch_size",
        "4",
        "--lr",
        "1e-3",
        "--save_steps",
        "3",
        "--save_total_limit",
        "0",
        "--eval_split",
        "none",
        *SMALL_RUN,
        *extra,
    ]
    main(["--output_dir", str(straight), *common])
    # The interrupted run: what the straight run had on disk when it wrote checkpoint-3 (plus later records).
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    shutil.copy(straight / "metrics.jsonl", resumed / "metrics.jsonl")
    main(["--output_dir", str(resumed), "--resume", *common])
    expected, found = train_losses(straight), train_losses(resumed)
    assert len(expected) == len(found) == 6
    assert found == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert_same_weights(straight, resumed, atol=1e-6)


# ---------------------------------------------------------------- options


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "exo_pair"])  # summed, averaged, smoothed: the recipe's paths
def test_dpo_loss_types_train(tmp_path, loss_type):
    assert loss_type in DPO_LOSS_TYPES  # every type is checked against hand values in test_losses.py
    smoothing = ["--label_smoothing", "0.1"] if loss_type in ("exo_pair", "robust") else []
    load_recipe("dpo").main(
        [
            "--output_dir",
            str(tmp_path),
            "--loss_type",
            loss_type,
            *smoothing,
            "--max_steps",
            "2",
            "--batch_size",
            "4",
            "--warm_start_steps",
            "0",
            "--eval_split",
            "none",
            *SMALL_RUN,
        ]
    )
    losses = train_losses(tmp_path)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_dpo_flags_are_checked_in_one_line():
    config_class = load_recipe("dpo").DPOConfig
    assert config_class(loss_type="sigmoid:0.8, bco_pair:0.2,sft").loss_weights == [0.8, 0.2, 1.0]
    with pytest.raises(ValueError, match="--loss_type: 'kto' is not one of sigmoid, robust"):
        config_class(loss_type="sigmoid,kto")
    with pytest.raises(ValueError, match="--loss_type: the weight of 'sigmoid' must be a number, got 'x'"):
        config_class(loss_type="sigmoid:x")
    with pytest.raises(ValueError, match="f_divergence 'forward_kl' only works with loss types"):
        config_class(loss_type="nca_pair", f_divergence="forward_kl")
    with pytest.raises(ValueError, match=r"--ld_alpha must be in \[0, 1\]"):
        config_class(ld_alpha=1.5)
    with pytest.raises(ValueError, match="WPO weights do not apply to aot"):
        config_class(loss_type="aot", use_weighting=True)


def test_dpo_precomputed_reference_matches_the_live_one(tmp_path):
    main = load_recipe("dpo").main
    common = ["--max_steps", "2", "--batch_size", "4", "--warm_start_steps", "0", "--eval_split", "none", *SMALL_RUN]
    common += ["--ld_alpha", "0.5"]  # LD-DPO's reference log-probs too
    main(["--output_dir", str(tmp_path / "live"), *common])
    main(["--output_dir", str(tmp_path / "precomputed"), "--precompute_ref", *common])
    assert train_losses(tmp_path / "live") == pytest.approx(train_losses(tmp_path / "precomputed"), abs=1e-6)
    assert_same_weights(tmp_path / "live", tmp_path / "precomputed", atol=1e-6)


def test_dpo_with_lora_and_policy_rejections(tmp_path, capsys):
    results = load_recipe("dpo").main(
        [
            "--output_dir",
            str(tmp_path),
            "--lora_r",
            "4",
            "--max_steps",
            "2",
            "--batch_size",
            "4",
            "--warm_start_steps",
            "0",
            "--rejected_from_policy",
            *SMALL_RUN,
        ]
    )
    assert "the starting policy is wrong on 64 of 64 training prompts" in capsys.readouterr().out
    assert set(results) == {"eval/accuracy", "eval/margin", "eval/loss", "eval/exact_match"}
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    AutoModelForCausalLM.from_pretrained(tmp_path)  # the merged model


@pytest.mark.parametrize(
    "dataset, extra",
    [
        ("toy:prompt_completion", ["--packing", "--max_length", "64"]),
        ("toy:conversational", []),
        ("toy:language_modeling", []),
    ],
)
def test_sft_data_variants(tmp_path, dataset, extra):
    results = load_recipe("sft").main(
        [
            "--output_dir",
            str(tmp_path),
            "--dataset",
            dataset,
            "--max_steps",
            "3",
            "--batch_size",
            "4",
            *SMALL_RUN,
            *extra,
        ]
    )
    assert len(train_losses(tmp_path)) == 3 and "eval/loss" in results
    assert "eval/token_accuracy" in results
    assert ("eval/exact_match" in results) == (dataset != "toy:language_modeling")  # text rows have no prompt


# ---------------------------------------------------------------- the embedded defaults (minutes each)


@pytest.mark.slow
def test_sft_default_learns_addition(tmp_path):
    run_script("sft", "--output_dir", str(tmp_path))  # all 3000 steps, however busy the CPU
    final = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "eval/exact_match" in r][-1]
    assert final["eval/exact_match"] >= 0.5


@pytest.mark.slow
def test_dpo_default_improves_its_sft_start(tmp_path):
    # From the ~42-50% mid-schedule SFT checkpoint, 300 steps of plain DPO gained 3-6 points (see dpo.py).
    run_script("dpo", "--output_dir", str(tmp_path))
    accuracy = [r["eval/exact_match"] for r in read_metrics(tmp_path / "metrics.jsonl") if "eval/exact_match" in r]
    assert accuracy[0] > 0.3 and accuracy[-1] >= accuracy[0] + 0.02


@pytest.mark.slow
def test_reward_model_default_ranks_held_out_pairs(tmp_path):
    # The default run (2000 steps, no time budget): 0.942 measured (15 min at load ~3, one thread).
    run_script("reward_model", "--output_dir", str(tmp_path), timeout=3600)
    assert [r for r in read_metrics(tmp_path / "metrics.jsonl") if "eval/accuracy" in r][-1]["eval/accuracy"] >= 0.9


def test_a_resumed_run_keeps_its_first_evaluation_and_does_not_repeat_the_last(tmp_path):
    main = load_recipe("sft").main
    common = [
        "--max_steps",
        "4",
        "--batch_size",
        "4",
        "--save_steps",
        "2",
        "--eval_steps",
        "2",
        "--save_total_limit",
        "0",
        *SMALL_RUN,
    ]
    main(["--output_dir", str(tmp_path / "straight"), *common])
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copy(tmp_path / "straight" / "metrics.jsonl", resumed / "metrics.jsonl")
    main(["--output_dir", str(resumed), "--resume", *common])
    straight_summary, resumed_summary = (
        json.loads((tmp_path / d / "summary.json").read_text()) for d in ("straight", "resumed")
    )
    assert resumed_summary["first_eval"] == straight_summary["first_eval"] != {}
    assert resumed_summary["steps"] == 4 and resumed_summary["final_error"] is None
    # evaluations at 0, 2 and 4 once each: resuming at the cadence step 2 does not evaluate step 2 again
    assert [r["step"] for r in read_metrics(resumed / "metrics.jsonl") if "eval/loss" in r] == [0, 2, 4]


def test_bad_input_is_one_line_and_exit_code_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "sft.py"), "--dataset", str(tmp_path / "missing.jsonl")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1]
        == f"sft.py: error: dataset {str(tmp_path / 'missing.jsonl')!r}: no such file or directory"
    )
    assert "Traceback" not in result.stderr
