"""Held-out evaluation for every row format the recipes take; task knowledge only through metric functions.

What each recipe measures, with no knowledge of the task:

==================  ======================================================================================
recipe              held-out metrics
==================  ======================================================================================
SFT                 :func:`sft_metrics`: loss (NLL per loss token) and token accuracy (argmax = target)
reward model        :func:`reward_model_metrics`: pairwise accuracy (r_c > r_r), mean margin, BT loss
DPO                 :func:`dpo_metrics`: pairwise accuracy of the implicit reward, its margin, the DPO loss
ORPO / CPO / SimPO  :func:`reference_free_metrics`: pairwise accuracy of beta * log pi, its margin
KTO                 :func:`kto_metrics`: sign accuracy of the implicit reward, desirable-undesirable margin,
                    the KTO loss and its reference point
online recipes      :func:`sampled_rewards`: mean reward of one sampled completion per prompt, per source;
                    :func:`sampled_pass_at_k`: pass@1 and pass@k of n sampled completions per prompt
==================  ======================================================================================

A task metric (the toy task's exact match, a unit test's pass rate, ...) is a *metric function* with the
signature of a reward function (``rlcore.rewards``: ``fn(prompts, completions, completion_ids, **columns)
-> list[float | None]``), applied to greedy completions of the held-out prompts by :func:`greedy_metric`.
The recipes take it by name (``--eval_metric``); the toy task supplies its own (``rlcore.toy.exact_match``).

Every function puts the model in eval mode with gradients off and restores its mode afterwards; all return
python floats (they run at evaluation steps only). Under torchrun (DDP or FSDP2) every function that runs the
model splits each batch over the processes and gathers the per-row values back
(``rlcore.distributed.evaluation_rows``, ``gather_evaluation``): the metrics equal the single process's, on
every process; the sampled ones draw per batch from ``seed + first row of the batch``, so the samples do not
depend on the split either.
"""

from __future__ import annotations

import math

import datasets
import torch

from rlcore import distributed, dpo_loss, gather_logprobs, kto_loss, masked_sum
from rlcore.data import (
    collate_completions,
    collate_left,
    collate_preference,
    collate_right,
    prompt_batch,
    repeat_each,
)
from rlcore.models import (
    chunked_head_supported,
    eos_token_ids,
    eval_mode,
    position_logprobs,
    sequence_logprobs,
    sequence_scores,
)
from rlcore.rewards import RewardFunction, RewardScorer, decode_completions, score_rollout
from rlcore.rollout import generate


def greedy_completion_ids(
    model: torch.nn.Module, tokenizer, prompt_ids: list[list[int]], *, batch_size: int = 64, max_new_tokens: int = 8
) -> list[list[int]]:
    """Greedy (temperature 0) completions of tokenised prompts: token ids up to and including the stop token.

    Generation runs through ``rlcore.rollout.generate`` in batches of ``batch_size`` left-padded prompts;
    each completion stops at any of ``eos_token_ids(tokenizer)`` or after ``max_new_tokens`` tokens.
    """
    device = next(model.parameters()).device
    stop_ids = eos_token_ids(tokenizer, getattr(model, "generation_config", None))
    parts = []  # [batch][row] of this process's rows (torchrun: rlcore.distributed.evaluation_part)
    with eval_mode(model):
        for start in range(0, len(prompt_ids), batch_size):
            rows = prompt_ids[start : start + batch_size]
            part, keep = distributed.evaluation_rows(len(rows), model)  # torchrun: this process's rows
            rows = [rows[i] for i in part]
            parts.append([])
            if not rows:  # torchrun: a batch of fewer rows than processes
                continue
            batch = collate_left(rows, tokenizer.pad_token_id)
            rollout = generate(
                model,
                batch["prompt_ids"].to(device),
                batch["prompt_mask"].to(device),
                max_new_tokens=max_new_tokens,
                eos_token_ids=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
                temperature=0.0,
            )
            lengths = rollout.completion_mask.sum(dim=1).tolist()  # [B]
            parts[-1] = [ids[:length] for ids, length in zip(rollout.completion_ids.tolist(), lengths)][
                : len(part) * keep
            ]
    return [ids for part in distributed.gather_evaluation(parts, model) for ids in part]


