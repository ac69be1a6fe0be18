"""On-policy distillation (GKD): the student samples, the teacher scores every token, the student moves toward it.

Each step takes P prompts. With probability --lmbda the student samples a completion for each with rlcore's
rollout engine (on-policy); otherwise the dataset's own completions are used (supervised distillation).
Both models read the same tokens, and the loss is the generalised Jensen-Shannon divergence between their
next-token distributions at every completion position:

    loss = sum_{rows, t} m_t JSD_beta( pi_student(. | x, y_<t) || pi_teacher(. | x, y_<t) ) / sum m_t
    JSD_beta: beta = 0 forward KL(teacher || student), beta = 1 reverse KL(student || teacher),
              in between beta KL(T || M) + (1 - beta) KL(S || M) with M = beta T + (1 - beta) S

(GKD, Agarwal et al. 2024, https://arxiv.org/abs/2306.13649; TRL's GKDTrainer; on-policy distillation with
reverse KL, beta = 1, as in Lu and Thinking Machines 2025). The divergence is ``rlcore.distillation_loss``:
both models run their transformer body only, and the two LM heads are applied chunk by chunk at the
completion positions, so neither model's [B, T, V] logits are ever held. The mean is over every completion
token of an optimizer step (all micro-batches are sampled first), so --grad_accum_steps is exact.

Departures: the on-policy/off-policy draw is made once per optimizer step (GKD draws per batch), from a
generator seeded by --seed and the step, so a resumed run draws the same; sampling and the loss use the same
--temperature (as TRL); the teacher must share the student's tokenizer (same vocabulary size is checked).
The teacher is frozen, so its precision is free of the student's: --teacher_dtype bfloat16 halves its
weights, --teacher_load_in_4bit holds them in nf4 (about a quarter; its LM head stays in --teacher_dtype).

The embedded default: the teacher is the toy task's SFT warm start of --teacher_steps (1500) steps, the
one the online recipes start from (``rlcore.toy.warm_start``, cached); the student is an earlier SFT run of
--warm_start_steps (700) steps with the same flags. Evaluation (before the first step, every --eval_steps,
at the end): the student's held-out SFT loss and token accuracy on the dataset's completions and its greedy
exact match (``--eval_metric``); the teacher's, once, at the start (printed).

Run it:
    python recipes/distill.py                                   # the toy default: 1500-step teacher, 700-step student
    python recipes/distill.py --beta 0 --lmbda 0                # supervised KD: forward KL on the dataset's completions
    python recipes/distill.py --model Qwen/Qwen2.5-0.5B-Instruct --teacher Qwen/Qwen2.5-7B-Instruct \
        --dataset prompts_and_answers.jsonl --max_new_tokens 256 --batch_size 8 --grad_accum_steps 4 --lora_r 16
Several processes: ``torchrun --nproc_per_node 2 recipes/distill.py`` (the same global batch; each process samples
and scores its rows; rlcore.distributed); ``--sharding fsdp2`` shards the student (the LM head's weight is
read right after the student's forward, while FSDP2 holds it gathered). Measured results: docs/results.md.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from rlcore import data, distillation_loss, distributed, evaluation, guards, models, optim, runtime, tracking
from rlcore.config import ONLINE_WARM_START_FLAGS, OnlineConfig, parse_config
from rlcore.rollout import generate
from rlcore.run import Run, cli
from rlcore.task import load_start_policy, load_task_rows, metric_value
from rlcore.toy import warm_start


@dataclass
class DistillConfig(OnlineConfig):
    needs_reward = False  # the teacher is the signal
    dataset: str = "toy:prompt_completion"  # prompt/completion rows (plain or chat; completions for --lmbda < 1)
    reward_funcs: str | None = None  # not used (the teacher is the signal)
    output_dir: str = "outputs/distill"
    teacher: str = "tiny"  # a directory or hub id; "tiny" = the toy's SFT warm start of --teacher_steps steps
    teacher_steps: int = 1500  # with --teacher tiny: SFT steps of the teacher (the online recipes' cached warm start)
    teacher_dtype: str | None = None  # the frozen teacher's weights: float32, bfloat16 or float16 (None = --dtype)
    teacher_load_in_4bit: bool = False  # quantise the teacher to nf4 as it loads (--bnb_* flags apply; no LoRA needed)
    warm_start_steps: int = 700  # with --model tiny: the student is an SFT run of this many steps (cached)
    lmbda: float = 1.0  # fraction of steps on the student's samples (GKD's lambda); others: the dataset's
    beta: float = 1.0  # generalised JSD: 0 = forward KL(teacher || student), 1 = reverse KL(student || teacher)
    top_k: int = 0  # sampling: the k most likely tokens (0 = all)
    distill_top_k: int | None = None  # divergence over the teacher's k most likely tokens, renormalised (None = all)
    chunk_size: int = 1024  # completion positions per LM-head chunk of the loss
    lr: float = 3e-4  # peak learning rate (AdamW); the toy default's choice: docs/results.md
    lr_schedule: str = "constant"  # "cosine", "linear" or "constant"
    batch_size: int = 32  # prompts per micro-batch; prompts per step = batch_size * grad_accum_steps
    max_steps: int = 1000  # optimizer steps
    logging_steps: int = 10  # log the mean of the metrics over this many steps
    eval_steps: int = 250  # evaluate every N steps (0 = only at the start and end)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.lmbda <= 1.0 or not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"--lmbda and --beta must be in [0, 1], got {self.lmbda} and {self.beta}")
        if self.teacher_steps < 0 or self.chunk_size < 1 or (self.distill_top_k is not None and self.distill_top_k < 1):
            raise ValueError("--teacher_steps must be >= 0, --chunk_size >= 1 and --distill_top_k >= 1 (or none)")
        if self.teacher_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(
                f"--teacher_dtype must be float32, bfloat16 or float16 (or none), got {self.teacher_dtype!r}"
            )


def body_states(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L, H] final hidden states (after the final norm) of a causal LM's transformer body: the LM head runs on
    no position. One call of the top-level model (FSDP2 gathers its weights, the head's included, in its hooks)."""
    position_ids = models.position_ids_from_mask(attention_mask)
    return models.body_hidden_states(model, input_ids, attention_mask, position_ids)


