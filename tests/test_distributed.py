"""Several processes (torchrun, gloo on CPU): a step with 2 processes equals the single-process step.

The invariance tests run a recipe for a few steps in one process (in-process) and under
``torchrun --nproc_per_node 2`` on the same global batch, and compare the logged loss of every step and the
final weights (float32, within 1e-5). The non-slow ones (SFT, GRPO, and the helpers under 2 gloo processes)
are a representative subset; ``python -m pytest -q tests/test_distributed.py -m slow`` runs the rest: every
recipe under DDP and FSDP2, sharded evaluation under both, LoRA under both, a 4-bit base under DDP,
``accelerate launch``, kill -9 and SIGTERM then resume, an FSDP2 sharded checkpoint then resume.

The online recipes start from the untrained tiny model (``--warm_start_steps 0``) with a dense reward (the
completion length), so every step has something to learn.
"""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlcore import distributed, masked_whiten
from rlcore.rollout import sample_tokens
from rlcore.toy import tiny_model, tiny_tokenizer
from tests.helpers import REPO, load_recipe

LENGTH_REWARD = (
    "def length(prompts, completions, completion_ids, **columns):\n    return [len(c) / 8 for c in completion_ids]\n"
)
COMMON = ["--logging_steps", "1", "--eval_steps", "0", "--eval_split", "none", "--threads", "1", "--lr", "1e-3"]
ONLINE = ["--warm_start_steps", "0", "--max_new_tokens", "6"]
RECIPE_ARGS = {  # a few steps of each recipe on a small global batch
    "sft": ["--max_steps", "3", "--batch_size", "8", "--grad_accum_steps", "2", "--num_train_rows", "64"],
    "dpo": ["--max_steps", "3", "--batch_size", "8", "--num_train_rows", "64", "--warm_start_steps", "0"],
    "reward_model": ["--max_steps", "3", "--batch_size", "8", "--num_train_rows", "64", "--warm_start_steps", "0"]
    + ["--lr", "1e-4"],  # as PPO: at 1e-3 one weight of 2e5 moved 1.5e-5 apart (a near-zero gradient's float noise)
    "grpo": ["--max_steps", "3", "--batch_size", "16", "--num_generations", "4", *ONLINE],
    # PPO: 8 AdamW updates; at --lr 1e-3 AdamW's m / sqrt(v) turns float noise in a near-zero gradient into
    # weight differences of ~1e-5 in a few elements (3e-5 in 1 of 16384, losses equal to 5e-7); 1e-4 keeps
    # them within 1e-5
    "ppo": ["--max_steps", "2", "--batch_size", "8", "--num_mini_batches", "2", "--num_ppo_epochs", "2", "--lr", "1e-4"]
    + ONLINE,
    "online_dpo": ["--max_steps", "3", "--batch_size", "8", "--lr", "1e-4", *ONLINE],  # as PPO
    "kto": ["--max_steps", "3", "--batch_size", "8", "--num_train_rows", "64", "--warm_start_steps", "0"],
    "orpo": ["--max_steps", "3", "--batch_size", "8", "--num_train_rows", "64", "--warm_start_steps", "0"],
    # on-policy: the student (untrained tiny) samples, a teacher of another initialisation scores
    "distill": ["--max_steps", "3", "--batch_size", "8", "--grad_accum_steps", "2", "--num_train_rows", "32", *ONLINE],
}
ROLLOUT_KEYS = ("reward_std", "completions/min_length", "completions/max_length")  # whole-batch, not per process
LOSS_KEYS = {
    "ppo": ("loss/policy", "loss/value", *ROLLOUT_KEYS),
    "kto": ("loss", "rewards/chosen", "rewards/rejected"),
    "grpo": ("loss", *ROLLOUT_KEYS),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(recipe: str, args: list[str], nproc: int = 2, **popen) -> subprocess.Popen | subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    command += ["--master_port", str(free_port()), str(REPO / "recipes" / f"{recipe}.py"), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if popen:
        return subprocess.Popen(command, env=env, cwd=REPO, **popen)
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def step_losses(output_dir: Path, keys: tuple[str, ...] = ("loss",)) -> list[tuple[float, ...]]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [tuple(r.get(k, math.nan) for k in keys) for r in records if keys[0] in r]  # NaN: not logged that step


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(output_dir / "model.safetensors")


def recipe_args(recipe: str, tmp_path: Path, extra: tuple[str, ...] = ()) -> list[str]:
    args = [*COMMON, *RECIPE_ARGS[recipe], *extra]
    if recipe in ("grpo", "ppo", "online_dpo"):
        reward = tmp_path / "length_reward.py"
        reward.write_text(LENGTH_REWARD)
        args += ["--reward_funcs", f"{reward}:length"]
    if recipe == "distill":
        teacher = tmp_path / "teacher"
        tiny_model(seed=1).save_pretrained(teacher)
        tiny_tokenizer().save_pretrained(teacher)
        args += ["--teacher", str(teacher)]
    return args


def check_invariance(recipe: str, tmp_path: Path, extra: tuple[str, ...] = (), nproc_extra: tuple[str, ...] = ()):
    """N steps in one process == N steps with 2 processes: losses of every step and final weights."""
    args = recipe_args(recipe, tmp_path, extra)
    load_recipe(recipe).main([*args, "--output_dir", str(tmp_path / "one")])
    torchrun(recipe, [*args, *nproc_extra, "--output_dir", str(tmp_path / "two")])
    keys = LOSS_KEYS.get(recipe, ("loss",))
    one, two = step_losses(tmp_path / "one", keys), step_losses(tmp_path / "two", keys)
    assert len(one) == len(two) >= int(RECIPE_ARGS[recipe][1]) - 1  # online DPO: a step without pairs logs no loss
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=0, atol=1e-5, equal_nan=True)
    assert any(abs(value) > 1e-3 for losses in one for value in losses)  # a step that learns something
    weights_one, weights_two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert weights_one.keys() == weights_two.keys()
    for name, value in weights_one.items():
        torch.testing.assert_close(weights_two[name], value, rtol=0, atol=1e-5, msg=name)
    return one


# ------------------------------------------------------------------------------------------ single process


def test_single_process_is_the_identity():
    """Without a launcher every helper is the identity of a world of one process."""
    assert not distributed.is_initialized() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.shard([5, 6, 7]) == [5, 6, 7]
    assert distributed.rank_normalizer(12) == 12
    rows = torch.tensor([3, 0, 2])
    assert torch.equal(distributed.own_rows(rows, 4), rows)
    x, mask = torch.randn(3, 4), torch.ones(3, 4)
    assert torch.equal(distributed.on_global_batch(masked_whiten, x, mask), masked_whiten(x, mask))
    assert distributed.reduce_stats({"loss": 1.5}) == {"loss": 1.5}
    assert distributed.sampling_draws(4, torch.device("cpu"))["draws"] is None


def test_sample_tokens_draws_of_a_larger_batch():
    """Rows ``rows`` of a batch of ``total`` sample what those rows sample in the whole batch, same seed."""
    logits = torch.randn(6, 11)
    whole, whole_logp = sample_tokens(logits, generator=torch.Generator().manual_seed(3))
    for rows in (torch.arange(0, 3), torch.arange(3, 6)):
        part, part_logp = sample_tokens(logits[rows], generator=torch.Generator().manual_seed(3), draws=(rows, 6))
        assert torch.equal(part, whole[rows]) and torch.equal(part_logp, whole_logp[rows])


# ------------------------------------------------------------------------------------------ 2 gloo processes


def _helpers_worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    distributed.init(torch.device("cpu"))
    try:
        # shard: contiguous disjoint halves; own_rows: this rank's rows of a shared permutation
        shard = distributed.shard(list(range(8)))
        own = distributed.own_rows(torch.tensor([7, 1, 4, 2]), 8).tolist()
        # gather_rows pads the ragged dimension 1 with zeros; on_global_batch equals the global computation
        torch.manual_seed(0)
        x, mask = torch.randn(4, 5), (torch.rand(4, 5) > 0.3).float()
        local_length = 5 - 2 * rank  # rank 0: 5 columns, rank 1: 3
        local = slice(2 * rank, 2 * rank + 2)
        whitened = distributed.on_global_batch(masked_whiten, x[local, :local_length], mask[local, :local_length])
        reference_mask = mask.clone()
        reference_mask[2:, 3:] = 0  # what rank 1 does not hold counts as padding
        expected = masked_whiten(x * reference_mask, reference_mask)[local, :local_length]
        # average_gradients: the mean of the ranks' gradients; a gradient on one rank only is averaged with 0
        both, one = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
        neither = torch.nn.Parameter(torch.zeros(1))
        both.grad = torch.full((3,), float(rank + 1))
        if rank == 1:
            one.grad = torch.tensor([4.0, 6.0])
        distributed.average_gradients([both, one, neither])
        # reduce_stats: the mean over the ranks that report a key
        stats = distributed.reduce_stats({"loss": torch.tensor(float(rank)), **({"kl": 3.0} if rank else {})})
        # with counts: the whole batch's mean (rank 0: 1 of 2 tokens right, rank 1: 6 of 6)
        weighted = distributed.reduce_stats({"acc": [0.5, 1.0][rank]}, counts={"acc": torch.tensor([2, 6][rank])})
        # evaluation: batches of 3 and 1 rows split 1 + 2 and 0 + 1, gathered back in the single process's order
        model = torch.nn.Linear(1, 1)
        parts = [distributed.evaluation_part(n, model) for n in (3, 1)]
        values = [torch.tensor([10.0 * (start + i) for i in part]) for start, part in zip((0, 3), parts)]
        merged = distributed.gather_evaluation([values[0], [f"row {i}" for i in parts[1]]], model)
        results[rank] = {
            "shard": shard,
            "own": own,
            "whiten_error": float((whitened - expected).abs().max()),
            "both": both.grad.tolist(),
            "one": one.grad.tolist(),
            "neither": neither.grad,
            "stats": {k: float(v) for k, v in stats.items()},
            "weighted": float(weighted["acc"]),
            "parts": [list(part) for part in parts],
            "merged": [merged[0].tolist(), merged[1]],
        }
    finally:
        dist.destroy_process_group()


def test_helpers_under_two_gloo_processes():
    results = mp.Manager().dict()
    mp.spawn(_helpers_worker, args=(free_port(), results), nprocs=2)
    assert results[0]["shard"] == [0, 1, 2, 3] and results[1]["shard"] == [4, 5, 6, 7]
    assert results[0]["own"] == [1, 2] and results[1]["own"] == [3, 0]  # rows 1, 2 and 7 - 4, 4 - 4
    for rank in (0, 1):
        assert results[rank]["whiten_error"] < 1e-6
        assert results[rank]["both"] == [1.5, 1.5, 1.5]  # (1 + 2) / 2
        assert results[rank]["one"] == [2.0, 3.0]  # ([0, 0] + [4, 6]) / 2
        assert results[rank]["neither"] is None
        assert results[rank]["stats"] == {"loss": 0.5, "kl": 3.0}
        assert results[rank]["weighted"] == 0.875  # (1 + 6) / 8, not (0.5 + 1) / 2
        assert results[rank]["merged"] == [[0.0, 10.0, 20.0], ["row 0"]]  # rank 0 holds no row of the second batch
    assert results[0]["parts"] == [[0], []] and results[1]["parts"] == [[1, 2], [0]]


def test_sft_two_processes_equal_one(tmp_path):
    """Also the token accuracy: over the step's loss tokens of both processes (not a mean of their means)."""
    check_invariance("sft", tmp_path)
    one, two = (step_losses(tmp_path / run, ("token_accuracy",)) for run in ("one", "two"))
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=0, atol=1e-6)
    assert not (tmp_path / "two" / "checkpoint-1").exists()
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["steps"] == 3