def greedy_metric(
    model: torch.nn.Module,
    tokenizer,
    prompts: datasets.Dataset,
    metric: RewardFunction,
    *,
    batch_size: int = 64,
    max_new_tokens: int = 8,
) -> float:
    """Mean of ``metric`` over the greedy completions of held-out prompts (rows where it returns None skipped).

    Args:
        prompts: a ``rlcore.data.load_prompts`` dataset (``prompt``, ``prompt_ids`` and the columns the metric
            reads, e.g. ``answer``).
        metric: ``fn(prompts, completions, completion_ids, **columns) -> list[float | None]``; completions
            are decoded as for reward functions (text, or an assistant message list for chat prompts).
    """
    completion_ids = greedy_completion_ids(
        model, tokenizer, list(prompts["prompt_ids"]), batch_size=batch_size, max_new_tokens=max_new_tokens
    )
    texts = prompts["prompt"]
    columns = {name: prompts[name] for name in prompts.column_names if name not in ("prompt", "prompt_ids")}
    completions = decode_completions(tokenizer, completion_ids, conversational=isinstance(texts[0], list))
    scores = metric(prompts=texts, completions=completions, completion_ids=completion_ids, **columns)
    values = [value for value in scores if value is not None]
    return sum(values) / max(1, len(values))


def sft_metrics(
    model: torch.nn.Module, tokenized_rows: datasets.Dataset, pad_id: int, batch_size: int = 64
) -> dict[str, float]:
    """Held-out loss and token accuracy of supervised rows, over all loss tokens at once.

        loss           = -sum_{rows, t} m_t log p(x_t | x_<t) / sum m_t
        token_accuracy =  sum_{rows, t} m_t [argmax_v p(v | x_<t) = x_t] / sum m_t

    Args:
        tokenized_rows: rows with ``input_ids`` and ``completion_mask`` (``rlcore.data.tokenize_sft``): any
            format SFT takes (language modelling, prompt-completion, conversational).
    """
    device = next(model.parameters()).device
    nll, correct, count = (torch.zeros((), device=device) for _ in range(3))
    with eval_mode(model):
        for start in range(0, len(tokenized_rows), batch_size):
            part, keep = distributed.evaluation_rows(min(batch_size, len(tokenized_rows) - start), model)  # torchrun
            if not part:
                continue
            rows = tokenized_rows[start + part.start : start + part.stop]
            batch = {
                k: v.to(device) for k, v in collate_right(rows["input_ids"], rows["completion_mask"], pad_id).items()
            }
            targets, mask = batch["input_ids"][:, 1:], batch["completion_mask"][:, 1:]  # [B, T-1] each
            if chunked_head_supported(model):  # the LM head at the loss positions only, chunk-wise
                positions = mask.nonzero()  # [N, 2]: (row, column) of the states that predict loss tokens
                logp, extras = position_logprobs(
                    model,
                    batch["input_ids"],
                    batch["attention_mask"],
                    positions=positions,
                    targets=targets[mask.bool()],
                    with_argmax=True,
                )  # [N]
                nll -= logp.sum() * keep
                correct += extras["argmax"].sum() * keep
            else:
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
                ).logits[:, :-1]
                nll -= masked_sum(gather_logprobs(logits.float(), targets), mask) * keep
                correct += masked_sum((logits.argmax(dim=-1) == targets).float(), mask) * keep
            count += mask.sum() * keep
    if distributed.evaluation_sharded(model):  # torchrun: the sums over every process's rows
        nll, correct, count = (distributed.all_reduce_sum(value).to(device) for value in (nll, correct, count))
    count = count.clamp(min=1)
    return {"loss": (nll / count).item(), "token_accuracy": (correct / count).item()}


def _sharded_batches(num_rows: int, batch_size: int, model: torch.nn.Module):
    """``(rows, keep)`` for each batch of ``batch_size`` rows: the rows this process runs (all of them in one
    process; its part under torchrun) and whether it keeps their values (``rlcore.distributed.evaluation_rows``)."""
    for start in range(0, num_rows, batch_size):
        part, keep = distributed.evaluation_rows(min(batch_size, num_rows - start), model)
        yield range(start + part.start, start + part.stop), keep


def _pair_batches(tokenized_pairs: datasets.Dataset, pad_id: int, batch_size: int, model: torch.nn.Module):
    """``(batch, keep)``: ``collate_preference`` batches ([2B, T]: chosen rows then rejected rows) of this
    process's tokenised pairs (:func:`_sharded_batches`; ``batch`` is None for an empty part), on the model's
    device."""
    device = next(model.parameters()).device
    for rows, keep in _sharded_batches(len(tokenized_pairs), batch_size, model):
        if not rows:
            yield None, keep
            continue
        pairs = tokenized_pairs[rows.start : rows.stop]
        batch = collate_preference(pairs["prompt_ids"], pairs["chosen_ids"], pairs["rejected_ids"], pad_id)
        yield {k: v.to(device) for k, v in batch.items()}, keep


