"""Where the time of ``rlcore.rollout.generate`` goes on CPU, per decode step (torch.profiler).

One ``generate`` call (batch 64 ragged prompts of up to 32 tokens, 128 new tokens, EOS off, temperature 1,
the models of ``benchmarks/generate.py``) runs under ``torch.profiler`` after a warm-up call. The time is
split into the prefill, the decode step (:class:`rlcore.decode.LlamaDecodeStep`), sampling
(``sample_tokens``) and the rest of the loop; inside the step, the ops called directly by the step are
grouped: the Linear layers' matmuls (``mm``, ``addmm``), attention over the KV cache (the step's two
``matmul`` calls on CPU, ``scaled_dot_product_attention`` elsewhere), KV cache writes (the in-place
copies), small ops (RMSNorm, RoPE, SiLU, residual adds, embedding, views) and Python (the step's wall time
not inside any op: interpreter and dispatch). Times are profiled wall times divided by the
number of decode steps, so they include the profiler's own overhead (~10 us per op); the unprofiled
process time per step is printed beside them for scale.

    python benchmarks/profile_decode.py                     # tiny and 20m, batch 64, one thread
    python benchmarks/profile_decode.py --models 20m --batch-size 16
    python benchmarks/profile_decode.py --matmuls           # also: F.linear against x @ W^T (contiguous)
    python benchmarks/profile_decode.py --models --softmax  # only: torch's softmax against the step's, short rows
    python benchmarks/profile_decode.py --compile           # the compiled step (generate(compile=True))
    python benchmarks/profile_decode.py --bounds            # also the work no decoder avoids, timed alone

``--bounds`` times, in the same process after the profile, what any decoder of these models must do per
decode step: the Linear layers alone (as ``benchmarks/generate.py --linear-floor`` times them, and against
the step's contiguous ``W^T`` copies), one read of every layer's filled keys and values at the call's mean
cache length (a sum: the least attention over the cache reads), and the prefill's Linear layers spread over
the steps. Beside them: the profiled step's own Linear matmuls and attention per step, and the step time
that 90% of the "linear layers only" bound allows. These are the figures of docs/results.md's "What the
sampler targets would take".

With ``--compile`` the step's ops run inside one compiled graph: its matmuls and the fused C++ kernels
(inductor's, named ``graph_*_cpp_fused_*``; the attention kernel is the one whose name has ``softmax``)
are split out as above, and the graph's own Python (guards, wrapper) is the rest of the step.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import build_model, linear_floor, ragged_prompts, timed  # noqa: E402

import rlcore.rollout as rollout  # noqa: E402
from rlcore import decode  # noqa: E402
from rlcore.decode import LlamaDecodeStep  # noqa: E402
from rlcore.run import cli

LINEAR_MATMULS = {"aten::mm", "aten::addmm", "aten::linear"}
ATTENTION = {"aten::scaled_dot_product_attention", "aten::matmul", "aten::bmm"}  # eager CPU: q K^T and weights V
CACHE_WRITES = {"aten::copy_"}
SCOPES = ("prefill", "decode step", "sampling")
PROMPT_LEN = 32  # prompts of 16-32 tokens, left padded to 32


def scoped(function, name: str):
    def wrapped(*args, **kwargs):
        with record_function(name):
            return function(*args, **kwargs)

    return wrapped


@contextlib.contextmanager
def instrumented() -> Iterator[None]:
    """Wrap the prefill (the model's forward, or the native step's own), the one-token step and the sampler of
    ``rlcore.rollout`` in named profiler scopes, and put the originals back on leaving."""
    originals = [
        (rollout, "_prefill", rollout._prefill),
        (LlamaDecodeStep, "prefill", LlamaDecodeStep.prefill),
        (rollout, "sample_tokens", rollout.sample_tokens),
        (rollout, "_native_step_call", rollout._native_step_call),
        (rollout, "_model_step", rollout._model_step),
    ]
    native_step_call, model_step = rollout._native_step_call, rollout._model_step

    def scoped_model_step(*args, **kwargs):
        step, ready_mask = model_step(*args, **kwargs)
        return scoped(step, "decode step"), ready_mask

    rollout._prefill = scoped(rollout._prefill, "prefill")
    LlamaDecodeStep.prefill = scoped(LlamaDecodeStep.prefill, "prefill")
    rollout.sample_tokens = scoped(rollout.sample_tokens, "sampling")
    rollout._native_step_call = lambda native: scoped(native_step_call(native), "decode step")
    rollout._model_step = scoped_model_step
    try:
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def kernel_names(compile: bool) -> contextlib.AbstractContextManager:
    """With ``compile``, inductor's C++ kernels show up in the profile under their names (for this call only)."""
    if not compile:
        return contextlib.nullcontext()
    import torch._inductor.config as inductor_config

    return inductor_config.patch({"cpp.enable_kernel_profile": True})


