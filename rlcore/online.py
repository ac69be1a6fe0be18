"""What the online recipes (GRPO/RLOO/REINFORCE++, PPO, online DPO) share: prompts in, scored samples out.

One step of every online recipe reads the same way::

    batch   = prompt_batch(prompts, rows, pad_id)                     P prompts of the dataset
    rollout = generate(policy, batch.prompt_ids, batch.prompt_mask,   G completions per prompt (rlcore.rollout)
                       num_samples=G, ...)
    rewards, per_source = score_rollout(scorer, tokenizer, batch, rollout)   rewards of the N = P * G completions
    logp, _ = completion_logprobs(policy, rollout.sequences, ...)     [N, T] log-probs, with gradient

and differs only in the loss built from them. This module also holds the shared flags
(:class:`OnlineConfig`), the reference model and the SFT warm start of the embedded default.

Conventions: sequences are ``[B, P + T]`` with the prompt left-padded to P columns and the completion
right-padded to T columns (so every completion starts at column P); ``completion_mask`` is 1 on completion
tokens up to and including the stop token; G completions of one prompt are G consecutive rows.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import datasets
import torch

from rlcore.config import ONLINE_WARM_START_FLAGS, TrainConfig  # noqa: F401 (ONLINE_WARM_START_FLAGS: re-exported)
from rlcore.data import collate_left, load_rows, tokenize_prompts
from rlcore.evaluation import toy_accuracy
from rlcore.logprobs import entropy_from_logits, gather_logprobs
from rlcore.rewards import RewardScorer
from rlcore.models import eos_token_ids
from rlcore.rollout import Rollout, generate
from rlcore.toy import default_cache_dir


@dataclass
class OnlineConfig(TrainConfig):
    """Flags shared by the online recipes: prompts, sampling, rewards, and the warm start of the default."""

    dataset: str = "toy:prompt_only"  # prompts (a "prompt" column; other columns reach the reward functions)
    warm_start_steps: int = 1500  # with --model tiny only: start from `recipes/sft.py --max_steps N` (42-46% accuracy; run once, cached); 0 = the untrained tiny model
    max_prompt_length: int = 128  # prompts longer than this many tokens are dropped
    max_new_tokens: int = 8  # completion length limit, in tokens
    temperature: float = 1.0  # sampling temperature (log-probs in the loss use the same temperature)
    top_k: int = 0  # sample among the k most likely tokens (0 = all)
    top_p: float = 1.0  # nucleus sampling (1 = off)
    reward_funcs: str | None = "accuracy"  # comma-separated reward functions: accuracy, format, pkg.module:fn, file.py:fn
    reward_model: str | None = None  # a reward-model directory (recipes/reward_model.py output), added to the functions
    reward_weights: str | None = None  # comma-separated weights, one per reward function then the reward model (None = all 1)
    missing_eos_penalty: float = 0.0  # subtracted from the reward of completions cut at --max_new_tokens

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.warm_start_steps < 0 or self.max_prompt_length <= 0 or self.max_new_tokens <= 0:
            raise ValueError("--warm_start_steps must be >= 0, --max_prompt_length and --max_new_tokens > 0")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0 for sampling, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0 or self.top_k < 0:
            raise ValueError(f"--top_p must be in (0, 1] and --top_k >= 0, got {self.top_p} and {self.top_k}")


# ----------------------------------------------------------------------------------------------------------
# the embedded default: an SFT warm start


def warm_start(model: str, steps: int, seed: int, sft_script: str | os.PathLike, sft_flags: tuple[str, ...] = ()) -> str:
    """The model a recipe starts from: ``model`` itself, or for ``"tiny"`` an SFT checkpoint.

    Reinforcement learning improves a policy that already succeeds sometimes; the untrained tiny model
    never writes a correct sum, so every reward is 0 and nothing is learnt. With ``model == "tiny"`` and
    ``steps > 0`` this runs ``python SFT_SCRIPT SFT_FLAGS --max_steps STEPS --seed SEED --max_seconds none``
    once and returns its output directory, cached as ``<rlcore cache>/tiny-sft-<steps>steps-seed<seed>-<hash
    of the script and flags>``, so every recipe and every later run reuses it. Any other ``model`` is
    returned unchanged.

    The online recipes pass ``ONLINE_WARM_START_FLAGS``: learning rate 1e-3 after 100 warmup steps, then a
    cosine that ends at half the peak, so that the checkpoint is like an SFT run stopped mid-schedule by a
    time budget rather than an annealed one; 1500 steps give 42-46% greedy test accuracy (seed 0, two
    versions of sft.py). On the toy task RL raised such a checkpoint by several points within minutes,
    while from a fully annealed SFT checkpoint (cosine to 0) the same runs left greedy accuracy within a
    few points of where it started.
    """
    if model != "tiny" or steps == 0:
        return model
    script = Path(sft_script)
    digest = hashlib.sha256(script.read_bytes() + " ".join(sft_flags).encode()).hexdigest()[:8]
    directory = Path(default_cache_dir()) / f"tiny-sft-{steps}steps-seed{seed}-{digest}"
    if (directory / "config.json").exists():
        return str(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{directory.name}-building-", dir=directory.parent))
    command = [sys.executable, str(script), *sft_flags, "--max_steps", str(steps), "--seed", str(seed),
               "--output_dir", str(build), "--max_seconds", "none"]
    print(f"warm start: {' '.join(command)}", flush=True)
    package_root = str(Path(__file__).resolve().parents[1])  # rlcore importable by the script, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    try:
        subprocess.run(command, check=True, env=env)
        os.replace(build, directory)
    except OSError:
        if not (directory / "config.json").exists():  # a real failure, not another process finishing first
            raise
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return str(directory)


# ----------------------------------------------------------------------------------------------------------
# prompts


def load_prompts(source: str, split: str, tokenizer, max_prompt_length: int, n: int | None = None) -> datasets.Dataset:
    """Rows of ``source`` (``rlcore.data.load_rows``) with a ``prompt_ids`` column; over-long prompts dropped."""
    rows = load_rows(source, split=split, n=n)
    return tokenize_prompts(rows, tokenizer, max_length=max_prompt_length, truncation="drop")


@dataclass(frozen=True)
class PromptBatch:
    """P prompts of the dataset.

    Attributes:
        prompts: the ``prompt`` column (text or message lists), P entries.
        columns: every other column except ``prompt_ids`` (reward functions read them), P entries each.
        prompt_ids, prompt_mask: [P, Lp] left-padded ids and 1-on-real-token mask.
        conversational: whether the prompts are message lists.
    """

    prompts: list
    columns: dict[str, list]
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    conversational: bool


def prompt_batch(dataset: datasets.Dataset, rows: list[int], pad_id: int) -> PromptBatch:
    """The prompts at ``rows`` of a :func:`load_prompts` dataset, collated for generation."""
    selected = dataset[list(rows)]  # {column: [P values]}
    columns = {name: values for name, values in selected.items() if name not in ("prompt", "prompt_ids")}
    tensors = collate_left(selected["prompt_ids"], pad_id)
    conversational = isinstance(selected["prompt"][0], list)
    return PromptBatch(selected["prompt"], columns, tensors["prompt_ids"], tensors["prompt_mask"], conversational)


# ----------------------------------------------------------------------------------------------------------
# samples and their rewards


def repeat_each(values: list, times: int) -> list:
    """``[a, b]`` -> ``[a, a, b, b]`` for ``times=2``: per-prompt values aligned with grouped completions."""
    return [value for value in values for _ in range(times)]


def decode_completions(tokenizer, completion_ids: torch.Tensor, completion_mask: torch.Tensor, conversational: bool) -> tuple[list, list[list[int]]]:
    """(completions, completion id lists) of [B, T] ids: text without special tokens, or for a conversational
    dataset ``[{"role": "assistant", "content": text}]``; the id lists stop after the stop token."""
    id_lists = [ids[: int(length)] for ids, length in zip(completion_ids.tolist(), completion_mask.sum(dim=1).tolist())]
    texts = tokenizer.batch_decode(id_lists, skip_special_tokens=True)
    completions = [[{"role": "assistant", "content": text}] for text in texts] if conversational else texts
    return completions, id_lists


def score_rollout(scorer: RewardScorer, tokenizer, batch: PromptBatch, rollout: Rollout, missing_eos_penalty: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of the completions of a rollout of ``batch`` (G consecutive rows per prompt).

    Returns:
        (rewards [N], per_source [N, K]), float32 on the CPU: the scorer's weighted reward minus
        ``missing_eos_penalty`` on truncated rows, and each source's own rewards (NaN where None).
    """
    group_size = rollout.completion_ids.shape[0] // len(batch.prompts)
    completions, id_lists = decode_completions(tokenizer, rollout.completion_ids, rollout.completion_mask, batch.conversational)
    columns = {name: repeat_each(values, group_size) for name, values in batch.columns.items()}
    rewards, per_source = scorer(
        repeat_each(batch.prompts, group_size), completions, id_lists, columns, rollout.sequences, rollout.attention_mask
    )
    return rewards - missing_eos_penalty * rollout.truncated.cpu().float(), per_source


