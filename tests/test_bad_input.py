"""Bad input, across the recipes: one clear line on stderr (no traceback), exit code 2, and nothing that an
earlier run left in the output directory (checkpoints, final model, metrics) changed.

Every case runs in-process through ``rlcore.run.cli`` (as ``python recipes/<name>.py`` does) against the
output directory of one finished run.
"""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from helpers import load_recipe, tiny_cache  # noqa: F401 (tiny_cache: an autouse fixture)
from safetensors.torch import save_file

from rlcore.run import cli

ROWS = [{"prompt": f"{i}+1=", "completion": f"{i + 1}"} for i in range(8)]
PAIRS = [{"prompt": f"{i}+1=", "chosen": f"{i + 1}", "rejected": f"{i + 2}"} for i in range(8)]
COMMON = ["--threads", "1", "--max_steps", "1", "--eval_split", "none"]


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """The bad (and a few good) inputs the cases point at."""
    root = tmp_path_factory.mktemp("inputs")
    lines = jsonl(ROWS).splitlines(keepends=True)
    (root / "line7.jsonl").write_text("".join(lines[:6]) + '{"prompt": "7+1=", "completion": 8\n' + "".join(lines[6:]))
    (root / "empty.jsonl").write_text("")
    (root / "rows.jsonl").write_text(jsonl(ROWS))
    (root / "rows.txt").write_text("1+1=2\n")
    (root / "pairs.jsonl").write_text(jsonl(PAIRS))
    (root / "int_chosen.jsonl").write_text(jsonl([{**p, "chosen": [1, 2]} for p in PAIRS]))
    (root / "same_pairs.jsonl").write_text(jsonl([{**p, "rejected": p["chosen"]} for p in PAIRS]))
    (root / "prompts.jsonl").write_text(jsonl([{"prompt": r["prompt"]} for r in ROWS]))
    (root / "bad.json").write_text('{"lr": 1e-3,}')
    (root / "unknown.json").write_text('{"learning_rate": 1e-3}')
    (root / "list.json").write_text("[1, 2]")
    (root / "empty_dir").mkdir()
    (root / "not_a_model").mkdir()
    (root / "not_a_model" / "weights.bin").write_bytes(b"\0" * 16)
    other_base = root / "reward_adapter_of_another_base"  # a reward model's adapter and score head
    other_base.mkdir()
    config = {"peft_type": "LORA", "task_type": "SEQ_CLS", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    (other_base / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "other-model"}))
    save_file({"base_model.model.score.weight": torch.zeros(1, 8)}, other_base / "adapter_model.safetensors")
    return root


@pytest.fixture(scope="module")
def earlier(tmp_path_factory) -> Path:
    """The output directory of a finished 2-step SFT run with a checkpoint: what bad input must not damage."""
    output_dir = tmp_path_factory.mktemp("earlier")
    load_recipe("sft").main(
        ["--threads", "1", "--max_steps", "2", "--batch_size", "4", "--num_train_rows", "16", "--save_steps", "1"]
        + ["--eval_split", "none", "--logging_steps", "1", "--output_dir", str(output_dir)]
    )
    assert (output_dir / "model.safetensors").exists() and (output_dir / "checkpoint-2").exists()
    return output_dir


def snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


