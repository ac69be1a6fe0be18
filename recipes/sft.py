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
- ``--padding_free`` puts each micro-batch's rows end to end (``rlcore.models.packed_batch``), attention kept
  within each row and position ids restarting (``rlcore.packing``): the same loss and gradients, no padding;
- speed and memory without changing the loss: each row's last token (which predicts nothing) is not fed,
  the LM head runs at the loss positions only, chunk-wise (``--lm_head_chunk``; 0 = the full logits), and
  on CPU rows of at most 128 tokens use eager
  attention (``rlcore.runtime.prefer_eager_attention``: sdpa's CPU kernel is slower on short rows);
- evaluation (before the first step, every --eval_steps, at the end) reports the held-out loss and token
  accuracy on any format, and a greedy-generation metric only when one is given (``--eval_metric``; on
  the toy task ``auto`` is its exact match). A single data file has no held-out split: pass
  ``--eval_dataset`` (nothing is evaluated otherwise, and the run says so).

Run:
    python recipes/sft.py                                   # tiny model, toy addition task, 3000 steps (~2 min on 2 CPU cores)
    python recipes/sft.py --model Qwen/Qwen2.5-0.5B --dataset trl-lib/Capybara --lr 2e-5 --batch_size 4 \\
        --grad_accum_steps 8 --max_length 1024 --max_steps 1000 --eval_split none --output_dir outputs/qwen-sft
    python recipes/sft.py --model ./my-model --dataset data.jsonl --eval_dataset heldout.jsonl --lora_r 16
    python recipes/sft.py --resume                          # continue the latest checkpoint of --output_dir
Several processes: ``torchrun --nproc_per_node 2 recipes/sft.py`` trains on the same global batch (each process
takes its half of every micro-batch); ``--sharding fsdp2`` shards the weights (rlcore.distributed).
Measured results: docs/results.md. The output directory is a transformers model directory
(``--model OUTPUT_DIR`` in the next recipe); run settings in OUTPUT_DIR/run_config.json.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlcore import (
    data,
    distributed,
    evaluation,
    guards,
    lora,
    models,
    optim,
    runtime,
    sft_loss,
    sft_loss_from_logprobs,
    tracking,
)
from rlcore.config import TrainConfig, parse_config
from rlcore.run import Run, cli
from rlcore.task import load_task_rows, metric_value


@dataclass
class SFTConfig(TrainConfig):
    dataset: str = "toy:prompt_completion"  # prompt/completion, text or messages rows (plain or chat)
    output_dir: str = "outputs/sft"
    completion_only: bool = True  # train on completion tokens only (text data: every token anyway)
    packing: bool = False  # pack rows into bins of --max_length tokens (no attention across rows)
    padding_free: bool = False  # a micro-batch's rows end to end (fewer rows), attention within each (rlcore.packing)
    lr: float = 1e-3  # peak learning rate (AdamW)
    adam_beta2: float = 0.99  # AdamW beta2
    warmup_steps: int = 100  # linear warmup steps
    batch_size: int = 32  # rows per micro-batch (bins with --packing)
    max_steps: int = 3000  # optimizer steps
    logging_steps: int = 25  # log the mean of the metrics over this many steps
    eval_steps: int = 500  # evaluate every N steps (0 = only at the start and end)
    max_new_tokens: int = 8  # completion length limit of the greedy-generation metric

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.packing and self.padding_free:
            raise ValueError("--packing and --padding_free are two ways to drop padding: choose one")


def main(argv: list[str] | None = None) -> dict[str, float]:
    config = parse_config(SFTConfig, argv)
    device, bf16 = runtime.setup(config)

    # ---------------------------------------------------------------- data (checked first), model
    rows, eval_rows, metric = load_task_rows(config, data.SFT_FORMATS)
    model, tokenizer = models.load_policy(config.model, device=device, **models.load_options(config))
    model = lora.prepare_model(
        model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_targets, config.load_in_4bit
    )
    if config.gradient_checkpointing:
        models.enable_gradient_checkpointing(model)
    model = distributed.prepare(model, config.sharding, bf16)  # torchrun: same weights on every process (or FSDP2)
    model.train()
    pad_id = tokenizer.pad_token_id
    train = data.tokenize_sft(rows, tokenizer, config.max_length, config.completion_only, truncation=config.truncation)
    train_ids, train_masks = list(train["input_ids"]), list(train["completion_mask"])  # python lists of token lists
    guards.check_completions(train_masks)  # rows left without a completion token: counted, refused if all
    packed = (
        data.pack_sequences(train, config.max_length, pad_id) if config.packing else None
    )  # each [bins, max_length]
    runtime.prefer_eager_attention(model, device, config.max_length if config.packing else max(map(len, train_ids)))
    forward = runtime.maybe_compile(model, device, config.compile)
    chunked = config.lm_head_chunk > 0 and models.chunked_head_supported(model)
    num_samples = len(packed["input_ids"]) if config.packing else len(train)
    if eval_rows is not None:
        eval_tokens = data.tokenize_sft(
            eval_rows, tokenizer, config.max_length, config.completion_only, truncation=config.truncation
        )
        eval_prompts = (
            data.tokenize_prompts(eval_rows, tokenizer, config.max_length, truncation=config.truncation)
            if metric
            else None
        )

    def evaluate() -> dict[str, float]:
        return {
            **evaluation.sft_metrics(model, eval_tokens, pad_id, config.eval_batch_size),
            **metric_value(model, tokenizer, eval_prompts, metric, config),
        }

    optimizer, scheduler = optim.from_flags(
        model, config, num_rows=num_samples, rows_per_step=config.batch_size * config.grad_accum_steps
    )
    evaluate = evaluate if eval_rows is not None else None
    run = Run(config, model, tokenizer, optimizer, scheduler, evaluate=evaluate, guard=guards.supervised(config))

    def micro_batch(indices: list[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """(model inputs [B, T-1], loss positions [N, 2], loss tokens [N]), all built on the host (no device sync).

        Position t predicts token t + 1, so each row's last token predicts nothing and is not fed (causal
        attention: the other positions' logits are unchanged); ``loss_positions`` holds the (row, t) whose
        next token is a loss token.
        """
        if config.packing:  # no attention mask: position ids mark the row boundaries
            batch = {k: packed[k][indices] for k in ("input_ids", "position_ids", "completion_mask")}
        else:
            batch = data.collate_right([train_ids[i] for i in indices], [train_masks[i] for i in indices], pad_id)
        if config.padding_free:  # rows end to end: each attends to itself, positions restart (rlcore.packing)
            loss_mask = batch["completion_mask"] * (torch.arange(batch["input_ids"].shape[1]) > 0)  # not first tokens
            flat = models.packed_batch(
                model,
                *(batch[k].to(device) for k in ("input_ids", "attention_mask")),
                loss_mask.to(device),
                padding_free=True,
            )
            return models.packed_inputs(model, flat), flat.positions, flat.targets
        loss_mask = batch.pop("completion_mask")[:, 1:].bool()  # [B, T-1]
        labels = batch["input_ids"][:, 1:][loss_mask]  # [N]
        inputs = {k: v[:, :-1].to(device) for k, v in batch.items()}  # [B, T-1] each
        return inputs, loss_mask.nonzero().to(device), labels.to(device)

    # ---------------------------------------------------------------- training loop
    while run.running():
        micro_batches = runtime.step_batches(
            num_samples, config.batch_size, config.grad_accum_steps, config.seed, run.step
        )
        window = [index for indices in micro_batches for index in indices]
        if config.packing:  # loss tokens of the whole step: the normaliser of every micro-batch's token sum
            normalizer = max(1, int(packed["completion_mask"][window].sum()))
        else:
            normalizer = optim.loss_tokens([train_masks[i] for i in window])
        normalizer = distributed.rank_normalizer(normalizer)  # torchrun: this process's share of the step's tokens
        stats: dict[str, torch.Tensor] = {}
        tokens = 0  # this process's loss tokens in the step
        for indices in micro_batches:
            inputs, loss_positions, labels = micro_batch(distributed.shard(indices))  # torchrun: this process's rows
            if chunked:  # the LM head at the loss positions only, chunk-wise: no [B, T-1, V] logits
                with runtime.autocast(device, bf16):
                    logp, extras = models.position_logprobs(
                        forward,
                        **inputs,
                        positions=loss_positions,
                        targets=labels,
                        chunk_size=config.lm_head_chunk,
                        with_argmax=True,
                    )  # [N]
                loss, _ = sft_loss_from_logprobs(logp, torch.ones_like(logp), normalizer=normalizer)  # [N] tokens
                correct = extras["argmax"].float().sum()
            else:
                with runtime.autocast(device, bf16):
                    logits = forward(**inputs, use_cache=False).logits  # [B, T-1, V]
                rows, columns = loss_positions.unbind(1)  # [N] each
                loss, loss_stats = sft_loss(logits[rows, columns], labels, normalizer=normalizer)  # [N, V], [N]
                correct = loss_stats["token_accuracy"] * len(labels)
            loss.backward()
            tracking.accumulate(stats, {"loss": loss.detach(), "token_accuracy": correct})  # the loss: the step's mean
            tokens += len(labels)
        stats["token_accuracy"] = stats["token_accuracy"] / max(1, tokens)  # over the step's loss tokens
        stats["grad_norm"] = optim.optimizer_step(model.parameters(), optimizer, scheduler, config.max_grad_norm)
        run.end_step(stats, counts={"token_accuracy": tokens})  # torchrun: over every process's tokens
    return run.finish()


if __name__ == "__main__":
    cli(main)
