"""Direct preference optimisation (DPO) and its family, from pairs of preferred and rejected completions.

    c = log pi(y_c | x) - log pi_ref(y_c | x),   r = log pi(y_r | x) - log pi_ref(y_r | x)
    sigmoid loss (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290):  -log sigmoid(beta * (c - r))

and every other ``--loss_type`` of ``rlcore.dpo_loss`` (robust, ipo, hinge, exo_pair, nca_pair, sppo_hard,
apo_zero, apo_down, bco_pair, aot, aot_unpaired, discopop, sigmoid_norm, sft; ``--label_smoothing`` for
cDPO/robust/exo/aot), or a weighted sum of several (MPO: ``--loss_type sigmoid:0.8,bco_pair:0.2,sft:1``).
Options as TRL's DPOTrainer names them: ``--f_divergence``/``--f_alpha`` (f-DPO), ``--discopop_tau``,
``--ld_alpha`` (LD-DPO: tokens beyond the shorter completion's length count ld_alpha times, for the policy and
the reference), ``--use_weighting`` (WPO pair weights), ``--rpo_alpha`` (RPO: + alpha * NLL of the chosen
tokens). Log-probs are sums over the completion tokens; ipo and sigmoid_norm divide by the token counts, as
TRL does. Chosen and rejected sequences go through the policy in ONE forward pass: [B] rows [prompt, chosen,
rejected] by default (--prefix_sharing; --no-prefix_sharing: [2B, T] padded rows), several pairs end to end in
rows of up to twice the padded width (--padding_free, on by default; rlcore.packing: the same log-probs and
gradients). The reference
pi_ref is, by choice:
- a frozen copy of the starting policy (full fine-tuning, the default);
- the same model with its adapters switched off (``--lora_r > 0``: no second model in memory);
- ``--precompute_ref``: reference log-probs of every training pair computed once before training, after
  which no reference model is kept.

Departures from the paper / TRL's DPOTrainer:
- ``--label_smoothing`` applies to sigmoid too (cDPO); ``--cdpo false`` gives TRL's sigmoid, which ignores it;
- the NLL of ``--rpo_alpha`` and of the ``sft`` loss type is the token mean over the chosen tokens of the whole
  optimizer step (TRL: of each micro-batch); with ``--use_weighting`` it is scaled by the micro-batch's mean pair
  weight (TRL 1.16 fails on that combination), which alone does not add up exactly under accumulation;
- ``--use_weighting`` takes log sum_v p^2 from one extra no-grad forward pass of the policy per micro-batch
  (TRL's fused LM head computes it in the training pass);
- evaluation scores plain summed log-probs (no LD-DPO, no WPO weights), and its loss leaves out the sft term;
- ``--rejected_from_policy`` (off by default): before training, the starting policy answers every training
  prompt greedily; where its answer differs from the chosen completion, that answer becomes the rejected
  completion (the errors the policy actually makes); elsewhere the dataset's rejected completion is kept;
- the embedded default starts from the same mid-schedule SFT checkpoint as the online recipes (1500 steps
  of ``recipes/sft.py`` with ``rlcore.config.ONLINE_WARM_START_FLAGS``, built once and cached, see
  ``rlcore.toy.warm_start``): DPO refines a policy that already answers, it does not teach addition;
- on CPU, pairs of at most 128 tokens use eager attention (``rlcore.runtime.prefer_eager_attention``:
  sdpa's CPU kernel is slower on short rows), as in ``recipes/sft.py``.

Evaluation, before the first step, every --eval_steps and at the end, on the held-out pairs of any
preference format (explicit or implicit prompt, plain or chat): the pairwise accuracy of the implicit
reward beta * (log pi - log pi_ref) (chosen above rejected), its mean margin and the DPO loss; and, when
the rows have a prompt and a metric is given (``--eval_metric``; ``auto`` on the toy task is its exact
match), that metric of greedy completions. Measured results: docs/results.md.

Run:
    python recipes/dpo.py                                  # tiny SFT model, toy pairs, 300 steps (+2 min SFT, once)
    python recipes/dpo.py --model outputs/sft              # from your SFT output (toy accuracy before -> after)
    python recipes/dpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/ultrafeedback_binarized \\
        --lr 5e-7 --batch_size 4 --grad_accum_steps 8 --max_length 1024 \\
        --max_steps 1000 --eval_split none --lora_r 16 --output_dir outputs/qwen-dpo
    python recipes/dpo.py --model ./sft --dataset pairs.jsonl --eval_dataset prompts.jsonl --precompute_ref
Several processes: ``torchrun --nproc_per_node 2 recipes/dpo.py`` (the same global batch; rlcore.distributed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rlcore import (
    data,
    distributed,
    dpo_loss,
    evaluation,
    guards,
    lora,
    models,
    optim,
    parse_loss_types,
    runtime,
    sft_loss_from_logprobs,
    toy,
    tracking,
    wpo_log_weights,
)
from rlcore.config import ONLINE_WARM_START_FLAGS, TrainConfig, parse_config
from rlcore.run import Run, cli
from rlcore.task import load_task_rows, metric_value


@dataclass
class DPOConfig(TrainConfig):
    dataset: str = "toy:preference"  # prompt/chosen/rejected (or chosen/rejected) rows, plain or chat
    output_dir: str = "outputs/dpo"
    warm_start_steps: int = 1500  # with --model tiny only: start from the online recipes' mid-schedule SFT checkpoint of N steps (cached); 0 = untrained
    beta: float = 0.1  # inverse temperature of the implicit reward (KL strength)
    loss_type: str = "sigmoid"  # one of rlcore.DPO_LOSS_TYPES, or a weighted sum "sigmoid:0.8,bco_pair:0.2,sft:1" (MPO)
    label_smoothing: float = 0.0  # conservative DPO / robust / exo_pair / aot epsilon
    cdpo: bool = True  # apply --label_smoothing to sigmoid (false: TRL's sigmoid, which ignores it)
    f_divergence: str = "reverse_kl"  # f-DPO regulariser: reverse_kl, forward_kl, js_divergence, alpha_divergence
    f_alpha: float = 0.5  # alpha of --f_divergence alpha_divergence
    discopop_tau: float = 0.05  # temperature of the discopop loss
    ld_alpha: float = 1.0  # LD-DPO: weight of the tokens beyond the shorter completion's length (1 = plain sums)
    use_weighting: bool = False  # WPO: weigh each pair by the policy's length-normalised probabilities
    rpo_alpha: float = 0.0  # RPO: add rpo_alpha * NLL of the chosen tokens (TRL's loss_type [..., "sft"]); 0 = off
    precompute_ref: bool = False  # compute reference log-probs once up front and keep no reference model
    rejected_from_policy: bool = False  # rejected = the starting policy's greedy answer where it differs from chosen
    prefix_sharing: bool = True  # the prompt once per pair: one sequence [prompt, chosen, rejected] (rlcore.packing)
    padding_free: bool = True  # several packed pairs per row (rows of 2 padded widths), attention kept within each
    lr: float = 5e-5  # peak learning rate (AdamW)
    warmup_steps: int = 10  # linear warmup steps
    batch_size: int = 32  # pairs per micro-batch
    max_steps: int = 300  # optimizer steps
    logging_steps: int = 10  # log the mean of the metrics over this many steps
    eval_steps: int = 100  # evaluate every N steps (0 = only at the start and end)
    max_new_tokens: int = 8  # completion length limit (on-policy rejected answers and the greedy metric)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.loss_types, self.loss_weights = parse_loss_types(self.loss_type)
        if self.beta <= 0:
            raise ValueError(f"--beta must be > 0, got {self.beta}")
        if not 0.0 <= self.ld_alpha <= 1.0:
            raise ValueError(f"--ld_alpha must be in [0, 1], got {self.ld_alpha}")
        zero = torch.zeros(1)  # dpo_loss's own checks (f-divergence support, smoothing, WPO with aot) on a dummy pair
        wpo = {"chosen_wpo_logweights": zero, "rejected_wpo_logweights": zero} if self.use_weighting else {}
        dpo_loss(
            *[zero] * 4, **self.loss_options(), chosen_lengths=zero, rejected_lengths=zero, chosen_nll=zero[0], **wpo
        )

    def loss_options(self) -> dict:
        """The keyword arguments of rlcore.dpo_loss that come straight from the flags."""
        return {
            "beta": self.beta,
            "loss_type": self.loss_types,
            "loss_weights": self.loss_weights,
            "label_smoothing": self.label_smoothing,
            "cdpo": self.cdpo,
            "f_divergence": self.f_divergence,
            "f_alpha": self.f_alpha,
            "discopop_tau": self.discopop_tau,
            "rpo_alpha": self.rpo_alpha,
        }


def main(argv: list[str] | None = None) -> dict[str, float]:
    config = parse_config(DPOConfig, argv)
    device, bf16 = runtime.setup(config)
    needs_nll = "sft" in config.loss_types or config.rpo_alpha > 0

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
    pairs = {name: list(train[name]) for name in ("prompt_ids", "chosen_ids", "rejected_ids")}  # python lists
    guards.check_pairs(pairs["chosen_ids"], pairs["rejected_ids"])  # identical or empty pairs: counted, refused if all

    def collate(indices: list[int]) -> dict[str, torch.Tensor]:
        batch = data.collate_preference(
            *([pairs[name][i] for i in indices] for name in ("prompt_ids", "chosen_ids", "rejected_ids")), pad_id
        )
        return {k: v.to(device) for k, v in batch.items()}  # each [2B, T]

    def completion_logps(forward, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        packing = {"shared_prefix": config.prefix_sharing, "padding_free": config.padding_free}
        return models.pair_logprobs(forward, batch, config.lm_head_chunk, config.ld_alpha, **packing)  # [2B], [2B, T-1]

    # ---------------------------------------------------------------- on-policy rejected answers and the reference
    # Both come from the starting policy, before any checkpoint is loaded, so a resumed run sees the same.
    if config.rejected_from_policy:
        answers = evaluation.greedy_completion_ids(
            model,
            tokenizer,
            pairs["prompt_ids"],
            batch_size=config.eval_batch_size,
            max_new_tokens=config.max_new_tokens,
        )
        mistakes = [i for i, answer in enumerate(answers) if answer and answer != pairs["chosen_ids"][i]]
        for i in mistakes:
            pairs["rejected_ids"][i] = answers[i]
        print(
            f"rejected_from_policy: the starting policy is wrong on {len(mistakes)} of {len(answers)} training prompts"
        )
    longest = max(
        len(p) + max(len(c), len(r)) for p, c, r in zip(pairs["prompt_ids"], pairs["chosen_ids"], pairs["rejected_ids"])
    )
    runtime.prefer_eager_attention(model, device, longest)  # CPU, short rows (before the reference is copied)
    reference = ref_logps = None
    if config.precompute_ref:  # the starting policy is the reference: score every pair with it once, now
        n, size = len(pairs["prompt_ids"]), config.eval_batch_size
        batches = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
        with models.eval_mode(model), runtime.autocast(device, bf16):  # the precision of the live reference
            ref_logps = torch.cat([completion_logps(model, collate(b))[0].float().view(2, -1) for b in batches], 1)
    elif config.lora_r == 0:  # with LoRA the reference is the model with its adapters off
        reference = models.frozen_copy(model)
    if eval_rows is not None:
        eval_pairs = data.tokenize_preference(eval_rows, tokenizer, config.max_length, truncation=config.truncation)
        eval_ref_logps = evaluation.preference_logps(model, eval_pairs, pad_id, config.eval_batch_size)  # [2, N]
        eval_prompts = (
            data.tokenize_prompts(eval_rows, tokenizer, config.max_length, truncation=config.truncation)
            if metric
            else None
        )
        # the held-out loss: the preference terms (no sft term, no WPO weights), on plain summed log-probs
        kept = [(n, w) for n, w in zip(config.loss_types, config.loss_weights) if n != "sft"] or [("sigmoid", 1.0)]
        eval_options = config.loss_options() | {"rpo_alpha": 0.0, "loss_type": [n for n, _ in kept]}
        eval_options["loss_weights"] = [w for _, w in kept]
        for name in ("chosen", "rejected"):  # completion token counts (ipo, sigmoid_norm)
            eval_options[f"{name}_lengths"] = torch.tensor(
                [len(ids) for ids in eval_pairs[f"{name}_ids"]], device=device
            )

    def evaluate() -> dict[str, float]:
        logps = evaluation.preference_logps(model, eval_pairs, pad_id, config.eval_batch_size)
        return {
            **evaluation.dpo_metrics(logps, eval_ref_logps, **eval_options),
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
            batch = collate(indices)
            if ref_logps is not None:
                ref_chosen, ref_rejected = ref_logps[:, indices]  # [B], [B]
            else:
                with (
                    lora.reference_context(model, reference) as ref_model,
                    torch.no_grad(),
                    runtime.autocast(device, bf16),
                ):
                    ref_chosen, ref_rejected = completion_logps(ref_model, batch)[0].float().chunk(2)
            with runtime.autocast(device, bf16):
                logps, token_logp = completion_logps(forward, batch)
            chosen, rejected = logps.float().chunk(2)  # [B], [B]
            mask = batch["completion_mask"][:, 1:]  # [2B, T-1]
            chosen_lengths, rejected_lengths = mask.sum(-1).chunk(2)  # [B], [B] (ipo, sigmoid_norm)
            extra: dict[str, torch.Tensor] = {}
            if needs_nll:  # NLL of the chosen tokens over the step's chosen-token count (x accum: / accum below)
                nll, _ = sft_loss_from_logprobs(token_logp.chunk(2)[0], mask.chunk(2)[0], normalizer=chosen_tokens)
                extra["chosen_nll"] = nll * config.grad_accum_steps
            if config.use_weighting:  # WPO: log sum_v p^2 of the policy, one extra no-grad pass
                with runtime.autocast(device, bf16):
                    log_sum_sq = models.log_sum_squared_token_probs(
                        model, batch["input_ids"], batch["attention_mask"], last=mask.shape[1]
                    )  # [2B, T-1]
                log_weights = wpo_log_weights(token_logp.float(), log_sum_sq, mask).chunk(2)  # [B], [B]
                extra["chosen_wpo_logweights"], extra["rejected_wpo_logweights"] = log_weights
            loss, loss_stats = dpo_loss(
                chosen,
                rejected,
                ref_chosen,
                ref_rejected,
                **config.loss_options(),
                chosen_lengths=chosen_lengths,
                rejected_lengths=rejected_lengths,
                **extra,
            )
            if needs_nll:
                loss_stats["sft_nll"] = extra["chosen_nll"].detach()
            loss = loss / config.grad_accum_steps  # equal-size micro-batches: the sum is the step's mean
            loss.backward()
            tracking.accumulate(
                stats, {"loss": loss.detach() * config.grad_accum_steps, **loss_stats}, 1 / config.grad_accum_steps
            )
        stats["grad_norm"] = optim.optimizer_step(model.parameters(), optimizer, scheduler, config.max_grad_norm)
        run.end_step(stats)
    return run.finish()


if __name__ == "__main__":
    cli(main)
