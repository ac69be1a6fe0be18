"""Reward modelling: a sequence classifier with one output, trained on preference pairs (Bradley-Terry).

    loss = mean_pairs[ -log sigmoid(r(x, y_chosen) - r(x, y_rejected) - m) ] + c * mean_pairs[ (r_c + r_r)^2 ]

r(x, y) is the score head read at the last real token of prompt + response (``rlcore.models``:
``sequence_scores``); m is the dataset's ``margin`` column when it has one (Llama 2), c is
``--center_coef`` (Eisenstein et al. 2023, TRL's ``center_rewards_coefficient``). Chosen and rejected
sequences go through the model in one forward pass. The output directory loads with
``AutoModelForSequenceClassification`` and is what the online recipes take as ``--reward_model``.

Departures from the common setup (Ouyang et al. 2022; TRL's RewardTrainer):
- one pair per prompt and one epoch-free stream of pairs (rows are drawn by step, see rlcore.runtime);
- the embedded default starts from the tiny model after a short SFT run on the toy task (built once and
  cached, as the online recipes do): knowing how to add makes "is this sum right?" far easier to learn;
- with LoRA, the score head is trained in full beside the adapters (PEFT's ``modules_to_save``); it is
  saved in each checkpoint as ``score.safetensors`` and inside the merged final model.

Run:
    python recipes/reward_model.py                         # tiny model, toy pairs, a couple of minutes on CPU
    python recipes/reward_model.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/ultrafeedback_binarized \\
        --lr 1e-5 --batch_size 8 --max_length 1024 --max_steps 2000 --output_dir outputs/qwen-rm
    python recipes/reward_model.py --model ./sft-out --dataset pairs.jsonl --eval_dataset heldout.jsonl --lora_r 16
Several GPUs: single process for now.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlcore import reward_pairwise_loss
from rlcore.checkpoint import load_checkpoint, resolve_resume, save_checkpoint, save_final_model
from rlcore.config import TrainConfig, parse_config, save_config
from rlcore.data import collate_preference, load_rows, tokenize_preference
from rlcore.evaluation import pairwise_accuracy
from rlcore.lora import prepare_model
from rlcore.models import last_token_index, load_reward_model
from rlcore.online import warm_start
from rlcore.optim import build_optimizer, build_scheduler, optimizer_step
from rlcore.runtime import autocast, maybe_compile, resolve_device, seed_everything, step_batches, use_bf16
from rlcore.tracking import Tracker


@dataclass
class RewardModelConfig(TrainConfig):
    dataset: str = "toy:preference"  # prompt/chosen/rejected (or chosen/rejected) rows, optional margin column
    output_dir: str = "outputs/reward_model"
    warm_start_steps: int = 1000  # with --model tiny only: start from `recipes/sft.py --max_steps N` (cached); 0 = untrained
    center_coef: float = 0.0  # weight of the (r_c + r_r)^2 centering term
    lr: float = 1e-3  # peak learning rate (AdamW)
    warmup_steps: int = 20  # linear warmup steps
    batch_size: int = 32  # pairs per micro-batch
    max_steps: int = 600  # optimizer steps
    max_seconds: float | None = 170.0  # stop early (evaluate and save) after this much training time
    logging_steps: int = 20  # log the mean of the metrics over this many steps
    eval_steps: int = 200  # evaluate every N steps (0 = only at the end)


def main(argv: list[str] | None = None) -> dict[str, float]:
    config = parse_config(RewardModelConfig, argv)
    seed_everything(config.seed)
    device = resolve_device(config.device)
    bf16 = use_bf16(device, config.bf16)

    # ---------------------------------------------------------------- model and data
    start_model = warm_start(config.model, config.warm_start_steps, config.seed, Path(__file__).with_name("sft.py"))
    model, tokenizer = load_reward_model(start_model, device=device)
    model = prepare_model(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_targets, config.load_in_4bit)
    model.score.requires_grad_(True)  # the head is new: train it in full, also under LoRA
    model.train()
    backbone = maybe_compile(getattr(model, model.base_model_prefix), device, config.compile)
    pad_id = tokenizer.pad_token_id

    train = tokenize_preference(load_rows(config.dataset, config.train_split, config.num_train_rows), tokenizer, config.max_length)
    columns = {name: list(train[name]) for name in ("prompt_ids", "chosen_ids", "rejected_ids")}  # python lists
    margins = torch.tensor(train["margin"], dtype=torch.float32) if "margin" in train.column_names else None
    eval_pairs = None
    if config.eval_split != "none":
        eval_rows = load_rows(config.eval_dataset or config.dataset, config.eval_split, config.num_eval_rows)
        eval_pairs = tokenize_preference(eval_rows, tokenizer, config.max_length)

    # ---------------------------------------------------------------- optimizer, resume, tracking
    optimizer = build_optimizer(model, config.lr, config.weight_decay, (config.adam_beta1, config.adam_beta2))
    scheduler = build_scheduler(optimizer, warmup_steps=config.warmup_steps, total_steps=config.max_steps,
                                schedule=config.lr_schedule, min_lr_ratio=config.min_lr_ratio)
    head = {"score": model.score} if config.lora_r > 0 else None  # adapters alone do not hold the head
    start_step, training_seconds = 0, 0.0
    resume_from = resolve_resume(config.resume, config.output_dir)
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, scheduler, seed=config.seed, extra_modules=head)
        start_step, training_seconds = state["step"], state["extra"].get("training_seconds", 0.0)
        print(f"resumed from {resume_from} at step {start_step}")
    save_config(config, config.output_dir)
    tracker = Tracker(config.output_dir, config.max_steps, start_step, bar_keys=("loss", "accuracy"))

    def evaluate(step: int) -> dict[str, float]:
        if eval_pairs is None:
            return {}
        return tracker.log_eval(step, pairwise_accuracy(model, eval_pairs, pad_id, config.eval_batch_size))

    def scores(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[2B] scores at the last real token of each sequence, one forward pass for chosen and rejected."""
        hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
        last = last_token_index(batch["attention_mask"])  # [2B]
        return model.score(hidden[torch.arange(hidden.shape[0], device=device), last]).squeeze(-1).float()  # [2B]

    # ---------------------------------------------------------------- training loop
    step, results, evaluated_at = start_step, {}, None
    while step < config.max_steps and (config.max_seconds is None or training_seconds < config.max_seconds):
        started = time.perf_counter()
        stats: dict[str, torch.Tensor] = {}
        for indices in step_batches(len(train), config.batch_size, config.grad_accum_steps, config.seed, step):
            pairs = {name: [values[i] for i in indices] for name, values in columns.items()}
            batch = collate_preference(pairs["prompt_ids"], pairs["chosen_ids"], pairs["rejected_ids"], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}  # each [2B, T]
            with autocast(device, bf16):
                chosen_scores, rejected_scores = scores(batch).chunk(2)  # [B], [B]
            margin = margins[indices].to(device) if margins is not None else None
            loss, loss_stats = reward_pairwise_loss(chosen_scores, rejected_scores, margin, config.center_coef)
            (loss / config.grad_accum_steps).backward()  # equal-size micro-batches: mean of means = mean
            for key, value in {"loss": loss.detach(), **loss_stats}.items():
                stats[key] = stats.get(key, 0.0) + value / config.grad_accum_steps
        stats["lr"] = scheduler.get_last_lr()[0]
        stats["grad_norm"] = optimizer_step(model.parameters(), optimizer, scheduler, config.max_grad_norm)
        step += 1
        training_seconds += time.perf_counter() - started
        tracker.update(stats)
        if step % config.logging_steps == 0:
            tracker.log(step)
        if config.eval_steps and step % config.eval_steps == 0:
            results, evaluated_at = evaluate(step), step
        if config.save_steps and step % config.save_steps == 0:
            save_checkpoint(config.output_dir, step, model, tokenizer, optimizer, scheduler, seed=config.seed,
                            extra_modules=head, extra_state={"training_seconds": training_seconds},
                            keep_last=config.save_total_limit)

    # ---------------------------------------------------------------- final evaluation and model
    tracker.log(step)
    print(f"trained {step} steps in {training_seconds:.0f} s")
    if evaluated_at != step:
        results = evaluate(step)
    save_final_model(model, tokenizer, config.output_dir)
    tracker.close()
    print(f"final reward model: {config.output_dir}")
    return results


if __name__ == "__main__":
    main()