def test_grpo_two_processes_equal_one(tmp_path):
    """Sampling, batch-std advantages (scale_rewards batch) and the DAPO token normaliser over both processes."""
    check_invariance("grpo", tmp_path, ("--scale_rewards", "batch"))


# ------------------------------------------------------------------------------------------ slow: the rest


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe, extra",
    [
        ("dpo", ()),
        ("dpo", ("--rpo_alpha", "0.5")),
        ("reward_model", ()),
        (
            "grpo",
            ("--advantage_estimator", "reinforce_pp", "--beta", "0.05", "--batch_size", "8", "--grad_accum_steps", "2"),
        ),
        ("grpo", ("--loss_type", "grpo", "--num_iterations", "2")),
        ("ppo", ("--whiten_rewards",)),
        ("online_dpo", ()),
        ("sft", ("--packing",)),
        ("sft", ("--padding_free",)),
        ("grpo", ("--prefix_sharing", "--beta", "0.05")),
        ("dpo", ("--no-prefix_sharing", "--no-padding_free")),  # the padded rows (packed: the default)
        ("online_dpo", ("--prefix_sharing",)),
        ("kto", ()),
        ("orpo", ()),
        ("orpo", ("--loss_type", "cpo", "--grad_accum_steps", "2")),
        ("distill", ()),
        ("distill", ("--lmbda", "0", "--beta", "0.5")),
    ],
)
def test_two_processes_equal_one(recipe, extra, tmp_path):
    check_invariance(recipe, tmp_path, extra)


