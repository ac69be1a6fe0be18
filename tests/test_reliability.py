"""Reliability: guards in the loop, resume that does only the right thing, preemption.

Each fault of the reliability list is driven here and its outcome asserted: a skipped or stopped step, a
warning, a refusal with its message. Recipes run in-process on tiny budgets (``load_recipe``); the SIGTERM
test is one subprocess.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import load_recipe, small_qwen2_config, tiny_cache  # noqa: F401 (tiny_cache: an autouse fixture)
from safetensors.torch import load_file
from transformers import Qwen2ForCausalLM

from rlcore import guards
from rlcore.checkpoint import (
    DamagedCheckpoint,
    load_checkpoint,
    resume_candidates,
    save_checkpoint,
    verify_checkpoint,
)
from rlcore.optim import build_optimizer, build_scheduler, optimizer_step
from rlcore.run import check_resumed_config, cli
from rlcore.toy import tiny_model_dir
from rlcore.tracking import read_metrics

REPO = Path(__file__).resolve().parents[1]
# a tiny SFT run: 32 rows, 4 per step, every step logged, a checkpoint every 2 steps, all kept
SFT_FLAGS = [
    "--threads",
    "1",
    "--num_train_rows",
    "32",
    "--batch_size",
    "4",
    "--eval_split",
    "none",
    "--logging_steps",
    "1",
    "--warmup_steps",
    "0",
    "--save_total_limit",
    "0",
]


def run_cli(main, argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``cli`` around a recipe's main, in-process."""
    code = 0
    try:
        cli(lambda: main(argv))
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    """The single ``<recipe>: error: ...`` line of stderr (progress bars aside), asserting there is no traceback."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def losses(output_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(output_dir / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def sft():
    return load_recipe("sft")


# ---------------------------------------------------------------- the guards' pure checks


def test_diverging_by_hand():
    # median([4, 5, 6]) = 5; 4 * 5 + 1 = 21: 21.5 is diverging, 20.9 is not
    assert guards.diverging([4.0, 5.0, 6.0], 21.5) and not guards.diverging([4.0, 5.0, 6.0], 20.9)
    # a small loss that reads 5x its median but within the 1-nat margin: noise, not divergence
    assert not guards.diverging([0.02, 0.02, 0.02], 0.1)
    # losses at or below 0 (policy gradients) are not judged; no history, no judgement
    assert not guards.diverging([-0.1, 0.0, -0.2], 100.0) and not guards.diverging([], 1e9)


def test_stuck_and_nonfinite_keys():
    ones = lambda v: v >= 1.0  # noqa: E731
    assert guards.stuck([0.5, 1.0, 1.0, 1.0], ones, 3) and not guards.stuck([1.0, 0.5, 1.0, 1.0], ones, 3)
    assert not guards.stuck([1.0, 1.0], ones, 3)
    values = {"loss": float("nan"), "grad_norm": float("inf"), "reward": float("nan")}
    assert guards.nonfinite_keys(values) == ["loss", "grad_norm"]  # only the loss and the gradient norm count


def test_nonfinite_gradient_skips_the_update_and_the_schedule_step():
    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(model, lr=0.1)
    scheduler = build_scheduler(optimizer, warmup_steps=2, total_steps=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    (model(torch.ones(1, 3)).sum() * float("nan")).backward()
    grad_norm = optimizer_step(model.parameters(), optimizer, scheduler, max_grad_norm=1.0)
    assert not torch.isfinite(grad_norm)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert scheduler.last_epoch == 0 and not optimizer.state and all(p.grad is None for p in model.parameters())
    model(torch.ones(1, 3)).sum().backward()  # a finite step after it updates as usual
    optimizer_step(model.parameters(), optimizer, scheduler, max_grad_norm=1.0)
    assert scheduler.last_epoch == 1 and not torch.equal(before["weight"], model.weight)


def test_guard_stops_after_k_skips_in_a_row_and_resets_on_a_finite_step():
    guard = guards.LoopGuard(max_skipped_steps=3)
    nan = {"loss": float("nan"), "grad_norm": float("nan")}
    assert guard.check(1, nan) and guard.check(2, nan)
    assert not guard.check(3, {"loss": 1.0, "grad_norm": 1.0})  # the count restarts
    guard.check(4, nan), guard.check(5, nan)
    with pytest.raises(guards.RunStopped, match="3 steps in a row had a non-finite") as stop:
        guard.check(6, nan)
    assert stop.value.exit_code == 1 and guard.skipped_total == 5


def test_online_guard_warns_on_collapse_and_stops_when_asked(capsys):
    values = {"frac_reward_zero_std": 1.0, "entropy": 0.5, "completions/truncated_frac": 1.0}
    guard = guards.online(type("C", (), {"max_skipped_steps": 5, "stop_on_collapse": False})(), patience=3)
    for step in range(1, 6):
        guard.check(step, values)
    out = capsys.readouterr().out
    assert out.count("WARNING") == 2  # once per kind, not every step
    assert "every group's rewards are equal" in out and "every completion ran to --max_new_tokens" in out
    assert "step 3:" in out and "entropy" not in out.replace("frac_reward", "")  # 0.5 nats: no collapse
    stopping = guards.online(type("C", (), {"max_skipped_steps": 5, "stop_on_collapse": True})(), patience=2)
    stopping.check(1, values)
    with pytest.raises(guards.RunStopped, match="--stop_on_collapse"):
        stopping.check(2, values)


def test_degenerate_pairs_are_counted_and_refused_when_all(capsys):
    counts = guards.check_pairs([[1, 2], [3], []], [[1, 2], [4], [5]])
    assert list(counts.values()) == [1, 1]
    assert "1 of 3 training pairs have chosen == rejected" in capsys.readouterr().out
    with pytest.raises(ValueError, match="every one of the 2 training pairs have chosen == rejected"):
        guards.check_pairs([[1], [2]], [[1], [2]])
    with pytest.raises(ValueError, match="no completion token left"):
        guards.check_completions([[0, 0, 0], [1, 0]])  # position 0 predicts nothing: [1, 0] has no loss token


# ---------------------------------------------------------------- faults of a whole run


def test_sft_lr_10_warns_that_it_diverges_and_stops_with_stop_on_collapse(tmp_path, sft, capsys):
    flags = [*SFT_FLAGS, "--lr", "10", "--max_steps", "4"]
    code, out, err = run_cli(sft.main, [*flags, "--output_dir", str(tmp_path / "warn")], capsys)
    assert code == 0 and "WARNING step 2: loss" in out and "the run is diverging" in out
    code, out, err = run_cli(sft.main, [*flags, "--output_dir", str(tmp_path / "stop"), "--stop_on_collapse"], capsys)
    assert code == 1 and one_error_line(err) and "stopped (--stop_on_collapse): step 2: loss" in err
    assert not (tmp_path / "stop" / "model.safetensors").exists()  # no final model of a diverged run
    assert "diverging" in json.loads((tmp_path / "stop" / "summary.json").read_text())["final_error"]


def test_nan_loss_skips_every_step_then_stops_and_writes_no_final_model(tmp_path, sft, capsys, monkeypatch):
    real_loss = sft.sft_loss_from_logprobs  # the loss of the default chunked LM head (--lm_head_chunk)

    def nan_loss(*args, **kwargs):
        loss, stats = real_loss(*args, **kwargs)
        return loss * float("nan"), stats

    monkeypatch.setattr(sft, "sft_loss_from_logprobs", nan_loss)
    flags = [*SFT_FLAGS, "--max_steps", "10", "--max_skipped_steps", "3", "--save_steps", "1"]
    code, out, err = run_cli(sft.main, [*flags, "--output_dir", str(tmp_path)], capsys)
    assert code == 1 and one_error_line(err) and "stopped at step 3: 3 steps in a row" in err
    assert "step 1 skipped: non-finite loss nan" in out
    assert not (tmp_path / "model.safetensors").exists()
    start = load_file(Path(tiny_model_dir()) / "model.safetensors")
    saved = load_file(tmp_path / "checkpoint-2" / "model.safetensors")  # the skipped steps changed no weight
    assert all(torch.equal(start[name], saved[name]) for name in saved)
    assert json.loads((tmp_path / "summary.json").read_text())["skipped_steps"] == 3


def test_grpo_without_signal_warns_that_every_group_is_equal(tmp_path, capsys):
    grpo = load_recipe("grpo")
    flags = ["--threads", "1", "--warm_start_steps", "0", "--max_steps", "3", "--batch_size", "8"]
    flags += ["--num_generations", "4", "--eval_split", "none", "--collapse_patience", "2"]
    code, out, err = run_cli(grpo.main, [*flags, "--output_dir", str(tmp_path)], capsys)
    # the untrained tiny model never writes a correct sum: every reward 0, every group without signal
    assert code == 0 and "WARNING step 2: every group's rewards are equal (no learning signal) for 2 steps" in out


def test_dpo_refuses_pairs_whose_chosen_equals_rejected(tmp_path, capsys):
    rows = [{"prompt": f"{i}+1=", "chosen": f"{i + 1}", "rejected": f"{i + 1}"} for i in range(8)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = ["--dataset", str(tmp_path / "pairs.jsonl"), "--warm_start_steps", "0", "--output_dir", str(tmp_path / "o")]
    code, out, err = run_cli(load_recipe("dpo").main, flags, capsys)
    assert code == 2 and one_error_line(err)
    assert "every one of the 8 training pairs have chosen == rejected after tokenisation" in err


# ---------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def finished(sft, tmp_path_factory):
    """A finished 4-step SFT run with checkpoints at steps 2 and 4."""
    output_dir = tmp_path_factory.mktemp("finished")
    sft.main([*SFT_FLAGS, "--max_steps", "4", "--save_steps", "2", "--output_dir", str(output_dir)])
    return output_dir


def copy_run(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def test_a_fresh_run_refuses_a_directory_with_checkpoints_unless_overwrite(finished, tmp_path, sft, capsys):
    run = copy_run(finished, tmp_path)
    flags = [*SFT_FLAGS, "--max_steps", "3", "--save_steps", "3", "--output_dir", str(run)]
    code, out, err = run_cli(sft.main, flags, capsys)
    assert code == 2 and "holds checkpoints of an earlier run (checkpoint-2, checkpoint-4)" in err
    assert "--overwrite_output_dir" in err and (run / "checkpoint-4").exists()
    code, out, err = run_cli(sft.main, [*flags, "--overwrite_output_dir"], capsys)
    assert code == 0 and sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-3"]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1, 2, 3]  # no spliced lines


def test_resume_without_a_checkpoint_says_so(tmp_path, sft, capsys):
    code, out, err = run_cli(
        sft.main, [*SFT_FLAGS, "--max_steps", "1", "--resume", "--output_dir", str(tmp_path)], capsys
    )
    assert code == 0 and f"--resume: no checkpoint in {tmp_path}; starting a new run at step 0" in out


def test_resume_refuses_changed_flags_that_break_the_run_and_records_the_others(finished, tmp_path, sft, capsys):
    run = copy_run(finished, tmp_path)
    base = [*SFT_FLAGS, "--max_steps", "4", "--save_steps", "2", "--output_dir", str(run), "--resume", "auto"]
    for changed in (["--batch_size", "8"], ["--lr", "1e-4"], ["--max_steps", "8"]):
        code, out, err = run_cli(sft.main, [*base, *changed], capsys)
        assert code == 2 and one_error_line(err) and f"{changed[0]} " in err and "original flags" in err
    code, out, err = run_cli(sft.main, [*base, "--logging_steps", "2"], capsys)
    assert code == 0 and "resumed with --logging_steps changed: 1 -> 2" in out
    assert json.loads((run / "summary.json").read_text())["changed_on_resume"] == {"logging_steps": [1, 2]}


def test_check_resumed_config_by_hand():
    saved = {"lr": 1e-3, "batch_size": 4, "eval_steps": 10, "resume": None}
    assert check_resumed_config(saved, {**saved, "eval_steps": 5, "resume": "auto"}, "c") == {"eval_steps": (10, 5)}
    assert check_resumed_config(None, {"lr": 1.0}, "c") == {}  # an old checkpoint without flags: not compared
    with pytest.raises(ValueError, match=r"--batch_size 4 -> 8"):
        check_resumed_config(saved, {**saved, "batch_size": 8}, "c")


@pytest.mark.parametrize("damage", ["garbage", "truncate", "nan"])
def test_a_damaged_latest_checkpoint_is_named_and_the_previous_one_resumed(finished, tmp_path, sft, capsys, damage):
    run = copy_run(finished, tmp_path)
    weights = run / "checkpoint-4" / "model.safetensors"
    if damage == "garbage":  # same length, loads, wrong numbers: only the hash sees it
        tensors = load_file(weights)
        name = next(iter(tensors))
        tensors[name] = torch.randn_like(tensors[name])
        from safetensors.torch import save_file

        save_file(tensors, weights, metadata={"format": "pt"})
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:  # NaN weights, hash rewritten to match: the load-time finiteness check refuses them
        tensors = load_file(weights)
        tensors = {k: torch.full_like(v, float("nan")) for k, v in tensors.items()}
        from safetensors.torch import save_file

        save_file(tensors, weights, metadata={"format": "pt"})
        manifest = json.loads((run / "checkpoint-4" / "checkpoint.json").read_text())
        from rlcore.checkpoint import file_hashes

        manifest["sha256"] = file_hashes(run / "checkpoint-4")
        (run / "checkpoint-4" / "checkpoint.json").write_text(json.dumps(manifest))
    (run / ".tmp-checkpoint-6").mkdir()  # the leftover of a killed save
    flags = [*SFT_FLAGS, "--max_steps", "4", "--save_steps", "2", "--output_dir", str(run), "--resume"]
    code, out, err = run_cli(sft.main, flags, capsys)
    assert code == 0 and f"WARNING: {weights if damage != 'nan' else run / 'checkpoint-4'}" in err
    assert "falling back to the previous checkpoint" in err and "resumed from" in out and "at step 2" in out
    assert not (run / ".tmp-checkpoint-6").exists()
    assert losses(run) == losses(finished)  # steps 3 and 4 again, as the first time


def test_an_explicit_damaged_checkpoint_is_refused_in_one_line(finished, tmp_path, sft, capsys):
    run = copy_run(finished, tmp_path)
    state = run / "checkpoint-2" / "training_state.pt"
    state.write_bytes(state.read_bytes()[:-100])
    flags = [*SFT_FLAGS, "--max_steps", "4", "--output_dir", str(run), "--resume", str(run / "checkpoint-2")]
    code, out, err = run_cli(sft.main, flags, capsys)
    assert code == 2 and one_error_line(err) and f"{state}: content does not match its sha256" in err


def test_resume_picks_checkpoints_of_its_own_run(tmp_path):
    model = Qwen2ForCausalLM(small_qwen2_config(num_hidden_layers=1))
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, 10, model, None, optimizer, seed=0, run_id="old", keep_last=0)
    save_checkpoint(tmp_path, 6, model, None, optimizer, seed=0, run_id="new", keep_last=0)
    save_checkpoint(tmp_path, 12, model, None, optimizer, seed=0, run_id="new", keep_last=0)
    assert [p.name for p in resume_candidates("auto", tmp_path)] == ["checkpoint-12", "checkpoint-6"]
    verify_checkpoint(tmp_path / "checkpoint-12")
    (tmp_path / "checkpoint-12" / "training_state.pt").write_bytes(b"garbage")
    with pytest.raises(DamagedCheckpoint, match="training_state.pt: content does not match"):
        load_checkpoint(tmp_path / "checkpoint-12", model)


def test_a_full_disk_says_no_space_left_and_names_the_path(tmp_path, monkeypatch):
    model = Qwen2ForCausalLM(small_qwen2_config(num_hidden_layers=1))
    optimizer = torch.optim.AdamW(model.parameters())

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match=r"no space left on device while writing .*\.tmp-checkpoint-3") as error:
        save_checkpoint(tmp_path, 3, model, None, optimizer, seed=0)
    assert error.value.errno == errno.ENOSPC and not list(tmp_path.glob(".tmp-*"))  # the partial save is gone


# ---------------------------------------------------------------- preemption


def test_sigterm_writes_a_checkpoint_and_resume_repeats_the_uninterrupted_run(tmp_path, sft):
    flags = [*SFT_FLAGS, "--max_steps", "16", "--lr", "1e-3"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, str(REPO / "recipes" / "sft.py"), *flags, "--output_dir", str(stopped)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while len(read_metrics(stopped / "metrics.jsonl")) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-2000:]
    (checkpoint,) = stopped.glob("checkpoint-*")
    step = int(checkpoint.name.split("-")[1])
    assert 2 <= step < 16 and f"stopped by SIGTERM after step {step}; checkpoint written to {checkpoint}" in err
    assert err.strip().splitlines()[-1].startswith("sft.py: error: stopped by SIGTERM")
    sft.main([*flags, "--output_dir", str(stopped), "--resume"])
    sft.main([*flags, "--output_dir", str(straight)])
    assert len(losses(straight)) == 16 and losses(stopped) == losses(straight)  # bit for bit
    first, second = load_file(straight / "model.safetensors"), load_file(stopped / "model.safetensors")
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_ctrl_c_finishes_the_step_writes_a_checkpoint_and_exits_130(tmp_path, sft, capsys, monkeypatch):
    real_loss, calls = sft.sft_loss_from_logprobs, []  # the loss of the default chunked LM head

    def interrupted_loss(*args, **kwargs):  # Ctrl-C arrives during the third step
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(sft, "sft_loss_from_logprobs", interrupted_loss)
    previous = signal.getsignal(signal.SIGINT)
    code, out, err = run_cli(sft.main, [*SFT_FLAGS, "--max_steps", "10", "--output_dir", str(tmp_path)], capsys)
    assert code == 130 and "stopped by SIGINT after step 3" in one_error_line(err)
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-3"] and len(losses(tmp_path)) == 3
    assert signal.getsignal(signal.SIGINT) is previous  # the handlers are given back


@pytest.mark.slow
def test_a_second_sigterm_exits_at_once(tmp_path):
    flags = [*SFT_FLAGS, "--max_steps", "200", "--output_dir", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(REPO / "recipes" / "sft.py"), *flags]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(read_metrics(tmp_path / "metrics.jsonl")) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143 and "SIGTERM again: exiting now, without a checkpoint" in err
