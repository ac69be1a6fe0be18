"""Reward modelling: a sequence classifier with one output, trained on preference pairs (Bradley-Terry).

    loss = mean_pairs[ -log sigmoid(r(x, y_chosen) - r(x, y_rejected) - m) ] + c * mean_pairs[ (r_c + r_r)^2 ]

r(x, y) is the score head read at the last real token of prompt + response (``rlcore.models``:
``sequence_scores``); m is the dataset's ``margin`` column when it has one (Llama 2), c is
``--center_coef`` (Eisenstein et al. 2023, TRL's ``center_rewards_coefficient``). Chosen and rejected
sequences go through the model in one forward pass. The output directory loads with
``AutoModelForSequenceClassification`` and is what the online recipes take as ``--reward_model``.

Departures from the common setup (Ouyang et al. 2022; TRL's RewardTrainer):
- one pair per prompt and one epoch-free stream of pairs (rows are drawn by step, see rlcore.runtime);
- the embedded default starts from the tiny model after the default SFT run on the toy task, all 3000 steps
  (built once and cached, as the online recipes do): knowing how to add makes "is this sum right?" far
  easier to learn;
- with LoRA, the score head is trained in full beside the adapters (PEFT's ``modules_to_save``); it is
  saved inside the merged final model and, with the adapters, in OUTPUT_DIR/adapter and each checkpoint
  (PEFT's SEQ_CLS layout; checkpoints also keep ``score.safetensors``): ``recipes/ppo.py --lora_r N
  --reward_on_policy --reward_model OUTPUT_DIR`` puts it on the policy's base when the bases match;
- the score head, new and randomly initialised, has its own learning rate (``--head_lr``, 10x the body's
  by default), so that the body adapts to a head that already points somewhere useful.

Evaluation (before the first step, every --eval_steps, at the end) on held-out pairs of any preference
format: pairwise accuracy (chosen scored above rejected), the mean margin and the Bradley-Terry loss
(``rlcore.evaluation.reward_model_metrics``). Measured results: docs/results.md.

Run:
    python recipes/reward_model.py                         # tiny SFT backbone, toy pairs, 2000 steps (+2 min SFT, once)
    python recipes/reward_model.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/ultrafeedback_binarized \\
        --lr 1e-5 --batch_size 8 --max_length 1024 --max_steps 2000 --output_dir outputs/qwen-rm
    python recipes/reward_model.py --model ./sft-out --dataset pairs.jsonl --eval_dataset heldout.jsonl --lora_r 16
Several processes: ``torchrun --nproc_per_node 2 recipes/reward_model.py`` (the same global batch; rlcore.distributed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rlcore import (
    data,
    distributed,
    evaluation,
    guards,
    last_valid_index,
    lora,
    models,
    optim,
    reward_pairwise_loss,
    runtime,
    toy,
    tracking,
)
from rlcore.config import TrainConfig, parse_config
from rlcore.run import Run, cli
from rlcore.task import load_task_rows


@dataclass
class RewardModelConfig(TrainConfig):
    dataset: str = "toy:preference"  # prompt/chosen/rejected (or chosen/rejected) rows, optional margin column
    output_dir: str = "outputs/reward_model"
    warm_start_steps: int = (
        3000  # with --model tiny only: start from `recipes/sft.py --max_steps N` (cached); 0 = untrained
    )
    center_coef: float = 0.0  # weight of the (r_c + r_r)^2 centering term
    head_lr: float | None = 5e-3  # peak learning rate of the new score head (None = --lr)
    num_train_rows: int | None = 50_000  # training pairs (the toy task draws fresh ones; None = all)
    lr: float = 5e-4  # peak learning rate of the body (AdamW)
    warmup_steps: int = 50  # linear warmup steps
    batch_size: int = 128  # pairs per micro-batch
    max_steps: int = 2000  # optimizer steps
    logging_steps: int = 20  # log the mean of the metrics over this many steps
    eval_steps: int = 250  # evaluate every N steps (0 = only at the start and end)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head_lr is not None and self.head_lr <= 0:
            raise ValueError(f"--head_lr must be > 0 (or none: the same as --lr), got {self.head_lr}")


def main(argv: list[str] | None = None) -> dict[str, float]:
    config = parse_config(RewardModelConfig, argv)
    device, bf16 = runtime.setup(config)

    # ---------------------------------------------------------------- data (checked first), model
    rows, eval_rows, _ = load_task_rows(config, data.PREFERENCE_FORMATS)  # no greedy metric: nothing is generated
    if config.eval_metric not in ("auto", "none", None):
        print(f"--eval_metric {config.eval_metric}: a reward model generates no text; only pairwise metrics")
    start_model = toy.warm_start(config.model, config.warm_start_steps, config.seed, Path(__file__).with_name("sft.py"))
    model, tokenizer = models.load_reward_model(start_model, device=device, **models.load_options(config))
    model = lora.prepare_model(
        model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_targets, config.load_in_4bit
    )
    if config.gradient_checkpointing:
        models.enable_gradient_checkpointing(model)
    model = distributed.prepare(model, config.sharding, bf16)  # torchrun: same weights on every process
    model.train()
    backbone = runtime.maybe_compile(getattr(model, model.base_model_prefix), device, config.compile)
    pad_id = tokenizer.pad_token_id
    train = data.tokenize_preference(rows, tokenizer, config.max_length, truncation=config.truncation)
    columns = {name: list(train[name]) for name in ("prompt_ids", "chosen_ids", "rejected_ids")}  # python lists
    guards.check_pairs(columns["chosen_ids"], columns["rejected_ids"])  # identical or empty pairs: refused if all
    margins = torch.tensor(train["margin"], dtype=torch.float32) if "margin" in train.column_names else None
    if eval_rows is not None:
        eval_pairs = data.tokenize_preference(eval_rows, tokenizer, config.max_length, truncation=config.truncation)

    model.score.requires_grad_(True)  # the head is new: trained in full (also under LoRA), at its own lr
    head_lr = config.lr if config.head_lr is None else config.head_lr
    head_group = {"params": list(model.score.parameters()), "lr": head_lr, "weight_decay": 0.0}
    optimizer, scheduler = optim.from_flags(
        model,
        config,
        extra_groups=[head_group],
        num_rows=len(train),
        rows_per_step=config.batch_size * config.grad_accum_steps,
    )
    evaluate = (
        (lambda: evaluation.reward_model_metrics(model, eval_pairs, pad_id, config.eval_batch_size))
        if eval_rows is not None
        else None
    )
    head = {"score": model.score} if config.lora_r > 0 else None  # checkpointed apart: adapters do not hold it
    run = Run(
        config,
        model,
        tokenizer,
        optimizer,
        scheduler,
        evaluate=evaluate,
        bar_keys=("loss", "accuracy"),
        extra_modules=head,
        guard=guards.supervised(config),  # non-finite steps skipped, divergence warned
    )

    def scores(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[2B] scores at the last real token of each sequence, one forward pass for chosen and rejected."""
        hidden = backbone(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).last_hidden_state
        last = last_valid_index(batch["attention_mask"])  # [2B]
        last_hidden = hidden[torch.arange(hidden.shape[0], device=device), last].to(model.score.weight.dtype)  # [2B, H]
        return model.score(last_hidden).squeeze(-1).float()  # [2B]

    # ---------------------------------------------------------------- training loop
    while run.running():
        stats: dict[str, torch.Tensor] = {}
        for indices in runtime.step_batches(
            len(train), config.batch_size, config.grad_accum_steps, config.seed, run.step
        ):
            indices = distributed.shard(indices)  # torchrun: this process's rows of the micro-batch
            pairs = {name: [values[i] for i in indices] for name, values in columns.items()}
            batch = data.collate_preference(pairs["prompt_ids"], pairs["chosen_ids"], pairs["rejected_ids"], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}  # each [2B, T]
            with runtime.autocast(device, bf16):
                chosen_scores, rejected_scores = scores(batch).chunk(2)  # [B], [B]
            margin = margins[indices].to(device) if margins is not None else None
            loss, loss_stats = reward_pairwise_loss(chosen_scores, rejected_scores, margin, config.center_coef)
            (loss / config.grad_accum_steps).backward()  # equal-size micro-batches: mean of means = mean
            tracking.accumulate(stats, {"loss": loss.detach(), **loss_stats}, 1 / config.grad_accum_steps)
        stats["grad_norm"] = optim.optimizer_step(model.parameters(), optimizer, scheduler, config.max_grad_norm)
        run.end_step(stats)
    return run.finish()


if __name__ == "__main__":
    cli(main)
