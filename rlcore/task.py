"""A run's task: the rows it learns from, the held-out rows it is judged on, its rewards and its metric.

Every recipe starts the same way, and this module holds that start so that it is written once and checked
before any training or warm start (a bad ``--dataset``, a missing column or an unknown reward function is
one line at once, not an error after minutes of work)::

    rows, eval_rows, metric = load_task_rows(config, formats)     # offline recipes (SFT, DPO, reward model)
    task = load_prompt_task(config, tokenizer, device)            # online recipes: + prompts and rewards

Held-out rows are never the training rows in disguise (``rlcore.data.load_eval_rows``); the greedy metric
(``--eval_metric``) is a reward-function spec, ``auto`` meaning the toy task's exact match on the toy
task and nothing elsewhere (``rlcore.rewards.resolve_metric``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import datasets
import torch

from rlcore.checkpoint import resolve_resume
from rlcore.config import ONLINE_WARM_START_FLAGS, OnlineConfig, TrainConfig
from rlcore.data import PROMPT_FORMATS, load_checked_rows, load_eval_rows, tokenize_prompts
from rlcore.evaluation import greedy_metric, sampled_pass_at_k, sampled_rewards
from rlcore.lora import prepare_model
from rlcore.models import (
    enable_gradient_checkpointing,
    eos_token_ids,
    load_options,
    load_policy,
    load_tokenizer,
)
from rlcore.rewards import RewardFunction, RewardScorer, build_reward_scorer, check_reward_columns, resolve_metric

Metric = tuple[str, RewardFunction]  # (name, function)


def load_task_rows(
    config: TrainConfig, formats: tuple[str, ...]
) -> tuple[datasets.Dataset, datasets.Dataset | None, Metric | None]:
    """(training rows, held-out rows or None, greedy metric or None), each checked.

    The metric is dropped, with a message, when the held-out rows have no ``prompt`` to generate from
    (language-modelling text, implicit-prompt preferences).
    """
    resolve_resume(config.resume, config.output_dir)  # a bad --resume path: one line now, not after a warm start
    options = row_options(config)
    rows = load_checked_rows(config.dataset, config.train_split, config.num_train_rows, formats, **options)
    eval_rows = load_eval_rows(
        config.dataset, config.eval_dataset, config.eval_split, config.num_eval_rows, formats, **options
    )
    metric = None if eval_rows is None else resolve_metric(config.eval_metric, config.eval_dataset or config.dataset)
    if metric is not None and "prompt" not in eval_rows.column_names:
        print(f"--eval_metric {metric[0]}: the evaluation rows have no 'prompt' column to generate from; skipped")
        metric = None
    if metric is not None:
        check_reward_columns([metric], eval_rows.column_names, "the evaluation rows")
    return rows, eval_rows, metric


def row_options(config: TrainConfig) -> dict[str, Any]:
    """The ``rlcore.data.load_rows`` options of the flags: ``--dataset_config``, ``--columns``, ``--formatting_func``."""
    return {
        "config_name": config.dataset_config,
        "columns": config.columns,
        "formatting_func": config.formatting_func,
    }


def metric_value(
    model: torch.nn.Module, tokenizer, eval_prompts: datasets.Dataset | None, metric: Metric | None, config: TrainConfig
) -> dict[str, float]:
    """``{metric name: mean over greedy completions}`` of the held-out prompts, or {} without a metric."""
    if metric is None or eval_prompts is None:
        return {}
    return {
        metric[0]: greedy_metric(
            model,
            tokenizer,
            eval_prompts,
            metric[1],
            batch_size=config.eval_batch_size,
            max_new_tokens=getattr(config, "max_new_tokens", 8),
        )
    }


def load_start_policy(
    config: OnlineConfig, device: torch.device, sft_script: str | os.PathLike
) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """(policy, tokenizer, sampling): the policy an online recipe trains, and how it samples.

    The policy starts from ``--model``; with ``--model tiny`` and ``--warm_start_steps N > 0`` from the toy
    task's SFT warm start, ``sft_script`` run once for N steps and cached (``rlcore.toy.warm_start``: the
    untrained tiny model never earns a reward). It is loaded as ``--dtype`` (or quantised while loading with
    ``--load_in_4bit``) and made what the flags train (full fine-tuning, LoRA or QLoRA:
    ``rlcore.lora.prepare_model``; ``--gradient_checkpointing``), in train mode; ``policy.name_or_path`` is where it started.
    ``sampling`` holds the keyword arguments of ``rlcore.rollout.generate`` the flags set (length, stop and
    pad tokens, temperature, top-k, top-p).
    """
    start_model = config.model
    if config.model == "tiny" and config.warm_start_steps > 0:
        from rlcore.toy import warm_start  # the toy default's warm start, asked for by --model tiny

        start_model = warm_start(
            config.model, config.warm_start_steps, config.seed, sft_script, ONLINE_WARM_START_FLAGS
        )
    policy, tokenizer = load_policy(start_model, device=device, **load_options(config))
    policy = prepare_model(
        policy, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_targets, config.load_in_4bit
    )
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    sampling = {
        "max_new_tokens": config.max_new_tokens,
        "eos_token_ids": eos_token_ids(tokenizer, policy.generation_config),
        "pad_token_id": tokenizer.pad_token_id,
        "temperature": config.temperature,
        "top_k": config.top_k,
        "top_p": config.top_p,
    }
    return policy.train(), tokenizer, sampling


@dataclass
class PromptTask:
    """What an online recipe samples from and is rewarded and judged by.

    Attributes:
        prompts: training rows with a ``prompt_ids`` column (``rlcore.data.tokenize_prompts``).
        eval_prompts: held-out rows likewise, or None (no evaluation).
        scorer: the reward functions and reward model, weighted (``rlcore.rewards.RewardScorer``).
        metric: the greedy metric, or None.
    """

    prompts: datasets.Dataset
    eval_prompts: datasets.Dataset | None
    scorer: RewardScorer
    metric: Metric | None


def load_prompt_task(config: OnlineConfig, device: torch.device) -> PromptTask:
    """The :class:`PromptTask` of an online recipe's flags, tokenised with ``--model``'s tokenizer (a warm
    start keeps it); every reward function's columns are checked."""
    tokenizer = load_tokenizer(config.model)
    rows, eval_rows, metric = load_task_rows(config, PROMPT_FORMATS)
    on_policy = getattr(config, "reward_on_policy", False)  # PPO: a reward adapter on the policy's base
    scorer = build_reward_scorer(
        config.reward_funcs, config.reward_model, config.reward_weights, tokenizer, device, on_policy
    )
    check_reward_columns(scorer.functions, rows.column_names, f"--dataset {config.dataset}")
    eval_prompts = None
    if eval_rows is not None:
        check_reward_columns(scorer.functions, eval_rows.column_names, "the evaluation rows")
        eval_prompts = _prompts(eval_rows, tokenizer, config, "evaluation")
    return PromptTask(_prompts(rows, tokenizer, config, "training"), eval_prompts, scorer, metric)


