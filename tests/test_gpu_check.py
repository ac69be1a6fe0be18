"""benchmarks/gpu_check.py in smoke mode (CPU, tiny shapes, the code paths of the GPU run): every row of its
table is there, with a number, or "skipped" with its reason where the smoke mode cannot measure it (the
compiled CUDA-graph decode step on CPU; TRL when it is not installed).

The decode and MFU parts run in-process (fast); the whole smoke run, in a subprocess as a user runs it, is
``-m slow`` (100 to 150 s on 2 busy cores, most of it the GRPO workers and a 0.5B memory row).
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import load_benchmark

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    return load_benchmark("gpu_check")


def expected_rows(plan, parts: list[str]) -> set[str]:
    """The row names the table must hold: 3 contenders x each batch size, batch-1 HBM fractions, and so on."""
    names = {"decode": {"device-to-device copy bandwidth"}, "mfu": set(), "grpo": set(), "memory": set()}
    for batch in plan.batch_sizes:
        for name in ("rlcore eager", "rlcore static cache + compiled step", "model.generate"):
            names["decode"].add(f"decode tokens/s batch {batch}, {name}")
            if batch == 1:
                names["decode"].add(f"batch-1 decode / HBM bound, {name}")
    names["mfu"] |= {"peak dense FLOP/s used", "measured matmul FLOP/s", "SFT MFU", "DPO MFU"}
    names["grpo"] |= {"GRPO step seconds, rlcore", "GRPO step seconds, trl", "GRPO step rlcore / TRL"}
    names["memory"] |= {f"memory {row.split(':')[0]} 0.5B lora ckpt off" for row in plan.memory_rows}
    return set().union(*(names[part] for part in parts))


def check_table(rows: list[dict], plan, parts: list[str]) -> None:
    trl_missing = importlib.util.find_spec("trl") is None
    by_name = {}
    for row in rows:
        # the compiled step carries its device in its name: "(CUDA graphs)" or "(no graphs: CPU)"
        by_name[row["row"].split(" (")[0]] = row
    assert len(by_name) == len(rows) and set(by_name) == expected_rows(plan, parts)
    for name, row in by_name.items():
        skippable = "compiled step" in name or (trl_missing and ("trl" in name or "TRL" in name))
        if row["value"] is None:
            assert skippable and row["note"].startswith("skipped"), row
        else:
            assert isinstance(row["value"], float) and math.isfinite(row["value"]) and row["value"] > 0, row
    fractions = [row["value"] for row in rows if row["unit"] == "fraction" and row["value"] is not None]
    assert fractions and all(0 < value < 1.5 for value in fractions)  # MFU and HBM fractions: no unit slip


def test_datasheet_peak_picks_the_most_specific_name(gpu_check):
    assert gpu_check.datasheet_peak("NVIDIA H100 80GB HBM3")[0] == 989e12  # SXM
    assert gpu_check.datasheet_peak("NVIDIA H100 PCIe")[0] == 756e12
    assert gpu_check.datasheet_peak("NVIDIA H100 NVL")[0] == 835e12
    assert gpu_check.datasheet_peak("NVIDIA H200")[0] == 989e12
    assert gpu_check.datasheet_peak("NVIDIA H200 NVL")[0] == 835e12
    assert gpu_check.datasheet_peak("NVIDIA A100-SXM4-80GB") is None  # measured matmul peak instead


def test_mfu_counts_the_0_5b_shape_by_hand(gpu_check):
    """N of the 0.5B shape, counted by hand (tied embedding once, q/k/v biases, no o_proj bias):
    embedding 151936 * 896 = 136,134,656; per layer q 896 * 896 + 896 = 803,712, k and v 896 * 128 + 128 =
    114,816 each, o 896 * 896 = 802,816, MLP 3 * 896 * 4864 = 13,074,432, two norms 1,792: 14,912,384, times
    24 layers = 357,897,216; final norm 896. Total 494,032,768 (Qwen2.5-0.5B's model card: 0.49B)."""
    config = gpu_check.Qwen2Config(**gpu_check.MFU_SHAPES["0.5B"])
    with torch.device("meta"):
        model = gpu_check.Qwen2ForCausalLM(config)
    parameters = gpu_check.models.parameter_counts(model)[1]
    assert parameters == 136_134_656 + 24 * 14_912_384 + 896 == 494_032_768
    assert gpu_check.training_flops("sft", parameters, 8 * 1024) == 6 * 494_032_768 * 8192
    assert gpu_check.training_flops("dpo", parameters, 8 * 1024) == 8 * 494_032_768 * 8192


def test_smoke_decode_and_mfu_rows(gpu_check, tmp_path):
    out = tmp_path / "table.json"
    gpu_check.main(["--smoke", "--parts", "decode,mfu", "--threads", "1", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["plan"]["device"] == "cpu"
    assert report["complete"] is True and report["seconds"] > 0
    check_table(report["rows"], gpu_check.PLANS["smoke"], ["decode", "mfu"])


def test_grpo_runs_with_a_kl_term_and_a_worker_past_the_limit_is_stopped(gpu_check, tmp_path, monkeypatch):
    """From the untrained model every reward is 0; with beta 0 rlcore would skip the forward and backward that
    TRL runs, so both get GRPO_BETA. A worker still running past --time_limit + grace is stopped, its row says
    so, and the rows measured so far are already in --out (``"complete": false`` until the end)."""
    calls = []

    def worker_that_overruns(spec, run_dir, config, timeout):
        calls.append((spec, timeout))
        raise subprocess.TimeoutExpired("worker", timeout)

    monkeypatch.setattr(gpu_check.compare_trl, "run_worker", worker_that_overruns)
    monkeypatch.setattr(gpu_check.compare_trl, "build_model", lambda name, directory: str(tmp_path / "model"))
    out = tmp_path / "table.json"
    table = gpu_check.Table(str(out), {"device": "test"})
    deadline = gpu_check.time.perf_counter() + 100
    gpu_check.grpo_part(gpu_check.PLANS["smoke"], table, 1, tmp_path, deadline)
    spec, timeout = calls[0]
    assert spec["framework"] == "rlcore" and spec["hyper"]["beta"] == gpu_check.GRPO_BETA > 0
    assert 100 < timeout <= 100 + gpu_check.SUBPROCESS_GRACE
    rows = {row["row"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["GRPO step seconds, rlcore"]["value"] is None
    assert rows["GRPO step seconds, rlcore"]["note"].startswith(f"stopped after {timeout:.0f} s")
    assert json.loads(out.read_text())["complete"] is False


def test_bad_parts_is_one_line(gpu_check, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--smoke", "--parts", "decode,speed"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--parts: unknown ['speed']" in error and "decode,grpo,mfu,memory" in error


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run itself would start")
def test_gpu_run_without_cuda_is_one_line(gpu_check, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main([])
    assert exit_info.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.slow
def test_whole_smoke_run_in_a_subprocess(gpu_check, tmp_path):
    out = tmp_path / "table.json"
    command = [sys.executable, str(SCRIPT), "--smoke", "--threads", "1", "--out", str(out)]
    finished = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "GRPO step rlcore / TRL" in finished.stdout  # the table is printed
    check_table(json.loads(out.read_text())["rows"], gpu_check.PLANS["smoke"], list(gpu_check.PARTS))