EVAL_KEYS = {  # what each recipe's held-out evaluation reports (at least)
    "sft": {"eval/loss", "eval/token_accuracy", "eval/exact_match"},
    "grpo": {"eval/reward", "eval/pass@1", "eval/pass@4"},
    "dpo": {"eval/accuracy", "eval/margin", "eval/loss"},
    "reward_model": {"eval/accuracy", "eval/margin", "eval/loss"},
    "kto": {"eval/accuracy", "eval/margin", "eval/loss", "eval/kl"},
    "orpo": {"eval/accuracy", "eval/margin"},
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe, sharding",
    [
        ("sft", "ddp"),
        ("grpo", "ddp"),
        ("dpo", "ddp"),
        ("reward_model", "ddp"),
        ("kto", "ddp"),
        ("orpo", "ddp"),
        ("sft", "fsdp2"),
        ("grpo", "fsdp2"),
        ("dpo", "fsdp2"),
    ],
)
def test_sharded_evaluation_equals_one_process(recipe, sharding, tmp_path):
    """Held-out evaluation split over 2 processes (9 rows in batches of 4: parts of 2 + 2, 2 + 2 and 0 + 1 rows;
    under FSDP2 the empty part runs a discarded pass on one row) gives the single process's metrics: SFT's loss,
    token accuracy and greedy exact match; GRPO's sampled reward, greedy exact match and pass@1, pass@4 (4
    samples per prompt, one prompt per batch); the preference metrics of DPO, the reward model, KTO and ORPO."""
    extra = ["--eval_split", "test", "--num_eval_rows", "9", "--eval_batch_size", "4", "--max_steps", "2"]
    if recipe == "grpo":
        extra += ["--num_generations_eval", "4"]
    check_invariance(recipe, tmp_path, tuple(extra), nproc_extra=("--sharding", sharding))
    records = {}
    for run in ("one", "two"):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        records[run] = [
            {k: v for k, v in r.items() if k.startswith("eval/")} for r in map(json.loads, lines) if "eval/" in str(r)
        ]
    assert len(records["one"]) == len(records["two"]) == 2  # before the first step and at the end
    assert EVAL_KEYS[recipe] <= set(records["one"][0]), set(records["one"][0])
    for one, two in zip(records["one"], records["two"]):
        assert one.keys() == two.keys()
        for key, value in one.items():
            assert two[key] == pytest.approx(value, abs=1e-5), key


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe, extra",
    [
        ("sft", ()),
        ("dpo", ()),
        ("reward_model", ()),
        ("grpo", ("--lr", "1e-4")),
        ("grpo", ("--beta", "0.05")),
        ("grpo", ("--prefix_sharing", "--beta", "0.05")),
        ("dpo", ("--no-prefix_sharing", "--no-padding_free")),  # the padded rows (packed: the default)
        ("kto", ()),
        ("orpo", ()),
        ("distill", ()),
        ("ppo", ()),
        ("online_dpo", ()),
    ],
)
def test_fsdp2_two_processes_equal_one(recipe, extra, tmp_path):
    """FSDP2 (fully_shard per decoder layer, then the root): the same steps as one process. PPO and online DPO
    hold different numbers of rows or pairs per process: the process with fewer runs zero-weighted passes so
    that every process runs as many as the busiest (FSDP2's collectives are inside them); distillation reads
    the student's LM head right after its forward pass."""
    check_invariance(recipe, tmp_path, extra, nproc_extra=("--sharding", "fsdp2"))


