"""GRPO, RLOO and REINFORCE++: group sampling, verifiable rewards, a clipped policy gradient, no critic.

Each step samples ``num_generations`` (G) completions for each of P prompts with rlcore's rollout engine,
scores them with reward functions (and/or a reward model), turns the rewards into advantages, and takes
``num_iterations`` clipped policy-gradient updates on them:

    A_i      = (r_i - mean_group(r)) / (std_group(r) + eps)        --advantage_estimator grpo (Shao et al. 2024,
                                                                    https://arxiv.org/abs/2402.03300)
             = r_i - mean of the other G - 1 rewards of the group   rloo (Ahmadian et al. 2024, arXiv 2402.14740)
             = whiten_batch(r_i) at every token                     reinforce_pp (Hu 2025, arXiv 2501.03262)
    rho_t    = pi(o_t | q, o_<t) / pi_old(o_t | q, o_<t)
    l_t      = -min(rho_t A_i, clip(rho_t, 1 - epsilon, 1 + epsilon_high) A_i) + beta * KL_k3(pi || ref)_t
    loss     = aggregate(l, completion_mask, mode of --loss_type)

Variants: --importance_sampling_level sequence replaces rho_t by GSPO's length-normalised sequence ratio
(Zheng et al. 2025, arXiv 2507.18071; rlcore.importance_ratio); --loss_type cispo takes CISPO's
clipped-weight REINFORCE, l_t = -sg(min(rho_t, 1 + epsilon_high)) A_i log pi_t (MiniMax-M1, arXiv
2506.13585; rlcore.cispo_loss; TRL's epsilon_high E is --epsilon_high E-1 here); --tis_cap C multiplies
each token's loss by min(pi_old / pi_sampler, C) against the log-probs the rollout engine sampled with
(truncated importance sampling, --tis_mode for the masked and sequence variants;
rlcore.truncated_importance_weights); --entropy_coef c subtracts c * aggregate(entropy).
--num_generations_eval n adds pass@1 and pass@k (k = 2, 4, .., n) of n samples per held-out prompt to the
evaluation, with the unbiased estimator of Chen et al. 2021 (rlcore.evaluation.pass_at_k).

--loss_type names the average over tokens as TRL names it (grpo, bnpo, dr_grpo, dapo); the table from
name to aggregation and the normaliser that keeps gradient accumulation exact are
``rlcore.LOSS_TYPE_AGGREGATION`` and ``rlcore.loss_normalizer``, beside ``rlcore.aggregate``.

Departures from the paper: beta defaults to 0 (no reference model is loaded, as TRL and DAPO do); with
--num_iterations 1 the ratio is exactly 1 and the clip is inactive (pi_old is the detached policy); the
KL term uses the k3 estimator. RLOO and REINFORCE++ use the same loop and the same optional KL loss term
(the papers put a KL penalty into the reward instead). With beta 0 and no entropy bonus, completions whose
advantage is 0 at every token (a group whose rewards are all equal) are left out of the forward and backward
passes: they add nothing to the loss or its gradient, and the loss normalisers still count them (not for bnpo,
whose normaliser is per micro-batch). The fraction trained on is logged as ``learning_rows_frac``.
--prefix_sharing (on by default) runs each prompt once with its G completions in the policy and reference
forwards (rlcore.packing; the same log-probs and gradients, less compute); --no-prefix_sharing: padded rows.

Evaluation (before the first step, every --eval_steps, at the end) logs ``eval/reward`` and
``eval/reward/<source>``: one sampled completion per held-out prompt at the training temperature, the
quantity RL raises; and a greedy metric when one is given (``--eval_metric``; on the toy task ``auto`` is
its exact match, ``eval/exact_match``).

Run it:
    python recipes/grpo.py                    # the toy task; starts from a cached SFT warm start (see below)
    python recipes/grpo.py --model runs/sft   # from your own SFT checkpoint
    python recipes/grpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset prompts.jsonl \
        --reward_funcs my_rewards.py:correctness,format --reward_weights 1,0.2 --max_new_tokens 512 \
        --batch_size 16 --grad_accum_steps 4 --lora_r 16
    python recipes/grpo.py --advantage_estimator rloo       # RLOO; reinforce_pp for REINFORCE++
Several processes: ``torchrun --nproc_per_node 2 recipes/grpo.py`` samples and trains the same global batch (each
process its own prompts' groups; batch statistics over all of them; rlcore.distributed).

The default --model tiny is an untrained network: it never writes a correct sum, every reward is 0 and RL
learns nothing. So with --model tiny the recipe first runs ``recipes/sft.py`` for --warm_start_steps steps
once (cached under ~/.cache/rlcore and shared by the online recipes; ``rlcore.toy.warm_start``) and
starts from it. --warm_start_steps 0 starts from the untrained model. Measured results: docs/results.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from einops import rearrange

from rlcore import (
    ADVANTAGE_ESTIMATORS,
    IMPORTANCE_SAMPLING_LEVELS,
    LOSS_TYPE_AGGREGATION,
    TIS_MODES,
    aggregate,
    data,
    distributed,
    estimate_advantages,
    guards,
    kl_estimate,
    lora,
    loss_normalizer,
    masked_mean,
    models,
    optim,
    runtime,
    surrogate_for,
    tracking,
    truncated_importance_weights,
)
from rlcore.config import OnlineConfig, parse_config
from rlcore.rewards import TrainerState, rollout_stats, score_rollout
from rlcore.rollout import generate
from rlcore.run import Run, cli
from rlcore.task import evaluate_policy, load_prompt_task, load_start_policy


@dataclass
class GRPOConfig(OnlineConfig):
    output_dir: str = "outputs/grpo"
    lr: float = (
        5e-5  # peak learning rate (AdamW); toy task: 1e-4 with 64 completions per step oscillates, 3e-4 diverges
    )
    lr_schedule: str = "constant"  # "cosine", "linear" or "constant"
    batch_size: int = 128  # completions per micro-batch; completions per step = batch_size * grad_accum_steps
    num_generations: int = 8  # G, completions per prompt (prompts per step = completions per step / G)
    num_iterations: int = 1  # policy updates on each batch of samples (mu of the paper)
    advantage_estimator: str = "grpo"  # "grpo", "rloo" or "reinforce_pp"
    scale_rewards: str = "group"  # grpo estimator: divide by the std of the "group", the "batch", or "none" (Dr. GRPO)
    loss_type: str = "dapo"  # "grpo", "bnpo", "dr_grpo", "dapo" or "cispo" (rlcore.LOSS_TYPE_AGGREGATION)
    epsilon: float = 0.2  # lower clip: ratio >= 1 - epsilon
    epsilon_high: float | None = None  # upper clip: ratio <= 1 + epsilon_high (DAPO clip-higher: 0.28; None = epsilon)
    beta: float = 0.0  # weight of the k3 KL to the reference (0 = no reference model)
    mask_truncated_completions: bool = False  # leave completions cut at --max_new_tokens out of the loss
    max_steps: int = 2000  # sampling steps (each gives num_iterations optimizer steps)
    logging_steps: int = 10  # log the mean of the metrics over this many steps
    eval_steps: int = 250  # evaluate every N steps (0 = only at the start and end)
    # --- policy-gradient variants
    importance_sampling_level: str = "token"  # "token" (a ratio per token) or "sequence" (GSPO: one per completion)
    tis_cap: float | None = None  # truncated importance sampling: weight min(pi_old / pi_sampler, C) (None = off)
    tis_mode: str = "token_truncate"  # token_truncate, token_mask, sequence_truncate or sequence_mask
    entropy_coef: float = 0.0  # entropy bonus: the loss subtracts entropy_coef * aggregate(entropy)
    prefix_sharing: bool = True  # one forward row [prompt, completion_1..G] per prompt (rlcore.packing)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_type not in LOSS_TYPE_AGGREGATION or self.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(
                f"--loss_type must be one of {list(LOSS_TYPE_AGGREGATION)} and --advantage_estimator one of {list(ADVANTAGE_ESTIMATORS)}"
            )
        if self.num_generations < 2 or (self.batch_size * self.grad_accum_steps) % self.num_generations:
            raise ValueError(
                f"--num_generations must be >= 2 and divide the completions per step ({self.batch_size} * {self.grad_accum_steps})"
            )
        if self.num_iterations < 1 or self.beta < 0:
            raise ValueError("--num_iterations must be >= 1 and --beta >= 0")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS or self.tis_mode not in TIS_MODES:
            raise ValueError(
                f"--importance_sampling_level must be one of {list(IMPORTANCE_SAMPLING_LEVELS)} and --tis_mode one of {list(TIS_MODES)}"
            )
        if (self.tis_cap is not None and self.tis_cap <= 0) or self.entropy_coef < 0:
            raise ValueError("--tis_cap must be > 0 (or none) and --entropy_coef >= 0")


def compute_advantages(config: GRPOConfig, rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] rewards -> [B] (grpo, rloo) or [B, T] (reinforce_pp) advantages."""
    return estimate_advantages(config.advantage_estimator, rewards, mask, config.num_generations, config.scale_rewards)


