"""Peak memory of one distillation loss and backward: ``rlcore.distillation_loss`` (chunked) vs the naive
full-vocabulary computation (``generalized_jsd`` on both models' whole logits), in one run.

Both take N positions' final hidden states of a student and a teacher and their LM heads ([V, H], random
float32) and compute the generalised JSD (``--beta``) and its gradient with respect to the student's hidden
states and LM head. The naive one holds both models' [N, V] logits, their log-softmaxes and autograd's saved
tensors; the chunked one holds a few [chunk_size, V] blocks at a time.

Each variant runs in its own subprocess so that the peaks do not mix. On CPU the figure is the growth of the
process's peak resident set size during the step (``ru_maxrss`` after minus before; inputs already built),
with glibc's mmap threshold fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_``) so that RSS follows live memory
(see benchmarks/memory.py). On CUDA it is ``torch.cuda.max_memory_allocated`` over the step, minus what was
allocated before it.

    python benchmarks/distill_memory.py                          # CPU, N = 2048, V = 32000, H = 256
    python benchmarks/distill_memory.py --device cuda --positions 16384 --vocab 151936 --hidden 896
"""

import argparse
import json
import os
import resource
import subprocess
import sys

import torch

from rlcore.run import cli


def step(variant: str, args: argparse.Namespace) -> float:
    """MiB added to the peak by one loss + backward of ``variant``."""
    from rlcore import distillation_loss, generalized_jsd

    device = torch.device(args.device)
    generator = torch.Generator(device).manual_seed(0)

    def rand(*shape, grad=False):
        return torch.randn(*shape, device=device, generator=generator).mul_(0.05).requires_grad_(grad)

    student_hidden, student_weight = (
        rand(args.positions, args.hidden, grad=True),
        rand(args.vocab, args.hidden, grad=True),
    )
    teacher_hidden, teacher_weight = rand(args.positions, args.hidden), rand(args.vocab, args.hidden)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)
    if variant == "chunked":
        loss, _ = distillation_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, beta=args.beta, chunk_size=args.chunk_size
        )
    else:
        loss = generalized_jsd(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, args.beta).mean()
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--positions", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--chunk_size", type=int, default=1024)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--variant", choices=("chunked", "naive"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:  # the child process
        print(json.dumps({"peak_mib": step(args.variant, args)}))
        return
    logits_mib = args.positions * args.vocab * 4 / 2**20
    print(
        f"N={args.positions} V={args.vocab} H={args.hidden} chunk={args.chunk_size}: one [N, V] float32 = {logits_mib:.0f} MiB"
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    for variant in ("naive", "chunked"):
        output = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--variant", variant],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        peak = json.loads(output.strip().splitlines()[-1])["peak_mib"]
        print(f"{variant:8s} loss + backward adds {peak:8.0f} MiB to the peak ({peak / logits_mib:.2f} x one [N, V])")


if __name__ == "__main__":
    cli(main)  # bad input: one line, not a traceback
