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

--loss_type names the average over tokens (rlcore.aggregate), as TRL names it:
    grpo     seq_mean_token_mean      every sequence weighs the same (the paper)
    bnpo     token_mean               every token of a micro-batch weighs the same
    dr_grpo  seq_mean_token_sum_norm  token sums over a constant (--max_new_tokens): no length bias (Liu et al. 2025)
    dapo     token_mean               every token of the whole step weighs the same (Yu et al. 2025)
bnpo and dapo differ only under gradient accumulation (bnpo normalises each micro-batch by its own tokens).

Departures from the paper: beta defaults to 0 (no reference model is loaded, as TRL and DAPO do); with
--num_iterations 1 the ratio is exactly 1 and the clip is inactive (pi_old is the detached policy); the
KL term uses the k3 estimator. RLOO and REINFORCE++ use the same loop and the same optional KL loss term
(the papers put a KL penalty into the reward instead). With beta 0, completions whose advantage is 0 at
every token (a group whose rewards are all equal) are left out of the forward and backward passes: they
add nothing to the loss or its gradient, and the loss normalisers still count them (not for bnpo, whose
normaliser is per micro-batch). The fraction trained on is logged as ``learning_rows_frac``.

Evaluation logs ``eval/reward`` (one sampled completion per held-out prompt at the training temperature,
the quantity RL raises) and, when the rows hold a reference answer, ``eval/accuracy`` (greedy exact match).

Run it:
    python recipes/grpo.py                    # the toy task; starts from a cached SFT warm start (see below)
    python recipes/grpo.py --model runs/sft   # from your own SFT checkpoint
    python recipes/grpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset prompts.jsonl \
        --reward_funcs my_rewards.py:correctness,format --reward_weights 1,0.2 --max_new_tokens 512 \
        --batch_size 16 --grad_accum_steps 4 --lora_r 16
    python recipes/grpo.py --advantage_estimator rloo       # RLOO; reinforce_pp for REINFORCE++
Single process for now (one CPU or GPU).

The default --model tiny is an untrained network: it never writes a correct sum, every reward is 0 and RL
learns nothing. So with --model tiny the recipe first runs ``recipes/sft.py`` for --warm_start_steps steps
once (42-46% greedy test accuracy with seed 0, depending on the version of sft.py; cached under
~/.cache/rlcore and shared by the online recipes; see rlcore.online.warm_start for its settings) and
starts from it. --warm_start_steps 0 starts from the untrained model.

Measured (toy task, 2 shared CPU cores, one torch thread): from that checkpoint at 46.2%, 300 s of
training (2068 steps) reached 51.4%; TRL's GRPOTrainer with the same settings and time 50.6% (898
steps); see README, "What the recipes learn on the toy task", for the commands.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rlcore import aggregate, group_advantages, kl_estimate, masked_mean, policy_loss, reinforce_pp_advantages, rloo_advantages
from rlcore.checkpoint import load_checkpoint, resolve_resume, save_checkpoint, save_final_model
from rlcore.config import parse_config, save_config
from rlcore.lora import prepare_model, reference_context
from rlcore.models import eos_token_ids, load_policy
from rlcore.online import ONLINE_WARM_START_FLAGS, OnlineConfig, completion_logprobs, evaluate_policy, frozen_copy, load_prompts, prompt_batch, rollout_stats, score_rollout, timed, warm_start
from rlcore.optim import build_optimizer, build_scheduler, optimizer_step
from rlcore.rewards import build_reward_scorer
from rlcore.rollout import generate
from rlcore.runtime import autocast, maybe_compile, prefer_eager_attention, resolve_device, seed_everything, step_batches, use_bf16
from rlcore.tracking import Tracker

LOSS_AGGREGATIONS = {"grpo": "seq_mean_token_mean", "bnpo": "token_mean", "dr_grpo": "seq_mean_token_sum_norm", "dapo": "token_mean"}
ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "reinforce_pp")


