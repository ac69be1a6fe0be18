"""Where a training step meets subnormal floats on the CPU, and what they cost its matrix products.

A float32 value is subnormal when 0 < |x| < 2**-126 (1.18e-38). x86 processors compute with such values
through a slow path, so ``rlcore.runtime.setup`` has the CPU treat them as zero (``--flush_denormal``,
on by default). This script runs one recipe as ``benchmarks/compare_trl.py`` times it (exactly, without the
flush) and, for ``--steps`` steps after a warm-up, watches every operation (a ``TorchDispatchMode``):

- **Where they come from**: the operations whose output holds subnormal values while their inputs hold
  none, with the count per step.
- **What they cost**: every matrix product (``aten.mm``, ``aten.bmm``) with a subnormal input is run again
  on the same inputs, ``--repeats`` times exactly and ``--repeats`` times with subnormals flushed,
  alternating; the table gives milliseconds per call of each, by shape.

    python benchmarks/subnormals.py --part dpo --model outputs/compare_trl/models/20m-sft1500
    python benchmarks/subnormals.py --part sft --model tiny

One thread (the flush is a setting of the calling thread).
"""

from __future__ import annotations

import collections
import statistics
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

SMALLEST_NORMAL = torch.finfo(torch.float32).tiny  # 2**-126
PRODUCTS = (torch.ops.aten.mm.default, torch.ops.aten.bmm.default)


@dataclass
class SubnormalConfig:
    part: str = "dpo"  # sft, dpo or grpo
    model: str = "tiny"  # "tiny" (the embedded model) or a model directory (DPO and GRPO: an SFT checkpoint)
    warmup: int = 3  # optimizer steps before watching
    steps: int = 2  # optimizer steps watched
    repeats: int = 3  # timed calls of each product with subnormal inputs, per setting
    output_dir: str = "outputs/subnormals"

    def __post_init__(self) -> None:
        if self.part not in compare_trl.PARTS:
            raise ValueError(f"--part must be one of {list(compare_trl.PARTS)}, got {self.part!r}")
        if self.warmup < 0 or self.steps < 1 or self.repeats < 1:
            raise ValueError("--warmup must be >= 0, --steps and --repeats >= 1")


def count_subnormals(value) -> int:
    """Subnormal entries of a float32 tensor (0 for anything else)."""
    if not isinstance(value, torch.Tensor) or value.dtype != torch.float32:
        return 0
    magnitude = value.detach().abs()
    return int(((magnitude < SMALLEST_NORMAL) & (magnitude > 0)).sum())


class Watch(TorchDispatchMode):
    """Record the operations that make subnormals and time the products that receive them."""

    def __init__(self, repeats: int) -> None:
        super().__init__()
        self.repeats = repeats
        self.sources: collections.Counter[str] = collections.Counter()
        self.products: dict[tuple, dict[str, list[float]]] = collections.defaultdict(
            lambda: {"exact": [], "flushed": [], "subnormals": []}
        )

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [arg for arg in args if isinstance(arg, torch.Tensor)]
        received = sum(map(count_subnormals, inputs))
        if func in PRODUCTS and received:
            self._time(func, args, kwargs, received)
        out = func(*args, **kwargs)
        made = sum(map(count_subnormals, out if isinstance(out, (tuple, list)) else (out,)))
        if made and not received and "empty" not in func.name():  # empty*: whatever the memory held
            self.sources[func.name()] += made
        return out

    def _time(self, func, args, kwargs, received: int) -> None:
        shapes = (func.name().split(".")[0], *(tuple(arg.shape) for arg in args[:2]))
        record = self.products[shapes]
        record["subnormals"].append(received)
        for _ in range(self.repeats):
            for setting in ("exact", "flushed"):
                runtime.flush_denormals(setting == "flushed")
                started = time.perf_counter()
                func(*args, **kwargs)
                record[setting].append(time.perf_counter() - started)
        runtime.flush_denormals(False)


def main(argv: list[str] | None = None) -> Watch:
    config = parse_config(SubnormalConfig, argv)
    torch.set_num_threads(1)
    watch, ended = Watch(config.repeats), [0]

    def step_end() -> None:
        ended[0] += 1
        if ended[0] == config.warmup:
            watch.__enter__()
        if ended[0] == config.warmup + config.steps:
            watch.__exit__(None, None, None)

    spec = compare_trl.in_process_spec(config.part, config.model, config.warmup + config.steps + 1, config.output_dir)
    spec["extra_flags"] = ["--flush_denormal", "false"]  # the exact arithmetic
    compare_trl.train_rlcore(spec, step_end)
    report(watch, config)
    return watch


def report(watch: Watch, config: SubnormalConfig) -> None:
    print(f"\n{config.part}, {config.model}: subnormal values made per step, by the first operation making them")
    for name, count in watch.sources.most_common() or [("(none)", 0)]:
        print(f"  {name:<40} {count / config.steps:12.0f}")
    print("\nproducts with subnormal inputs: ms per call, exact vs flushed (same inputs, alternating)")
    print(f"  {'op, shapes':<48} {'calls/step':>10} {'subnormals':>11} {'exact':>8} {'flushed':>8} {'ratio':>7}")
    for shapes, record in sorted(watch.products.items(), key=lambda item: -sum(item[1]["exact"])):
        exact, flushed = (1000 * statistics.median(record[key]) for key in ("exact", "flushed"))
        calls = len(record["subnormals"]) / config.steps
        subnormals = statistics.median(record["subnormals"])
        label = f"{shapes[0]} {shapes[1]} x {shapes[2]}"
        print(f"  {label:<48} {calls:10.0f} {subnormals:11.0f} {exact:8.2f} {flushed:8.2f} {exact / flushed:7.1f}")


if __name__ == "__main__":
    cli(main)  # bad flags: one line, not a traceback
