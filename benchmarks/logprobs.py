"""Peak memory and time of token log-probs from hidden states, forward + backward, three ways side by side.

    naive    logits = hidden @ W.T;  log_softmax(logits / T).gather(tokens)        [N, V] logits + log-softmax
    gather   logits = hidden @ W.T;  rlcore.gather_logprobs(logits, tokens, T)     [N, V] logits only
    chunked  rlcore.chunked_logprobs(hidden, W, tokens, chunk_size, T)            no [N, V] tensor at all
                                                                              (one row per --chunk-sizes)

Each path runs in its own subprocess. Peak memory is the extra memory the step needs: on CPU the
process's RSS high-water mark (``ru_maxrss``) minus its RSS once the inputs exist; on CUDA
``torch.cuda.max_memory_allocated`` minus the allocated memory before the step. Time is the median of
``--repeats`` forward+backward steps after one warm-up step. Ratios are against the naive path of the
same run.

    python benchmarks/logprobs.py                              # N=4096, V=32768, H=1024, float32, CPU
    python benchmarks/logprobs.py --device cuda --dtype bfloat16 --tokens 16384 --vocab 151936
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rlcore import chunked_logprobs, gather_logprobs  # noqa: E402
from rlcore.run import cli

PATHS = ("naive", "gather", "chunked")


def _log_probs(path: str, hidden, weight, tokens, chunk_size: int, temperature: float) -> torch.Tensor:
    """Per-token log-probs [N] by one of the three paths."""
    if path == "chunked":
        return chunked_logprobs(hidden, weight, tokens, chunk_size=chunk_size, temperature=temperature)
    logits = F.linear(hidden, weight)  # [N, V]
    if path == "gather":
        return gather_logprobs(logits, tokens, temperature=temperature)
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature  # no copy for float32, T=1
    return torch.log_softmax(scaled, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(args: argparse.Namespace) -> dict:
    """Run one path in this process; return its extra peak memory (bytes) and step times (seconds)."""
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    hidden = torch.randn(args.tokens, args.hidden, device=args.device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(args.vocab, args.hidden, device=args.device, dtype=dtype) / args.hidden**0.5).requires_grad_()
    tokens = torch.randint(0, args.vocab, (args.tokens,), device=args.device)
    grad_out = torch.randn(args.tokens, device=args.device)
    # The gradients exist before the baseline is taken: they cost the same on every path.
    hidden.grad, weight.grad = torch.zeros_like(hidden), torch.zeros_like(weight)
    _synchronize(args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = _current_rss_bytes()
    times = []
    for step in range(args.repeats + 1):
        start = time.perf_counter()
        logprobs = _log_probs(args.path, hidden, weight, tokens, args.chunk_sizes[0], args.temperature)
        (logprobs * grad_out).sum().backward()
        _synchronize(args.device)
        if step > 0:  # step 0 is the warm-up
            times.append(time.perf_counter() - start)
        del logprobs
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return {"peak_bytes": peak, "times": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="N, positions in the batch")
    parser.add_argument("--vocab", type=int, default=32768, help="V")
    parser.add_argument("--hidden", type=int, default=1024, help="H")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[1024, 256], help="one chunked row each")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--path", choices=PATHS, help="internal: measure one path in this process")
    args = parser.parse_args()
    sizes = {"--tokens": [args.tokens], "--vocab": [args.vocab], "--hidden": [args.hidden]}
    for flag, values in {**sizes, "--chunk-sizes": args.chunk_sizes, "--repeats": [args.repeats]}.items():
        if min(values) < 1:
            parser.error(f"{flag} must be >= 1, got {values}")
    if args.path:
        print(json.dumps(measure(args)))
        return

    print(
        f"N={args.tokens} V={args.vocab} H={args.hidden} {args.dtype} on {args.device}, "
        f"forward+backward, median of {args.repeats} steps after 1 warm-up"
    )
    runs = [("naive", None), ("gather", None)] + [("chunked", size) for size in args.chunk_sizes]
    results = {}
    for path, chunk_size in runs:
        options = ["--path", path] + (["--chunk-sizes", str(chunk_size)] if chunk_size else [])
        output = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], *options], check=True, stdout=subprocess.PIPE, text=True
        ).stdout
        results[path if chunk_size is None else f"chunked/{chunk_size}"] = json.loads(output.strip().splitlines()[-1])
    naive = results["naive"]
    naive_time = statistics.median(naive["times"])
    print(f"{'path':<13} {'peak MiB':>9} {'vs naive':>9} {'time s':>8} {'vs naive':>9}")
    for path, result in results.items():
        peak_mib, seconds = result["peak_bytes"] / 2**20, statistics.median(result["times"])
        print(
            f"{path:<13} {peak_mib:>9.0f} {result['peak_bytes'] / naive['peak_bytes']:>9.2f} "
            f"{seconds:>8.2f} {seconds / naive_time:>9.2f}"
        )


if __name__ == "__main__":
    cli(main)  # bad input: one line, not a traceback