def main(argv: list[str] | None = None) -> dict[str, float]:
    config = parse_config(DistillConfig, argv)
    device, bf16 = runtime.setup(config)

    # ---------------------------------------------------------------- data (checked first), student, teacher
    rows, eval_rows, metric = load_task_rows(config, ("prompt_completion",))
    if config.teacher != "tiny":  # a bad --teacher: one line now, not after the student's warm start
        try:
            models.load_tokenizer(config.teacher)
        except OSError as error:
            raise ValueError(f"--teacher {config.teacher}: {error}") from None
    sft_script = Path(__file__).with_name("sft.py")
    student, tokenizer, sampling = load_start_policy(config, device, sft_script)
    teacher_path = warm_start(config.teacher, config.teacher_steps, config.seed, sft_script, ONLINE_WARM_START_FLAGS)
    teacher = models.load_policy(teacher_path, device=device, **models.load_options(config, "teacher_"))[0]
    teacher.eval().requires_grad_(False)  # frozen: --teacher_dtype, --teacher_load_in_4bit (no gradient or state)
    student_head, teacher_head = student.get_output_embeddings(), teacher.get_output_embeddings()
    if student_head.weight.shape[0] != teacher_head.weight.shape[0]:
        raise ValueError(
            f"--teacher {config.teacher}: a vocabulary of {teacher_head.weight.shape[0]} tokens, the student's has "
            f"{student_head.weight.shape[0]}; the two models must share a tokenizer"
        )
    prompts = data.tokenize_prompts(rows, tokenizer, config.max_prompt_length, config.truncation)
    sft_rows = data.tokenize_sft(rows, tokenizer, config.max_length, truncation=config.truncation)  # same order
    guards.check_completions(sft_rows["completion_mask"])  # rows left without a completion token: refused if all
    if not len(prompts) == len(sft_rows) == len(rows):  # row i of both must be row i of the dataset
        raise ValueError(
            f"--dataset {config.dataset}: {len(rows) - min(len(prompts), len(sft_rows))} rows over --max_prompt_length "
            "or --max_length; raise them or pass --truncation keep_start or keep_end"
        )
    for model in (student, teacher):
        runtime.prefer_eager_attention(model, device, max(map(len, sft_rows["input_ids"])) + config.max_new_tokens)
    pad_id = tokenizer.pad_token_id
    if eval_rows is not None:
        eval_tokens = data.tokenize_sft(eval_rows, tokenizer, config.max_length, truncation=config.truncation)
        eval_prompts = (
            data.tokenize_prompts(eval_rows, tokenizer, config.max_prompt_length, config.truncation) if metric else None
        )

    def evaluate(model: torch.nn.Module = student) -> dict[str, float]:
        metrics = evaluation.sft_metrics(model, eval_tokens, pad_id, config.eval_batch_size)
        if config.num_generations_eval and metric is not None:  # pass@1 and pass@k of n samples per prompt
            sampling_flags = {
                k: getattr(config, k) for k in ("max_new_tokens", "temperature", "top_k", "top_p", "seed")
            }
            metrics |= evaluation.sampled_pass_at_k(
                model, tokenizer, eval_prompts, metric[1], config.num_generations_eval, **sampling_flags
            )
        return {**metrics, **metric_value(model, tokenizer, eval_prompts, metric, config)}

    if eval_rows is not None:
        print(f"teacher {teacher_path}: {evaluate(teacher)}", flush=True)
    student = distributed.prepare(student, config.sharding, bf16)  # torchrun: same weights on every process
    rows_per_step = config.batch_size * config.grad_accum_steps
    optimizer, scheduler = optim.from_flags(student, config, num_rows=len(prompts), rows_per_step=rows_per_step)
    run = Run(config, student, tokenizer, optimizer, scheduler, evaluate=evaluate if eval_rows is not None else None)

    def micro_batch(indices: list[int], on_policy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids [B, L], attention_mask [B, L], loss_mask [B, L - 1]): position t of the loss mask is 1
        where token t + 1 is a completion token (the student's sample, or the dataset's completion)."""
        if on_policy:  # left-padded prompt + the student's right-padded completion (the last T columns)
            batch = data.prompt_batch(prompts, indices, pad_id)
            with torch.no_grad():
                rollout = generate(
                    student,
                    batch.prompt_ids.to(device),
                    batch.prompt_mask.to(device),
                    **sampling,
                    **distributed.sampling_draws(len(indices), device),  # the samples do not depend on the processes
                )
            loss_mask = torch.zeros_like(rollout.sequences[:, 1:])  # [B, L - 1]
            loss_mask[:, -rollout.completion_mask.shape[1] :] = rollout.completion_mask
            return rollout.sequences, rollout.attention_mask, loss_mask
        selected = sft_rows[indices]
        batch = data.collate_right(selected["input_ids"], selected["completion_mask"], pad_id)  # right-padded
        return (
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            batch["completion_mask"][:, 1:].to(device),
        )

    # ---------------------------------------------------------------- training loop
    while run.running():
        on_policy = random.Random(f"{config.seed}-{run.step}").random() < config.lmbda  # the same draw on resume
        with run.timed("generation" if on_policy else "data"):
            step_rows = runtime.step_batches(
                len(prompts), config.batch_size, config.grad_accum_steps, config.seed, run.step
            )
            step_rows = [distributed.shard(indices) for indices in step_rows]  # torchrun: this process's rows
            batches = [micro_batch(indices, on_policy) for indices in step_rows]
        step_tokens = distributed.all_reduce_sum(sum(int(loss_mask.sum()) for _, _, loss_mask in batches))
        normalizer = distributed.rank_normalizer(max(1, int(step_tokens)))  # torchrun: this process's share
        stats: dict[str, torch.Tensor] = {"on_policy": torch.tensor(float(on_policy))}
        with run.timed("training"):
            for input_ids, attention_mask, loss_mask in batches:
                rows_, columns = loss_mask.nonzero().unbind(1)  # [N] each: hidden at t predicts token t + 1
                with torch.no_grad(), runtime.autocast(device, bf16):
                    teacher_hidden = body_states(teacher, input_ids, attention_mask)[rows_, columns]  # [N, H_t]
                with runtime.autocast(device, bf16):
                    student_hidden = body_states(student, input_ids, attention_mask)[rows_, columns]  # [N, H_s]
                loss, _ = distillation_loss(
                    student_hidden,
                    student_head.weight.to(student_hidden.dtype),
                    teacher_hidden,
                    teacher_head.weight.to(teacher_hidden.dtype),
                    beta=config.beta,
                    temperature=config.temperature,
                    top_k=config.distill_top_k,
                    chunk_size=config.chunk_size,
                    normalizer=normalizer,
                    student_bias=student_head.bias,
                    teacher_bias=teacher_head.bias,
                )
                loss.backward()  # the loss, summed over micro-batches: the step's mean divergence per token
                tracking.accumulate(stats, {"loss": loss.detach(), "completion_tokens": float(len(rows_))})
            stats["grad_norm"] = optim.optimizer_step(student.parameters(), optimizer, scheduler, config.max_grad_norm)
        run.end_step(stats)
    return run.finish()


if __name__ == "__main__":
    cli(main)