def category(op_name: str) -> str:
    if "cpp_fused" in op_name:
        return "attention over the cache" if "softmax" in op_name else "small ops"
    if op_name in LINEAR_MATMULS:
        return "Linear matmuls"
    if op_name in ATTENTION:
        return "attention over the cache"
    if op_name in CACHE_WRITES:
        return "cache writes"
    return "small ops"


def called_by_step(event) -> bool:
    """An op of the step itself: a direct child of the step's scope (eager), or of the compiled graph's
    call inside it (``--compile``); ops nested in those are counted with their caller."""
    parent = event.cpu_parent
    if parent is None:
        return False
    if parent.name == "decode step":
        return event.name.startswith("aten::")
    if not parent.name.startswith("## Call CompiledFxGraph"):
        return False
    while parent is not None and parent.name != "decode step":
        parent = parent.cpu_parent
    return parent is not None


def breakdown(events, total_us: float, steps: int) -> dict[str, float]:
    """Microseconds per decode step of each scope, and of each category of the step's own ops."""
    per_step = defaultdict(float)
    for event in events:
        if event.name in SCOPES:
            per_step[event.name] += event.cpu_time_total
        if called_by_step(event):
            per_step["  " + category(event.name)] += event.cpu_time_total
    inside = sum(value for key, value in per_step.items() if key.startswith("  "))
    per_step["  Python (step time outside ops)"] = per_step["decode step"] - inside
    per_step["loop bookkeeping (rest)"] = total_us - sum(per_step[name] for name in SCOPES)
    return {key: value / steps for key, value in per_step.items()}


def profile_model(name: str, batch: int, new_tokens: int, compile: bool = False, with_bounds: bool = False) -> None:
    model = build_model(name, "cpu")
    ids, mask = ragged_prompts(batch, PROMPT_LEN, model.config.vocab_size, "cpu")

    def run():
        rollout.generate(model, ids, mask, max_new_tokens=new_tokens, eos_token_ids=[], pad_token_id=0, compile=compile)

    run()
    seconds = []
    for _ in range(3):
        start = time.process_time()
        run()
        seconds.append(time.process_time() - start)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        start = time.perf_counter()
        run()
        total_us = (time.perf_counter() - start) * 1e6
    steps = new_tokens - 1  # the first token is sampled from the prefill's logits
    rows = breakdown(profiler.events(), total_us, steps)
    print(f"\n{name}, batch {batch}: {statistics.median(seconds) / new_tokens * 1e6:.0f} us per token step unprofiled")
    print(f"{'':<36}{'us/step':>9}{'share':>8}")
    order = ["prefill", "decode step"] + sorted(key for key in rows if key.startswith("  ")) + ["sampling"]
    for key in order + ["loop bookkeeping (rest)"]:
        print(f"{key:<36}{rows[key]:>9.0f}{rows[key] / (total_us / steps):>8.1%}")
    print(f"{'total (profiled)':<36}{total_us / steps:>9.0f}")
    if with_bounds:
        print_bounds(model, batch, new_tokens, rows, statistics.median(seconds) / new_tokens)


def kv_read_seconds(model, batch: int, new_tokens: int, repeats: int = 5) -> float:
    """Process seconds per decode step of one read (a sum) of every layer's filled keys and values in
    ``[batch, kv_heads, PROMPT_LEN + new_tokens, head_dim]`` buffers, the native step's, averaged over the
    call's cache lengths (every 8th): the least that attention over the cache must read."""
    config, head_dim = model.config, model.model.layers[0].self_attn.head_dim
    shape = (batch, config.num_key_value_heads, PROMPT_LEN + new_tokens, head_dim)
    buffers = [torch.randn(shape) for _ in range(2 * config.num_hidden_layers)]
    lengths = range(PROMPT_LEN + 1, PROMPT_LEN + new_tokens, 8)

    def read_all():
        for length in lengths:
            for buffer in buffers:
                buffer[:, :, :length].sum()

    read_all()
    return statistics.median(timed(read_all, "cpu", "process") for _ in range(repeats)) / len(lengths)