def reward_model_metrics(
    model: torch.nn.Module, tokenized_pairs: datasets.Dataset, pad_id: int, batch_size: int = 64
) -> dict[str, float]:
    """Pairwise accuracy, mean margin and Bradley-Terry loss of a reward model on held-out pairs.

        accuracy = mean[r_c > r_r] (ties count as wrong),  margin = mean[r_c - r_r],
        loss = mean[-log sigmoid(r_c - r_r)]

    Args:
        model: a one-output sequence classifier (``rlcore.models.load_reward_model``).
        tokenized_pairs: rows with ``prompt_ids``, ``chosen_ids``, ``rejected_ids``
            (``rlcore.data.tokenize_preference``: explicit or implicit prompts, plain or conversational).
    """
    margins = []  # this process's [B] per batch (torchrun: its part)
    with eval_mode(model):
        for batch, keep in _pair_batches(tokenized_pairs, pad_id, batch_size, model):
            if batch is None:
                margins.append(torch.zeros(0))
                continue
            chosen_scores, rejected_scores = (
                sequence_scores(model, batch["input_ids"], batch["attention_mask"]).float().chunk(2)
            )
            margins.append((chosen_scores - rejected_scores)[: len(chosen_scores) * keep].cpu())  # [B]
    margin = torch.cat(distributed.gather_evaluation(margins, model))  # [N], in row order
    return {
        "accuracy": (margin > 0).float().mean().item(),
        "margin": margin.mean().item(),
        "loss": -torch.nn.functional.logsigmoid(margin).mean().item(),
    }


def preference_logps(
    model: torch.nn.Module, tokenized_pairs: datasets.Dataset, pad_id: int, batch_size: int = 64, average: bool = False
) -> torch.Tensor:
    """[2, N] completion log-probs (row 0 chosen, row 1 rejected) of tokenised pairs, without gradient.

    Sums over each completion's tokens (means with ``average``, as IPO takes them). The DPO recipe computes
    them once with the starting policy for the reference, and with the current policy at each evaluation.
    """
    device = next(model.parameters()).device
    logps = []  # this process's [B, 2] per batch (torchrun: its part)
    with eval_mode(model):
        for batch, keep in _pair_batches(tokenized_pairs, pad_id, batch_size, model):
            if batch is None:
                logps.append(torch.zeros(0, 2, device=device))
                continue
            summed, _ = sequence_logprobs(
                model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"][:, 1:], average
            )
            pairs = summed.float().view(2, -1).T  # [B, 2]
            logps.append(pairs[: len(pairs) * keep])
    return torch.cat(distributed.gather_evaluation(logps, model)).T  # [2, N]


def dpo_metrics(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    **loss_options,
) -> dict[str, float]:
    """Held-out DPO metrics from [2, N] policy and reference log-probs (:func:`preference_logps`).

    The implicit reward of a completion is beta * (log pi - log pi_ref); ``accuracy`` is the fraction of
    pairs whose chosen completion gets the larger one, ``margin`` the mean difference, ``loss`` the DPO loss
    (``loss_options``: further keyword arguments of ``dpo_loss``, e.g. the completion lengths).
    """
    loss, stats = dpo_loss(
        logps[0],
        logps[1],
        ref_logps[0],
        ref_logps[1],
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        **loss_options,
    )
    return {
        "accuracy": stats["rewards/accuracies"].item(),
        "margin": stats["rewards/margins"].item(),
        "loss": loss.item(),
    }


def reference_free_metrics(logps: torch.Tensor, beta: float) -> dict[str, float]:
    """Held-out metrics of a reference-free preference loss (ORPO, CPO, SimPO) from [2, N] policy log-probs
    (:func:`preference_logps`, averaged or summed as the loss takes them): the implicit reward is
    beta * log pi; ``accuracy`` is the fraction of pairs whose chosen completion gets the larger one (ties
    count as wrong), ``margin`` the mean difference."""
    margin = beta * (logps[0] - logps[1])  # [N]
    return {"accuracy": (margin > 0).float().mean().item(), "margin": margin.mean().item()}


