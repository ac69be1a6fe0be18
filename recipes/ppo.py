"""PPO for language models (RLHF): a value model, KL-shaped per-token rewards, GAE, clipped updates.

Each step samples one completion per prompt, scores it (a reward model and/or reward functions, minus
--missing_eos_penalty when it never stopped), and builds per-token rewards and advantages:

    r_t   = -kl_coef * KL_t(pi_old || ref) + [t = last token] * score     (kl_shaped_rewards; k1 or k3)
    A_t   = GAE(r, V_old; gamma, lam),  R_t = A_t + V_old_t                (gae), A whitened over the batch
    loss  = policy_loss(clip --cliprange, token mean)
            + vf_coef * value_loss(clipped by --cliprange_value, token mean)
            - entropy_coef * token mean of the policy's entropy      (--entropy_coef, default 0: no bonus)

then runs --num_ppo_epochs epochs over --num_mini_batches shuffled mini-batches, one optimizer step per
mini-batch (Schulman et al. 2017, https://arxiv.org/abs/1707.06347; Ziegler et al. 2019,
https://arxiv.org/abs/1909.08593; Ouyang et al. 2022, https://arxiv.org/abs/2203.02155; the layout
follows Huang et al. 2024, "The N+ implementation details of RLHF with PPO", https://arxiv.org/abs/2403.17031).

V_t is the value of the state *before* completion token t (read at the position of the previous token:
``rlcore.models.completion_values``).
Layouts (one optimizer over everything trained). Per step over B rows, E = --num_ppo_epochs, generation apart:
- value, separate (the default): a backbone with a zero linear head (rlcore.models.ValueModel) from
  --value_model (default: the policy's start; a reward model is the classic choice), trained in full. Cost:
  one more copy of the weights with its gradients and AdamW state (16 bytes per parameter in float32), one
  more forward at scoring and one more forward+backward per row and epoch; the critic learns apart.
- --value_on_policy: a zero head on the policy's own trunk (rlcore.models.token_logprobs_and_values): one
  pass gives log-probs and values. Cost: hidden-size + 1 parameters; the value loss (x --vf_coef) trains
  the shared trunk or adapters too, so the two objectives compete.
- reward, separate (--reward_model DIR): loaded apart (rlcore.rewards). Cost: one more copy (frozen), one
  forward per row at scoring.
- --reward_on_policy (--lora_r, and --reward_model trained with --lora_r on the policy's own base): its
  adapter and score head go onto the policy's base, switched on for the scoring pass
  (rlcore.rewards.AdapterRewardScorer, rlcore.lora.use_adapter). Cost: no copy; the same forward plus the
  adapter's rank-r matmuls (a checkpoint of another base is refused).
- reference: with --lora_r the adapters-off policy (no copy); full fine-tuning keeps a frozen copy.
Copies of the base weights in all, LoRA: 3 with both separate, 2 with one on the policy, 1 with
--value_on_policy --reward_on_policy (policy, reference, value, reward); full fine-tuning: one more.
Transformer passes per step: 3 forwards (reward, old log-probs, reference) + E forward+backward, plus
1 + E with a separate value model. Departures: one sample per prompt and no reward whitening by default
(--whiten_rewards); with --lora_r the policy trains adapters.

Run:
    python recipes/ppo.py                                    # toy task, accuracy reward, SFT warm start
    python recipes/ppo.py --reward_model outputs/reward_model --reward_funcs none
    python recipes/ppo.py --model SFT_DIR --lora_r 16 --value_on_policy --reward_on_policy \\
        --reward_model RM_DIR --reward_funcs none     # RM_DIR: reward_model.py --model SFT_DIR --lora_r 16
    python recipes/ppo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset prompts.jsonl \
        --reward_model my-rm-dir --reward_funcs none --max_new_tokens 256 --batch_size 8 --grad_accum_steps 4
Several processes: ``torchrun --nproc_per_node 2 recipes/ppo.py`` samples and trains the same global batch
(rlcore.distributed). --model tiny, the default, starts from the cached SFT warm start
(recipes/grpo.py, rlcore.toy.warm_start). Evaluation as in recipes/grpo.py: held-out
mean sampled reward per source, and the greedy metric (``--eval_metric``). Measured results: docs/results.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rlcore import (
    data,
    distributed,
    gae,
    guards,
    kl_estimate,
    kl_shaped_rewards,
    lora,
    masked_mean,
    masked_sum,
    masked_whiten,
    models,
    optim,
    policy_loss,
    runtime,
    tracking,
    value_loss,
)
from rlcore.config import OnlineConfig, parse_config
from rlcore.rewards import TrainerState, rollout_stats, score_rollout
from rlcore.rollout import generate
from rlcore.run import Run, cli
from rlcore.task import evaluate_policy, load_prompt_task, load_start_policy


@dataclass
class PPOConfig(OnlineConfig):
    output_dir: str = "outputs/ppo"
    lr: float = 3e-5  # peak learning rate (AdamW), policy and value model
    lr_schedule: str = "constant"  # "cosine", "linear" or "constant"
    batch_size: int = 64  # rows per micro-batch; a mini-batch is batch_size * grad_accum_steps rows
    num_mini_batches: int = 1  # mini-batches (optimizer steps) per PPO epoch; prompts per step = their rows in all
    num_ppo_epochs: int = 4  # passes over each batch of samples
    value_model: str | None = None  # value model backbone: a directory or hub id (None = the policy's start model)
    value_on_policy: bool = False  # the value function as a head on the policy's own trunk (one base; see above)
    reward_on_policy: bool = False  # --reward_model's LoRA adapter + score head on the policy's base (see above)
    kl_coef: float = 0.05  # weight of the per-token KL penalty in the reward
    kl_estimator: str = "k1"  # "k1" or "k3", the per-token KL in the reward
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    cliprange: float = 0.2  # policy ratio clip (policy_loss clip_low)
    cliprange_value: float = 0.2  # value clip, in reward units (value_loss clip)
    vf_coef: float = 0.1  # weight of the value loss
    entropy_coef: float = 0.0  # entropy bonus: the loss subtracts entropy_coef * token mean of the entropy
    whiten_rewards: bool = False  # scale the per-token rewards to unit variance before GAE
    missing_eos_penalty: float = 1.0  # subtracted from the score of completions that never stopped
    max_steps: int = 250  # sampling steps
    logging_steps: int = 5  # log the mean of the metrics over this many steps
    eval_steps: int = 50  # evaluate every N steps (0 = only at the start and end)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"--kl_estimator must be k1 or k3, got {self.kl_estimator!r}")
        if self.num_mini_batches < 1 or self.num_ppo_epochs < 1 or self.entropy_coef < 0:
            raise ValueError("--num_mini_batches and --num_ppo_epochs must be >= 1, --entropy_coef >= 0")
        if self.value_on_policy and (self.value_model is not None or self.lm_head_chunk == 0 or self.entropy_coef):
            raise ValueError(
                "--value_on_policy reads the policy's hidden states: no --value_model, --lm_head_chunk > 0, "
                "--entropy_coef 0"
            )
        if self.reward_on_policy and not (self.reward_model and self.lora_r):
            raise ValueError("--reward_on_policy puts --reward_model's adapter on the LoRA policy's base: give both")


def main(argv: list[str] | None = None) -> dict[str, float]:
    config = parse_config(PPOConfig, argv)
    device, bf16 = runtime.setup(config)

    # ---------------------------------------------------------------- task (checked first), models
    task = load_prompt_task(config, device)
    policy, tokenizer, sampling = load_start_policy(config, device, sft_script=Path(__file__).with_name("sft.py"))
    if config.reward_on_policy:  # the reward model: an adapter on the policy's base, switched per forward pass
        task.scorer.reward_model.attach(policy)
    critic_name, critic = models.new_critic(  # a head on the policy's trunk, or a backbone with a value head
        policy, config.value_on_policy, config.value_model, config.dtype, device, config.gradient_checkpointing
    )
    value_head, value_model = (critic, None) if config.value_on_policy else (None, critic)
    reference = models.frozen_copy(policy) if config.lora_r == 0 else None  # LoRA: the adapters-off policy
    for model in filter(None, (policy, value_model)):  # the value head starts at zero on every process
        distributed.prepare(model, config.sharding, bf16)  # torchrun: same weights everywhere (or FSDP2)
    forward_policy = runtime.maybe_compile(policy, device, config.compile)
    forward_value = runtime.maybe_compile(value_model, device, config.compile) if value_model is not None else None
    prompts, scorer = task.prompts, task.scorer
    longest = max(map(len, prompts["prompt_ids"])) + config.max_new_tokens
    for model in filter(None, (policy, reference, value_model and value_model.backbone)):
        runtime.prefer_eager_attention(model, device, longest)  # CPU, short rows
    mini_batch_rows = config.batch_size * config.grad_accum_steps
    rows_per_step = mini_batch_rows * config.num_mini_batches

    def logprobs_and_values(sequences, attention_mask, length, with_entropy=False, entropy_grad=False):
        """([B, T] log-probs, [B, T] entropies or None, [B, T] values) of the T completion tokens."""
        if value_head is not None:  # one forward pass of the shared trunk
            return models.token_logprobs_and_values(
                forward_policy,
                value_head,
                sequences,
                attention_mask,
                length,
                config.temperature,
                with_entropy,
                config.lm_head_chunk,
            )
        logp, entropy = models.token_logprobs(
            forward_policy,
            sequences,
            attention_mask,
            length,
            config.temperature,
            with_entropy,
            entropy_grad=entropy_grad,
            chunk_size=config.lm_head_chunk,
        )
        return logp, entropy, models.completion_values(forward_value, sequences, attention_mask, length)

    trained = torch.nn.ModuleDict({"policy": policy, critic_name: critic})
    updates_per_step = config.num_ppo_epochs * config.num_mini_batches
    optimizer, scheduler = optim.from_flags(
        trained, config, updates_per_step, num_rows=len(prompts), rows_per_step=rows_per_step
    )
    evaluate = (lambda: evaluate_policy(policy, tokenizer, task, config)) if task.eval_prompts is not None else None
    run = Run(
        config,
        policy,
        tokenizer,
        optimizer,
        scheduler,
        evaluate=evaluate,
        bar_keys=("reward",),
        extra_modules={critic_name: critic},
        guard=guards.online(config),  # non-finite steps skipped; entropy collapse, all truncated warned
        save_extra=lambda path, states: models.save_value_critic(critic, Path(path) / critic_name, states[critic_name]),
    )

    # ---------------------------------------------------------------- training loop
    while run.running():
        rows = runtime.step_batches(len(prompts), rows_per_step, 1, config.seed, run.step)[0]
        rows = distributed.shard(rows)  # torchrun: this process's prompts
        batch = data.prompt_batch(prompts, rows, tokenizer.pad_token_id)

        # -- one completion per prompt
        with run.timed("generation"):
            rollout = generate(
                policy,
                batch.prompt_ids.to(device),
                batch.prompt_mask.to(device),
                **sampling,
                **distributed.sampling_draws(len(rows), device),  # the samples do not depend on the processes
            )

        # -- scores, log-probs under the sampling policy and the reference, values, advantages
        with run.timed("scoring"):
            state = TrainerState(run.step, run.step * rows_per_step / len(prompts))
            scores, per_source = score_rollout(
                scorer, tokenizer, batch, rollout, config.missing_eos_penalty, state
            )  # [B] each
            sequences, attention_mask, mask = (
                rollout.sequences,
                rollout.attention_mask,
                rollout.completion_mask.to(device),
            )
            length = rollout.completion_ids.shape[1]
            with torch.no_grad(), runtime.autocast(device, bf16):
                old_logp, _, old_values = logprobs_and_values(sequences, attention_mask, length)  # [B, T] each
                with lora.reference_context(policy, reference) as ref_model:
                    ref_logp, _ = models.token_logprobs(
                        ref_model,
                        sequences,
                        attention_mask,
                        length,
                        config.temperature,
                        chunk_size=config.lm_head_chunk,
                    )
            rewards = kl_shaped_rewards(
                scores.to(device), old_logp, ref_logp, mask, config.kl_coef, kind=config.kl_estimator
            )  # [B, T]
            if config.whiten_rewards:  # statistics of the global batch (torchrun)
                rewards = distributed.on_global_batch(lambda r, m: masked_whiten(r, m, shift_mean=False), rewards, mask)
            advantages, returns = gae(rewards, old_values, mask, gamma=config.gamma, lam=config.lam)  # [B, T] each
            advantages = distributed.on_global_batch(masked_whiten, advantages, mask)
            sequence_kl = masked_sum(kl_estimate(old_logp, ref_logp, kind=config.kl_estimator), mask, dim=1)  # [B]
            stats = {
                **rollout_stats(rollout, scores, per_source, scorer),
                "kl": sequence_kl.mean(),
                "non_score_reward": -config.kl_coef * sequence_kl.mean(),
            }

        # -- PPO epochs over shuffled mini-batches
        with run.timed("training"):
            for _ in range(config.num_ppo_epochs):
                for mini_batch in torch.randperm(rows_per_step, device=device).split(mini_batch_rows):
                    mini_batch = distributed.own_rows(mini_batch, rows_per_step)  # torchrun: this process's rows
                    tokens = distributed.all_reduce_sum(mask[mini_batch].sum()).clamp(min=1)  # of the mini-batch
                    normalizer = distributed.rank_normalizer(tokens)  # token mean over the mini-batch
                    micro_batches = mini_batch.split(max(1, config.batch_size // distributed.world_size()))
                    filler = torch.zeros(1, dtype=torch.long, device=device)  # FSDP2: row 0 in zero-weighted passes
                    for micro, real in distributed.equal_passes(micro_batches, policy, filler):
                        with runtime.autocast(device, bf16):
                            logp, entropy, values = logprobs_and_values(
                                sequences[micro],
                                attention_mask[micro],
                                length,
                                with_entropy=True,
                                entropy_grad=config.entropy_coef > 0,
                            )
                        pg_loss, pg_stats = policy_loss(
                            logp,
                            old_logp[micro],
                            advantages[micro],
                            mask[micro],
                            clip_low=config.cliprange,
                            normalizer=normalizer,
                        )
                        vf_loss, vf_stats = value_loss(
                            values,
                            old_values[micro],
                            returns[micro],
                            mask[micro],
                            clip=config.cliprange_value,
                            normalizer=normalizer,
                        )
                        bonus = config.entropy_coef * masked_sum(entropy, mask[micro]) / normalizer
                        ((pg_loss + config.vf_coef * vf_loss - bonus) * real).backward()
                        if not real:
                            continue
                        losses = {"loss/policy": pg_loss.detach(), "loss/value": vf_loss.detach()}
                        tracking.accumulate(stats, losses, 1 / updates_per_step)  # micro-batch losses add up
                        value_stats = {f"value/{k}": v for k, v in vf_stats.items()}
                        micro_stats = {"entropy": masked_mean(entropy.detach(), mask[micro]), **pg_stats, **value_stats}
                        tracking.accumulate(stats, micro_stats, 1 / (updates_per_step * config.grad_accum_steps))
                    grad_norm = optim.optimizer_step(trained.parameters(), optimizer, scheduler, config.max_grad_norm)
                    tracking.accumulate(stats, {"grad_norm": grad_norm}, 1 / updates_per_step)
        run.end_step(stats)
    return run.finish()


if __name__ == "__main__":
    cli(main)
