"""Where a recipe's training step spends its time: process CPU seconds per step in each phase.

Runs ``recipes/{sft,dpo,grpo}.py`` as ``benchmarks/compare_trl.py`` times them (the same flags, one process)
with the phases wrapped by a process-time clock: the forward passes of the training log-probs, ``backward``,
the optimizer step (clipping, AdamW, schedule), generation (GRPO: decode-step set-up and prefill, decode loop),
reward scoring, packing (prefix sharing), collation and the per-step bookkeeping. Phases nest (the packing
is inside a forward, the decode loop inside generation), so the rows do not add up to the step.

    python benchmarks/step_split.py --part sft --steps 100 --threads 1
    python benchmarks/step_split.py --part grpo --steps 60 --threads 1 --model outputs/compare_trl/models/tiny-sft1500
"""

from __future__ import annotations

import collections
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_trl  # noqa: E402

from rlcore import data, decode, models, optim, rewards, rollout, run  # noqa: E402
from rlcore.config import parse_config  # noqa: E402

PHASES = [  # (module or class, function name, label)
    (models, "position_logprobs", "forward (body + chunked head)"),
    (torch.Tensor, "backward", "backward"),
    (optim, "optimizer_step", "optimizer step"),
    (rollout, "generate", "generation"),
    (rollout, "_native_prefill", "  decode-step set-up and prefill"),
    (decode.LlamaDecodeStep, "prefill", "    prefill"),
    (rollout, "_decode", "  decode loop"),
    (rewards, "score_rollout", "reward scoring"),
    (models, "pack_batch", "packing"),
    (data, "collate_right", "collation (sft)"),
    (data, "collate_preference", "collation (dpo)"),
    (run.Run, "end_step", "bookkeeping (end_step)"),
]


@dataclass
class SplitConfig:
    part: str = "sft"  # sft, dpo or grpo
    steps: int = 100  # optimizer steps (the first 5 are left out)
    threads: int = 1  # torch threads
    model: str = "tiny"  # "tiny" (the embedded model) or a model directory (DPO and GRPO: an SFT checkpoint)
    output_dir: str = "outputs/step_split"

    def __post_init__(self) -> None:
        if self.part not in compare_trl.PARTS:
            raise ValueError(f"--part must be one of {list(compare_trl.PARTS)}, got {self.part!r}")
        if self.steps < 10:
            raise ValueError(f"--steps must be >= 10, got {self.steps}")


def main(argv: list[str] | None = None) -> dict[str, float]:
    config = parse_config(SplitConfig, argv)
    torch.set_num_threads(config.threads)
    seconds: dict[str, float] = collections.defaultdict(float)
    step_ends: list[float] = []
    for owner, name, label in PHASES:
        setattr(owner, name, _clocked(getattr(owner, name), label, seconds, step_ends))
    model_dir = compare_trl.build_model("tiny", None) if config.model == "tiny" else config.model
    spec = dict(
        part=config.part,
        model_dir=model_dir,
        device="cpu",
        hyper=compare_trl.hyperparameters(config.part, "cpu"),
        steps=config.steps,
        budget_seconds=None,
        output_dir=config.output_dir,
    )
    compare_trl.train_rlcore(spec, lambda: step_ends.append(time.process_time()))
    timed_steps = len(step_ends) - 6
    per_step = {"step": (step_ends[-1] - step_ends[5]) / timed_steps}
    per_step |= {label: total / timed_steps for label, total in seconds.items()}
    print(f"\n{config.part}: process ms per step, mean of steps 6-{len(step_ends) - 1}, {config.threads} thread(s)")
    for label, value in per_step.items():
        print(f"{label:<32} {1000 * value:8.2f}")
    return per_step


def _clocked(function, label: str, seconds: dict[str, float], step_ends: list[float]):
    """``function`` adding its process time to ``seconds[label]`` once 5 steps have ended (warm-up left out)."""

    def clocked(*args, **kwargs):
        started = time.process_time()
        try:
            return function(*args, **kwargs)
        finally:
            if len(step_ends) > 5:
                seconds[label] += time.process_time() - started

    return clocked


if __name__ == "__main__":
    main()
