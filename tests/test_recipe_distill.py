"""recipes/distill.py end to end on tiny budgets: the loss falls, the student loads, resume repeats the run."""

import json
import math

import pytest
from helpers import load_recipe, tiny_cache  # noqa: F401 (tiny_cache: an autouse fixture)
from transformers import AutoModelForCausalLM

from rlcore.toy import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """Another initialisation of the tiny architecture: a teacher the untrained student differs from."""
    directory = tmp_path_factory.mktemp("teacher")
    tiny_model(seed=1).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return str(directory)


def distill_records(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def distill(output_dir, teacher_dir, *flags):
    common = ["--warm_start_steps", "0", "--teacher", teacher_dir, "--output_dir", str(output_dir), "--threads", "1"]
    common += ["--num_train_rows", "16", "--num_eval_rows", "8", "--batch_size", "8", "--logging_steps", "1"]
    common += ["--max_new_tokens", "4", "--lr", "3e-3", "--max_seconds", "none"]
    load_recipe("distill").main([*common, *flags])
    return distill_records(output_dir)


def test_distill_off_policy_loss_falls_and_the_student_loads(tmp_path, teacher_dir):
    # --lmbda 0: the dataset's completions of the same 16 rows every two steps; the divergence must fall
    records = distill(tmp_path / "kd", teacher_dir, "--lmbda", "0", "--beta", "0.5", "--max_steps", "6")
    train = [r for r in records if "loss" in r and "eval/loss" not in r]
    assert [r["step"] for r in train] == list(range(1, 7)) and all(r["on_policy"] == 0 for r in train)
    assert train[-1]["loss"] < 0.8 * train[0]["loss"], [r["loss"] for r in train]
    evals = [r for r in records if "eval/exact_match" in r]
    assert [r["step"] for r in evals] == [0, 6]
    AutoModelForCausalLM.from_pretrained(tmp_path / "kd")


def test_distill_on_policy_resume_repeats_the_uninterrupted_run(tmp_path, teacher_dir):
    flags = ("--lmbda", "1", "--max_steps", "4", "--save_steps", "2", "--eval_steps", "0", "--distill_top_k", "8")
    flags += ("--num_generations_eval", "2")
    straight = [r for r in distill(tmp_path / "a", teacher_dir, *flags) if "loss" in r and "eval/loss" not in r]
    assert all(r["on_policy"] == 1 and r["completion_tokens"] > 0 and math.isfinite(r["loss"]) for r in straight)
    resumed = distill(tmp_path / "b", teacher_dir, *flags, "--resume", str(tmp_path / "a" / "checkpoint-2"))
    resumed = [r for r in resumed if "loss" in r and "eval/loss" not in r]
    assert [r["step"] for r in resumed] == [3, 4]
    evals = [r for r in distill_records(tmp_path / "b") if "eval/pass@2" in r]
    assert evals and all(0 <= r["eval/pass@1"] <= r["eval/pass@2"] <= 1 for r in evals)
    for before, after in zip(straight[2:], resumed):
        assert math.isclose(after["loss"], before["loss"], rel_tol=1e-4), (before, after)


def test_distill_flags_are_checked(teacher_dir):
    distill_recipe = load_recipe("distill")
    for flags in ({"lmbda": 1.5}, {"beta": -0.1}, {"distill_top_k": 0}):
        with pytest.raises(ValueError):
            distill_recipe.DistillConfig(**flags)
    with pytest.raises(ValueError, match="--teacher"):  # before the student's warm start
        distill_recipe.main(["--teacher", "/no/such/teacher", "--num_train_rows", "4", "--num_eval_rows", "4"])
