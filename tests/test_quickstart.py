"""quickstart.py: the whole pipeline (SFT, then GRPO and DPO from the SFT model) on budgets of one second."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_quickstart():
    spec = importlib.util.spec_from_file_location("quickstart", REPO / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["quickstart"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_accuracies_reads_steps_and_first_and_last_evaluation(tmp_path):
    records = [
        {"step": 0, "eval/exact_match": 0.25},
        {"step": 10, "loss": 1.0},
        {"step": 20, "loss": 0.5},
        {"step": 20, "eval/exact_match": 0.5},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    result = load_quickstart().accuracies(tmp_path)
    assert result == {"steps": 20, "start": 0.25, "end": 0.5, "stopped_early": False}
    assert load_quickstart().verdict(result) == "+25.0 points"


def test_accuracies_has_no_start_without_a_step_zero_evaluation(tmp_path):
    records = [{"step": 25, "loss": 2.0}, {"step": 40, "eval/loss": 1.5, "eval/exact_match": 0.1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    assert load_quickstart().accuracies(tmp_path) == {"steps": 40, "start": None, "end": 0.1, "stopped_early": False}


def test_a_stage_that_learnt_nothing_or_was_cut_says_so():
    verdict = load_quickstart().verdict
    assert verdict({"start": 0.5, "end": 0.5, "stopped_early": False}) == "LEARNT NOTHING (no gain over its start)"
    assert verdict({"start": 0.4, "end": 0.3, "stopped_early": True}) == (
        "LEARNT NOTHING (no gain over its start); CUT SHORT by --max_seconds"
    )


def test_a_non_positive_budget_is_refused_by_name():
    with pytest.raises(ValueError, match="--grpo_steps must be > 0"):
        load_quickstart().main(["--grpo_steps", "0"])


def test_quickstart_runs_sft_then_grpo_and_dpo_and_prints_the_table(tmp_path):
    command = [
        sys.executable,
        "quickstart.py",
        "--sft_steps",
        "5",
        "--grpo_steps",
        "2",
        "--dpo_steps",
        "2",
        "--num_train_rows",
        "64",
        "--num_eval_rows",
        "8",
        "--output_dir",
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a 1M-parameter model gains nothing from more threads
    finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    output = finished.stdout

    for recipe in ("sft", "grpo", "dpo"):
        assert f"$ python recipes/{recipe}.py" in output  # each stage is a command the reader can copy
    rows = {
        match[0]: match[1:] for match in re.findall(r"^(sft|grpo|dpo) .*?(\S+%|-)\s+(\S+%)  ", output, re.MULTILINE)
    }
    assert set(rows) == {"sft", "grpo", "dpo"}
    sft_end = rows["sft"][1]
    assert re.fullmatch(r"\d+\.\d%", sft_end)
    # GRPO and DPO start from the SFT model: their step-0 evaluation is the SFT model's final one.
    assert rows["grpo"][0] == rows["dpo"][0] == sft_end
    for stage in ("sft", "grpo", "dpo"):
        curves = tmp_path / stage / "curves.png"
        assert curves.exists() and str(curves) in output
        assert (tmp_path / stage / "config.json").exists()  # a model directory the next stage can load
