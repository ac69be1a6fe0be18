"""The online recipes (GRPO/RLOO/REINFORCE++, PPO, online DPO) and what they share (data, rewards, models, toy)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import load_recipe, tiny_cache  # noqa: F401 (tiny_cache: an autouse fixture)
from transformers import AutoModelForCausalLM

from rlcore import LOSS_TYPE_AGGREGATION, loss_normalizer, policy_loss
from rlcore.data import load_prompts, prompt_batch, repeat_each
from rlcore.models import load_policy, load_reward_model, load_tokenizer, position_ids_from_mask, token_logprobs
from rlcore.rewards import RewardScorer, decode_completions, score_rollout
from rlcore.toy import accuracy_reward, sources_digest, warm_start

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- prompts, completions, rewards


def test_prompt_batch_keeps_columns_and_left_pads():
    tokenizer = load_tokenizer("tiny")
    prompts = load_prompts("toy:prompt_only", "test", tokenizer, max_prompt_length=64, n=4)
    batch = prompt_batch(prompts, [2, 0], tokenizer.pad_token_id)
    assert batch.prompts == [prompts[2]["prompt"], prompts[0]["prompt"]]
    assert batch.columns == {"answer": [prompts[2]["answer"], prompts[0]["answer"]]} and not batch.conversational
    lengths = [len(prompts[2]["prompt_ids"]), len(prompts[0]["prompt_ids"])]
    assert batch.prompt_ids.shape == (2, max(lengths))
    assert (
        batch.prompt_mask.sum(dim=1).tolist() == lengths and batch.prompt_mask[:, -1].all()
    )  # prompts end at the last column
    assert repeat_each(["a", "b"], 3) == ["a", "a", "a", "b", "b", "b"]


def test_decode_completions_skips_special_tokens():
    tokenizer = load_tokenizer("tiny")
    eos, one, two = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("1"), tokenizer.convert_tokens_to_ids("2")
    id_lists = [[one, two, eos], [two] * 4]
    assert decode_completions(tokenizer, id_lists, conversational=False) == ["12", "2222"]
    messages = decode_completions(tokenizer, id_lists, conversational=True)
    assert messages[0] == [{"role": "assistant", "content": "12"}]


def test_score_rollout_groups_rows_and_penalises_missing_eos():
    tokenizer = load_tokenizer("tiny")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    digit = tokenizer.convert_tokens_to_ids
    batch = SimpleNamespace(prompts=["1+1=", "2+2="], columns={"answer": ["2", "4"]}, conversational=False)
    # two completions per prompt: "2<eos>" (right), "3<eos>" (wrong), "4<eos>" (right), "444" (never stops)
    completion_ids = torch.tensor(
        [[digit("2"), eos, pad], [digit("3"), eos, pad], [digit("4"), eos, pad], [digit("4")] * 3]
    )
    completion_mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 1, 1]])
    rollout = SimpleNamespace(
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        sequences=torch.zeros(4, 7, dtype=torch.long),
        attention_mask=torch.cat([torch.ones(4, 4, dtype=torch.long), completion_mask], dim=1),
        truncated=torch.tensor([False, False, False, True]),
    )
    rewards, per_source = score_rollout(
        RewardScorer([("accuracy", accuracy_reward)]), tokenizer, batch, rollout, missing_eos_penalty=0.5
    )
    torch.testing.assert_close(rewards, torch.tensor([1.0, 0.0, 1.0, -0.5]))  # "444" != 4, and -0.5
    torch.testing.assert_close(per_source, torch.tensor([[1.0], [0.0], [1.0], [0.0]]))


def test_token_logprobs_of_a_left_padded_completion_match_unpadded_forward():
    torch.manual_seed(0)
    model, _ = load_policy("tiny")
    prompts, completions = [[10, 11, 12], [13, 14, 15, 16, 17]], [[20, 21], [22, 23]]
    # left-padded prompts (width 5) + completions (width 2); pad id 0
    sequences = torch.tensor([[0, 0] + prompts[0] + completions[0], prompts[1] + completions[1]])
    attention_mask = (torch.arange(7) >= torch.tensor([[2], [0]])).long()
    assert position_ids_from_mask(attention_mask)[0].tolist() == [0, 0, 0, 1, 2, 3, 4]
    logp, entropy = token_logprobs(model, sequences, attention_mask, last=2, temperature=0.7, with_entropy=True)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        ids = torch.tensor([prompt + completion])
        logits = model(ids).logits[0, len(prompt) - 1 : -1] / 0.7  # [2, V]: the positions predicting the completion
        expected = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(completion)[:, None]).squeeze(1)
        torch.testing.assert_close(logp[row], expected, atol=1e-5, rtol=1e-5)
        probs = torch.softmax(logits, dim=-1)
        torch.testing.assert_close(entropy[row], -(probs * probs.log()).sum(-1).detach(), atol=1e-5, rtol=1e-5)
    assert logp.requires_grad and not entropy.requires_grad
    with pytest.raises(ValueError, match="last must be in"):
        token_logprobs(model, sequences, attention_mask, last=7)


# ---------------------------------------------------------------- warm start


def test_warm_start_runs_the_script_once_and_caches(tmp_path, tiny_cache):
    calls = tmp_path / "calls.txt"
    script = tmp_path / "fake_sft.py"  # stands in for recipes/sft.py: writes a config.json into --output_dir
    script.write_text(
        "import sys, pathlib\n"
        f"open({str(calls)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
        "out = pathlib.Path(sys.argv[sys.argv.index('--output_dir') + 1])\n"
        "(out / 'config.json').write_text('{}')\n"
    )
    assert warm_start("some/model", 300, 0, script) == "some/model"
    assert warm_start("tiny", 0, 0, script) == "tiny"
    first = warm_start("tiny", 7, 3, script, ("--lr", "0.5"))
    assert warm_start("tiny", 7, 3, script, ("--lr", "0.5")) == first and Path(first, "config.json").exists()
    assert Path(first).parent == tiny_cache and "tiny-sft-7steps-seed3-" in first
    other = warm_start("tiny", 7, 3, script)  # other flags: another checkpoint
    assert other != first
    lines = calls.read_text().splitlines()
    assert (
        len(lines) == 2 and lines[0].startswith("--lr 0.5 --max_steps 7 --seed 3") and "--max_seconds none" in lines[0]
    )


def test_warm_start_key_follows_the_library_sources(tmp_path):
    package = tmp_path / "package"
    (package / "sub").mkdir(parents=True)
    (package / "a.py").write_text("x = 1\n")
    (package / "sub" / "b.py").write_text("y = 2\n")
    (package / "notes.txt").write_text("not code")
    first = sources_digest(package)
    (package / "notes.txt").write_text("other")
    assert sources_digest(package) == first  # only .py files count
    (package / "sub" / "b.py").write_text("y = 3\n")
    assert sources_digest(package) != first
    (package / "sub" / "b.py").write_text("y = 2\n")
    assert sources_digest(package) == first
    (package / "sub" / "b.py").rename(package / "b.py")  # the same bytes under another name
    assert sources_digest(package) != first


@pytest.mark.slow
def test_grpo_default_gains_on_its_warm_start(tmp_path):
    # The defaults (one thread): the warm start, built here in a fresh cache, and 2000 steps. Measured 44.4% -> 74.8%
    # (73.0% with two other sampling seeds; docs/results.md, "The default on the current code"); the target is +15
    # points. Builds of the warm start by other code started at 36.2% to 46.2%, and one gained only +12.4 points.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(REPO / "recipes" / "grpo.py"), "--output_dir", str(tmp_path), "--threads", "1"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = [r["eval/exact_match"] for r in read_metrics(tmp_path) if "eval/exact_match" in r]
    assert 0.2 < accuracy[0] < 0.8 and accuracy[-1] >= accuracy[0] + 0.15, accuracy


# ---------------------------------------------------------------- GRPO loss types and online DPO pairs


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_micro_batches_add_up_to_the_step_loss(loss_type):
    aggregation = LOSS_TYPE_AGGREGATION[loss_type]
    torch.manual_seed(0)
    logp = torch.randn(8, 5, dtype=torch.float64)
    advantages = torch.randn(8, dtype=torch.float64)
    mask = (torch.rand(8, 5) > 0.3).long()
    mask[3] = 0  # a row without tokens
    full, _ = policy_loss(logp, logp.detach(), advantages, mask, agg=aggregation, max_len=5)
    micro_batches = torch.arange(8).split(4)
    summed = sum(
        policy_loss(
            logp[m],
            logp[m].detach(),
            advantages[m],
            mask[m],
            agg=aggregation,
            max_len=5,
            normalizer=loss_normalizer(loss_type, mask, mask[m], len(micro_batches)),
        )[0]
        for m in micro_batches
    )
    if loss_type == "bnpo":  # bnpo: the mean of the micro-batches' own token means
        full = (
            sum(
                policy_loss(logp[m], logp[m].detach(), advantages[m], mask[m], agg="token_mean")[0]
                for m in micro_batches
            )
            / 2
        )
    torch.testing.assert_close(summed, full)


def test_grpo_advantage_estimators_by_name():
    grpo = load_recipe("grpo")
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # two groups of 4
    mask = torch.ones(8, 3)
    # grpo: group 1 has mean 1/4 and std sqrt(1/4) (Bessel: (9/16 + 3/16) / 3 = 1/4): (1 - 1/4) / (1/2 + 1e-4);
    # group 2 is constant: 0. rloo: 1 - 0 = 1 and 0 - 1/3; reinforce_pp: one value per row, repeated over tokens.
    advantages = grpo.compute_advantages(grpo.GRPOConfig(num_generations=4), rewards, mask)
    torch.testing.assert_close(advantages[:2], torch.tensor([0.75 / 0.5001, -0.25 / 0.5001]))
    assert advantages[4:].abs().max() == 0
    rloo = grpo.compute_advantages(grpo.GRPOConfig(num_generations=4, advantage_estimator="rloo"), rewards, mask)
    torch.testing.assert_close(rloo[:2], torch.tensor([1.0, -1 / 3]))
    reinforce = grpo.compute_advantages(
        grpo.GRPOConfig(num_generations=4, advantage_estimator="reinforce_pp"), rewards, mask
    )
    assert reinforce.shape == (8, 3) and torch.allclose(reinforce, reinforce[:, :1].expand(8, 3))


def test_online_dpo_rank_pairs_by_hand():
    rank_pairs = load_recipe("online_dpo").rank_pairs
    # pairs: (1, 0) -> chosen row 0; (0, 0) tie -> dropped; (0.2, 0.9) -> chosen row 5, rejected row 4
    chosen, rejected = rank_pairs(torch.tensor([1.0, 0.0, 0.0, 0.0, 0.2, 0.9]))
    assert chosen.tolist() == [0, 5] and rejected.tolist() == [1, 4]


def test_grpo_config_errors():
    grpo = load_recipe("grpo")
    with pytest.raises(ValueError, match="--num_generations must be >= 2 and divide"):
        grpo.GRPOConfig(batch_size=6, num_generations=4)
    with pytest.raises(ValueError, match="--loss_type must be one of"):
        grpo.GRPOConfig(loss_type="ppo")


# ---------------------------------------------------------------- end to end (subprocess)

REWARD_FILE = "def digit_fraction(prompts, completions, **kwargs):\n    return [sum(c.isdigit() for c in text) / 8 for text in completions]\n"


def run_recipe(name: str, tmp_path: Path, *flags: str) -> Path:
    """Run recipes/<name>.py on the untrained tiny model with a tiny budget; return its output directory."""
    reward_file = tmp_path / "rewards.py"
    reward_file.write_text(REWARD_FILE)
    output_dir = tmp_path / name
    command = [
        sys.executable,
        str(REPO / "recipes" / f"{name}.py"),
        "--output_dir",
        str(output_dir),
        "--warm_start_steps",
        "0",
        "--reward_funcs",
        f"accuracy,{reward_file}:digit_fraction",
        "--num_train_rows",
        "64",
        "--num_eval_rows",
        "8",
        "--logging_steps",
        "1",
        "--max_new_tokens",
        "4",
        "--max_seconds",
        "none",
        *flags,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def check_run(
    output_dir: Path, steps: int, keys: tuple[str, ...], reward_range: tuple[float, float] = (0, 2)
) -> list[dict]:
    """Training records at steps 1..steps with finite `keys`; evaluations at 0 and the end, eval/reward within
    `reward_range` (accuracy + digit_fraction lie in [0, 2]; a reward model's score is any real number)."""
    records = read_metrics(output_dir)
    train = [r for r in records if "reward" in r]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    for record in train:
        for key in keys:
            assert math.isfinite(record[key]), (key, record)
    evals = [r for r in records if "eval/exact_match" in r]
    assert [r["step"] for r in evals] == [0, steps] and all(
        reward_range[0] <= r["eval/reward"] <= reward_range[1] for r in evals
    )
    assert (output_dir / "curves.png").exists()
    AutoModelForCausalLM.from_pretrained(output_dir)  # the final model loads
    return train


GRPO_KEYS = (
    "reward",
    "rewards/digit_fraction/mean",
    "rewards/accuracy/mean",
    "loss",
    "kl",
    "entropy",
    "clip_frac",
    "frac_reward_zero_std",
    "completions/mean_length",
    "time/generation",
    "time/scoring",
    "time/training",
)


def test_grpo_end_to_end(tmp_path):
    output_dir = run_recipe(
        "grpo",
        tmp_path,
        "--max_steps",
        "2",
        "--batch_size",
        "8",
        "--num_generations",
        "4",
        "--save_steps",
        "2",
        "--beta",
        "0.1",
    )
    train = check_run(output_dir, 2, GRPO_KEYS)
    assert any(r["loss"] != 0 for r in train)
    assert (output_dir / "checkpoint-2" / "training_state.pt").exists()


@pytest.mark.slow
def test_grpo_resume_repeats_the_uninterrupted_run(tmp_path):
    flags = ("--max_steps", "4", "--batch_size", "8", "--num_generations", "4", "--save_steps", "2", "--beta", "0.1")
    output_dir = run_recipe("grpo", tmp_path, *flags)
    straight = check_run(output_dir, 4, GRPO_KEYS)
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    resumed_dir = tmp_path / "resumed"  # steps 3 and 4 from checkpoint-2 must repeat the uninterrupted run
    resumed_dir.mkdir()
    run_recipe("grpo", tmp_path, *flags, "--resume", str(output_dir / "checkpoint-2"), "--output_dir", str(resumed_dir))
    resumed = [r for r in read_metrics(resumed_dir) if "reward" in r]
    assert [r["step"] for r in resumed] == [3, 4]
    for before, after in zip(straight[2:], resumed):
        for key in ("reward", "loss", "kl", "grad_norm"):
            assert math.isclose(after[key], before[key], rel_tol=1e-4, abs_tol=1e-6), (key, before, after)


def test_grpo_step_without_signal_logs_a_zero_loss_and_no_update(tmp_path):
    """The untrained model never answers correctly: with the accuracy reward alone every group's rewards are
    equal, every advantage is 0, no row is fed to the backward pass, and the step logs loss 0 (its exact
    value when beta = 0) and gradient norm 0, so every step's record has the same keys."""
    output_dir = run_recipe(
        "grpo",
        tmp_path,
        "--max_steps",
        "2",
        "--batch_size",
        "8",
        "--num_generations",
        "4",
        "--reward_funcs",
        "accuracy",
    )
    for record in check_run(output_dir, 2, ("reward", "loss", "grad_norm", "learning_rows_frac")):
        assert record["reward"] == 0 and record["learning_rows_frac"] == 0
        assert record["loss"] == 0 and record["grad_norm"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["rloo", "reinforce_pp"])
def test_grpo_other_estimators_run(tmp_path, estimator):
    """With beta > 0 every row takes part in the update, so the policy-loss statistics exist at every step
    even when a step's rewards are all equal (the untrained model often scores 0 on every sample)."""
    output_dir = run_recipe(
        "grpo",
        tmp_path,
        "--max_steps",
        "2",
        "--batch_size",
        "4",
        "--grad_accum_steps",
        "2",
        "--num_generations",
        "4",
        "--advantage_estimator",
        estimator,
        "--num_iterations",
        "2",
        "--loss_type",
        "dr_grpo",
        "--mask_truncated_completions",
        "--beta",
        "0.05",
    )
    check_run(output_dir, 2, ("reward", "loss", "clip_frac", "kl"))


def test_ppo_end_to_end(tmp_path):
    output_dir = run_recipe(
        "ppo",
        tmp_path,
        "--max_steps",
        "2",
        "--batch_size",
        "4",
        "--num_mini_batches",
        "2",
        "--num_ppo_epochs",
        "2",
        "--save_steps",
        "2",
    )
    check_run(
        output_dir,
        2,
        (
            "reward",
            "kl",
            "loss/policy",
            "loss/value",
            "approx_kl",
            "clip_frac",
            "value/explained_variance",
            "value/returns_mean",
            "entropy",
        ),
    )
    assert (output_dir / "checkpoint-2" / "value_model.safetensors").exists()
    assert (output_dir / "value_model" / "value_head.safetensors").exists()


def test_online_dpo_end_to_end_with_a_reward_model(tmp_path):
    torch.manual_seed(0)
    reward_model, tokenizer = load_reward_model("tiny")  # a random score head: continuous rewards, few ties
    torch.nn.init.normal_(reward_model.score.weight)
    reward_model.save_pretrained(tmp_path / "reward_model")
    tokenizer.save_pretrained(tmp_path / "reward_model")
    output_dir = run_recipe(
        "online_dpo",
        tmp_path,
        "--max_steps",
        "2",
        "--batch_size",
        "4",
        "--save_steps",
        "2",
        "--reward_funcs",
        "none",
        "--reward_model",
        str(tmp_path / "reward_model"),
    )
    train = check_run(
        output_dir, 2, ("reward", "rewards/reward_model/mean", "pairs/decided_frac"), (-math.inf, math.inf)
    )
    assert any("rewards/margins" in r and math.isfinite(r["loss"]) for r in train)
    assert (output_dir / "checkpoint-2" / "training_state.pt").exists()
