"""Online DPO: sample two completions per prompt, let a reward rank them, take a DPO step on the pair.

Each step samples two completions for each of P prompts with rlcore's rollout engine, scores them with
reward functions and/or a reward model (rlcore.rewards), calls the better one chosen and the other
rejected, and minimises the DPO loss against the reference policy:

    sigmoid:  -log sigma(beta * [(log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))])
    ipo:      ((c - r) - 1 / (2 beta))^2, with length-averaged log-probs c, r as TRL's ipo

(Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback", https://arxiv.org/abs/2402.04792;
rlcore.dpo_loss for the formulas). The reference is a frozen copy of the starting policy, or with LoRA
the adapters-off base.

Departures: pairs whose two completions get the same reward are left out of the loss (with a 0/1
reward such as the toy task's accuracy, both right or both wrong carries no preference; TRL would train
on them in an arbitrary direction); the fraction kept is logged as ``pairs/decided_frac``. Log-probs
use the model's own distribution (temperature 1), whatever the sampling temperature.

Learning rate, measured on the toy task from the 46.2% warm start (300 s, one thread each, two runs at
once on 2 cores; ``OMP_NUM_THREADS=1 python recipes/online_dpo.py --lr LR``), toy test accuracy of the
evaluations every 250 steps after the start: lr 1e-4: mean 50.6%, between 46.4% and 53.6%, 46.4% at the end
(5312 steps; the policy swings from one evaluation to the next); lr 5e-5: mean 52.8%, 50.4-55.6%, 55.6% at
the end (4414 steps); lr 2e-5 (the default): mean 53.2%, 51.4-54.2%, 54.0% at the end (4165 steps).

Run it:
    python recipes/online_dpo.py                                   # toy task, accuracy reward, SFT warm start
    python recipes/online_dpo.py --reward_model outputs/reward_model --reward_funcs none
    python recipes/online_dpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset prompts.jsonl \
        --reward_model my-rm-dir --reward_funcs none --max_new_tokens 256 --batch_size 8 --lora_r 16
Single process for now (one CPU or GPU). With --model tiny (the default) the recipe starts from a cached
SFT warm start (see recipes/grpo.py and rlcore.online.warm_start).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rlcore import dpo_loss, masked_mean, masked_sum
from rlcore.checkpoint import load_checkpoint, resolve_resume, save_checkpoint, save_final_model
from rlcore.config import parse_config, save_config
from rlcore.lora import prepare_model, reference_context
from rlcore.models import eos_token_ids, load_policy
from rlcore.online import ONLINE_WARM_START_FLAGS, OnlineConfig, completion_logprobs, evaluate_policy, frozen_copy, load_prompts, prompt_batch, rollout_stats, score_rollout, timed, warm_start
from rlcore.optim import build_optimizer, build_scheduler, optimizer_step
from rlcore.rewards import build_reward_scorer
from rlcore.rollout import generate
from rlcore.runtime import (autocast, maybe_compile, prefer_eager_attention, resolve_device, seed_everything, step_batches,
                            use_bf16)
from rlcore.tracking import Tracker


@dataclass
class OnlineDPOConfig(OnlineConfig):
    output_dir: str = "outputs/online_dpo"
    lr: float = 2e-5  # peak learning rate (AdamW); see the measurements in the docstring
    lr_schedule: str = "constant"  # "cosine", "linear" or "constant"
    batch_size: int = 32  # prompts per micro-batch (two completions each); prompts per step = batch_size * grad_accum_steps
    beta: float = 0.1  # DPO inverse temperature (the strength of the implicit KL)
    loss_type: str = "sigmoid"  # "sigmoid" (DPO) or "ipo"
    max_steps: int = 100_000  # sampling steps, one optimizer step each
    max_seconds: float | None = 300.0  # stop (evaluate, save) after this much training time
    logging_steps: int = 10  # log the mean of the metrics over this many steps
    eval_steps: int = 250  # evaluate toy accuracy every N steps (0 = only at the start and end)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_type not in ("sigmoid", "ipo") or self.beta <= 0:
            raise ValueError(f"--loss_type must be sigmoid or ipo and --beta > 0, got {self.loss_type!r} and {self.beta}")


def sequence_logprobs(model, sequences, attention_mask, mask, length_average: bool) -> torch.Tensor:
    """[N] summed (or, for ipo, length-averaged) completion log-probs."""
    logp, _ = completion_logprobs(model, sequences, attention_mask, mask.shape[1])  # [N, T]
    return masked_mean(logp, mask, dim=1) if length_average else masked_sum(logp, mask, dim=1)


def rank_pairs(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (chosen, rejected) of each pair of consecutive completions whose rewards differ.

    rewards: [2P], rows 2p and 2p + 1 are the two completions of prompt p. Returns two [N] index tensors.
    """
    pair_rewards = rewards.view(-1, 2)  # [P, 2]
    decided = (pair_rewards[:, 0] != pair_rewards[:, 1]).nonzero().squeeze(1)  # [N]
    second_wins = (pair_rewards[decided, 1] > pair_rewards[decided, 0]).long()  # [N]
    return 2 * decided + second_wins, 2 * decided + 1 - second_wins