def test_fsdp2_flags_it_does_not_take():
    from rlcore.config import TrainConfig

    with pytest.raises(ValueError, match="fsdp2 does not take --load_in_4bit"):
        TrainConfig(sharding="fsdp2", lora_r=4, load_in_4bit=True)
    TrainConfig(sharding="fsdp2", lora_r=4, save_steps=10, resume="auto")  # LoRA, sharded checkpoints, resume


@pytest.mark.slow
def test_fsdp2_sharded_checkpoint_resumes_bit_for_bit(tmp_path):
    """FSDP2: each process writes its shards (torch.distributed.checkpoint) into an atomically placed, hashed
    checkpoint; resuming from step 2 at the same world size repeats the uninterrupted run exactly on CPU."""
    args = [*recipe_args("sft", tmp_path), "--max_steps", "4", "--save_steps", "2", "--save_total_limit", "0"]
    args += ["--sharding", "fsdp2"]
    torchrun("sft", [*args, "--output_dir", str(tmp_path / "whole")])
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    shards = sorted(p.name for p in (checkpoint / "distributed").iterdir())
    assert ".metadata" in shards and len([name for name in shards if name.endswith(".distcp")]) == 2
    manifest = json.loads((checkpoint / "checkpoint.json").read_text())
    assert "distributed/.metadata" in manifest["sha256"] and not list(tmp_path.glob("whole/.tmp-*"))
    resumed = tmp_path / "resumed"
    torchrun("sft", [*args, "--output_dir", str(resumed), "--resume", str(checkpoint)])
    whole = step_losses(tmp_path / "whole")
    assert len(whole) == 4 and step_losses(resumed) == whole[2:]  # bit-for-bit
    for name, value in final_weights(tmp_path / "whole").items():
        assert torch.equal(final_weights(resumed)[name], value), name
    # a sharded checkpoint is refused in one process, with one line
    with pytest.raises(ValueError, match="--sharding 'fsdp2' -> 'ddp'"):
        load_recipe("sft").main(
            [*recipe_args("sft", tmp_path), "--output_dir", str(tmp_path / "one"), "--resume", str(checkpoint)]
        )


