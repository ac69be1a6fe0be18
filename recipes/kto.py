"""Kahneman-Tversky optimisation (KTO): learn from single completions labelled desirable or undesirable.

    r = log pi(y | x) - log pi_ref(y | x),   z0 = max(0, mean over the batch of r on mismatched pairs (x, y'))
    desirable:   w_D * (1 - sigmoid(beta * (r - z0)))      undesirable:   w_U * (1 - sigmoid(beta * (z0 - r)))

(Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306; ``rlcore.kto_loss``.) The data is unpaired: rows
of ``prompt``, ``completion`` and a bool ``label`` (TRL's unpaired preference format, plain or chat); the
embedded default ``toy:unpaired`` holds the toy's preference pairs split into one desirable row (the right
sum) and one undesirable row (a plausible wrong sum), alternating. ``--loss_type apo_zero_unpaired`` is the
unpaired APO-zero loss (no reference point). The reference pi_ref is a frozen copy of the starting policy,
or with ``--lora_r > 0`` the same model with its adapters off.

The reference point z0 estimates KL(pi || pi_ref) on mismatched prompt-completion pairs, as TRL does: within
each micro-batch, prompt i with the completion of row i - 1 (the completions rotated by one), scored by the
policy and the reference without gradient; z0 is detached and clamped at 0. Departures from TRL's KTOTrainer:
- TRL rotates the completions once, over consecutive rows of the dataset before shuffling; here the rotation
  is over the rows of the actual micro-batch, so the mismatched completions are the batch's own (what the
  paper asks for);
- the embedded default starts from the same mid-schedule SFT checkpoint as DPO and the online recipes (1500
  steps of ``recipes/sft.py`` with ``rlcore.config.ONLINE_WARM_START_FLAGS``, built once and cached).

Evaluation, before the first step, every --eval_steps and at the end, on held-out unpaired rows: the
fraction of rows whose implicit reward beta * r has the sign of its label, the mean reward of desirable
minus undesirable rows, the KTO loss and its reference point over the held-out set; and, with a metric
(``--eval_metric``; ``auto`` on the toy task is its exact match, on the prompts of desirable rows), that
metric of greedy completions. Measured results: docs/results.md.

Run:
    python recipes/kto.py                                  # tiny SFT model, toy unpaired rows, 300 steps
    python recipes/kto.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/kto-mix-14k --lr 5e-7 \\
        --batch_size 8 --grad_accum_steps 4 --max_length 1024 --max_steps 1000 --lora_r 16 --output_dir outputs/qwen-kto
Several processes: ``torchrun --nproc_per_node 2 recipes/kto.py`` (the same global batch; each process scores its
rows' mismatched pairs, the reference point is the mean over all of them; rlcore.distributed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rlcore import (
    KTO_LOSS_TYPES,
    data,
    distributed,
    evaluation,
    guards,
    kto_loss,
    lora,
    models,
    optim,
    runtime,
    toy,
    tracking,
)
from rlcore.config import ONLINE_WARM_START_FLAGS, TrainConfig, parse_config
from rlcore.run import Run, cli
from rlcore.task import load_task_rows, metric_value


@dataclass
class KTOConfig(TrainConfig):
    dataset: str = "toy:unpaired"  # prompt/completion/label rows (label: bool, True = desirable), plain or chat
    output_dir: str = "outputs/kto"
    warm_start_steps: int = 1500  # with --model tiny only: start from the online recipes' mid-schedule SFT checkpoint of N steps (cached); 0 = untrained
    beta: float = 0.1  # inverse temperature of the implicit reward (KL strength)
    loss_type: str = "kto"  # one of rlcore.KTO_LOSS_TYPES
    desirable_weight: float = 1.0  # w_D; with unequal counts keep w_D n_D / (w_U n_U) in [1, 4/3] (the paper)
    undesirable_weight: float = 1.0  # w_U
    lr: float = 5e-5  # peak learning rate (AdamW)
    warmup_steps: int = 10  # linear warmup steps
    batch_size: int = 32  # rows per micro-batch (also the rows the reference point is estimated from)
    max_steps: int = 300  # optimizer steps
    logging_steps: int = 10  # log the mean of the metrics over this many steps
    eval_steps: int = 100  # evaluate every N steps (0 = only at the start and end)
    max_new_tokens: int = 8  # completion length limit of the greedy metric

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_type not in KTO_LOSS_TYPES:
            raise ValueError(f"--loss_type must be one of {', '.join(KTO_LOSS_TYPES)}; got {self.loss_type!r}")
        if self.beta <= 0:
            raise ValueError(f"--beta must be > 0, got {self.beta}")
        if self.desirable_weight < 0 or self.undesirable_weight < 0:
            raise ValueError("--desirable_weight and --undesirable_weight must be >= 0")
        if self.loss_type == "kto" and self.batch_size < 2:
            raise ValueError(
                "--batch_size must be >= 2 for kto: the reference point pairs each prompt with another row"
            )


def rotated(completions: list) -> list:
    """The mismatched completions of KTO's reference point: row i gets the completion of row i - 1."""
    return completions[-1:] + completions[:-1]


