"""Supervised fine-tuning (SFT): maximise the likelihood of reference completions.

    loss = -sum_{rows, t} m_t log pi(x_t | x_<t) / sum_{rows, t} m_t

with m the loss mask: the completion tokens and the end token that closes them (prompt-completion data,
the default), every token (language-modelling ``text`` data), or the assistant turns (chat ``messages``,
rendered through the tokenizer's chat template). The mean is over all loss tokens of an optimizer step, so
``--batch_size 2 --grad_accum_steps 4`` gives the update of ``--batch_size 8`` (see rlcore.optim).

Departures from the common setup (TRL's SFTTrainer):
- the learning-rate schedule, warmup and batch size of the embedded default are tuned for the tiny model
  on 2 CPU cores (a high learning rate, small batches, many steps); use ~1e-5..2e-5 for a real model;
- ``--packing`` packs rows into bins of ``--max_length`` tokens without attention across rows (position
  ids restart per row), see ``rlcore.data.pack_sequences``;
- speed without changing the loss: each row's last token (which predicts nothing) is not fed, the
  log-softmax is taken at the loss positions only, and on CPU rows of at most 128 tokens use eager
  attention (``rlcore.runtime.prefer_eager_attention``: sdpa's CPU kernel is slower on short rows);
- evaluation reports the held-out loss and, when the evaluation rows have prompts, greedy exact-match
  accuracy (``rlcore.evaluation.toy_accuracy``: the answer column, or the reference completion).

Run:
    python recipes/sft.py                                   # tiny model, toy addition task, ~2.5 min on 2 CPU cores
    python recipes/sft.py --model Qwen/Qwen2.5-0.5B --dataset trl-lib/Capybara --lr 2e-5 --batch_size 4 \\
        --grad_accum_steps 8 --max_length 1024 --max_steps 1000 --eval_split none --output_dir outputs/qwen-sft
    python recipes/sft.py --model ./my-model --dataset data.jsonl --eval_dataset heldout.jsonl --lora_r 16
    python recipes/sft.py --resume                          # continue the latest checkpoint of --output_dir
Several GPUs: single process for now. The output directory is a transformers model directory
(``--model OUTPUT_DIR`` in the next recipe); run settings in OUTPUT_DIR/run_config.json.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from rlcore import sft_loss
from rlcore.checkpoint import load_checkpoint, resolve_resume, save_checkpoint, save_final_model
from rlcore.config import TrainConfig, parse_config, save_config
from rlcore.data import collate_right, load_rows, pack_sequences, tokenize_sft
from rlcore.evaluation import mean_token_nll, toy_accuracy
from rlcore.lora import prepare_model
from rlcore.models import load_policy
from rlcore.optim import build_optimizer, build_scheduler, loss_tokens, optimizer_step
from rlcore.runtime import (autocast, maybe_compile, prefer_eager_attention, resolve_device, seed_everything, step_batches,
                            use_bf16)
from rlcore.tracking import Tracker


@dataclass
class SFTConfig(TrainConfig):
    dataset: str = "toy:prompt_completion"  # prompt/completion, text or messages rows (plain or chat)
    output_dir: str = "outputs/sft"
    completion_only: bool = True  # train on completion tokens only (text data: every token anyway)
    packing: bool = False  # pack rows into bins of --max_length tokens (no attention across rows)
    lr: float = 1e-3  # peak learning rate (AdamW)
    adam_beta2: float = 0.99  # AdamW beta2
    warmup_steps: int = 100  # linear warmup steps
    batch_size: int = 32  # rows per micro-batch (bins with --packing)
    max_steps: int = 3000  # optimizer steps
    max_seconds: float | None = 170.0  # stop early (evaluate and save) after this much training time
    logging_steps: int = 25  # log the mean of the metrics over this many steps
    eval_steps: int = 500  # evaluate every N steps (0 = only at the end)
    max_new_tokens: int = 8  # completion length limit of the accuracy evaluation


def main(argv: list[str] | None = None) -> dict[str, float]:
    config = parse_config(SFTConfig, argv)
    seed_everything(config.seed)
    device = resolve_device(config.device)
    bf16 = use_bf16(device, config.bf16)

    # ---------------------------------------------------------------- model and data
    model, tokenizer = load_policy(config.model, device=device)
    model = prepare_model(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_targets, config.load_in_4bit)
    model.train()
    pad_id = tokenizer.pad_token_id

    rows = load_rows(config.dataset, config.train_split, config.num_train_rows)
    train = tokenize_sft(rows, tokenizer, config.max_length, config.completion_only)
    train_ids, train_masks = list(train["input_ids"]), list(train["completion_mask"])  # python lists of token lists
    packed = pack_sequences(train, config.max_length, pad_id) if config.packing else None  # each [bins, max_length]
    prefer_eager_attention(model, device, config.max_length if config.packing else max(map(len, train_ids)))
    forward = maybe_compile(model, device, config.compile)
    num_samples = len(packed["input_ids"]) if config.packing else len(train)
    eval_rows = eval_tokens = None
    if config.eval_split != "none":
        eval_rows = load_rows(config.eval_dataset or config.dataset, config.eval_split, config.num_eval_rows)
        eval_tokens = tokenize_sft(eval_rows, tokenizer, config.max_length, config.completion_only)

    # ---------------------------------------------------------------- optimizer, resume, tracking
    optimizer = build_optimizer(model, config.lr, config.weight_decay, (config.adam_beta1, config.adam_beta2))
    scheduler = build_scheduler(optimizer, warmup_steps=config.warmup_steps, total_steps=config.max_steps,
                                schedule=config.lr_schedule, min_lr_ratio=config.min_lr_ratio)
    start_step, training_seconds = 0, 0.0
    resume_from = resolve_resume(config.resume, config.output_dir)
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, scheduler, seed=config.seed)
        start_step, training_seconds = state["step"], state["extra"].get("training_seconds", 0.0)
        print(f"resumed from {resume_from} at step {start_step}")
    save_config(config, config.output_dir)
    tracker = Tracker(config.output_dir, config.max_steps, start_step, bar_keys=("loss",))

    def evaluate(step: int) -> dict[str, float]:
        if eval_rows is None:
            return {}
        metrics = {"loss": mean_token_nll(model, eval_tokens, pad_id, config.eval_batch_size)}
        if "prompt" in eval_rows.column_names:
            metrics["accuracy"] = toy_accuracy(model, tokenizer, eval_rows, config.eval_batch_size, config.max_new_tokens)
        return tracker.log_eval(step, metrics)

    def micro_batch(indices: list[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """(model inputs [B, T-1], loss positions [N, 2], loss tokens [N]), all built on the host (no device sync).

        Position t predicts token t + 1, so each row's last token predicts nothing and is not fed (causal
        attention: the other positions' logits are unchanged); ``loss_positions`` holds the (row, t) whose
        next token is a loss token.
        """
        if config.packing:  # no attention mask: position ids mark the row boundaries
            batch = {k: packed[k][indices] for k in ("input_ids", "position_ids", "completion_mask")}
        else:
            batch = collate_right([train_ids[i] for i in indices], [train_masks[i] for i in indices], pad_id)
        loss_mask = batch.pop("completion_mask")[:, 1:].bool()  # [B, T-1]
        labels = batch["input_ids"][:, 1:][loss_mask]  # [N]
        inputs = {k: v[:, :-1].to(device) for k, v in batch.items()}  # [B, T-1] each
        return inputs, loss_mask.nonzero().to(device), labels.to(device)

    # ---------------------------------------------------------------- training loop
    step, results, evaluated_at = start_step, {}, None
    while step < config.max_steps and (config.max_seconds is None or training_seconds < config.max_seconds):
        started = time.perf_counter()
        micro_batches = step_batches(num_samples, config.batch_size, config.grad_accum_steps, config.seed, step)
        window = [index for indices in micro_batches for index in indices]
        if config.packing:  # loss tokens of the whole step: the normaliser of every micro-batch's token sum
            normalizer = max(1, int(packed["completion_mask"][window].sum()))
        else:
            normalizer = loss_tokens([train_masks[i] for i in window])
        stats: dict[str, torch.Tensor] = {}
        for indices in micro_batches:
            inputs, loss_positions, labels = micro_batch(indices)
            with autocast(device, bf16):
                logits = forward(**inputs, use_cache=False).logits  # [B, T-1, V]
            rows, columns = loss_positions.unbind(1)  # [N] each
            loss, loss_stats = sft_loss(logits[rows, columns].unsqueeze(0), labels.unsqueeze(0),  # [1, N, V], [1, N]
                                        torch.ones_like(labels).unsqueeze(0), normalizer=normalizer)
            loss.backward()
            stats["loss"] = stats.get("loss", 0.0) + loss.detach()  # sums to the step's token mean
            stats["token_accuracy"] = stats.get("token_accuracy", 0.0) + loss_stats["token_accuracy"] / len(micro_batches)
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
                            extra_state={"training_seconds": training_seconds}, keep_last=config.save_total_limit)

    # ---------------------------------------------------------------- final evaluation and model
    tracker.log(step)
    print(f"trained {step} steps in {training_seconds:.0f} s ({(step - start_step) / max(training_seconds, 1e-9):.1f} steps/s)")
    if evaluated_at != step:
        results = evaluate(step)
    save_final_model(model, tokenizer, config.output_dir)
    tracker.close()
    print(f"final model: {config.output_dir}")
    return results


if __name__ == "__main__":
    main()