@pytest.mark.slow
def test_kill_minus_9_then_resume_continues_the_curve(tmp_path):
    """Kill one rank (SIGKILL) after a checkpoint; resuming with 2 processes continues the uninterrupted curve."""
    args = [*recipe_args("sft", tmp_path), "--max_steps", "8", "--save_steps", "2", "--save_total_limit", "0"]
    torchrun("sft", [*args, "--output_dir", str(tmp_path / "whole")])
    interrupted = tmp_path / "interrupted"
    launcher = torchrun(
        "sft",
        [*args, "--output_dir", str(interrupted)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while not (interrupted / "checkpoint-4" / "training_state.pt").exists():
            assert time.time() < deadline and launcher.poll() is None, "the run ended before its checkpoint"
            time.sleep(0.05)
        workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
        os.kill(int(workers[-1]), signal.SIGKILL)
        launcher.wait(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode != 0
    assert not (interrupted / "summary.json").exists()
    torchrun("sft", [*args, "--output_dir", str(interrupted), "--resume"])
    whole, resumed = step_losses(tmp_path / "whole"), step_losses(interrupted)
    assert len(resumed) == len(whole) == 8
    assert resumed == whole  # bit-for-bit on CPU at the same world size
    for name, value in final_weights(tmp_path / "whole").items():
        assert torch.equal(final_weights(interrupted)[name], value), name


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp2"])
def test_lora_under_two_processes_saves_an_adapter_peft_loads(sharding, tmp_path):
    """LoRA under 2 processes (DDP, or FSDP2 with frozen sharded base weights): only the adapters have gradients
    to reduce; the losses, the merged model and the adapter equal one process's; the adapter loads in PEFT."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from rlcore.models import resolve_model

    check_invariance("sft", tmp_path, ("--lora_r", "4"), nproc_extra=("--sharding", sharding))
    adapters = [load_adapter_file(tmp_path / run) for run in ("one", "two")]
    assert adapters[0].keys() == adapters[1].keys() and any("lora_B" in name for name in adapters[0])
    for name, value in adapters[0].items():
        torch.testing.assert_close(adapters[1][name], value, rtol=0, atol=1e-5, msg=name)
    assert any(value.abs().max() > 0 for name, value in adapters[1].items() if "lora_B" in name)  # trained
    base = AutoModelForCausalLM.from_pretrained(resolve_model("tiny"))
    model = peft.PeftModel.from_pretrained(base, str(tmp_path / "two" / "adapter"))
    loaded = {name: p for name, p in model.named_parameters() if "lora_B" in name}
    assert loaded and all(
        torch.equal(p.detach(), adapters[1][name.replace(".default", "")]) for name, p in loaded.items()
    )


ACCELERATE_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: 'no'
use_cpu: false
rdzv_backend: static
same_network: true
"""


@pytest.mark.slow
def test_accelerate_launch_with_a_plain_multi_process_cpu_config(tmp_path):
    """``accelerate launch`` with a plain 2-process config (no accelerate code in the recipe) sets the same
    environment as torchrun: the run equals one process, and it did run 2 processes (a batch of 7 rows is refused
    as not splittable over 2). The config is accelerate's ``MULTI_GPU`` type, its torchrun launcher: on a machine
    without GPUs the processes take gloo on CPU. (Its ``MULTI_CPU`` type starts ONE process unless mpirun is
    configured.)"""
    pytest.importorskip("accelerate")
    config = tmp_path / "accelerate.yaml"
    config.write_text(ACCELERATE_CONFIG)
    args = recipe_args("sft", tmp_path)
    load_recipe("sft").main([*args, "--output_dir", str(tmp_path / "one")])
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    command += ["--main_process_port", str(free_port()), str(REPO / "recipes" / "sft.py"), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*command, "--output_dir", str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(
        torch.tensor(step_losses(tmp_path / "two")), torch.tensor(step_losses(tmp_path / "one")), rtol=0, atol=1e-5
    )
    for name, value in final_weights(tmp_path / "one").items():
        torch.testing.assert_close(final_weights(tmp_path / "two")[name], value, rtol=0, atol=1e-5, msg=name)
    odd = subprocess.run(
        [*command, "--batch_size", "7", "--output_dir", str(tmp_path / "odd")], env=env, capture_output=True, text=True
    )
    assert odd.returncode != 0 and "cannot be split over 2 processes" in odd.stderr


@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_and_resume_continues_the_curve(tmp_path):
    """SIGTERM to the launcher (as a scheduler's preemption): torchrun passes it to both processes, which finish
    the same step and write one checkpoint; ``--resume`` continues the uninterrupted curve exactly."""
    args = [*recipe_args("sft", tmp_path), "--max_steps", "30", "--save_total_limit", "0"]
    torchrun("sft", [*args, "--output_dir", str(tmp_path / "whole")])
    stopped = tmp_path / "stopped"
    launcher = torchrun(
        "sft", [*args, "--output_dir", str(stopped)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 300
        while len(step_losses(stopped) if (stopped / "metrics.jsonl").exists() else []) < 2:
            assert time.time() < deadline and launcher.poll() is None, "the run ended before the signal"
            time.sleep(0.02)
        launcher.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    (checkpoint,) = stopped.glob("checkpoint-*")
    step = int(checkpoint.name.split("-")[1])
    assert 2 <= step < 30 and f"stopped by SIGTERM after step {step}; checkpoint written to" in err
    torchrun("sft", [*args, "--output_dir", str(stopped), "--resume"])
    whole, resumed = step_losses(tmp_path / "whole"), step_losses(stopped)
    assert len(resumed) == len(whole) == 30 and resumed == whole  # bit-for-bit on CPU at the same world size
    for name, value in final_weights(tmp_path / "whole").items():
        assert torch.equal(final_weights(stopped)[name], value), name


@pytest.mark.slow
def test_4bit_base_with_lora_under_ddp_equals_one_process(tmp_path):
    """QLoRA under 2 DDP processes on CPU: a frozen nf4 base (bitsandbytes), the adapters' gradients averaged;
    losses, the merged (dequantised) model and the adapter equal one process's."""
    pytest.importorskip("bitsandbytes")
    check_invariance("sft", tmp_path, ("--lora_r", "4", "--load_in_4bit"))
    adapters = [load_adapter_file(tmp_path / run) for run in ("one", "two")]
    for name, value in adapters[0].items():
        torch.testing.assert_close(adapters[1][name], value, rtol=0, atol=1e-5, msg=name)


def load_adapter_file(output_dir: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(output_dir / "adapter" / "adapter_model.safetensors")