def print_bounds(model, batch: int, new_tokens: int, rows: dict[str, float], step_seconds: float) -> None:
    """The work no decoder avoids, timed alone (process time, after the profile), beside the profiled step."""
    floors = {layout: linear_floor(model, batch, "cpu", 5, "process", layout=layout) for layout in ("linear", "copy")}
    prefill = linear_floor(model, batch, "cpu", 3, "process", PROMPT_LEN, layout="copy") / new_tokens
    lines = {
        "Linear layers (nn.Linear: the bound)": floors["linear"],
        "Linear layers (the step's W^T copies)": floors["copy"],
        "one read of the filled KV cache": kv_read_seconds(model, batch, new_tokens),
        "prefill's Linear layers (copies)": prefill,
        "profiled step: Linear matmuls": rows.get("  Linear matmuls", 0.0) / 1e6,
        "profiled step: attention": rows.get("  attention over the cache", 0.0) / 1e6,
        "90% of the bound allows": floors["linear"] / 0.9,
        "measured (unprofiled)": step_seconds,
    }
    print("per token step, us (bounds timed alone, process time; profiled rows: profiled wall)")
    for label, seconds in lines.items():
        print(f"  {label:<40}{seconds * 1e6:>9.0f}{seconds / floors['linear']:>8.0%} of the bound")


def compare_matmuls(batch: int) -> None:
    """F.linear(x, W) against torch.mm(x, W^T contiguous) for the 20m and tiny models' weight shapes."""

    def per_call(fn, *args, calls=50):
        fn(*args)
        start = time.process_time()
        for _ in range(calls):
            fn(*args)
        return (time.process_time() - start) / calls * 1e6

    print(f"\nmatmul [{batch}, in] x [in, out], us per call: F.linear(x, W) | torch.mm(x, W.t().contiguous())")
    for out_features, in_features in [(1024, 512), (512, 512), (2048, 512), (512, 2048), (256, 128), (512, 128)]:
        weight, x = torch.randn(out_features, in_features), torch.randn(batch, in_features)
        weight_t = weight.t().contiguous()
        linear, mm = per_call(F.linear, x, weight), per_call(torch.mm, x, weight_t)
        print(f"  W [{out_features}, {in_features}]: {linear:8.0f} | {mm:8.0f}  ({linear / mm:.2f}x)")


def compare_softmax(batch: int) -> None:
    """torch's softmax against the written-out form of the step (``rlcore.decode._softmax_``) on the step's
    ``[N, 2, 2, L]`` scores (the tiny model's grouped heads), for cache lengths L around a 16-float vector."""

    def per_call(fn, scores, calls=200):
        fn(scores.clone())
        start = time.process_time()
        for _ in range(calls):
            fn(scores.clone())
        return (time.process_time() - start) / calls * 1e6

    print(f"\nsoftmax of [{batch}, 2, 2, L] scores, us per call (a copy of the scores included in both)")
    print("  L    | torch softmax | written out")
    for length in (8, 11, 14, 15, 16, 20, 32, 64, 160):
        scores = torch.randn(batch, 2, 2, length)
        torch_us, written_us = per_call(lambda x: x.softmax(-1), scores), per_call(decode._softmax_, scores)
        print(f"  {length:4d} | {torch_us:13.1f} | {written_us:11.1f}  ({torch_us / written_us:.2f}x)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=["tiny", "20m"], choices=["tiny", "20m"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--matmuls", action="store_true", help="also time F.linear against x @ W^T (contiguous)")
    parser.add_argument("--softmax", action="store_true", help="also time torch's softmax against the written-out one")
    parser.add_argument("--compile", action="store_true", help="profile generate(compile=True), the compiled step")
    parser.add_argument("--bounds", action="store_true", help="also time the work no decoder avoids, alone")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.new_tokens < 2:
        parser.error(f"--batch-size must be >= 1 and --new-tokens >= 2, got {args.batch_size} and {args.new_tokens}")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    print(
        f"threads={torch.get_num_threads()} torch={torch.__version__} batch={args.batch_size} new_tokens={args.new_tokens}"
    )
    try:
        with instrumented(), kernel_names(args.compile):
            for name in args.models:
                profile_model(name, args.batch_size, args.new_tokens, args.compile, args.bounds)
        if args.matmuls:
            compare_matmuls(args.batch_size)
        if args.softmax:
            compare_softmax(args.batch_size)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    cli(main)  # bad input: one line, not a traceback