@dataclass
class GRPOConfig(OnlineConfig):
    output_dir: str = "outputs/grpo"
    lr: float = 5e-5  # peak learning rate (AdamW); toy task: 1e-4 with 64 completions per step oscillates, 3e-4 diverges
    lr_schedule: str = "constant"  # "cosine", "linear" or "constant"
    batch_size: int = 128  # completions per micro-batch; completions per step = batch_size * grad_accum_steps
    num_generations: int = 8  # G, completions per prompt (prompts per step = completions per step / G)
    num_iterations: int = 1  # policy updates on each batch of samples (mu of the paper)
    advantage_estimator: str = "grpo"  # "grpo", "rloo" or "reinforce_pp"
    scale_rewards: str = "group"  # grpo estimator: divide by the std of the "group", the "batch", or "none" (Dr. GRPO)
    loss_type: str = "dapo"  # "grpo", "bnpo", "dr_grpo" or "dapo" (see the module docstring)
    epsilon: float = 0.2  # lower clip: ratio >= 1 - epsilon
    epsilon_high: float | None = None  # upper clip: ratio <= 1 + epsilon_high (DAPO clip-higher: 0.28; None = epsilon)
    beta: float = 0.0  # weight of the k3 KL to the reference (0 = no reference model)
    mask_truncated_completions: bool = False  # leave completions cut at --max_new_tokens out of the loss
    max_steps: int = 100_000  # sampling steps (each gives num_iterations optimizer steps)
    max_seconds: float | None = 300.0  # stop (evaluate, save) after this much training time
    logging_steps: int = 10  # log the mean of the metrics over this many steps
    eval_steps: int = 250  # evaluate toy accuracy every N steps (0 = only at the start and end)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_type not in LOSS_AGGREGATIONS or self.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"--loss_type must be one of {list(LOSS_AGGREGATIONS)} and --advantage_estimator one of {list(ADVANTAGE_ESTIMATORS)}")
        if self.num_generations < 2 or (self.batch_size * self.grad_accum_steps) % self.num_generations:
            raise ValueError(f"--num_generations must be >= 2 and divide the completions per step ({self.batch_size} * {self.grad_accum_steps})")
        if self.num_iterations < 1 or self.beta < 0:
            raise ValueError("--num_iterations must be >= 1 and --beta >= 0")


