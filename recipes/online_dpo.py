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

Run it:
    python recipes/online_dpo.py                                   # toy task, accuracy reward, SFT warm start
    python recipes/online_dpo.py --reward_model outputs/reward_model --reward_funcs none
    python recipes/online_dpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset prompts.jsonl \
        --reward_model my-rm-dir --reward_funcs none --max_new_tokens 256 --batch_size 8 --lora_r 16
Several processes: ``torchrun --nproc_per_node 2 recipes/online_dpo.py`` (the same global batch;
rlcore.distributed). With --model tiny (the default) the recipe starts from a cached
SFT warm start (see recipes/grpo.py and rlcore.toy.warm_start). Evaluation as in recipes/grpo.py: held-out
mean sampled reward per source, and the greedy metric (``--eval_metric``). Measured results (the learning
rate sweep behind the default): docs/results.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from einops import rearrange

from rlcore import data, distributed, dpo_loss, guards, lora, models, optim, runtime, tracking
from rlcore.config import OnlineConfig, parse_config
from rlcore.rewards import TrainerState, rollout_stats, score_rollout
from rlcore.rollout import generate
from rlcore.run import Run, cli
from rlcore.task import evaluate_policy, load_prompt_task, load_start_policy


@dataclass
class OnlineDPOConfig(OnlineConfig):
    output_dir: str = "outputs/online_dpo"
    lr: float = 2e-5  # peak learning rate (AdamW); see docs/results.md for the sweep
    lr_schedule: str = "constant"  # "cosine", "linear" or "constant"
    batch_size: int = (
        32  # prompts per micro-batch (two completions each); prompts per step = batch_size * grad_accum_steps
    )
    beta: float = 0.1  # DPO inverse temperature (the strength of the implicit KL)
    loss_type: str = "sigmoid"  # "sigmoid" (DPO) or "ipo"
    max_steps: int = 4000  # sampling steps, one optimizer step each
    logging_steps: int = 10  # log the mean of the metrics over this many steps
    eval_steps: int = 500  # evaluate every N steps (0 = only at the start and end)
    prefix_sharing: bool = False  # a pair's prompt once: one forward row [prompt, chosen, rejected] (rlcore.packing)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_type not in ("sigmoid", "ipo") or self.beta <= 0:
            raise ValueError(
                f"--loss_type must be sigmoid or ipo and --beta > 0, got {self.loss_type!r} and {self.beta}"
            )


