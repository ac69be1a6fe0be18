"""Where a recipe's training step spends its time: process CPU seconds per step in each phase.

Runs ``recipes/{sft,dpo,grpo}.py`` as ``benchmarks/compare_trl.py`` times them (the same flags, one process)
with the phases wrapped by a process-time clock: the forward passes of the training log-probs, ``backward``,
the optimizer step (clipping, AdamW, schedule), generation (GRPO: decode-step set-up and prefill, decode loop),
reward scoring, packing (prefix sharing), collation and the per-step bookkeeping. Phases nest (the packing
is inside a forward, the decode loop inside generation), so the rows do not add up to the step.

``--off`` measures what an exact shortcut buys, side by side in one process: steps alternate, two at a time,
between the code as it is and the code with the named shortcuts turned off, and the table gets a column
for each and their ratio (the machine's drift falls on both alike). Shortcuts: ``scored_layer`` (the last
decoder layer at the scored positions only, ``rlcore.last_layer``), ``fewest_tokens`` (padding-free rows
as wide as feeds the fewest tokens, ``rlcore.packing``), ``unread_tokens`` (packed rows without the tokens
after the one before a sequence's last scored token, ``rlcore.packing._tokens_read``), ``clip_skip`` (no
scaling of the gradients by 1, ``rlcore.optim.clip_gradients``), ``flush_denormal`` (subnormal floats
computed as zero, ``rlcore.runtime.flush_denormals``; one thread, as the setting is the thread's),
``transposed_weights`` (the native decode step's contiguous ``W^T`` copies, ``rlcore.decode._operand``; off:
the transposed views).

    python benchmarks/step_split.py --part sft --steps 100 --threads 1
    python benchmarks/step_split.py --part grpo --steps 60 --threads 1 --model outputs/compare_trl/models/tiny-sft1500
    python benchmarks/step_split.py --part sft --steps 200 --off scored_layer,clip_skip
    python benchmarks/step_split.py --part dpo --steps 40 --off flush_denormal --model outputs/compare_trl/models/20m-sft1500
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

from rlcore import data, decode, models, optim, packing, rewards, rollout, run, runtime  # noqa: E402
from rlcore.config import parse_config  # noqa: E402
from rlcore.run import cli  # noqa: E402

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
    off: str = ""  # comma-separated shortcuts to compare against (see the module docstring)

    def __post_init__(self) -> None:
        if self.part not in compare_trl.PARTS:
            raise ValueError(f"--part must be one of {list(compare_trl.PARTS)}, got {self.part!r}")
        if self.steps < 10:
            raise ValueError(f"--steps must be >= 10, got {self.steps}")
        unknown = sorted(set(_names(self.off)) - set(SHORTCUTS) - {"flush_denormal"})
        if unknown:
            raise ValueError(
                f"--off: unknown shortcuts {unknown}; choose from {sorted(SHORTCUTS) + ['flush_denormal']}"
            )
        if "flush_denormal" in _names(self.off) and self.threads != 1:
            raise ValueError("--off flush_denormal needs --threads 1 (the setting is per thread)")


SHORTCUTS = {  # name -> (owner, function, its stand-in without the shortcut)
    "scored_layer": (models, "scored_layer_unsupported", lambda original: lambda model: "turned off"),
    "fewest_tokens": (packing, "_fewest_tokens_capacity", lambda original: lambda sizes, capacity: capacity),
    "unread_tokens": (packing, "_tokens_read", lambda original: lambda wanted, length: length),
    "transposed_weights": (decode, "_operand", lambda original: lambda weight: weight.t()),
    "clip_skip": (
        optim,
        "clip_gradients",
        lambda original: lambda params, max_norm, total, norm: original(params, max_norm, total, float("inf")),
    ),
}


def _names(text: str) -> list[str]:
    return [name for name in text.split(",") if name]


def main(argv: list[str] | None = None) -> dict[str, float]:
    config = parse_config(SplitConfig, argv)
    torch.set_num_threads(config.threads)
    modes = ["as is", "off"] if config.off else ["as is"]
    state = {"mode": "as is"}
    seconds: dict[tuple[str, str], float] = collections.defaultdict(float)
    step_ends: list[float] = []
    shortcuts = [SHORTCUTS[name] for name in set(_names(config.off)) & set(SHORTCUTS)]
    originals = [(owner, name, getattr(owner, name)) for owner, name, *_ in PHASES + shortcuts]
    for owner, name, label in PHASES:
        setattr(owner, name, _clocked(getattr(owner, name), label, seconds, step_ends, state))
    for owner, function, stand_in in shortcuts:
        original, replacement = getattr(owner, function), stand_in(getattr(owner, function))
        setattr(owner, function, _switched(original, replacement, state))
    spec = compare_trl.in_process_spec(config.part, config.model, config.steps, config.output_dir)
    step_modes: list[str] = []

    def step_end() -> None:
        step_ends.append(time.process_time())
        step_modes.append(state["mode"])
        state["mode"] = modes[(len(step_ends) // 2) % len(modes)]  # two steps each, alternating
        if "flush_denormal" in _names(config.off):
            runtime.flush_denormals(state["mode"] == "as is")

    try:
        compare_trl.train_rlcore(spec, step_end)
    finally:  # this process's functions as they were (step_split.main may run inside another program)
        for owner, name, original in originals:
            setattr(owner, name, original)
        runtime.flush_denormals(True)  # what the recipe set, whichever mode the last step ran in
    durations = collections.defaultdict(list)
    for index in range(6, len(step_ends)):
        durations[step_modes[index]].append(step_ends[index] - step_ends[index - 1])
    table = {mode: {"step": sum(durations[mode]) / len(durations[mode])} for mode in modes}
    for (mode, label), total in seconds.items():
        table[mode][label] = total / len(durations[mode])
    title = f"{config.part}: process ms per step, mean of steps 6-{len(step_ends) - 1}, {config.threads} thread(s)"
    print(f"\n{title}" + (f"; steps alternate with --off {config.off}" if config.off else ""))
    print(f"{'':<32} " + " ".join(f"{mode:>8}" for mode in modes) + ("    ratio" if config.off else ""))
    for label, value in table["as is"].items():
        row = [value] + [table[mode].get(label, 0.0) for mode in modes[1:]]
        ratio = f" {row[0] / row[1]:8.2f}" if config.off and row[1] else ""
        print(f"{label:<32} " + " ".join(f"{1000 * v:8.2f}" for v in row) + ratio)
    return table["as is"]


def _switched(original, replacement, state: dict):
    """``original`` while ``state["mode"]`` is "as is", ``replacement`` otherwise."""

    def switched(*args, **kwargs):
        return (original if state["mode"] == "as is" else replacement)(*args, **kwargs)

    return switched


def _clocked(function, label: str, seconds: dict, step_ends: list[float], state: dict):
    """``function`` adding its process time to ``seconds[(mode, label)]`` once 5 steps have ended (warm-up left out)."""

    def clocked(*args, **kwargs):
        started, mode = time.process_time(), state["mode"]
        try:
            return function(*args, **kwargs)
        finally:
            if len(step_ends) > 5:
                seconds[(mode, label)] += time.process_time() - started

    return clocked


if __name__ == "__main__":
    cli(main)  # bad flags: one line, not a traceback
