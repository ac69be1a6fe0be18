"""Direct preference optimisation (DPO) and its family, from pairs of preferred and rejected completions.

    c = log pi(y_c | x) - log pi_ref(y_c | x),   r = log pi(y_r | x) - log pi_ref(y_r | x)
    sigmoid loss (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290):  -log sigmoid(beta * (c - r))

and every other ``--loss_type`` of ``rlcore.dpo_loss`` (robust, ipo, hinge, exo_pair, nca_pair, sppo_hard,
apo_zero, apo_down; ``--label_smoothing`` for cDPO/robust/exo). Log-probs are sums over the completion
tokens (length-averaged for ipo, as TRL does). Chosen and rejected sequences go through the policy in ONE
forward pass ([2B, T]). The reference pi_ref is, by choice:
- a frozen copy of the starting policy (full fine-tuning, the default);
- the same model with its adapters switched off (``--lora_r > 0``: no second model in memory);
- ``--precompute_ref``: reference log-probs of every training pair computed once before training, after
  which no reference model is kept.

Departures from the paper / TRL's DPOTrainer:
- ``--sft_weight W`` adds W times the token-mean NLL of the chosen completions to the loss (RPO, Pang et
  al. 2024, https://arxiv.org/abs/2404.19733; TRL: ``loss_type=["sigmoid", "sft"]``); off by default;
- ``--rejected_from_policy`` (off by default): before training, the starting policy answers every training
  prompt greedily; where its answer differs from the chosen completion, that answer becomes the rejected
  completion (the errors the policy actually makes); elsewhere the dataset's rejected completion is kept;
- the embedded default starts from the same mid-schedule SFT checkpoint as the online recipes (1500 steps
  of ``recipes/sft.py`` with ``rlcore.online.ONLINE_WARM_START_FLAGS``, built once and cached, ~42-50%
  greedy test accuracy): DPO refines a policy that already answers, it does not teach addition;
- on CPU, pairs of at most 128 tokens use eager attention (``rlcore.runtime.prefer_eager_attention``:
  sdpa's CPU kernel is slower on short rows), as in ``recipes/sft.py``.

Measured on the toy task (500 test problems, greedy exact match; 2 shared CPU cores), from a build of
that checkpoint at 42.2%, 300 steps of 32 pairs (``--model <checkpoint> --max_seconds none``):
    plain DPO, the dataset's perturbed rejected answers (the default)   lr 1e-4: 47.2%   lr 5e-5: 48.2%
        the same with --seed 1 (another data order)                      lr 1e-4: 47.6%   lr 5e-5: 47.8%
    plain DPO, --rejected_from_policy                                    lr 1e-4: 44.8%   lr 5e-5: 44.2%
    --rejected_from_policy, 1000 steps at lr 1e-4                        40.2%
    --rejected_from_policy --sft_weight 1 (RPO)                          51.6%
    no preference term: recipes/sft.py for 300 steps at lr 1e-4         51.6%
Plain DPO raises accuracy by ~5 points within the first 100-300 steps and then drifts; pushing down the
policy's own greedy mistakes lowers the chosen answers' likelihood too and helps less. With the NLL term
the gain equals that of continuing SFT alone: the checkpoint is mid-schedule, and more supervised steps
help it as much.

The default run, ``python recipes/dpo.py`` (building the checkpoint first: 1500 SFT steps in 107 s), took
toy test accuracy from 46.2% to 49.4% in 300 steps (42 s of training, 174 s wall in all, load average
2.3-4.0 on the 2 cores). From the output of the default ``recipes/sft.py`` run instead (61.2%, further
along its schedule), ``--model outputs/sft`` gave 62.4%: a gain within the noise of 500 problems.

Run:
    python recipes/dpo.py                                  # tiny SFT model, toy pairs, ~1 min (+2 min SFT, once)
    python recipes/dpo.py --model outputs/sft              # from your SFT output (toy accuracy before -> after)
    python recipes/dpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/ultrafeedback_binarized \\
        --lr 5e-7 --batch_size 4 --grad_accum_steps 8 --max_length 1024 \\
        --max_steps 1000 --eval_split none --lora_r 16 --output_dir outputs/qwen-dpo
    python recipes/dpo.py --model ./sft --dataset pairs.jsonl --eval_dataset prompts.jsonl --precompute_ref
Several GPUs: single process for now.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlcore import DPO_LOSS_TYPES, dpo_loss, gather_logprobs, masked_mean, sft_loss_from_logprobs
from rlcore.checkpoint import load_checkpoint, resolve_resume, save_checkpoint, save_final_model
from rlcore.config import TrainConfig, parse_config, save_config
from rlcore.data import collate_preference, load_rows, tokenize_preference
from rlcore.evaluation import greedy_completion_ids, toy_accuracy
from rlcore.lora import prepare_model, reference_context
from rlcore.models import load_policy
from rlcore.online import ONLINE_WARM_START_FLAGS, warm_start
from rlcore.optim import build_optimizer, build_scheduler, optimizer_step
from rlcore.runtime import (autocast, maybe_compile, prefer_eager_attention, resolve_device, seed_everything, step_batches,
                            use_bf16)
from rlcore.tracking import Tracker


@dataclass
class DPOConfig(TrainConfig):
    dataset: str = "toy:preference"  # prompt/chosen/rejected (or chosen/rejected) rows, plain or chat
    output_dir: str = "outputs/dpo"
    warm_start_steps: int = 1500  # with --model tiny only: start from the online recipes' mid-schedule SFT checkpoint of N steps (cached); 0 = untrained
    beta: float = 0.1  # inverse temperature of the implicit reward (KL strength)
    loss_type: str = "sigmoid"  # one of rlcore.DPO_LOSS_TYPES
    label_smoothing: float = 0.0  # conservative DPO / robust / exo_pair epsilon
    sft_weight: float = 0.0  # add sft_weight * NLL of the chosen tokens (RPO; TRL's loss_type [..., "sft"]); 0 = plain DPO
    precompute_ref: bool = False  # compute reference log-probs once up front and keep no reference model
    rejected_from_policy: bool = False  # rejected = the starting policy's greedy answer where it differs from chosen
    lr: float = 5e-5  # peak learning rate (AdamW)
    warmup_steps: int = 10  # linear warmup steps
    batch_size: int = 32  # pairs per micro-batch
    max_steps: int = 300  # optimizer steps
    max_seconds: float | None = 170.0  # stop early (evaluate and save) after this much training time
    logging_steps: int = 10  # log the mean of the metrics over this many steps
    eval_steps: int = 100  # evaluate every N steps (0 = only at the start and end)
    max_new_tokens: int = 8  # completion length limit (on-policy rejected answers and evaluation)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"--loss_type must be one of {', '.join(DPO_LOSS_TYPES)}; got {self.loss_type!r}")
        if self.beta <= 0:
            raise ValueError(f"--beta must be > 0, got {self.beta}")


def completion_logps(model, batch: dict[str, torch.Tensor], average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the completions of a ``collate_preference`` batch, from one forward pass.

    Returns:
        ([2B] sum (or mean) over each completion's tokens, [2B, T-1] per-token log-probs of the next tokens,
        zero outside the completions).
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    mask = batch["completion_mask"][:, 1:]  # [2B, T-1]
    token_logps = gather_logprobs(logits[:, :-1], batch["input_ids"][:, 1:]) * mask  # [2B, T-1]
    return (masked_mean(token_logps, mask, dim=1) if average else token_logps.sum(dim=1)), token_logps


def main(argv: list[str] | None = None) -> dict[str, float]:
    config = parse_config(DPOConfig, argv)
    seed_everything(config.seed)
    device = resolve_device(config.device)
    bf16 = use_bf16(device, config.bf16)
    average = config.loss_type == "ipo"  # IPO takes length-averaged log-probs

    # ---------------------------------------------------------------- model and data
    start_model = warm_start(config.model, config.warm_start_steps, config.seed, Path(__file__).with_name("sft.py"),
                             ONLINE_WARM_START_FLAGS)
    model, tokenizer = load_policy(start_model, device=device)
    model = prepare_model(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_targets, config.load_in_4bit)
    pad_id = tokenizer.pad_token_id
    train = tokenize_preference(load_rows(config.dataset, config.train_split, config.num_train_rows), tokenizer, config.max_length)
    pairs = {name: list(train[name]) for name in ("prompt_ids", "chosen_ids", "rejected_ids")}  # python lists
    eval_rows = None
    if config.eval_split != "none":
        eval_rows = load_rows(config.eval_dataset or config.dataset, config.eval_split, config.num_eval_rows)

    def collate(indices: list[int]) -> dict[str, torch.Tensor]:
        batch = collate_preference(*([pairs[name][i] for i in indices] for name in ("prompt_ids", "chosen_ids", "rejected_ids")), pad_id)
        return {k: v.to(device) for k, v in batch.items()}  # each [2B, T]

    # ---------------------------------------------------------------- on-policy rejected answers and the reference
    # Both come from the starting policy, before any checkpoint is loaded, so a resumed run sees the same.
    if config.rejected_from_policy:
        answers = greedy_completion_ids(model, tokenizer, pairs["prompt_ids"], batch_size=config.eval_batch_size,
                                        max_new_tokens=config.max_new_tokens)
        mistakes = [i for i, answer in enumerate(answers) if answer and answer != pairs["chosen_ids"][i]]
        for i in mistakes:
            pairs["rejected_ids"][i] = answers[i]
        print(f"rejected_from_policy: the starting policy is wrong on {len(mistakes)} of {len(answers)} training prompts")
    longest = max(len(p) + max(len(c), len(r)) for p, c, r in zip(pairs["prompt_ids"], pairs["chosen_ids"], pairs["rejected_ids"]))
    prefer_eager_attention(model, device, longest)  # CPU, short rows (before the reference is copied)
    reference = ref_logps = None
    if config.precompute_ref:  # the starting policy is the reference: score every pair with it once, now
        model.eval()
        num_pairs = len(pairs["prompt_ids"])
        ref_logps = torch.empty(2, num_pairs, device=device)  # [chosen/rejected, N]
        for start in range(0, num_pairs, config.eval_batch_size):
            rows = list(range(start, min(start + config.eval_batch_size, num_pairs)))
            with torch.no_grad(), autocast(device, bf16):
                ref_logps[:, rows] = completion_logps(model, collate(rows), average)[0].float().view(2, -1)
    elif config.lora_r == 0:  # with LoRA the reference is the model with its adapters off
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()
    forward = maybe_compile(model, device, config.compile)

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
    tracker = Tracker(config.output_dir, config.max_steps, start_step, bar_keys=("loss", "rewards/accuracies"))

    def evaluate(step: int) -> dict[str, float]:
        if eval_rows is None:
            return {}
        accuracy = toy_accuracy(model, tokenizer, eval_rows, config.eval_batch_size, config.max_new_tokens)
        return tracker.log_eval(step, {"accuracy": accuracy})

    if start_step == 0:
        evaluate(0)  # the starting policy's accuracy: the "before" of before -> after

    # ---------------------------------------------------------------- training loop
    step, results, evaluated_at = start_step, {}, None
    while step < config.max_steps and (config.max_seconds is None or training_seconds < config.max_seconds):
        started = time.perf_counter()
        stats: dict[str, torch.Tensor] = {}
        micro_batches = step_batches(len(pairs["prompt_ids"]), config.batch_size, config.grad_accum_steps, config.seed, step)
        chosen_tokens = sum(len(pairs["chosen_ids"][i]) for indices in micro_batches for i in indices)
        for indices in micro_batches:
            batch = collate(indices)
            if ref_logps is not None:
                ref_chosen, ref_rejected = ref_logps[:, indices]  # [B], [B]
            else:
                with reference_context(model, reference) as ref_model, autocast(device, bf16):
                    ref_chosen, ref_rejected = completion_logps(ref_model, batch, average)[0].float().chunk(2)
            with autocast(device, bf16):
                logps, token_logps = completion_logps(forward, batch, average)
            chosen, rejected = logps.float().chunk(2)  # [B], [B]
            loss, loss_stats = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=config.beta,
                                        loss_type=config.loss_type, label_smoothing=config.label_smoothing)
            loss = loss / config.grad_accum_steps  # equal-size micro-batches: the sum is the step's mean
            if config.sft_weight:  # NLL of the chosen tokens, normalised by the step's chosen-token count
                chosen_mask = batch["completion_mask"][:, 1:].chunk(2)[0]
                nll, _ = sft_loss_from_logprobs(token_logps.chunk(2)[0], chosen_mask, normalizer=chosen_tokens)
                loss = loss + config.sft_weight * nll
                loss_stats["sft_nll"] = nll.detach() * config.grad_accum_steps
            loss.backward()
            for key, value in {"loss": loss.detach() * config.grad_accum_steps, **loss_stats}.items():
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
                            extra_state={"training_seconds": training_seconds}, keep_last=config.save_total_limit)

    # ---------------------------------------------------------------- final evaluation and model
    tracker.log(step)
    print(f"trained {step} steps in {training_seconds:.0f} s")
    if evaluated_at != step:
        results = evaluate(step)
    save_final_model(model, tokenizer, config.output_dir)
    tracker.close()
    print(f"final model: {config.output_dir}")
    return results


if __name__ == "__main__":
    main()