def completion_logps(
    model: torch.nn.Module,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    pad_id: int,
    batch_size: int = 64,
) -> torch.Tensor:
    """[N] summed completion log-probs of (prompt, completion) token lists, without gradient (KTO's held-out
    rows and their mismatched pairs)."""
    device = next(model.parameters()).device
    logps = []  # this process's [B] per batch (torchrun: its part)
    with eval_mode(model):
        for rows, keep in _sharded_batches(len(prompt_ids), batch_size, model):
            if not rows:
                logps.append(torch.zeros(0, device=device))
                continue
            batch = collate_completions(
                prompt_ids[rows.start : rows.stop], completion_ids[rows.start : rows.stop], pad_id
            )
            batch = {k: v.to(device) for k, v in batch.items()}
            summed, _ = sequence_logprobs(
                model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"][:, 1:]
            )
            logps.append(summed.float()[: len(rows) * keep])  # [B]
    return torch.cat(distributed.gather_evaluation(logps, model))  # [N], in row order


def kto_metrics(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl_logps: torch.Tensor,
    ref_kl_logps: torch.Tensor,
    beta: float,
    **loss_kwargs,
) -> dict[str, float]:
    """Held-out KTO metrics from [N] log-probs of the rows and of their mismatched pairs
    (:func:`completion_logps`, policy and reference).

    The implicit reward of a completion is beta * (log pi - log pi_ref); ``accuracy`` is the fraction of
    rows where it is positive for a desirable and negative for an undesirable completion, ``margin`` the
    mean reward of the desirable rows minus that of the undesirable ones, ``loss`` the KTO loss
    (``loss_kwargs``: weights, loss_type) and ``kl`` its reference point z0 over the whole held-out set.
    """
    loss, stats = kto_loss(logps, ref_logps, labels, kl_logps, ref_kl_logps, beta=beta, **loss_kwargs)
    rewards = logps - ref_logps  # [N]; the sign is that of beta * rewards
    right = torch.where(labels.bool(), rewards > 0, rewards < 0)
    return {
        "accuracy": right.float().mean().item(),
        "margin": stats["rewards/margins"].item(),
        "loss": loss.item(),
        "kl": stats["kl"].item(),
    }


