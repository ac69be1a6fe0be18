"""Evaluation shared by the recipes: greedy exact-match accuracy of a policy, pairwise accuracy of a reward model.

Both put the model in eval mode for the measurement and restore its previous mode afterwards; both run
under ``torch.no_grad`` and return python floats (they are called at evaluation steps only).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import datasets
import torch

from rlcore import gather_logprobs, masked_sum
from rlcore.data import collate_left, collate_preference, collate_right, tokenize_prompts
from rlcore.models import eos_token_ids, sequence_scores
from rlcore.rollout import generate
from rlcore.toy import accuracy_reward


def greedy_completion_ids(
    model: torch.nn.Module,
    tokenizer,
    prompt_ids: list[list[int]],
    *,
    batch_size: int = 64,
    max_new_tokens: int = 8,
) -> list[list[int]]:
    """Greedy (temperature 0) completions of tokenised prompts: token ids up to and including the stop token.

    Generation runs through ``rlcore.rollout.generate`` in batches of ``batch_size`` left-padded prompts;
    each completion stops at any of ``eos_token_ids(tokenizer)`` or after ``max_new_tokens`` tokens.
    """
    device = next(model.parameters()).device
    stop_ids = eos_token_ids(tokenizer, getattr(model, "generation_config", None))
    completions = []
    with _eval_mode(model):
        for start in range(0, len(prompt_ids), batch_size):
            batch = collate_left(prompt_ids[start : start + batch_size], tokenizer.pad_token_id)
            rollout = generate(
                model, batch["prompt_ids"].to(device), batch["prompt_mask"].to(device),
                max_new_tokens=max_new_tokens, eos_token_ids=stop_ids, pad_token_id=tokenizer.pad_token_id,
                temperature=0.0,
            )
            lengths = rollout.completion_mask.sum(dim=1).tolist()  # [B]
            completions += [ids[:length] for ids, length in zip(rollout.completion_ids.tolist(), lengths)]
    return completions


def toy_accuracy(
    model: torch.nn.Module,
    tokenizer,
    dataset: datasets.Dataset,
    batch_size: int = 64,
    max_new_tokens: int = 8,
    reward_fn: Callable[..., list[float]] = accuracy_reward,
) -> float:
    """Greedy exact-match accuracy: the mean of ``reward_fn`` over greedy completions of the prompts.

    Args:
        model: a causal LM (any mode; restored afterwards).
        tokenizer: its tokenizer.
        dataset: rows with a ``prompt`` (text or chat messages) and the reference in the first of the
            columns ``answer``, ``completion``, ``chosen`` (text or an assistant message list); a
            ``prompt_ids`` column is used as is, otherwise the prompts are tokenised with
            ``rlcore.data.tokenize_prompts``.
        batch_size: prompts per generation batch.
        max_new_tokens: completion length limit.
        reward_fn: ``fn(prompts, completions, answer=..., **columns) -> list[float]``; default the toy
            task's ``accuracy_reward`` (1 when the completion is exactly the reference integer).

    Returns:
        The mean reward in [0, 1] for the default, as a python float.
    """
    if "prompt_ids" not in dataset.column_names:
        dataset = tokenize_prompts(dataset, tokenizer)
    reference_column = next((c for c in ("answer", "completion", "chosen") if c in dataset.column_names), None)
    if reference_column is None:
        raise ValueError(f"toy_accuracy needs an 'answer', 'completion' or 'chosen' column; found {dataset.column_names}")
    answers = [a if isinstance(a, str) else a[-1]["content"] for a in dataset[reference_column]]
    completion_ids = greedy_completion_ids(
        model, tokenizer, list(dataset["prompt_ids"]), batch_size=batch_size, max_new_tokens=max_new_tokens
    )
    completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=False)  # stop token kept
    rewards = reward_fn(list(dataset["prompt"]), completions, answer=answers)
    return sum(rewards) / max(1, len(rewards))


def mean_token_nll(model: torch.nn.Module, tokenized_rows: datasets.Dataset, pad_id: int, batch_size: int = 64) -> float:
    """Held-out loss of supervised data: negative log-likelihood per loss token, over all rows at once.

        nll = -sum_{rows, t} m_t log p(x_t | x_<t) / sum_{rows, t} m_t

    Args:
        tokenized_rows: rows with ``input_ids`` and ``completion_mask`` (``rlcore.data.tokenize_sft``).
    """
    device = next(model.parameters()).device
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    with _eval_mode(model):
        for start in range(0, len(tokenized_rows), batch_size):
            rows = tokenized_rows[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate_right(rows["input_ids"], rows["completion_mask"], pad_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            logp = gather_logprobs(logits[:, :-1].float(), batch["input_ids"][:, 1:])  # [B, T-1]
            mask = batch["completion_mask"][:, 1:]  # [B, T-1]
            total += -masked_sum(logp, mask)
            count += mask.sum()
    return (total / count.clamp(min=1)).item()


def pairwise_accuracy(
    model: torch.nn.Module, tokenized_pairs: datasets.Dataset, pad_id: int, batch_size: int = 64
) -> dict[str, float]:
    """Fraction of preference pairs a reward model scores the right way round, and the mean score margin.

    Args:
        model: a one-output sequence classifier (``rlcore.models.load_reward_model``).
        tokenized_pairs: rows with ``prompt_ids``, ``chosen_ids``, ``rejected_ids``
            (``rlcore.data.tokenize_preference``).
        pad_id: the tokenizer's pad id.
        batch_size: pairs per forward pass (each pass scores 2 * batch_size sequences).

    Returns:
        ``{"accuracy": mean[r_c > r_r], "margin": mean[r_c - r_r]}`` (ties count as wrong).
    """
    device = next(model.parameters()).device
    margins = []
    with _eval_mode(model):
        for start in range(0, len(tokenized_pairs), batch_size):
            rows = tokenized_pairs[start : start + batch_size]
            batch = collate_preference(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"], pad_id)
            scores = sequence_scores(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
            chosen_scores, rejected_scores = scores.float().chunk(2)  # [B], [B]
            margins.append(chosen_scores - rejected_scores)
    margin = torch.cat(margins)  # [N]
    return {"accuracy": (margin > 0).float().mean().item(), "margin": margin.mean().item()}


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside the block; the model's previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)