def rank_pairs(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (chosen, rejected) of each pair of consecutive completions whose rewards differ.

    rewards: [2P], rows 2p and 2p + 1 are the two completions of prompt p. Returns two [N] index tensors.
    """
    pair_rewards = rearrange(rewards, "(p two) -> p two", two=2)  # [P, 2]
    decided = (pair_rewards[:, 0] != pair_rewards[:, 1]).nonzero().squeeze(1)  # [N]
    second_wins = (pair_rewards[decided, 1] > pair_rewards[decided, 0]).long()  # [N]
    return 2 * decided + second_wins, 2 * decided + 1 - second_wins


def main(argv: list[str] | None = None) -> dict[str, float]:
    config = parse_config(OnlineDPOConfig, argv)
    device, bf16 = runtime.setup(config)

    # ---------------------------------------------------------------- task (checked first), models
    task = load_prompt_task(config, device)
    policy, tokenizer, sampling = load_start_policy(config, device, sft_script=Path(__file__).with_name("sft.py"))
    reference = models.frozen_copy(policy) if config.lora_r == 0 else None  # LoRA: the adapters-off policy
    policy = distributed.prepare(policy, config.sharding, bf16)  # torchrun: same weights everywhere (or FSDP2)
    forward = runtime.maybe_compile(policy, device, config.compile)
    prompts, scorer = task.prompts, task.scorer
    longest = max(map(len, prompts["prompt_ids"])) + config.max_new_tokens
    for model in filter(None, (policy, reference)):
        runtime.prefer_eager_attention(model, device, longest)  # CPU, short rows
    prompts_per_step = config.batch_size * config.grad_accum_steps
    length_average = config.loss_type == "ipo"

    optimizer, scheduler = optim.from_flags(policy, config, num_rows=len(prompts), rows_per_step=prompts_per_step)
    evaluate = (lambda: evaluate_policy(policy, tokenizer, task, config)) if task.eval_prompts is not None else None
    guard = guards.online(config)  # non-finite steps skipped; no decided pair, all truncated warned
    run = Run(config, policy, tokenizer, optimizer, scheduler, evaluate=evaluate, bar_keys=("reward",), guard=guard)

    # ---------------------------------------------------------------- training loop
    while run.running():
        rows = runtime.step_batches(len(prompts), prompts_per_step, 1, config.seed, run.step)[0]
        rows = distributed.shard(rows)  # torchrun: this process's prompts
        batch = data.prompt_batch(prompts, rows, tokenizer.pad_token_id)

        # -- two completions per prompt
        with run.timed("generation"):
            rollout = generate(
                policy,
                batch.prompt_ids.to(device),
                batch.prompt_mask.to(device),
                num_samples=2,
                **sampling,
                **distributed.sampling_draws(2 * len(rows), device),  # the samples do not depend on the processes
            )

        # -- rank each pair; keep the pairs with a preference; reference log-probs
        with run.timed("scoring"):
            state = TrainerState(run.step, run.step * prompts_per_step / len(prompts))
            rewards, per_source = score_rollout(scorer, tokenizer, batch, rollout, config.missing_eos_penalty, state)
            chosen_rows, rejected_rows = rank_pairs(rewards)  # [N] each, the pairs with a preference
            num_pairs, mask = len(chosen_rows), rollout.completion_mask.to(device)
            all_pairs = int(distributed.all_reduce_sum(num_pairs))  # of every process (torchrun)
            pair_rows = torch.cat([chosen_rows, rejected_rows]).to(device)  # [2N]: chosen then rejected
            if all_pairs and not num_pairs and distributed.is_sharded(policy):  # FSDP2: a filler pair, rows 0, 1
                pair_rows = torch.arange(2, device=device)
            width = len(pair_rows) // 2  # chosen row i, rejected row width + i
            sequences, attention_mask = rollout.sequences[pair_rows], rollout.attention_mask[pair_rows]  # [2N, L]
            if width:
                with (
                    lora.reference_context(policy, reference) as ref_model,
                    torch.no_grad(),
                    runtime.autocast(device, bf16),
                ):
                    ref_logps, _ = models.sequence_logprobs(
                        ref_model,
                        sequences,
                        attention_mask,
                        mask[pair_rows],
                        length_average,
                        chunk_size=config.lm_head_chunk,
                        share_prompts=config.prefix_sharing,
                    )  # [2N]
            stats = {
                **rollout_stats(rollout, rewards, per_source, scorer),
                "pairs/decided_frac": torch.tensor(2 * num_pairs / len(rewards)),
                "pairs/chosen_reward": rewards[chosen_rows].mean() if num_pairs else torch.tensor(0.0),
                "pairs/rejected_reward": rewards[rejected_rows].mean() if num_pairs else torch.tensor(0.0),
            }

        # -- one DPO step over the kept pairs (micro-batches of batch_size pairs); with none kept no parameter
        # has a gradient, so the optimizer step changes nothing and the schedule stays in step
        with run.timed("training"):
            micro_pairs = max(1, config.batch_size // distributed.world_size())  # this process's share of a micro-batch
            micro_batches = torch.arange(num_pairs, device=device).split(micro_pairs) if num_pairs else ()
            filler = torch.zeros(1, dtype=torch.long, device=device)  # FSDP2: pair 0 in zero-weighted passes
            for pairs, real in distributed.equal_passes(micro_batches, policy, filler):
                rows_of_pairs = torch.cat([pairs, pairs + width])  # [2n]: chosen then rejected
                with runtime.autocast(device, bf16):
                    logps, _ = models.sequence_logprobs(
                        forward,
                        sequences[rows_of_pairs],
                        attention_mask[rows_of_pairs],
                        mask[pair_rows][rows_of_pairs],
                        length_average,
                        chunk_size=config.lm_head_chunk,
                        share_prompts=config.prefix_sharing,
                    )  # [2n]
                chosen_logps, rejected_logps = logps.float().chunk(2)
                loss, loss_stats = dpo_loss(
                    chosen_logps,
                    rejected_logps,
                    ref_logps[pairs],
                    ref_logps[pairs + width],
                    beta=config.beta,
                    loss_type=config.loss_type,
                )
                share = real * len(pairs) / distributed.rank_normalizer(all_pairs)  # of the mean over all pairs
                (loss * share).backward()
                if not real:
                    continue
                tracking.accumulate(stats, {"loss": loss.detach(), **loss_stats}, share)
            grad_norm = optim.optimizer_step(policy.parameters(), optimizer, scheduler, config.max_grad_norm)
            if all_pairs and not num_pairs:  # torchrun: only other processes have pairs; this one's share is 0
                _, empty_stats = dpo_loss(
                    *[torch.zeros(1, device=device)] * 4, beta=config.beta, loss_type=config.loss_type
                )
                tracking.accumulate(stats, {"loss": 0.0, **empty_stats}, 0.0)
            if all_pairs:  # a step without pairs has no gradient to measure
                stats["grad_norm"] = grad_norm
        run.end_step(stats)
    return run.finish()


if __name__ == "__main__":
    cli(main)