def main(argv: list[str] | None = None) -> dict[str, float]:
    config = parse_config(OnlineDPOConfig, argv)
    seed_everything(config.seed)
    device = resolve_device(config.device)
    bf16 = use_bf16(device, config.bf16)

    # ---------------------------------------------------------------- models, data, rewards
    start_model = warm_start(config.model, config.warm_start_steps, config.seed, Path(__file__).with_name("sft.py"), ONLINE_WARM_START_FLAGS)
    policy, tokenizer = load_policy(start_model, device=device)
    policy = prepare_model(policy, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_targets, config.load_in_4bit)
    reference = frozen_copy(policy) if config.lora_r == 0 else None  # LoRA: the adapters-off policy
    forward = maybe_compile(policy, device, config.compile)
    stop_ids = eos_token_ids(tokenizer, policy.generation_config)
    scorer = build_reward_scorer(config.reward_funcs, config.reward_model, config.reward_weights, tokenizer, device)
    prompts = load_prompts(config.dataset, config.train_split, tokenizer, config.max_prompt_length, config.num_train_rows)
    eval_prompts = None
    if config.eval_split != "none":
        eval_prompts = load_prompts(config.dataset, config.eval_split, tokenizer, config.max_prompt_length, config.num_eval_rows)
    for model in filter(None, (policy, reference)):
        prefer_eager_attention(model, device, max(map(len, prompts["prompt_ids"])) + config.max_new_tokens)  # CPU, short rows
    prompts_per_step = config.batch_size * config.grad_accum_steps
    length_average = config.loss_type == "ipo"

    optimizer = build_optimizer(policy, config.lr, config.weight_decay, (config.adam_beta1, config.adam_beta2))
    scheduler = build_scheduler(optimizer, warmup_steps=config.warmup_steps, total_steps=config.max_steps,
                                schedule=config.lr_schedule, min_lr_ratio=config.min_lr_ratio)
    step, training_seconds = 0, 0.0
    resume_from = resolve_resume(config.resume, config.output_dir)
    if resume_from is not None:
        state = load_checkpoint(resume_from, policy, optimizer, scheduler, seed=config.seed)
        step, training_seconds = state["step"], state["extra"]["training_seconds"]
    save_config(config, config.output_dir)
    tracker = Tracker(config.output_dir, config.max_steps, step, bar_keys=("reward",))

    def evaluate(at_step: int) -> dict[str, float]:
        if eval_prompts is None:
            return {}
        return tracker.log_eval(at_step, evaluate_policy(policy, tokenizer, eval_prompts, scorer, config))

    if step == 0:
        evaluate(0)

    # ---------------------------------------------------------------- training loop
    while step < config.max_steps and (config.max_seconds is None or training_seconds < config.max_seconds):
        seconds: dict[str, float] = {}
        rows = step_batches(len(prompts), prompts_per_step, 1, config.seed, step)[0]
        batch = prompt_batch(prompts, rows, tokenizer.pad_token_id)

        # -- two completions per prompt
        with timed(seconds, "generation", device):
            rollout = generate(
                policy, batch.prompt_ids.to(device), batch.prompt_mask.to(device), max_new_tokens=config.max_new_tokens,
                eos_token_ids=stop_ids, pad_token_id=tokenizer.pad_token_id, temperature=config.temperature,
                top_k=config.top_k, top_p=config.top_p, num_samples=2,
            )

        # -- rank each pair; keep the pairs with a preference; reference log-probs
        with timed(seconds, "scoring", device):
            rewards, per_source = score_rollout(scorer, tokenizer, batch, rollout, config.missing_eos_penalty)
            chosen_rows, rejected_rows = rank_pairs(rewards)  # [N] each, the pairs with a preference
            num_pairs, mask = len(chosen_rows), rollout.completion_mask.to(device)
            pair_rows = torch.cat([chosen_rows, rejected_rows]).to(device)  # [2N]: chosen then rejected
            if num_pairs:
                with reference_context(policy, reference) as ref_model, autocast(device, bf16):
                    ref_logps = sequence_logprobs(ref_model, rollout.sequences[pair_rows], rollout.attention_mask[pair_rows],
                                                  mask[pair_rows], length_average)  # [2N]
            stats = {**rollout_stats(rollout, rewards, per_source, scorer), "pairs/decided_frac": torch.tensor(2 * num_pairs / len(rewards)),
                     "pairs/chosen_reward": rewards[chosen_rows].mean() if num_pairs else torch.tensor(0.0),
                     "pairs/rejected_reward": rewards[rejected_rows].mean() if num_pairs else torch.tensor(0.0)}

        # -- one DPO step over the kept pairs (micro-batches of batch_size pairs); none kept: no update
        lr = scheduler.get_last_lr()[0]
        with timed(seconds, "training", device):
            for pairs in torch.arange(num_pairs, device=device).split(config.batch_size) if num_pairs else ():
                rows_of_pairs = torch.cat([pair_rows[pairs], pair_rows[pairs + num_pairs]])  # [2n]
                with autocast(device, bf16):
                    logps = sequence_logprobs(forward, rollout.sequences[rows_of_pairs], rollout.attention_mask[rows_of_pairs],
                                              mask[rows_of_pairs], length_average)  # [2n]
                chosen_logps, rejected_logps = logps.chunk(2)
                loss, loss_stats = dpo_loss(chosen_logps, rejected_logps, ref_logps[pairs], ref_logps[pairs + num_pairs],
                                            beta=config.beta, loss_type=config.loss_type)
                (loss * len(pairs) / num_pairs).backward()  # the micro-batch's share of the mean over all pairs
                for key, value in {"loss": loss.detach(), **loss_stats}.items():
                    stats[key] = stats.get(key, 0.0) + value * len(pairs) / num_pairs
            if num_pairs:
                stats["grad_norm"] = optimizer_step(policy.parameters(), optimizer, scheduler, config.max_grad_norm)
            else:  # keep the schedule in step
                scheduler.step()

        step += 1
        training_seconds += sum(seconds.values())
        stats.update({f"time/{name}": value for name, value in seconds.items()})
        stats.update({"time/step": sum(seconds.values()), "lr": lr})
        tracker.update(stats)
        if step % config.logging_steps == 0:
            tracker.log(step)
        if config.eval_steps and step % config.eval_steps == 0:
            evaluate(step)
        if config.save_steps and step % config.save_steps == 0:
            save_checkpoint(config.output_dir, step, policy, tokenizer, optimizer, scheduler, seed=config.seed,
                            extra_state={"training_seconds": training_seconds}, keep_last=config.save_total_limit)

    # ---------------------------------------------------------------- final evaluation and model
    tracker.log(step)
    results = evaluate(step) if not (config.eval_steps and step % config.eval_steps == 0) else {}
    save_final_model(policy, tokenizer, config.output_dir)
    tracker.close()
    return results


if __name__ == "__main__":
    main()
