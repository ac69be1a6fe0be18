"""SFT under torchrun: steps/s and peak memory per process, 1 vs 2 processes, DDP vs FSDP2, tiny and 20M models.

Every configuration trains ``recipes/sft.py`` on the toy task for the same number of steps on the same global
batch (``--batch_size`` rows per step, split over the processes), one torch thread per process:

- ``1 process``: ``python recipes/sft.py`` (no launcher);
- ``2 x DDP``:   ``torchrun --nproc_per_node 2 recipes/sft.py`` (replicated weights, one gradient all-reduce);
- ``2 x FSDP2``: the same with ``--sharding fsdp2`` (weights, gradients and AdamW states sharded).

steps/s is the recipe's own (``summary.json``: steps / training seconds, evaluation and start-up excluded).
Peak memory is each process's peak resident set size (``ru_maxrss``: interpreter, torch, transformers, model,
optimizer; nothing subtracted), the largest over the processes. ``20m`` is the tiny Llama widened to hidden
512, MLP 2048, 6 layers (19M parameters, as in benchmarks/compare_trl.py), random weights.

    python benchmarks/distributed.py                         # tiny and 20m, 1 / 2 x DDP / 2 x FSDP2
    python benchmarks/distributed.py --models tiny --steps 20
"""

import argparse
import json
import os
import resource
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "20m": dict(
        hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4
    )
}
SETUPS = {"1 process": (1, "ddp"), "2 x DDP": (2, "ddp"), "2 x FSDP2": (2, "fsdp2")}


def model_dir(name: str, root: Path) -> str:
    """'tiny', or a directory holding the 20m model (random weights) and the toy tokenizer."""
    if name == "tiny":
        return "tiny"
    from rlcore.models import load_tokenizer
    from rlcore.toy import tiny_model

    directory = root / name
    tiny_model(**SHAPES[name]).save_pretrained(directory)
    load_tokenizer("tiny").save_pretrained(directory)
    return str(directory)


def run(setup: str, model: str, steps: int, batch_size: int, output: Path) -> dict:
    nproc, sharding = SETUPS[setup]
    flags = ["--model", model, "--max_steps", str(steps), "--batch_size", str(batch_size), "--threads", "1"]
    flags += ["--eval_split", "none", "--logging_steps", str(steps), "--warmup_steps", "0", "--output_dir", str(output)]
    flags += ["--sharding", sharding]
    worker = [str(Path(__file__).resolve()), "--worker", str(REPO / "recipes" / "sft.py"), *flags]
    launcher = (
        [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RSS_DIR": str(output)}
    subprocess.run([*launcher, *worker], check=True, env=env, cwd=REPO, capture_output=True)
    summary = json.loads((output / "summary.json").read_text())
    peaks = [json.loads(path.read_text())["peak_rss_mib"] for path in output.glob("rss-*.json")]
    return {"steps_per_s": summary["steps"] / summary["training_seconds"], "peak_rss_mib": max(peaks)}


def worker(recipe: str, flags: list[str]) -> None:
    """Run the recipe in this process, then write its peak RSS to $RSS_DIR/rss-<rank>.json."""
    sys.argv = [recipe, *flags]
    try:
        runpy.run_path(recipe, run_name="__main__")
    finally:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
        Path(os.environ["RSS_DIR"], f"rss-{os.environ.get('RANK', '0')}.json").write_text(
            json.dumps({"peak_rss_mib": peak})
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="tiny,20m")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--worker", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker[0], args.worker[1:])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model = model_dir(name, Path(tmp))
            for setup in SETUPS:
                result = run(setup, model, args.steps, args.batch_size, Path(tmp) / f"{name}-{setup.replace(' ', '')}")
                rows.append((name, setup, result))
                print(json.dumps({"model": name, "setup": setup, **result}), flush=True)
    print("\n| model | setup | steps/s | peak RSS per process (MiB) |\n| --- | --- | --- | --- |")
    for name, setup, result in rows:
        print(f"| {name} | {setup} | {result['steps_per_s']:.2f} | {result['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
