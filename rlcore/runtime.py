"""Where and how a run executes: device, precision, compilation, seeds, and the order of the data.

The data order is a pure function of ``(seed, step)`` (:func:`step_batches`), so a resumed run draws exactly
the batches the uninterrupted run would have drawn, with no sampler state to save.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import time
from collections.abc import Callable, Iterator

import torch

from rlcore import distributed


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    return device


def setup(config) -> tuple[torch.device, bool]:
    """What every recipe does first: flush subnormal numbers (:func:`flush_denormals`), seed, set the CPU
    threads, pick the device and precision, and under ``torchrun`` join the process group
    (``rlcore.distributed.init``).

    Returns:
        (device, bf16): where the run trains and whether forward passes use bf16 autocast.
    """
    flush_denormals(config.flush_denormal)  # first: the worker threads torch starts later inherit it
    seed_everything(config.seed)
    set_threads(config.threads)
    device = distributed.init(resolve_device(config.device))  # under torchrun: join the group, cuda:LOCAL_RANK
    return device, use_bf16(device, config.bf16)


def flush_denormals(on: bool = True) -> bool:
    """Compute with subnormal floats (float32: 0 < |x| < 1.2e-38) as zero on the CPU (``on``), or exactly.

    Why: x86 processors take a slow microcode path for each operation on a subnormal value, and a matrix
    product with thousands of them among its inputs runs several times slower. A trained model makes them:
    its attention gives keys far below the best score probabilities exp(-88)...exp(-103), and their
    gradients flow on into the query, key, value and output projections, whose products then crawl: 4-18x
    in a 20M model's DPO step (``benchmarks/subnormals.py`` shows where they arise and what each product
    loses; ``benchmarks/step_split.py --off flush_denormal`` times whole steps with and without). A flushed
    value is below 1.2e-38, and the factors it meets in training (weights, activations, gradients) are far
    below 1e30, so what it would have added stays far below the float32 rounding of any result of normal
    size. CUDA arithmetic is untouched.

    The setting belongs to the calling thread and to the threads it starts afterwards: call it before the
    first multi-threaded CPU operation (:func:`setup` does, first), so that torch's worker threads inherit
    it. Returns whether the processor supports it (``torch.set_flush_denormal``).
    """
    return torch.set_flush_denormal(on)


def set_threads(threads: int | None = None) -> int:
    """Set torch's CPU threads: ``threads``, else ``$OMP_NUM_THREADS`` when set, else half the cores (>= 1).

    Why half: on a 2-core machine the tiny model's steps are small matrix products, for which a second
    thread adds synchronisation more than speed, and a run that takes every core slows to a crawl as soon
    as another process needs one (see docs/results.md, "Threads"). Returns the number set.
    """
    if threads is None:
        from_env = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(from_env) if from_env.isdigit() and int(from_env) > 0 else max(1, (os.cpu_count() or 2) // 2)
    torch.set_num_threads(threads)
    return threads


@contextlib.contextmanager
def timed(seconds: dict[str, float], name: str, device: torch.device) -> Iterator[None]:
    """Add the wall time of the block to ``seconds[name]`` (waiting for CUDA work to finish at both ends)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start


def seed_everything(seed: int) -> None:
    """Seed python's ``random`` and torch (CPU and every CUDA device)."""
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds all CUDA devices


def use_bf16(device: torch.device, requested: bool | None) -> bool:
    """bf16 autocast: on by default for CUDA (when supported), off for CPU; an explicit flag wins."""
    if requested is not None:
        return requested
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast around forward passes (weights and optimizer states stay float32)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def maybe_compile(model: torch.nn.Module, device: torch.device, requested: bool | None) -> Callable:
    """``torch.compile(model)`` on CUDA by default (off on CPU); an explicit flag wins.

    The compiled module shares the parameters of ``model``: call it for forward passes, and keep saving,
    optimizing and switching adapters on ``model`` itself (the compiled wrapper prefixes state-dict keys).

    Why not on CPU: on the embedded default (1M parameters, rows of ~13 tokens, one thread) a training step
    is mostly matrix products, which inductor does not speed up. Compiling the model cut an SFT step by
    ~10-20% with sdpa attention (~5 s of compilation), but the eager attention of :func:`prefer_eager_attention`
    gives the same gain without compiling; compiling on top of it saved ~10% more per step but took 35-45 s
    to compile, which the default 170 s SFT run does not earn back.
    """
    enabled = device.type == "cuda" if requested is None else requested
    return torch.compile(model) if enabled else model


CPU_EAGER_ATTENTION_MAX_TOKENS = 128  # longest row for which eager attention beat sdpa on CPU (tiny model, 1 thread)


def prefer_eager_attention(model: torch.nn.Module, device: torch.device, longest_sequence: int) -> str:
    """Switch a transformers model from sdpa to eager (matmul + softmax) attention on CPU for short rows.

    PyTorch's CPU sdpa runs a flash-attention kernel tiled for long sequences; on rows of a few dozen tokens
    its fixed cost per call dominates. Forward + backward of the tiny model, one thread (``--threads 1``),
    sdpa -> eager: [32 x 13 tokens] 66 -> 56 ms, [16 x 64] 196 -> 178 ms, [8 x 128] 197 -> 189 ms, but
    [4 x 256] 219 -> 248 ms; hence the switch up to ``CPU_EAGER_ATTENTION_MAX_TOKENS``. Both compute the
    same attention (equal up to float rounding); CUDA and other implementations are left as they are.

    Args:
        model: a transformers ``PreTrainedModel`` (changed in place: its attention implementation).
        device: where it trains.
        longest_sequence: the longest row (or packed bin) it will see, in tokens.

    Returns:
        The attention implementation now in use.
    """
    if longest_sequence < 1:
        raise ValueError(f"prefer_eager_attention: longest_sequence must be >= 1, got {longest_sequence}")
    current = model.config._attn_implementation
    if device.type == "cpu" and current == "sdpa" and longest_sequence <= CPU_EAGER_ATTENTION_MAX_TOKENS:
        model.set_attn_implementation("eager")
    return model.config._attn_implementation


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_rows: int, seed: int, epoch: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return tuple(torch.randperm(num_rows, generator=generator).tolist())


def step_batches(num_rows: int, batch_size: int, grad_accum_steps: int, seed: int, step: int) -> list[list[int]]:
    """Row indices of the micro-batches of optimizer step ``step`` (0-based): a pure function of its inputs.

    The rows are consumed as one endless stream: epoch ``e`` is a permutation of ``range(num_rows)`` seeded
    by ``(seed, e)``, and step ``s`` takes the ``batch_size * grad_accum_steps`` rows starting at stream
    position ``s * batch_size * grad_accum_steps`` (a step may straddle two epochs), split into
    ``grad_accum_steps`` consecutive micro-batches of ``batch_size`` rows.

    Returns:
        ``grad_accum_steps`` lists of ``batch_size`` row indices.
    """
    if num_rows <= 0:
        raise ValueError(f"step_batches: the dataset has no rows (num_rows={num_rows})")
    rows_per_step = batch_size * grad_accum_steps
    start = step * rows_per_step
    rows = []
    for position in range(start, start + rows_per_step):
        epoch, offset = divmod(position, num_rows)
        rows.append(_epoch_permutation(num_rows, seed, epoch)[offset])
    return [rows[i * batch_size : (i + 1) * batch_size] for i in range(grad_accum_steps)]