SIDE_COUNTS = {
    f"{k}/{side}": n
    for side, n in (("chosen", "num_desirable"), ("rejected", "num_undesirable"))
    for k in ("rewards", "logps")
}
"""Metrics that are means over the desirable (chosen) or undesirable (rejected) rows, and their counts."""


def main(argv: list[str] | None = None) -> dict[str, float]:
    config = parse_config(KTOConfig, argv)
    device, bf16 = runtime.setup(config)
    use_kl = config.loss_type == "kto"

    # ---------------------------------------------------------------- data (checked first), model, reference
    rows, eval_rows, metric = load_task_rows(config, ("unpaired_preference",))
    start_model = toy.warm_start(
        config.model, config.warm_start_steps, config.seed, Path(__file__).with_name("sft.py"), ONLINE_WARM_START_FLAGS
    )
    model, tokenizer = models.load_policy(start_model, device=device, **models.load_options(config))
    model = lora.prepare_model(
        model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_targets, config.load_in_4bit
    )
    if config.gradient_checkpointing:
        models.enable_gradient_checkpointing(model)
    pad_id = tokenizer.pad_token_id
    train = data.tokenize_unpaired(rows, tokenizer, config.max_length, truncation=config.truncation)
    prompts, completions = list(train["prompt_ids"]), list(train["completion_ids"])
    labels = torch.tensor(train["label"], dtype=torch.bool)  # [N]
    empty = {"have an empty completion after truncation": sum(not ids for ids in completions)}
    guards.report_degenerate(empty, len(completions), "training rows")  # counted, refused if all
    num_desirable, num_undesirable = int(labels.sum()), int((~labels).sum())
    balance = config.desirable_weight * num_desirable / max(1e-9, config.undesirable_weight * num_undesirable)
    print(
        f"{num_desirable} desirable and {num_undesirable} undesirable training rows; w_D n_D / (w_U n_U) = {balance:.2f}"
    )
    if not 1.0 <= balance <= 4 / 3:
        print("  the KTO paper recommends 1 to 4/3: set --desirable_weight or --undesirable_weight accordingly")
    longest = max(map(len, prompts)) + max(map(len, completions))  # bounds the mismatched rows too
    runtime.prefer_eager_attention(model, device, longest)  # CPU, short rows (before the reference is copied)
    reference = models.frozen_copy(model) if config.lora_r == 0 else None  # with LoRA: adapters off

    def logps_of(forward, prompt_rows: list, completion_rows: list) -> torch.Tensor:
        """[B] summed completion log-probs of prompt + completion rows, one forward pass."""
        batch = {k: v.to(device) for k, v in data.collate_completions(prompt_rows, completion_rows, pad_id).items()}
        mask = batch["completion_mask"][:, 1:]
        return models.sequence_logprobs(forward, batch["input_ids"], batch["attention_mask"], mask)[0].float()

    if eval_rows is not None:
        held_out = data.tokenize_unpaired(eval_rows, tokenizer, config.max_length, truncation=config.truncation)
        eval_prompts, eval_completions = list(held_out["prompt_ids"]), list(held_out["completion_ids"])
        eval_labels = torch.tensor(held_out["label"], dtype=torch.bool)

        def held_out_logps() -> tuple[torch.Tensor, torch.Tensor]:
            """[N] log-probs of the held-out rows and [N] of their mismatched pairs, under the model now."""
            score = evaluation.completion_logps
            return (
                score(model, eval_prompts, eval_completions, pad_id, config.eval_batch_size),
                score(model, eval_prompts, rotated(eval_completions), pad_id, config.eval_batch_size),
            )

        eval_ref_logps, eval_ref_kl_logps = held_out_logps()  # the starting policy
        eval_prompt_rows = (
            data.tokenize_prompts(eval_rows, tokenizer, config.max_length, truncation=config.truncation)
            if metric
            else None
        )

    def evaluate() -> dict[str, float]:
        logps, kl_logps = held_out_logps()
        return {
            **evaluation.kto_metrics(
                logps,
                eval_ref_logps,
                eval_labels.to(logps.device),
                kl_logps,
                eval_ref_kl_logps,
                config.beta,
                desirable_weight=config.desirable_weight,
                undesirable_weight=config.undesirable_weight,
                loss_type=config.loss_type,
            ),
            **metric_value(model, tokenizer, eval_prompt_rows, metric, config),
        }

    model = distributed.prepare(model, config.sharding, bf16)  # torchrun: same weights on every process (or FSDP2)
    model.train()
    forward = runtime.maybe_compile(model, device, config.compile)
    optimizer, scheduler = optim.from_flags(
        model, config, num_rows=len(train), rows_per_step=config.batch_size * config.grad_accum_steps
    )
    evaluate = evaluate if eval_rows is not None else None
    run = Run(
        config,
        model,
        tokenizer,
        optimizer,
        scheduler,
        evaluate=evaluate,
        bar_keys=("loss", "kl"),
        guard=guards.supervised(config),  # non-finite steps skipped, divergence warned
    )

    # ---------------------------------------------------------------- training loop
    while run.running():
        stats: dict[str, torch.Tensor] = {}
        sums: dict[str, torch.Tensor] = {}  # of the rewards and log-probs over desirable / undesirable rows
        micro_batches = runtime.step_batches(
            len(prompts), config.batch_size, config.grad_accum_steps, config.seed, run.step
        )
        for indices in micro_batches:
            mismatched = distributed.shard(rotated([completions[i] for i in indices]))  # prompt i, completion i - 1
            indices = distributed.shard(indices)  # torchrun: this process's rows of the micro-batch
            batch_prompts = [prompts[i] for i in indices]
            batch_completions = [completions[i] for i in indices]
            with torch.no_grad(), runtime.autocast(device, bf16):
                with lora.reference_context(model, reference) as ref_model:
                    ref_logps = logps_of(ref_model, batch_prompts, batch_completions)  # [B]
                    ref_kl_logps = logps_of(ref_model, batch_prompts, mismatched) if use_kl else None  # [B]
                kl_logps = logps_of(forward, batch_prompts, mismatched) if use_kl else None  # [B]
            if use_kl:  # torchrun: z0 is the mean over the mismatched pairs of the whole micro-batch
                kl_logps, ref_kl_logps = distributed.gather_rows(kl_logps), distributed.gather_rows(ref_kl_logps)
            with runtime.autocast(device, bf16):
                logps = logps_of(forward, batch_prompts, batch_completions)  # [B], with gradient
            loss, loss_stats = kto_loss(
                logps,
                ref_logps,
                labels[indices].to(device),
                kl_logps,
                ref_kl_logps,
                beta=config.beta,
                desirable_weight=config.desirable_weight,
                undesirable_weight=config.undesirable_weight,
                loss_type=config.loss_type,
            )
            (loss / config.grad_accum_steps).backward()  # equal-size micro-batches: the sum is the step's mean
            tracking.accumulate(stats, {"loss": loss.detach(), **loss_stats}, 1 / config.grad_accum_steps)
            tracking.accumulate(sums, {k: loss_stats[k] * loss_stats[n] for k, n in SIDE_COUNTS.items()})
            tracking.accumulate(sums, {n: loss_stats[n] for n in ("num_desirable", "num_undesirable")})
        means = distributed.whole_batch_means(sums, SIDE_COUNTS)  # over the step's rows of every process
        stats |= {**means, "rewards/margins": means["rewards/chosen"] - means["rewards/rejected"]}
        stats["grad_norm"] = optim.optimizer_step(model.parameters(), optimizer, scheduler, config.max_grad_norm)
        run.end_step(stats)
    return run.finish()


if __name__ == "__main__":
    cli(main)
