"""Quickstart: the classic post-training pipeline on the embedded default, in minutes on 2 CPU cores.

    untrained tiny model --SFT--> sft --GRPO--> grpo     (reinforcement learning from a checkable reward)
                                      --DPO---> dpo      (preference pairs: the right sum over a wrong one)

The toy task is integer addition (``"37+85="`` -> ``"122"``, see ``rlcore/toy.py``) and the model a
1M-parameter Llama built in-process, so nothing is downloaded. Each stage is one recipe run with flags,
exactly the command you would type (it is printed before it runs):

    python recipes/sft.py  --output_dir OUT/sft  --lr 1e-3 --warmup_steps 100 --lr_schedule cosine --min_lr_ratio 0.5 \
                           --lm_head_chunk 0 --max_steps SFT_STEPS
    python recipes/grpo.py --model OUT/sft --output_dir OUT/grpo --max_steps GRPO_STEPS
    python recipes/dpo.py  --model OUT/sft --output_dir OUT/dpo  --max_steps DPO_STEPS --rpo_alpha 1.0

The SFT stage stops mid-schedule on purpose: 1500 steps whose learning rate decays to half the peak, the
online recipes' own warm start (``rlcore.config.ONLINE_WARM_START_FLAGS``), not to zero: RL and DPO improved
such checkpoints on the toy task, not fully annealed ones (docs/results.md). It is built as that warm
start is (``rlcore.toy.warm_start``: the full-logits LM head, ``--lm_head_chunk 0``), so it is the same
checkpoint: code paths equal up to float rounding reach different points of this task's sudden jump in
exact match, and RL gains differently from each (docs/results.md, "Warm start: sensitivity to rounding").
On this code: SFT 0 -> 44.4%, GRPO -> 66.2%, DPO -> 62.8% (docs/results.md, "Packed rows without the tokens
no scored value reads"). The DPO stage adds
the chosen answers' NLL (RPO, ``--rpo_alpha 1.0``; Pang et al. 2024, arXiv 2404.19733): from a strong SFT
start, plain DPO raised the margin by pushing both answers' likelihoods down and its exact match fell (85.8%
-> 63.2% in 300 steps), while with the NLL term it rose (85.8% -> 88.4%; docs/results.md, "Quickstart").

Every stage trains a fixed number of steps, so a slower or busier machine takes longer and learns the
same; the elapsed time is printed. Each recipe scores the greedy answers to the held-out problems (the toy
task's exact match) before its first step and at its end, and writes them to OUT/<stage>/metrics.jsonl and
summary.json; this script reads them back into one table, before -> after, and says so loudly if a stage
learnt nothing. Then read the recipes: each is one file, top to bottom, and the next step is to run them
on your own model and data.

    pip install -e ".[test]"
    python quickstart.py                                          # ~6 minutes on 2 CPU cores (6:20 here)
    python quickstart.py --sft_steps 3000 --grpo_steps 2000 --output_dir outputs/longer
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))  # rlcore from this checkout, installed or not

from rlcore.config import ONLINE_WARM_START_FLAGS, parse_config  # noqa: E402
from rlcore.tracking import CURVES_NAME, METRICS_NAME, read_metrics  # noqa: E402

METRIC = "eval/exact_match"  # the toy task's greedy exact match, logged by every recipe on the toy task


@dataclass
class QuickstartConfig:
    """SFT, then GRPO and DPO from the SFT model, on the embedded default; a table of test accuracy."""

    sft_steps: int = 1500  # optimizer steps of the SFT stage (its schedule ends at half the peak learning rate)
    grpo_steps: int = 1000  # sampling steps of the GRPO stage (16 prompts x 8 completions each)
    dpo_steps: int = 300  # optimizer steps of the DPO stage
    max_seconds: float | None = None  # optional safety stop per stage, in seconds of training (a cut stage is flagged)
    output_dir: str = "outputs/quickstart"  # one sub-directory per stage: model, metrics.jsonl, curves.png
    num_train_rows: int | None = None  # training rows of every stage (None = the recipes' default, 10,000)
    num_eval_rows: int | None = None  # held-out problems scored after each stage (None = the recipes' default, 500)

    def __post_init__(self) -> None:
        for name in ("sft_steps", "grpo_steps", "dpo_steps", "max_seconds", "num_train_rows", "num_eval_rows"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")


def run_stage(recipe: str, flags: dict, config: QuickstartConfig) -> Path:
    """Run ``python recipes/<recipe>.py --flag value ...`` (printed first); return its output directory."""
    flags = {
        **flags,
        "num_train_rows": config.num_train_rows,
        "num_eval_rows": config.num_eval_rows,
        "max_seconds": config.max_seconds,
    }
    argv = [f"recipes/{recipe}.py"]
    for name, value in flags.items():
        if value is not None:
            argv += [f"--{name}", str(value)]
    print(f"\n$ python {' '.join(argv)}", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    finished = subprocess.run([sys.executable, *argv], cwd=REPO, env=env)
    if finished.returncode != 0:
        sys.exit(f"quickstart: the {recipe} stage failed (exit code {finished.returncode}); its output is above")
    print(f"{recipe} stage: {time.perf_counter() - started:.0f} s wall", flush=True)
    return Path(flags["output_dir"])


def accuracies(stage_dir: Path) -> dict:
    """Steps trained, the first and last toy accuracy of a stage's metrics.jsonl (None if absent), and whether
    the run was cut short by --max_seconds (from its summary.json)."""
    records = read_metrics(stage_dir / METRICS_NAME)
    evaluations = [record for record in records if METRIC in record]
    summary_path = stage_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return {
        "steps": max((record["step"] for record in records), default=0),
        "start": evaluations[0][METRIC] if evaluations and evaluations[0]["step"] == 0 else None,
        "end": evaluations[-1][METRIC] if evaluations else None,
        "stopped_early": summary.get("stopped_early", False),
    }


def verdict(result: dict) -> str:
    """What the row says: the gain, or a loud warning when the stage learnt nothing or was cut short."""
    notes = []
    if result["start"] is not None and result["end"] is not None:
        gain = 100 * (result["end"] - result["start"])
        notes.append(f"{gain:+.1f} points" if gain > 0 else "LEARNT NOTHING (no gain over its start)")
    if result["stopped_early"]:
        notes.append("CUT SHORT by --max_seconds")
    return "; ".join(notes)


def print_table(stages: dict[str, tuple[str, Path]]) -> bool:
    """Print the before -> after table; return whether every stage learnt something."""

    def percent(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    print(f"\n{'stage':<6} {'starts from':<15} {'steps':>6} {'accuracy before':>16} {'after':>7}  verdict")
    all_learnt = True
    for stage, (start, stage_dir) in stages.items():
        result = accuracies(stage_dir)
        note = verdict(result)
        all_learnt &= note.endswith("points")
        print(
            f"{stage:<6} {start:<15} {result['steps']:>6} {percent(result['start']):>16} {percent(result['end']):>7}  {note}"
        )
    print("\n(toy test accuracy: greedy answers to held-out addition problems, exact match)")
    print("training curves:")
    for _, stage_dir in stages.values():
        curves = stage_dir / CURVES_NAME
        if curves.exists():
            print(f"  {curves}")
    return all_learnt


def main(argv: list[str] | None = None) -> None:
    config = parse_config(QuickstartConfig, argv)
    started = time.perf_counter()
    out = Path(config.output_dir).resolve()
    schedule = dict(
        zip((flag.removeprefix("--") for flag in ONLINE_WARM_START_FLAGS[::2]), ONLINE_WARM_START_FLAGS[1::2])
    )
    sft_flags = {"output_dir": out / "sft", **schedule, "lm_head_chunk": 0, "max_steps": config.sft_steps}
    sft = run_stage("sft", sft_flags, config)  # the online recipes' warm start, built the same way
    grpo = run_stage("grpo", {"model": sft, "output_dir": out / "grpo", "max_steps": config.grpo_steps}, config)
    dpo_flags = {"model": sft, "output_dir": out / "dpo", "max_steps": config.dpo_steps, "rpo_alpha": 1.0}
    dpo = run_stage("dpo", dpo_flags, config)
    all_learnt = print_table({"sft": ("untrained tiny", sft), "grpo": ("sft", grpo), "dpo": ("sft", dpo)})
    print(f"done in {time.perf_counter() - started:.0f} s; models and metrics in {out}")
    if not all_learnt:
        print("\nWARNING: at least one stage did not improve on its start (see the verdict column).")


if __name__ == "__main__":
    main()