def rollout_stats(rollout: Rollout, rewards: torch.Tensor, per_source: torch.Tensor, scorer: RewardScorer) -> dict[str, torch.Tensor]:
    """Reward mean/std (overall and per source), completion length mean/min/max and truncated fraction."""
    lengths = rollout.completion_mask.sum(dim=1).float()  # [N]
    return {
        "reward": rewards.mean(),
        "reward_std": rewards.std() if rewards.numel() > 1 else torch.tensor(0.0),
        **scorer.stats(per_source),
        "completions/mean_length": lengths.mean(),
        "completions/min_length": lengths.min(),
        "completions/max_length": lengths.max(),
        "completions/truncated_frac": rollout.truncated.float().mean(),
    }


@torch.no_grad()
def sampled_reward(model, tokenizer, dataset: datasets.Dataset, scorer: RewardScorer, *, batch_size: int = 64,
                   max_new_tokens: int = 8, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> float:
    """Mean reward of one sampled completion per prompt of a :func:`load_prompts` dataset (the quantity RL
    raises), with a fixed sampling seed so that two evaluations differ only by the model.

    Greedy accuracy (``rlcore.evaluation.toy_accuracy``) and this sampled reward can move apart: RL at
    temperature 1 first sharpens the distribution, which raises the sampled reward before the greedy answer
    changes.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    stop_ids, total = eos_token_ids(tokenizer, getattr(model, "generation_config", None)), 0.0
    for start in range(0, len(dataset), batch_size):
        batch = prompt_batch(dataset, range(start, min(start + batch_size, len(dataset))), tokenizer.pad_token_id)
        rollout = generate(model, batch.prompt_ids.to(device), batch.prompt_mask.to(device), max_new_tokens=max_new_tokens,
                           eos_token_ids=stop_ids, pad_token_id=tokenizer.pad_token_id, temperature=temperature,
                           top_k=top_k, top_p=top_p, generator=generator)
        total += score_rollout(scorer, tokenizer, batch, rollout)[0].sum().item()
    return total / max(1, len(dataset))


def evaluate_policy(model, tokenizer, dataset: datasets.Dataset, scorer: RewardScorer, config: OnlineConfig) -> dict[str, float]:
    """``reward``: :func:`sampled_reward` with the run's sampling settings; ``accuracy``: greedy exact match
    (``rlcore.evaluation.toy_accuracy``), when the rows carry a reference (``answer``, ``completion`` or ``chosen``)."""
    metrics = {"reward": sampled_reward(model, tokenizer, dataset, scorer, batch_size=config.eval_batch_size,
                                        max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                        top_k=config.top_k, top_p=config.top_p, seed=config.seed)}
    if any(column in dataset.column_names for column in ("answer", "completion", "chosen")):
        metrics["accuracy"] = toy_accuracy(model, tokenizer, dataset, config.eval_batch_size, config.max_new_tokens)
    return metrics


# ----------------------------------------------------------------------------------------------------------
# log-probabilities of the completions


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] positions that count real tokens only: left padding does not shift them (as in generation)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def completion_logprobs(
    model: torch.nn.Module,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_length: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (and entropies) of the last ``completion_length`` tokens of each sequence.

        logp[b, t] = log softmax(logits(sequence_b[: Lp + t]) / temperature)[completion_b[t]]

    One forward pass over prompt + completion; only the last T + 1 positions go through the LM head
    (``logits_to_keep``). Position ids count real tokens (left padding does not shift them), as during
    generation.

    Args:
        model: a causal LM (``model(input_ids, attention_mask, position_ids, logits_to_keep)``).
        sequences: [B, Lp + T] ids, completion in the last T columns.
        attention_mask: [B, Lp + T], 1 on real tokens.
        completion_length: T.
        temperature: divides the logits (use the sampling temperature).
        with_entropy: also return the per-token entropy, computed without gradient (a metric).

    Returns:
        (logp [B, T] float32 with the model's gradient, entropy [B, T] detached or None). Positions after
        the stop token hold values for padding ids: mask them with ``completion_mask``.
    """
    if sequences.shape != attention_mask.shape or sequences.dim() != 2:
        raise ValueError(f"sequences {tuple(sequences.shape)} and attention_mask {tuple(attention_mask.shape)} must both be [B, L]")
    if not 0 < completion_length < sequences.shape[1]:
        raise ValueError(f"completion_length must be in [1, {sequences.shape[1] - 1}] (a prompt precedes it), got {completion_length}")
    logits = model(
        input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=completion_length + 1, use_cache=False,
    ).logits[:, :-1]  # [B, T, V]: position t predicts completion token t
    logp = gather_logprobs(logits, sequences[:, -completion_length:], temperature=temperature)  # [B, T]
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = entropy_from_logits(logits.detach(), temperature=temperature)  # [B, T]
    return logp, entropy


# ----------------------------------------------------------------------------------------------------------
# reference model and timing


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen deep copy (eval mode, no gradients): the reference model of full fine-tuning."""
    return copy.deepcopy(model).eval().requires_grad_(False)


@contextlib.contextmanager
def timed(seconds: dict[str, float], name: str, device: torch.device) -> Iterator[None]:
    """Add the wall time of the block to ``seconds[name]`` (waiting for CUDA work to finish at both ends)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