@torch.no_grad()
def sampled_rewards(
    model,
    tokenizer,
    prompts: datasets.Dataset,
    scorer: RewardScorer,
    *,
    batch_size: int = 64,
    max_new_tokens: int = 8,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> dict[str, float]:
    """Mean reward of one sampled completion per held-out prompt (the quantity RL raises), overall and per source.

    The sampling seed is fixed (batch b of ``batch_size`` rows draws from ``seed + b * batch_size``, so that
    the samples do not depend on how the batch is split over processes), so two evaluations differ only by
    the model. Returns ``{"reward": mean
    weighted reward, "reward/<source>": mean of each source over the rows it scored}``. Greedy metrics
    (:func:`greedy_metric`) and this sampled reward can move apart: RL at temperature 1 first sharpens the
    distribution, which raises the sampled reward before the greedy answer changes.
    """
    device = next(model.parameters()).device
    stop_ids = eos_token_ids(tokenizer, getattr(model, "generation_config", None))
    rewards, per_source = [], []
    for start in range(0, len(prompts), batch_size):
        size = min(batch_size, len(prompts) - start)
        part, keep = distributed.evaluation_rows(size, model)  # torchrun: this process's rows of the batch
        if not part:
            rewards.append(torch.zeros(0, device=device))
            per_source.append(torch.zeros(0, len(scorer.names), device=device))
            continue
        batch = prompt_batch(prompts, range(start + part.start, start + part.stop), tokenizer.pad_token_id)
        draws = (torch.arange(part.start, part.stop, device=device), size) if len(part) < size else None
        rollout = generate(
            model,
            batch.prompt_ids.to(device),
            batch.prompt_mask.to(device),
            max_new_tokens=max_new_tokens,
            eos_token_ids=stop_ids,
            pad_token_id=tokenizer.pad_token_id,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=torch.Generator(device).manual_seed(seed + start),  # per batch: the same whatever the split
            draws=draws,  # torchrun: these rows sample as they do in the whole batch
        )
        batch_rewards, batch_per_source = score_rollout(scorer, tokenizer, batch, rollout)
        rewards.append(batch_rewards[: len(part) * keep])
        per_source.append(batch_per_source[: len(part) * keep])
    per_source = torch.cat(distributed.gather_evaluation(per_source, model))  # [N, K]
    metrics = {"reward": torch.cat(distributed.gather_evaluation(rewards, model)).mean().item()}
    for index, name in enumerate(scorer.names):
        values = per_source[:, index]
        if not values.isnan().all():  # a source that scored no held-out row has no mean
            metrics[f"reward/{name}"] = values[~values.isnan()].mean().item()
    return metrics


def pass_at_k(num_correct: torch.Tensor, num_samples: int, k: int) -> torch.Tensor:
    """Unbiased pass@k of each problem from n samples of which c pass (Chen et al. 2021, "Evaluating large
    language models trained on code", https://arxiv.org/abs/2107.03374, eq. 1):

        pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

    the probability that at least one of k samples drawn without replacement from the n passes; the
    product form is the paper's numerically stable one. pass@1 = c / n.

    Args:
        num_correct: [P] passing samples per problem, c in [0, n].
        num_samples: n, samples per problem.
        k: 1 <= k <= n.

    Returns:
        [P] float64 estimates.
    """
    if not 1 <= k <= num_samples:
        raise ValueError(f"pass@k needs 1 <= k <= n = {num_samples}, got k = {k}")
    estimates = []
    for c in num_correct.tolist():
        if num_samples - c < k:  # every k-subset holds a pass
            estimates.append(1.0)
        else:
            estimates.append(1.0 - math.prod(1.0 - k / i for i in range(num_samples - int(c) + 1, num_samples + 1)))
    return torch.tensor(estimates, dtype=torch.float64)


@torch.no_grad()
def sampled_pass_at_k(
    model,
    tokenizer,
    prompts: datasets.Dataset,
    metric: RewardFunction,
    num_samples: int,
    *,
    batch_size: int = 64,
    max_new_tokens: int = 8,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> dict[str, float]:
    """pass@1 and pass@k (k = 2, 4, ... up to n and n itself) over held-out prompts, from ``num_samples`` = n
    sampled completions each (:func:`pass_at_k`); a sample passes when ``metric`` returns at least 1 (the
    toy task's exact match: the right sum). The sampling seed is fixed, so two evaluations differ only by
    the model. Returns ``{"pass@1": ..., "pass@k": ...}``, means over the prompts."""
    device = next(model.parameters()).device
    stop_ids = eos_token_ids(tokenizer, getattr(model, "generation_config", None))
    prompts_per_batch = max(1, batch_size // num_samples)
    correct = []  # this process's [P] per batch (torchrun: its part)
    with eval_mode(model):
        for start in range(0, len(prompts), prompts_per_batch):
            size = min(prompts_per_batch, len(prompts) - start)
            part, keep = distributed.evaluation_rows(size, model)  # torchrun: this process's prompts of the batch
            if not part:
                correct.append(torch.zeros(0))
                continue
            rows = range(start + part.start, start + part.stop)
            batch = prompt_batch(prompts, rows, tokenizer.pad_token_id)
            # per batch: the same samples whatever the split (rows p * n .. p * n + n - 1 are prompt p's samples)
            generator = torch.Generator(device).manual_seed(seed + start)
            completion_rows = torch.arange(part.start * num_samples, part.stop * num_samples, device=device)
            draws = (completion_rows, size * num_samples) if len(part) < size else None
            rollout = generate(
                model,
                batch.prompt_ids.to(device),
                batch.prompt_mask.to(device),
                max_new_tokens=max_new_tokens,
                eos_token_ids=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                num_samples=num_samples,
                generator=generator,
                draws=draws,  # torchrun: these rows sample as they do in the whole batch
            )
            lengths = rollout.completion_mask.sum(dim=1).tolist()
            ids = [row[:length] for row, length in zip(rollout.completion_ids.tolist(), lengths)]
            columns = {name: repeat_each(values, num_samples) for name, values in batch.columns.items()}
            texts = repeat_each(batch.prompts, num_samples)
            completions = decode_completions(tokenizer, ids, conversational=batch.conversational)
            scores = metric(prompts=texts, completions=completions, completion_ids=ids, **columns)
            passed = torch.tensor([float(score is not None and score >= 1.0) for score in scores])  # [P * n]
            correct.append(passed.reshape(len(rows), num_samples).sum(dim=1)[: len(rows) * keep])  # [P]
    correct = torch.cat(distributed.gather_evaluation(correct, model))  # [P_all], in prompt order
    ks = sorted({1, num_samples, *(2**i for i in range(1, num_samples.bit_length()) if 2**i <= num_samples)})
    return {f"pass@{k}": pass_at_k(correct, num_samples, k).mean().item() for k in ks}
