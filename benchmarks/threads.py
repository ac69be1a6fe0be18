"""Torch CPU threads per process: SFT steps per second at 1 and 2 threads, alone and beside a competitor.

Why: ``rlcore.runtime.set_threads`` picks half the cores by default. On a 2-core machine that is one
thread; this script measures whether that is the right call, idle and with another CPU-heavy process
beside the run (the situation of a shared machine, or of two recipes at once).

Each measurement runs ``recipes/sft.py --max_steps N --threads T`` on the embedded default and reads the
training time from its summary.json (evaluation and loading excluded). The competitor is a second SFT
run at 2 threads started just before and killed just after. Rows are interleaved (1, 2, 1, 2, ...) so
that drifting load hits both settings; compare the ratios within one run, not across runs.

    python benchmarks/threads.py                 # 200 steps per measurement, 2 rounds (~15 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rlcore.run import cli

REPO = Path(__file__).resolve().parents[1]


def sft(steps: int, threads: int, output_dir: str) -> list[str]:
    return [
        sys.executable,
        str(REPO / "recipes" / "sft.py"),
        "--max_steps",
        str(steps),
        "--threads",
        str(threads),
        "--eval_split",
        "none",
        "--output_dir",
        output_dir,
        "--logging_steps",
        "50",
    ]


def steps_per_second(steps: int, threads: int, competitor: bool) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("OMP_NUM_THREADS", None)
    with tempfile.TemporaryDirectory() as work:
        rival = None
        if competitor:
            rival = subprocess.Popen(
                sft(100_000, 2, f"{work}/rival"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        try:
            subprocess.run(
                sft(steps, threads, f"{work}/run"),
                env=env,
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        finally:
            if rival is not None:
                rival.kill()
                rival.wait()
        summary = json.loads(Path(work, "run", "summary.json").read_text())
    return summary["steps"] / summary["training_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="SFT steps per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every setting")
    args = parser.parse_args()
    print(f"cores: {os.cpu_count()}; {args.steps} SFT steps of the embedded default per measurement")
    results: dict[tuple[bool, int], list[float]] = {}
    for _ in range(args.rounds):
        for competitor in (False, True):
            for threads in (1, 2):
                rate = steps_per_second(args.steps, threads, competitor)
                print(f"  {'busy' if competitor else 'idle'}, {threads} thread(s): {rate:.2f} steps/s", flush=True)
                results.setdefault((competitor, threads), []).append(rate)
    print(f"{'beside':<18} {'threads':>7} {'steps/s (median)':>17} {'runs':>20}")
    for (competitor, threads), values in results.items():
        runs = ", ".join(f"{v:.1f}" for v in values)
        print(
            f"{'a 2-thread SFT' if competitor else 'nothing':<18} {threads:>7} {statistics.median(values):>17.2f} {runs:>20}"
        )
    for competitor in (False, True):
        one, two = (statistics.median(results[(competitor, t)]) for t in (1, 2))
        print(f"{'busy' if competitor else 'idle'}: 2 threads / 1 thread = {two / one:.2f}x")


if __name__ == "__main__":
    cli(main)  # bad input: one line, not a traceback
