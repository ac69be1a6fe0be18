"""Reference-free preference optimisation from pairs: ORPO, CPO and SimPO (``--loss_type``), one model only.

    ORPO  (Hong et al. 2024, https://arxiv.org/abs/2403.07691):     NLL(y_c) + beta * -log sigmoid(log odds(y_c) - log odds(y_r))
    CPO   (Xu et al. 2024, https://arxiv.org/abs/2401.08417):       -log sigmoid(beta * (log pi(y_c) - log pi(y_r))) + w * NLL(y_c)
    SimPO (Meng et al. 2024, https://arxiv.org/abs/2405.14734):     -log sigmoid(beta * (l_c - l_r) - gamma) (+ w * NLL: CPO-SimPO)

with odds(y) = P / (1 - P), P = exp(mean log-prob per token), l = mean log-prob per token, and NLL the
token-mean negative log-likelihood of the chosen completions (``rlcore.orpo_loss``, ``cpo_loss``,
``simpo_loss``). No reference model: the NLL term (ORPO, CPO) or the length-normalised margin (SimPO) keeps
the policy close to the data. Log-probs are length-averaged for ORPO and SimPO and summed for CPO, as TRL's
ORPOTrainer and CPOTrainer take them. Chosen and rejected sequences go through the model in ONE forward
pass ([2B, T]).

Defaults per loss (a flag left at none takes them): ``--beta`` 0.1 for ORPO (the paper's lambda) and CPO,
2.0 for SimPO (with ``--gamma_beta_ratio`` 0.5); ``--nll_weight`` 1 for ORPO (fixed: the paper's SFT term)
and CPO, 0 for SimPO. Departures from the papers / TRL:
- TRL's ORPOTrainer takes the NLL over the prompt and the completion; here, as in the paper, over the
  completion tokens only, normalised by the chosen tokens of the whole optimizer step (exact under gradient
  accumulation);
- the embedded default starts from the same mid-schedule SFT checkpoint as DPO (1500 steps of
  ``recipes/sft.py`` with ``rlcore.config.ONLINE_WARM_START_FLAGS``, built once and cached).

Evaluation, before the first step, every --eval_steps and at the end, on held-out pairs of any preference
format: the pairwise accuracy of the implicit reward beta * log pi (with the loss's averaging), its mean
margin, the token-mean NLL of the chosen completions; and, with a metric (``--eval_metric``; ``auto`` on the
toy task is its exact match), that metric of greedy completions. Measured results: docs/results.md.

Run:
    python recipes/orpo.py                                 # ORPO: tiny SFT model, toy pairs, 300 steps
    python recipes/orpo.py --loss_type cpo                 # CPO;  --loss_type simpo: SimPO
    python recipes/orpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/ultrafeedback_binarized \\
        --lr 8e-6 --batch_size 4 --grad_accum_steps 8 --max_length 1024 --max_steps 1000 --lora_r 16 --output_dir outputs/qwen-orpo
Several processes: ``torchrun --nproc_per_node 2 recipes/orpo.py`` (the same global batch; rlcore.distributed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets
import torch

from rlcore import (
    cpo_loss,
    data,
    distributed,
    evaluation,
    guards,
    lora,
    models,
    optim,
    orpo_loss,
    runtime,
    sft_loss_from_logprobs,
    simpo_loss,
    toy,
    tracking,
)
from rlcore.config import ONLINE_WARM_START_FLAGS, TrainConfig, parse_config
from rlcore.run import Run, cli
from rlcore.task import load_task_rows, metric_value

LOSS_TYPES = ("orpo", "cpo", "simpo")
DEFAULT_BETA = {"orpo": 0.1, "cpo": 0.1, "simpo": 2.0}
DEFAULT_NLL_WEIGHT = {"orpo": 1.0, "cpo": 1.0, "simpo": 0.0}


@dataclass
class ORPOConfig(TrainConfig):
    dataset: str = "toy:preference"  # prompt/chosen/rejected (or chosen/rejected) rows, plain or chat
    output_dir: str = "outputs/orpo"
    warm_start_steps: int = 1500  # with --model tiny only: start from the online recipes' mid-schedule SFT checkpoint of N steps (cached); 0 = untrained
    loss_type: str = "orpo"  # orpo, cpo or simpo
    beta: float | None = None  # orpo: odds-ratio weight (lambda); cpo, simpo: reward scale (None = 0.1, 0.1, 2.0)
    nll_weight: float | None = None  # weight of the chosen NLL (None = 1 for orpo and cpo, 0 for simpo; orpo: 1 only)
    gamma_beta_ratio: float = 0.5  # simpo: target margin gamma / beta
    label_smoothing: float = 0.0  # cpo and simpo: conservative epsilon
    lr: float = 5e-5  # peak learning rate (AdamW)
    warmup_steps: int = 10  # linear warmup steps
    batch_size: int = 32  # pairs per micro-batch
    max_steps: int = 300  # optimizer steps
    logging_steps: int = 10  # log the mean of the metrics over this many steps
    eval_steps: int = 100  # evaluate every N steps (0 = only at the start and end)
    max_new_tokens: int = 8  # completion length limit of the greedy metric

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"--loss_type must be one of {', '.join(LOSS_TYPES)}; got {self.loss_type!r}")
        self.beta = DEFAULT_BETA[self.loss_type] if self.beta is None else self.beta
        self.nll_weight = DEFAULT_NLL_WEIGHT[self.loss_type] if self.nll_weight is None else self.nll_weight
        if self.beta <= 0:
            raise ValueError(f"--beta must be > 0, got {self.beta}")
        if self.loss_type == "orpo" and self.nll_weight != 1.0:
            raise ValueError(f"--nll_weight is 1 in ORPO (--beta weighs the odds-ratio term); got {self.nll_weight}")
        if self.nll_weight < 0:
            raise ValueError(f"--nll_weight must be >= 0, got {self.nll_weight}")


def main(argv: list[str] | None = None) -> dict[str, float]:
    config = parse_config(ORPOConfig, argv)
    device, bf16 = runtime.setup(config)
    average = config.loss_type in ("orpo", "simpo")  # length-averaged log-probs (CPO: summed)

    # ---------------------------------------------------------------- data (checked first), model
    rows, eval_rows, metric = load_task_rows(config, data.PREFERENCE_FORMATS)
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
    train = data.tokenize_preference(rows, tokenizer, config.max_length, truncation=config.truncation)
    pairs = {name: list(train[name]) for name in ("prompt_ids", "chosen_ids", "rejected_ids")}
    guards.check_pairs(pairs["chosen_ids"], pairs["rejected_ids"])  # identical or empty pairs: counted, refused if all
    longest = max(
        len(p) + max(len(c), len(r)) for p, c, r in zip(pairs["prompt_ids"], pairs["chosen_ids"], pairs["rejected_ids"])
    )
    runtime.prefer_eager_attention(model, device, longest)  # CPU, short rows

    def loss_of(chosen, rejected, nll) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if config.loss_type == "orpo":
            return orpo_loss(chosen, rejected, nll, beta=config.beta)
        if config.loss_type == "cpo":
            return cpo_loss(
                chosen,
                rejected,
                nll,
                beta=config.beta,
                nll_weight=config.nll_weight,
                label_smoothing=config.label_smoothing,
            )
        loss, stats = simpo_loss(chosen, rejected, config.beta, config.gamma_beta_ratio, config.label_smoothing)
        if config.nll_weight:  # CPO-SimPO
            loss, stats["nll"] = loss + config.nll_weight * nll, nll.detach()
        return loss, stats

    if eval_rows is not None:
        eval_pairs = data.tokenize_preference(eval_rows, tokenizer, config.max_length, truncation=config.truncation)
        eval_prompts = (
            data.tokenize_prompts(eval_rows, tokenizer, config.max_length, truncation=config.truncation)
            if metric
            else None
        )
        eval_chosen = datasets.Dataset.from_dict(  # prompt + chosen rows, the NLL on the chosen tokens
            {
                "input_ids": [p + c for p, c in zip(eval_pairs["prompt_ids"], eval_pairs["chosen_ids"])],
                "completion_mask": [
                    [0] * len(p) + [1] * len(c) for p, c in zip(eval_pairs["prompt_ids"], eval_pairs["chosen_ids"])
                ],
            }
        )

    def evaluate() -> dict[str, float]:
        logps = evaluation.preference_logps(model, eval_pairs, pad_id, config.eval_batch_size, average)  # [2, N]
        return {
            **evaluation.reference_free_metrics(logps, config.beta),
            "nll": evaluation.sft_metrics(model, eval_chosen, pad_id, config.eval_batch_size)["loss"],
            **metric_value(model, tokenizer, eval_prompts, metric, config),
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
        bar_keys=("loss", "rewards/accuracies"),
        guard=guards.supervised(config),  # non-finite steps skipped, divergence warned
    )

    # ---------------------------------------------------------------- training loop
    while run.running():
        stats: dict[str, torch.Tensor] = {}
        micro_batches = runtime.step_batches(
            len(pairs["prompt_ids"]), config.batch_size, config.grad_accum_steps, config.seed, run.step
        )
        chosen_tokens = sum(len(pairs["chosen_ids"][i]) for indices in micro_batches for i in indices)
        chosen_tokens = distributed.rank_normalizer(chosen_tokens)  # torchrun: this process's share
        for indices in micro_batches:
            indices = distributed.shard(indices)  # torchrun: this process's rows of the micro-batch
            batch = data.collate_preference(
                *([pairs[name][i] for i in indices] for name in ("prompt_ids", "chosen_ids", "rejected_ids")), pad_id
            )
            batch = {k: v.to(device) for k, v in batch.items()}  # each [2B, T]
            mask = batch["completion_mask"][:, 1:]  # [2B, T-1]
            with runtime.autocast(device, bf16):
                logps, token_logp = models.sequence_logprobs(
                    forward, batch["input_ids"], batch["attention_mask"], mask, average
                )
            chosen, rejected = logps.float().chunk(2)  # [B], [B]
            # token-mean NLL of the chosen completions over the whole step; x grad_accum_steps: this micro-batch's
            # share, so that the loss below divided by grad_accum_steps sums to the step's loss
            nll, _ = sft_loss_from_logprobs(token_logp.float().chunk(2)[0], mask.chunk(2)[0], normalizer=chosen_tokens)
            loss, loss_stats = loss_of(chosen, rejected, nll * config.grad_accum_steps)
            (loss / config.grad_accum_steps).backward()
            tracking.accumulate(stats, {"loss": loss.detach(), **loss_stats}, 1 / config.grad_accum_steps)
        stats["grad_norm"] = optim.optimizer_step(model.parameters(), optimizer, scheduler, config.max_grad_norm)
        run.end_step(stats)
    return run.finish()


if __name__ == "__main__":
    cli(main)
