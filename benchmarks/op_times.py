"""Where a training step's time goes, operation by operation, in rlcore and in TRL, timed where each one runs.

Runs ``recipes/<part>.py`` and TRL's trainer as ``benchmarks/compare_trl.py`` times them (the same settings,
one thread), one after the other in this process. For ``--steps`` optimizer steps after ``--warmup`` it
watches every ATen operation of the forward, the backward and the optimizer (a ``TorchDispatchMode``) and
times each call with ``perf_counter`` around the kernel alone. The table gives, per framework and operation,
calls and milliseconds per step; the matrix products also get their FLOPs (2 M K N per product) and rate.

The FLOPs are what to read first: they are a property of the computation, not of the machine's load. Their
ratio rlcore / TRL is the step-time ratio the two frameworks' products allow at equal matmul speed, which is
the floor of the whole step's ratio wherever the products dominate it. (torch.profiler's per-operation times
were inflated for small operations on this machine; these are not.) The watch adds Python to every call, so
the watched steps' process time is longer than an unwatched step's; the operations' own times are not.

    python benchmarks/op_times.py --part sft --model outputs/compare_trl/models/20m
    python benchmarks/op_times.py --part dpo --model outputs/compare_trl/models/20m-sft1500 --frameworks rlcore
    python benchmarks/op_times.py --part grpo --model outputs/compare_trl/models/tiny-sft1500 --top 30
    python benchmarks/op_times.py --part sft --frameworks rlcore --rlcore_flags "--padding_free true"

TRL runs as installed, without flushing subnormal floats (``--trl_flush_denormal`` gives it rlcore's
setting, as in compare_trl.py); TRL comes with ``pip install -e ".[bench]"``.
"""

from __future__ import annotations

import collections
import importlib.util
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_trl  # noqa: E402

from rlcore import runtime  # noqa: E402
from rlcore.config import parse_config  # noqa: E402
from rlcore.run import cli  # noqa: E402

FRAMEWORKS = ("rlcore", "trl")
_MM = {"aten::mm", "aten::addmm", "aten::addmm_"}  # [M, K] @ [K, N]: the Linear layers' products
_BMM = {"aten::bmm", "aten::baddbmm", "aten::baddbmm_"}  # [B, M, K] @ [B, K, N]: attention written as products


@dataclass
class OpTimesConfig:
    part: str = "sft"  # sft, dpo or grpo
    model: str = "tiny"  # "tiny" (the embedded model) or a model directory (DPO and GRPO: an SFT checkpoint)
    frameworks: str = "rlcore,trl"  # comma-separated: rlcore, trl
    warmup: int = 3  # optimizer steps before watching
    steps: int = 4  # optimizer steps watched
    top: int = 20  # operations shown, by the larger of the two frameworks' times
    trl_flush_denormal: bool = False  # give TRL rlcore's flush of subnormal floats (rlcore.runtime)
    rlcore_flags: str = ""  # more flags for rlcore's recipe, e.g. "--padding_free true" (TRL runs as compared)
    output_dir: str = "outputs/op_times"

    def __post_init__(self) -> None:
        if self.part not in compare_trl.PARTS:
            raise ValueError(f"--part must be one of {list(compare_trl.PARTS)}, got {self.part!r}")
        unknown = sorted(set(self.framework_list) - set(FRAMEWORKS))
        if unknown or not self.framework_list:
            raise ValueError(
                f"--frameworks: expected a comma-separated subset of {list(FRAMEWORKS)}, got {self.frameworks!r}"
            )
        if self.warmup < 1 or self.steps < 1 or self.top < 1:
            raise ValueError("--warmup, --steps and --top must be >= 1")
        if "trl" in self.framework_list and importlib.util.find_spec("trl") is None:
            raise ValueError('--frameworks trl needs TRL, which is not installed: pip install -e ".[bench]"')

    @property
    def framework_list(self) -> list[str]:
        return [name for name in self.frameworks.split(",") if name]


def product_flops(name: str, args) -> int:
    """Floating-point operations of one matrix product, 2 M K N (times the batch for batched products); 0 for
    any other operation. ``name`` is the ATen name (``aten::mm``), ``args`` its arguments (an ``addmm``'s
    first argument is the added term)."""
    tensors = [arg for arg in args if isinstance(arg, torch.Tensor)]
    if name in _MM or name in _BMM:
        left, right = tensors[-2:]
        return 2 * left.shape[:-1].numel() * left.shape[-1] * right.shape[-1]
    return 0