# (recipe, flags, what the one line must say); "{f}" is the inputs directory, "{out}" the earlier run's
CASES = [
    # data files
    ("sft", ["--dataset", "{f}/line7.jsonl"], "line 7: not valid JSON"),
    ("sft", ["--dataset", "{f}/empty.jsonl"], "empty.jsonl' is empty (no rows)"),
    ("sft", ["--dataset", "{f}/missing.jsonl"], "no such file or directory"),
    ("sft", ["--dataset", "{f}/rows.txt"], "expected a file ending in"),
    ("sft", ["--dataset", "{f}/pairs.jsonl"], "got a preference dataset"),
    ("sft", ["--eval_dataset", "{f}/empty.jsonl", "--eval_split", "test"], "--eval_dataset: dataset"),
    ("dpo", ["--dataset", "{f}/int_chosen.jsonl"], "field 'chosen' must be a string, got list"),
    ("dpo", ["--dataset", "{f}/same_pairs.jsonl"], "8 training pairs have chosen == rejected"),
    ("dpo", ["--dataset", "{f}/rows.jsonl"], "got a prompt_completion dataset"),
    ("kto", ["--dataset", "{f}/pairs.jsonl"], "got a preference dataset"),
    ("orpo", ["--dataset", "{f}/same_pairs.jsonl"], "8 training pairs have chosen == rejected"),
    ("reward_model", ["--dataset", "{f}/empty.jsonl"], "is empty (no rows)"),
    ("reward_model", ["--dataset", "{f}/same_pairs.jsonl"], "chosen == rejected"),
    ("grpo", ["--dataset", "{f}/prompts.jsonl"], "reward function 'accuracy' needs column(s) ['answer']"),
    ("grpo", ["--max_prompt_length", "2"], "--max_prompt_length 2: every"),
    ("online_dpo", ["--dataset", "{f}/empty.jsonl"], "is empty (no rows)"),
    ("ppo", ["--dataset", "{f}/line7.jsonl"], "line 7: not valid JSON"),
    # models
    ("sft", ["--model", "{f}/empty_dir"], "empty_dir' is not a model directory (no config.json)"),
    ("sft", ["--model", "{f}/not_a_model"], "not_a_model' is not a model directory"),
    ("sft", ["--model", "{f}/missing_model"], "missing_model': no such directory"),
    ("grpo", ["--reward_model", "{f}/empty_dir"], "empty_dir' is not a model directory"),
    ("ppo", ["--value_model", "{f}/missing_model"], "missing_model': no such directory"),
    # --config files
    ("sft", ["--config", "{f}/bad.json"], "bad.json: not valid JSON"),
    ("sft", ["--config", "{f}/missing.json"], "missing.json: no such file"),
    ("sft", ["--config", "{f}/unknown.json"], "unknown field(s) ['learning_rate']"),
    ("dpo", ["--config", "{f}/list.json"], "expected a mapping of field names to values"),
    # flag values
    ("sft", ["--lr", "0"], "--lr must be > 0"),
    ("sft", ["--max_seconds", "-1"], "--max_seconds must be > 0 or none"),
    ("sft", ["--lr_schedule", "step"], "--lr_schedule must be one of cosine, linear, constant"),
    ("sft", ["--load_in_4bit", "true"], "needs --lora_r > 0"),
    ("sft", ["--max_skipped_steps", "-1"], "--max_skipped_steps must be >= 0"),
    ("dpo", ["--loss_type", "hinged"], "--loss_type: 'hinged' is not one of"),
    ("dpo", ["--beta", "0"], "--beta must be > 0"),
    ("kto", ["--batch_size", "1"], "--batch_size must be >= 2 for kto"),
    ("orpo", ["--nll_weight", "0.5"], "--nll_weight is 1 in ORPO"),
    ("reward_model", ["--head_lr", "-1"], "--head_lr must be > 0"),
    ("grpo", ["--num_generations", "3"], "--num_generations must be >= 2 and divide"),
    ("grpo", ["--temperature", "0"], "--temperature must be > 0"),
    ("online_dpo", ["--reward_funcs", "none"], "no reward: give --reward_funcs or --reward_model"),
    ("ppo", ["--top_p", "0"], "--top_p must be in (0, 1]"),
    ("ppo", ["--reward_on_policy", "--reward_model", "{f}/empty_dir"], "adapter on the LoRA policy's base: give both"),
    ("ppo", ["--reward_on_policy", "--reward_model", "{f}/empty_dir", "--lora_r", "4"], "no adapter_config.json in it"),
    (
        "ppo",
        ["--reward_on_policy", "--reward_model", "{f}/reward_adapter_of_another_base", "--lora_r", "4"],
        "was trained on 'other-model', the policy starts from",
    ),
    ("grpo", ["--collapse_patience", "0"], "--collapse_patience must be > 0"),
    # the output directory and --resume
    ("sft", [], "holds checkpoints of an earlier run (checkpoint-1, checkpoint-2)"),
    ("sft", ["--resume", "--batch_size", "8"], "--batch_size 4 -> 8"),
    ("sft", ["--resume", "{out}/checkpoint-7"], "checkpoint-7: not a checkpoint directory"),
]


@pytest.mark.parametrize("recipe, flags, message", CASES, ids=[f"{c[0]}:{' '.join(c[1])[:40]}" for c in CASES])
def test_bad_input_is_one_line_exit_2_and_damages_nothing(recipe, flags, message, files, earlier, capsys):
    before = snapshot(earlier)
    argv = [flag.format(f=files, out=earlier) for flag in flags]
    same_run = ["--batch_size", "4", "--num_train_rows", "16", "--save_steps", "1", "--logging_steps", "1"]
    own = same_run if recipe == "sft" else ["--warm_start_steps", "0"]  # no SFT warm start for the others
    base = [*COMMON, *own, "--output_dir", str(earlier)]
    code = None
    try:
        cli(lambda: load_recipe(recipe).main([*base, *argv]))
    except SystemExit as exit:
        code = exit.code
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if ": error: " in line]
    assert code == 2, err[-3000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert message in lines[0], lines[0]
    assert snapshot(earlier) == before
