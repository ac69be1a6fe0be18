"""recipes/distill.py end to end on tiny budgets: the loss falls, the student loads, resume repeats the run."""

import json
import math

import bitsandbytes as bnb
import pytest
import torch
from helpers import load_recipe, tiny_cache  # noqa: F401 (tiny_cache: an autouse fixture)
from transformers import AutoModelForCausalLM

from rlcore import models
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


def test_teacher_precision_flags_load_a_bfloat16_or_4bit_teacher(teacher_dir):
    config = load_recipe("distill").DistillConfig
    assert models.load_options(config(dtype="bfloat16"), "teacher_")["dtype"] == "bfloat16"  # None: --dtype
    options = models.load_options(config(teacher_dtype="bfloat16", teacher_load_in_4bit=True), "teacher_")
    assert options == {"dtype": "bfloat16", "load_in_4bit": True, "double_quant": False, "compute_dtype": None}
    assert models.load_options(config(teacher_dtype="bfloat16"))["dtype"] == "float32"  # the student's own
    teacher = models.load_policy(teacher_dir, **options)[0]
    up_proj = teacher.model.layers[0].mlp.up_proj
    assert isinstance(up_proj, bnb.nn.Linear4bit) and up_proj.weight.quant_state.shape == (512, 128)
    assert teacher.get_output_embeddings().weight.dtype == torch.bfloat16  # the head is never quantised
    with pytest.raises(ValueError, match="--teacher_dtype must be"):
        config(teacher_dtype="int8")
    config(teacher_load_in_4bit=True, bnb_double_quant=True)  # the --bnb_* flags apply to a 4-bit teacher


@pytest.mark.slow  # three short runs: ~25 s on 2 busy CPU cores
def test_distill_with_a_bfloat16_and_a_4bit_teacher_learns_the_same_first_step(tmp_path, teacher_dir):
    flags = ("--lmbda", "0", "--beta", "0.5", "--max_steps", "2", "--eval_split", "none")
    first = {}
    for name, teacher_flags in (
        ("float32", ()),
        ("bfloat16", ("--teacher_dtype", "bfloat16")),
        ("nf4", ("--teacher_load_in_4bit", "--teacher_dtype", "bfloat16")),
    ):
        records = distill(tmp_path / name, teacher_dir, *flags, *teacher_flags)
        first[name] = [r["loss"] for r in records if "loss" in r][0]
    # the same rows, the same student: only the teacher's rounding differs (bfloat16: ~2^-8 relative per weight;
    # nf4: up to 0.15 of each block's absmax), so the divergence moves a little, not a lot
    # (measured: 0.0129247 float32, 0.0129260 bfloat16, 0.0130243 nf4)
    assert math.isclose(first["bfloat16"], first["float32"], rel_tol=1e-3) and first["bfloat16"] != first["float32"]
    assert math.isclose(first["nf4"], first["float32"], rel_tol=0.05) and first["nf4"] != first["bfloat16"], first