class Watch(TorchDispatchMode):
    """Per ATen operation: calls, seconds inside the call and FLOPs (products only)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, list] = collections.defaultdict(lambda: [0, 0.0, 0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        started = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        seconds = time.perf_counter() - started
        name = func.name().split(".")[0]  # aten::mm, whatever the overload (.default, .out)
        record = self.ops[name]
        record[0] += 1
        record[1] += seconds
        record[2] += product_flops(name, args)
        return out


def watch_steps(framework: str, config: OpTimesConfig) -> dict:
    """Train ``framework`` for warmup + steps optimizer steps; the last ``steps`` watched. Returns per step: the
    operations (``{name: (calls, seconds, flops)}``) and the process seconds of the watched steps."""
    watch, ended, clock = Watch(), [0], {}

    def step_end() -> None:
        ended[0] += 1
        if ended[0] == config.warmup:
            clock["start"] = time.process_time()
            watch.__enter__()
        if ended[0] == config.warmup + config.steps:
            watch.__exit__(None, None, None)
            clock["end"] = time.process_time()

    output_dir = str(Path(config.output_dir) / framework)
    spec = compare_trl.in_process_spec(config.part, config.model, config.warmup + config.steps + 1, output_dir)
    spec["extra_flags"] = config.rlcore_flags.split()
    if framework == "trl":
        runtime.flush_denormals(config.trl_flush_denormal)  # the recipe set it for rlcore (runtime.setup)
        try:
            compare_trl.train_trl(spec, step_end)
        finally:
            runtime.flush_denormals(True)  # as a recipe leaves it (op_times.main may run inside another program)
    else:
        compare_trl.train_rlcore(spec, step_end)
    per_step = {
        name: (calls / config.steps, s / config.steps, f / config.steps) for name, (calls, s, f) in watch.ops.items()
    }
    return {"ops": per_step, "process_s": (clock["end"] - clock["start"]) / config.steps}


def main(argv: list[str] | None = None) -> dict[str, dict]:
    config = parse_config(OpTimesConfig, argv)
    torch.set_num_threads(1)
    results = {framework: watch_steps(framework, config) for framework in config.framework_list}
    report(results, config)
    return results


def _totals(result: dict, names=None) -> tuple[float, float]:
    """(seconds, FLOPs) per step over the operations ``names`` (all when None)."""
    rows = [row for name, row in result["ops"].items() if names is None or name in names]
    return sum(row[1] for row in rows), sum(row[2] for row in rows)


def report(results: dict[str, dict], config: OpTimesConfig) -> None:
    names = list(results)
    everything = {op for result in results.values() for op in result["ops"]}
    ranked = sorted(
        everything, key=lambda op: -max(result["ops"].get(op, (0, 0.0, 0))[1] for result in results.values())
    )
    width = max(44, *(len(op) + 1 for op in ranked[: config.top]))
    print(f"\n{config.part}, {config.model}: per optimizer step, mean of {config.steps} watched steps, 1 thread")
    print(f"{'operation':<{width}}" + "".join(f"{name + ' calls':>13}{'ms':>9}{'GF/s':>7}" for name in names))
    for op in ranked[: config.top]:
        cells = ""
        for name in names:
            calls, seconds, flops = results[name]["ops"].get(op, (0, 0.0, 0))
            rate = f"{flops / seconds / 1e9:7.1f}" if flops and seconds else " " * 7
            cells += f"{calls:13.0f}{1000 * seconds:9.1f}{rate}"
        print(f"{op:<{width}}{cells}")
    print()
    for label, subset in (
        ("all operations", None),
        ("Linear products (mm, addmm)", _MM),
        ("batched products (bmm)", _BMM),
    ):
        cells = []
        for name in names:
            seconds, flops = _totals(results[name], subset)
            cells.append(f"{name} {1000 * seconds:.1f} ms" + (f", {flops / 1e9:.2f} GFLOP" if subset else ""))
        print(f"{label:<{width}}" + "   ".join(cells))
    watched = "   ".join(f"{name} {1000 * results[name]['process_s']:.1f} ms" for name in names)
    print(f"{'process time of a watched step':<{width}}{watched}")
    if len(names) == 2:
        (first_s, first_f), (second_s, second_f) = (_totals(results[name], _MM) for name in names)
        print(
            f"\nLinear-product FLOPs per step, {names[0]} / {names[1]}: {first_f / second_f:.3f} "
            f"(their time: {first_s / second_s:.3f})"
        )


if __name__ == "__main__":
    cli(main)  # bad flags: one line, not a traceback