def compute_advantages(config: GRPOConfig, rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] rewards -> [B] (grpo, rloo) or [B, T] (reinforce_pp) advantages."""
    if config.advantage_estimator == "grpo":
        return group_advantages(rewards, config.num_generations, scale=config.scale_rewards)
    if config.advantage_estimator == "rloo":
        return rloo_advantages(rewards, config.num_generations)
    return reinforce_pp_advantages(rewards, mask)


def main(argv: list[str] | None = None) -> dict[str, float]:
    config = parse_config(GRPOConfig, argv)
    seed_everything(config.seed)
    device = resolve_device(config.device)
    bf16 = use_bf16(device, config.bf16)

    # ---------------------------------------------------------------- models, data, rewards
    start_model = warm_start(config.model, config.warm_start_steps, config.seed, Path(__file__).with_name("sft.py"), ONLINE_WARM_START_FLAGS)
    policy, tokenizer = load_policy(start_model, device=device)
    policy = prepare_model(policy, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_targets, config.load_in_4bit)
    stop_ids = eos_token_ids(tokenizer, policy.generation_config)
    scorer = build_reward_scorer(config.reward_funcs, config.reward_model, config.reward_weights, tokenizer, device)
    prompts = load_prompts(config.dataset, config.train_split, tokenizer, config.max_prompt_length, config.num_train_rows)
    eval_prompts = None
    if config.eval_split != "none":
        eval_prompts = load_prompts(config.dataset, config.eval_split, tokenizer, config.max_prompt_length, config.num_eval_rows)
    prefer_eager_attention(policy, device, max(map(len, prompts["prompt_ids"])) + config.max_new_tokens)  # CPU, short rows
    reference = frozen_copy(policy) if config.beta > 0 and config.lora_r == 0 else None  # LoRA: adapters off
    forward = maybe_compile(policy, device, config.compile)
    group_size = config.num_generations
    completions_per_step = config.batch_size * config.grad_accum_steps
    prompts_per_step = completions_per_step // group_size
    aggregation = LOSS_AGGREGATIONS[config.loss_type]

    optimizer = build_optimizer(policy, config.lr, config.weight_decay, (config.adam_beta1, config.adam_beta2))
    scheduler = build_scheduler(optimizer, warmup_steps=config.warmup_steps, total_steps=config.max_steps * config.num_iterations,
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

        # -- sample G completions per prompt
        with timed(seconds, "generation", device):
            rollout = generate(
                policy, batch.prompt_ids.to(device), batch.prompt_mask.to(device), max_new_tokens=config.max_new_tokens,
                eos_token_ids=stop_ids, pad_token_id=tokenizer.pad_token_id, temperature=config.temperature,
                top_k=config.top_k, top_p=config.top_p, num_samples=group_size,
            )

        # -- rewards, advantages, reference log-probs
        with timed(seconds, "scoring", device):
            rewards, per_source = score_rollout(scorer, tokenizer, batch, rollout, config.missing_eos_penalty)
            mask = rollout.completion_mask.to(device)  # [B, T]
            if config.mask_truncated_completions:
                mask = mask * ~rollout.truncated.to(device).unsqueeze(1)
            advantages = compute_advantages(config, rewards.to(device), mask)  # [B] or [B, T]
            completion_length = rollout.completion_ids.shape[1]
            ref_logp = None
            if config.beta > 0:
                with reference_context(policy, reference) as ref_model, autocast(device, bf16):
                    ref_logp, _ = completion_logprobs(ref_model, rollout.sequences, rollout.attention_mask, completion_length, config.temperature)
            grouped_rewards = rewards.view(-1, group_size)  # [P, G]
            stats = {**rollout_stats(rollout, rewards, per_source, scorer), "frac_reward_zero_std": (grouped_rewards.std(dim=1) == 0).float().mean()}

        # -- num_iterations clipped policy-gradient updates on these samples. Without a KL term, a row whose
        # advantage is 0 at every token (a group of equal rewards) adds nothing to the loss or its gradient:
        # it is left out of the forward/backward passes (the loss normalisers still count it).
        lr = scheduler.get_last_lr()[0]
        with timed(seconds, "training", device):
            learning_rows = torch.arange(completions_per_step, device=device)  # [B]
            if config.beta == 0 and config.loss_type != "bnpo":
                learning_rows = learning_rows[(advantages.reshape(completions_per_step, -1) != 0).any(dim=1) & mask.bool().any(dim=1)]
            stats["learning_rows_frac"] = torch.tensor(len(learning_rows) / completions_per_step)
            old_logp = torch.zeros_like(mask, dtype=torch.float32)  # [B, T], filled on the first pass
            for iteration in range(config.num_iterations if len(learning_rows) else 0):
                for micro in learning_rows.split(config.batch_size):
                    with autocast(device, bf16):
                        logp, entropy = completion_logprobs(forward, rollout.sequences[micro], rollout.attention_mask[micro],
                                                            completion_length, config.temperature, with_entropy=True)
                    if iteration == 0:
                        old_logp[micro] = logp.detach()
                    normalizer = loss_normalizer(config.loss_type, mask, mask[micro], config.grad_accum_steps)
                    loss, loss_stats = policy_loss(
                        logp, old_logp[micro], advantages[micro], mask[micro], clip_low=config.epsilon,
                        clip_high=config.epsilon_high, agg=aggregation, max_len=config.max_new_tokens, normalizer=normalizer,
                    )
                    if config.beta > 0:
                        kl = kl_estimate(logp, ref_logp[micro], kind="k3")  # [b, T]
                        loss = loss + config.beta * aggregate(kl, mask[micro], aggregation, config.max_new_tokens, normalizer)
                        loss_stats["kl"] = masked_mean(kl.detach(), mask[micro])
                    loss.backward()
                    stats["loss"] = stats.get("loss", 0.0) + loss.detach() / config.num_iterations  # micro-batch losses add up
                    share = len(micro) / (len(learning_rows) * config.num_iterations)  # other stats: mean over the rows
                    for key, value in {"entropy": masked_mean(entropy, mask[micro]), **loss_stats}.items():
                        stats[key] = stats.get(key, 0.0) + value * share
                grad_norm = optimizer_step(policy.parameters(), optimizer, scheduler, config.max_grad_norm)
                stats["grad_norm"] = stats.get("grad_norm", 0.0) + grad_norm / config.num_iterations
            if not len(learning_rows):  # nothing to learn from these samples (loss 0, no update); keep the schedule in step
                stats.update(loss=0.0, grad_norm=0.0)
                for _ in range(config.num_iterations):
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


def loss_normalizer(loss_type: str, step_mask: torch.Tensor, micro_mask: torch.Tensor, micro_batches: int) -> torch.Tensor | float:
    """Denominator that makes the micro-batch losses of one step add up to the loss of the whole step.

    dapo: the step's valid tokens; bnpo: the micro-batch's own tokens times the number of micro-batches;
    grpo: the step's rows that hold a token; dr_grpo: the step's rows.
    """
    if loss_type == "bnpo":
        return micro_mask.sum().clamp(min=1) * micro_batches
    if loss_type == "dapo":
        return step_mask.sum().clamp(min=1)
    if loss_type == "grpo":
        return step_mask.bool().any(dim=1).sum().clamp(min=1)
    return float(step_mask.shape[0])


if __name__ == "__main__":
    main()