def _prompts(rows: datasets.Dataset, tokenizer, config: OnlineConfig, which: str) -> datasets.Dataset:
    """tokenize_prompts, its "every row is too long" error naming the flag."""
    try:
        return tokenize_prompts(rows, tokenizer, config.max_prompt_length, config.truncation)
    except ValueError as error:
        if "every row is longer" not in str(error):
            raise
        raise ValueError(
            f"--max_prompt_length {config.max_prompt_length}: every {which} prompt is longer; raise it"
        ) from None


def evaluate_policy(policy: torch.nn.Module, tokenizer, task: PromptTask, config: OnlineConfig) -> dict[str, float]:
    """Held-out mean sampled reward (overall and per source) with the run's sampling settings, the greedy
    metric when there is one, and with ``--num_generations_eval n`` pass@1 and pass@k of n samples by that
    metric (``rlcore.evaluation.sampled_pass_at_k``)."""
    pass_at_k = {}
    if config.num_generations_eval and task.metric is not None:
        sampling = {k: getattr(config, k) for k in ("max_new_tokens", "temperature", "top_k", "top_p", "seed")}
        pass_at_k = sampled_pass_at_k(
            policy, tokenizer, task.eval_prompts, task.metric[1], config.num_generations_eval,
            batch_size=config.eval_batch_size, **sampling,
        )  # fmt: skip
    metrics = sampled_rewards(
        policy,
        tokenizer,
        task.eval_prompts,
        task.scorer,
        batch_size=config.eval_batch_size,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        seed=config.seed,
    )
    return {**metrics, **metric_value(policy, tokenizer, task.eval_prompts, task.metric, config), **pass_at_k}