def main(argv: list[str] | None = None) -> dict[str, float]:
    config = parse_config(GRPOConfig, argv)
    device, bf16 = runtime.setup(config)

    # ---------------------------------------------------------------- task (checked first), models
    task = load_prompt_task(config, device)
    policy, tokenizer, sampling = load_start_policy(config, device, sft_script=Path(__file__).with_name("sft.py"))
    prompts, scorer = task.prompts, task.scorer
    longest = max(map(len, prompts["prompt_ids"])) + config.max_new_tokens
    runtime.prefer_eager_attention(policy, device, longest)  # CPU, short rows
    reference = models.frozen_copy(policy) if config.beta > 0 and config.lora_r == 0 else None  # LoRA: adapters off
    policy = distributed.prepare(policy, config.sharding, bf16)  # torchrun: same weights everywhere (or FSDP2)
    forward = runtime.maybe_compile(policy, device, config.compile)
    group_size = config.num_generations
    completions_per_step = config.batch_size * config.grad_accum_steps
    aggregation = LOSS_TYPE_AGGREGATION[config.loss_type]

    optimizer, scheduler = optim.from_flags(
        policy, config, config.num_iterations, num_rows=len(prompts), rows_per_step=completions_per_step // group_size
    )
    evaluate = (lambda: evaluate_policy(policy, tokenizer, task, config)) if task.eval_prompts is not None else None
    guard = guards.online(config)  # non-finite steps skipped; no signal, entropy collapse, all truncated warned
    run = Run(config, policy, tokenizer, optimizer, scheduler, evaluate=evaluate, bar_keys=("reward",), guard=guard)

    # ---------------------------------------------------------------- training loop
    while run.running():
        rows = runtime.step_batches(len(prompts), completions_per_step // group_size, 1, config.seed, run.step)[0]
        rows = distributed.shard(rows)  # torchrun: this process's prompts
        num_rows = len(rows) * group_size  # completions of this process
        batch = data.prompt_batch(prompts, rows, tokenizer.pad_token_id)

        # -- sample G completions per prompt
        with run.timed("generation"):
            rollout = generate(
                policy,
                batch.prompt_ids.to(device),
                batch.prompt_mask.to(device),
                num_samples=group_size,
                **sampling,
                **distributed.sampling_draws(num_rows, device),  # the samples do not depend on the processes
            )

        # -- rewards, advantages, reference log-probs
        with run.timed("scoring"):
            state = TrainerState(run.step, run.step * completions_per_step / group_size / len(prompts))
            rewards, per_source = score_rollout(scorer, tokenizer, batch, rollout, config.missing_eos_penalty, state)
            mask = rollout.completion_mask.to(device)  # [B, T]
            if config.mask_truncated_completions:
                mask = mask * ~rollout.truncated.to(device).unsqueeze(1)
            advantages = distributed.on_global_batch(  # statistics of the global batch (torchrun)
                lambda step_rewards, step_mask: compute_advantages(config, step_rewards, step_mask),
                rewards.to(device),
                mask,
            )  # [B] or [B, T]
            step_mask = distributed.gather_rows(mask)  # [B, T] of every process: the loss normalisers count it
            completion_length = rollout.completion_ids.shape[1]
            ref_logp = None
            if config.beta > 0:
                with lora.reference_context(policy, reference) as ref_model, runtime.autocast(device, bf16):  # no grad
                    ref_logp, _ = models.token_logprobs(
                        ref_model,
                        rollout.sequences,
                        rollout.attention_mask,
                        completion_length,
                        config.temperature,
                        chunk_size=config.lm_head_chunk,
                        share_prompts=config.prefix_sharing,
                    )
            grouped_rewards = rearrange(rewards, "(p g) -> p g", g=group_size)  # [P, G]
            stats = {
                **rollout_stats(rollout, rewards, per_source, scorer),
                "frac_reward_zero_std": (grouped_rewards.std(dim=1) == 0).float().mean(),
            }

        # -- num_iterations clipped policy-gradient updates on these samples. Without a KL term, a row whose
        # advantage is 0 at every token (a group of equal rewards) adds nothing to the loss or its gradient:
        # it is left out of the forward/backward passes (the loss normalisers still count it).
        with run.timed("training"):
            learning_rows = torch.arange(num_rows, device=device)  # [B]
            if config.beta == 0 and config.entropy_coef == 0 and config.loss_type != "bnpo":
                learning = (advantages.reshape(num_rows, -1) != 0).any(dim=1) & mask.bool().any(dim=1)  # [B]
                if config.sharding != "fsdp2":
                    learning_rows = learning_rows[learning]
                elif not distributed.all_reduce_sum(learning.sum()):  # FSDP2: equal passes, none if nothing anywhere
                    learning_rows = learning_rows[:0]
            stats["learning_rows_frac"] = torch.tensor(len(learning_rows) / num_rows)
            old_logp = torch.zeros_like(mask, dtype=torch.float32)  # [B, T], filled on the first pass
            loss_function, clip = surrogate_for(config.loss_type, config.epsilon, config.epsilon_high)
            micro_rows = max(1, config.batch_size // distributed.world_size())  # this process's share of a micro-batch
            micro_batches = learning_rows.split(micro_rows) if len(learning_rows) else ()
            for iteration in range(config.num_iterations):
                for micro in micro_batches:
                    with runtime.autocast(device, bf16):
                        logp, entropy = models.token_logprobs(
                            forward,
                            rollout.sequences[micro],
                            rollout.attention_mask[micro],
                            completion_length,
                            config.temperature,
                            with_entropy=True,
                            entropy_grad=config.entropy_coef > 0,
                            chunk_size=config.lm_head_chunk,
                            share_prompts=config.prefix_sharing,
                        )
                    if iteration == 0:
                        old_logp[micro] = logp.detach()
                    micro_mask = distributed.gather_rows(mask[micro]) if config.loss_type == "bnpo" else mask[micro]
                    normalizer = loss_normalizer(config.loss_type, step_mask, micro_mask, config.grad_accum_steps)
                    normalizer = distributed.rank_normalizer(normalizer)  # torchrun: this process's share
                    weights = None  # truncated importance sampling against the sampler's own log-probs
                    if config.tis_cap is not None:
                        sampler_logp = rollout.logprobs[micro].to(device)
                        weights = truncated_importance_weights(
                            old_logp[micro], sampler_logp, mask[micro], config.tis_cap, config.tis_mode
                        )
                    loss, loss_stats = loss_function(
                        logp,
                        old_logp[micro],
                        advantages[micro],
                        mask[micro],
                        **clip,
                        agg=aggregation,
                        max_len=config.max_new_tokens,
                        normalizer=normalizer,
                        importance_sampling_level=config.importance_sampling_level,
                        importance_weights=weights,
                    )
                    if weights is not None:
                        loss_stats["tis_weight"] = masked_mean(weights.expand_as(logp), mask[micro])
                    if config.entropy_coef > 0:
                        bonus = aggregate(entropy, mask[micro], aggregation, config.max_new_tokens, normalizer)
                        loss = loss - config.entropy_coef * bonus
                    if config.beta > 0:
                        kl = kl_estimate(logp, ref_logp[micro], kind="k3")  # [b, T]
                        loss = loss + config.beta * aggregate(
                            kl, mask[micro], aggregation, config.max_new_tokens, normalizer
                        )
                        loss_stats["kl"] = masked_mean(kl.detach(), mask[micro])
                    loss.backward()
                    tracking.accumulate(stats, {"loss": loss.detach()}, 1 / config.num_iterations)  # losses add up
                    share = len(micro) / (len(learning_rows) * config.num_iterations)  # other stats: mean over the rows
                    entropy_mean = masked_mean(entropy.detach(), mask[micro])
                    tracking.accumulate(stats, side := {"entropy": entropy_mean, **loss_stats}, share)
                # no learning row: no gradient, so no weight changes; the schedule still advances with the optimizer
                grad_norm = optim.optimizer_step(policy.parameters(), optimizer, scheduler, config.max_grad_norm)
                tracking.accumulate(stats, {"grad_norm": grad_norm}, 1 / config.num_iterations)
            stats.setdefault("loss", 0.0)
        run.end_step(stats, counts=dict.fromkeys(side if micro_batches else (), len(learning_rows)))  # torchrun
    return run.finish()


if __name__ == "__main__":
    cli(main)
