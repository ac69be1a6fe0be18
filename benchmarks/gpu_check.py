"""One command for one H100/H200: decoding, bandwidth, a GRPO step against TRL, SFT/DPO MFU and memory, one table.

Every part calls the project's own benchmark code; this file only picks the shapes and budgets, times, and
collects the numbers into one table (printed at the end and written as JSON to ``--out``):

- **decode** (``benchmarks/generate.py``'s model, prompts and contenders): completion tokens/s of
  ``rlcore.rollout.generate`` eager (static cache on CUDA), of the static cache + compiled one-token step
  (``torch.compile(mode="reduce-overhead")``: CUDA graphs) and of ``model.generate``, at batch 1 and 64, for
  a Qwen2.5-0.5B-shaped model (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864, vocabulary
  151,936, tied embeddings) with random bf16 weights built on the device (nothing downloaded). tokens/s =
  batch x new tokens / wall time of the whole call (prefill included); medians over ``repeats`` runs after
  one warm-up run each (the compile is in the warm-up, timed apart).
- **bandwidth**: batch-1 decode as a fraction of the HBM bound: (bytes read per token step: every weight
  once + the live KV cache of the row, ``generate.bytes_per_step``) / (seconds per token step) over the
  device-to-device bandwidth of cloning a 1 GiB tensor (read + write, timed with CUDA events).
- **grpo** (``benchmarks/compare_trl.py``'s workers, each in its own process): seconds per GRPO step with
  16 prompts x G 8 x 256 new tokens (compare_trl's CUDA settings and its ``qwen0.5b`` model: the 0.5B sizes
  in the toy's Llama layers and tokenizer, bf16 autocast), rlcore's recipe against TRL's ``GRPOTrainer``
  without vLLM; TRL's row says "skipped" when trl is not importable. Both run with a KL term (``beta``
  ``GRPO_BETA``): from the untrained model every reward is 0, and without one rlcore skips the forward and
  backward of rows whose advantage is 0, which TRL still runs: the two steps would not do the same work.
- **mfu**: SFT and DPO steps (full fine-tuning, bf16 weights, torch AdamW, eager; rows of ``tokens``
  positions, every position scored) on the 0.5B shape built by ``benchmarks/memory.py``'s ``build``.
  MFU = 6 N tokens (policy forward + backward; DPO adds 2 N per token of the reference forward) per second
  over the device's peak dense bf16 FLOP/s: NVIDIA's datasheet figure for the device name (``PEAK_BF16``,
  half the "with sparsity" figure), or, for another device, the measured peak of a large bf16 matmul. N =
  every parameter, the tied embedding counted once (as the LM head's matmul); attention's own FLOPs
  (QK^T, AV) are left out, as in the usual 6 N D convention.
- **memory** (``benchmarks/memory.py``'s rows, each in its own process, ``--device cuda``): peak
  ``max_memory_allocated`` of one optimizer step of SFT, DPO, GRPO and PPO at the 0.5B shape.

Step counts set each part's budget (under 8 minutes on one H100/H200 in all); the elapsed time of each part
is printed. ``--time_limit`` (default 450 s) is a backstop: a part, GRPO worker or memory row that would
start after it is marked skipped, and a worker or row still running ``SUBPROCESS_GRACE`` seconds after it is
stopped and marked so. ``--out`` is rewritten after every row, so a run cut short keeps what it measured.

    python benchmarks/gpu_check.py --out gpu_check.json          # one H100/H200
    python benchmarks/gpu_check.py --smoke --out smoke.json      # CPU, tiny shapes, the same code paths

``--smoke`` runs every part on CPU at tiny shapes (the embedded tiny model; a 2-layer Qwen2 for MFU; one
0.5B memory row at 16 tokens) in about a minute. On CPU the compiled decode row is skipped (CUDA graphs need
CUDA, and compiling the step with inductor's C++ backend takes longer than the whole smoke budget;
``--smoke_compile`` runs it without graphs) and the MFU peak is the measured float32 matmul peak.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
sys.path[:0] = [str(REPO), str(BENCHMARKS)]  # rlcore from this checkout; the sibling benchmark scripts

import compare_trl  # noqa: E402
import generate  # noqa: E402
import memory  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from rlcore import dpo_loss, masked_mean, models, optim  # noqa: E402
from rlcore.rollout import release_static_caches  # noqa: E402
from rlcore.run import cli  # noqa: E402

# Memory last: its rows are short subprocesses, each checked against --time_limit before it starts.
PARTS = ("decode", "grpo", "mfu", "memory")
GRPO_BETA = 0.04  # a KL term for both frameworks: see the module docstring
SUBPROCESS_GRACE = 60.0  # seconds a GRPO worker or memory row may run past --time_limit before it is stopped

# Peak dense bf16 tensor-core FLOP/s: half the "with sparsity" figure of NVIDIA's datasheets. Most specific first.
PEAK_BF16 = {
    "H100 PCIe": (756e12, "NVIDIA H100 datasheet (PCIe): 1,513 TFLOPS bf16 with sparsity, dense half"),
    "H100 NVL": (835e12, "NVIDIA H100 NVL datasheet: 1,671 TFLOPS bf16 with sparsity, dense half"),
    "H100": (989e12, "NVIDIA H100 datasheet (SXM): 1,979 TFLOPS bf16 with sparsity, dense half"),
    "H200 NVL": (835e12, "NVIDIA H200 datasheet (NVL): 1,671 TFLOPS bf16 with sparsity, dense half"),
    "H200": (989e12, "NVIDIA H200 datasheet (SXM): 1,979 TFLOPS bf16 with sparsity, dense half"),
}

MFU_SHAPES = {
    "0.5B": memory.SHAPES["0.5B"],
    "smoke": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=512,
        tie_word_embeddings=True,
    ),
}

# What each mode runs: shapes and step counts (the budget of each part).
PLANS = {
    "gpu": SimpleNamespace(
        device="cuda",
        decode_model="qwen2.5-0.5b-shaped",
        batch_sizes=(1, 64),
        prompt_len=64,
        new_tokens=128,
        repeats=3,
        compile_decode=True,
        copy_numel=2**28,  # float32: 1 GiB
        grpo_model="qwen0.5b",
        grpo_warmup=2,
        grpo_steps=2,
        mfu_shape="0.5B",
        mfu_variant="full_bf16",
        mfu_rows=8,  # SFT: 8 sequences; DPO: 4 pairs
        mfu_tokens=1024,
        mfu_warmup=2,
        mfu_steps=5,
        matmul_size=8192,
        memory_rows=("0.5B:full_bf16:nogc", "0.5B:lora:nogc"),
        memory_seq_len=512,
        time_limit=450.0,
    ),
    "smoke": SimpleNamespace(
        device="cpu",
        decode_model="tiny",
        batch_sizes=(1, 64),
        prompt_len=8,
        new_tokens=8,
        repeats=1,
        compile_decode=False,
        copy_numel=2**22,  # float32: 16 MiB
        grpo_model="tiny",
        grpo_warmup=1,
        grpo_steps=1,
        mfu_shape="smoke",
        mfu_variant="full_fp32",
        mfu_rows=4,
        mfu_tokens=32,
        mfu_warmup=1,
        mfu_steps=2,
        matmul_size=256,
        memory_rows=("sft:0.5B:lora:nogc",),
        memory_seq_len=16,
        time_limit=600.0,
    ),
}


class Table:
    """Rows of (part, row, value, unit, note); value None = not measured, the note says why. With ``out``, the
    JSON report (``header`` and the rows so far, ``"complete": false`` until ``write(complete=True)``) is rewritten
    after every row."""

    def __init__(self, out: str | None = None, header: dict | None = None) -> None:
        self.rows: list[dict] = []
        self.out, self.header = out, header or {}

    def add(self, part: str, row: str, value: float | None, unit: str, note: str = "") -> None:
        self.rows.append({"part": part, "row": row, "value": value, "unit": unit, "note": note})
        shown = "-" if value is None else f"{value:.4g}"
        print(f"  {row}: {shown} {unit} {note}".rstrip(), flush=True)
        self.write(complete=False)

    def write(self, complete: bool, **extra) -> None:
        if self.out:
            report = {**self.header, **extra, "complete": complete, "rows": self.rows}
            Path(self.out).write_text(json.dumps(report, indent=2) + "\n")

    def print(self) -> None:
        width = max(len(row["row"]) for row in self.rows)
        print(f"\n{'part':<8} {'row':<{width}} {'value':>10}  {'unit':<10} note")
        for row in self.rows:
            value = "skipped" if row["value"] is None else f"{row['value']:.4g}"
            print(f"{row['part']:<8} {row['row']:<{width}} {value:>10}  {row['unit']:<10} {row['note']}")


# ----------------------------------------------------------------------------------------------------------
# decode and bandwidth


def clone_bandwidth(device: str, numel: int, repeats: int = 5) -> float:
    """Bytes per second of cloning a float32 tensor of ``numel`` elements (read + write): median of
    ``repeats`` clones after one, timed with CUDA events on CUDA (perf_counter on CPU)."""
    source = torch.ones(numel, dtype=torch.float32, device=device)
    source.clone()
    seconds = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            source.clone()
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            source.clone()
            seconds.append(time.perf_counter() - begin)
    return 2 * source.numel() * source.element_size() / statistics.median(seconds)


def cudagraph_skips() -> int:
    """How often inductor has declined to capture a CUDA graph in this process (it logs why and runs without)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def decode_part(plan, table: Table, smoke_compile: bool) -> None:
    bandwidth = clone_bandwidth(plan.device, plan.copy_numel)
    table.add("decode", "device-to-device copy bandwidth", bandwidth / 1e9, "GB/s", "clone, read + write")
    model = generate.build_model(plan.decode_model, plan.device)
    compiled = plan.compile_decode or smoke_compile
    arguments = SimpleNamespace(device=plan.device, forward_step=False, compile=False, compile_static=compiled)
    labels = {
        "rlcore": "rlcore eager" + (" (static cache)" if plan.device == "cuda" else ""),
        "rlcore static+comp": "rlcore static cache + compiled step"
        + (" (CUDA graphs)" if plan.device == "cuda" else " (no graphs: CPU)"),
        "model.generate": "model.generate",
    }
    for batch in plan.batch_sizes:
        ids, mask = generate.ragged_prompts(batch, plan.prompt_len, model.config.vocab_size, plan.device)
        runs = generate.contenders(model, ids, mask, plan.new_tokens, arguments)
        skips_before = cudagraph_skips()
        warmup = {label: generate.timed(run, plan.device) for label, run in runs.items()}  # compiles here
        skipped_graphs = cudagraph_skips() - skips_before
        seconds = {label: [] for label in runs}
        for _ in range(plan.repeats):  # alternating, so a change of load hits every contender
            for label, run in runs.items():
                seconds[label].append(generate.timed(run, plan.device))
        for label, name in labels.items():
            row = f"decode tokens/s batch {batch}, {name}"
            if label not in seconds:
                reason = "skipped on CPU: CUDA graphs need CUDA; inductor's CPU compile outlasts the smoke budget"
                table.add("decode", row, None, "tokens/s", reason)
                if batch == 1:
                    table.add("decode", f"batch-1 decode / HBM bound, {name}", None, "fraction", reason)
                continue
            median = statistics.median(seconds[label])
            note = ""
            if label == "rlcore static+comp":
                note = f"warm-up incl. compile {warmup[label]:.1f} s; inductor skipped CUDA graphs {skipped_graphs}x"
            table.add("decode", row, batch * plan.new_tokens / median, "tokens/s", note)
            if batch == 1:
                step_bytes = generate.bytes_per_step(model, plan.prompt_len, plan.new_tokens)
                fraction = step_bytes / (median / plan.new_tokens) / bandwidth
                note = f"{step_bytes / 1e6:.1f} MB per token step (weights + KV)"
                table.add("decode", f"batch-1 decode / HBM bound, {name}", fraction, "fraction", note)
    del model
    release_static_caches()


def time_left(deadline: float) -> float:
    """Seconds a subprocess started now may run: until ``--time_limit``, then ``SUBPROCESS_GRACE`` more."""
    return max(0.0, deadline - time.perf_counter()) + SUBPROCESS_GRACE


# ----------------------------------------------------------------------------------------------------------
# one GRPO step, rlcore against TRL


def grpo_part(plan, table: Table, threads: int | None, output_dir: Path, deadline: float) -> None:
    config = compare_trl.CompareConfig(
        models=plan.grpo_model,
        parts="grpo",
        accuracy="none",
        device=plan.device,
        threads=threads,
        start_sft_steps=0,
        timing_warmup=plan.grpo_warmup,
        timing_steps=plan.grpo_steps,
        rounds=1,
        output_dir=str(output_dir),
    )
    model_dir = compare_trl.build_model(plan.grpo_model, output_dir / "models")
    settings = {**compare_trl.hyperparameters("grpo", plan.device), "beta": GRPO_BETA}
    shape = f"{settings['batch_size'] * settings['grad_accum_steps'] // settings['num_generations']} prompts x G "
    shape += f"{settings['num_generations']} x {settings['max_new_tokens']} new tokens"
    step_seconds = {}
    for framework in compare_trl.FRAMEWORKS:
        row = f"GRPO step seconds, {framework}"
        if framework == "trl" and importlib.util.find_spec("trl") is None:
            table.add("grpo", row, None, "s", "skipped: trl is not importable (pip install -e '.[bench]')")
            continue
        if time.perf_counter() > deadline:
            table.add("grpo", row, None, "s", "skipped: --time_limit reached")
            continue
        spec = dict(
            framework=framework,
            part="grpo",
            model_dir=model_dir,
            device=plan.device,
            threads=threads,
            flush_denormal=framework == "rlcore",  # as each framework runs when installed
            clock="wall",
            hyper=settings,
            steps=plan.grpo_warmup + plan.grpo_steps + 1,
            budget_seconds=None,
        )
        timeout = time_left(deadline)
        try:
            result = compare_trl.run_worker(spec, output_dir / "runs" / f"grpo-{framework}", config, timeout)
        except subprocess.TimeoutExpired:
            table.add("grpo", row, None, "s", f"stopped after {timeout:.0f} s: --time_limit")
            continue
        step_seconds[framework] = statistics.median(result["step_seconds"][plan.grpo_warmup :])
        note = f"{shape}, beta {GRPO_BETA}; median of {plan.grpo_steps} after {plan.grpo_warmup} warm-up; "
        note += f"peak {result['peak_mib']:.0f} MiB; mean reward {result['mean_reward']}"
        table.add("grpo", row, step_seconds[framework], "s", note)
    if len(step_seconds) == 2:
        table.add("grpo", "GRPO step rlcore / TRL", step_seconds["rlcore"] / step_seconds["trl"], "ratio")
    else:
        table.add("grpo", "GRPO step rlcore / TRL", None, "ratio", "skipped: no TRL row")


# ----------------------------------------------------------------------------------------------------------
# SFT and DPO model FLOP utilisation


def peak_flops(plan) -> tuple[float, str, float]:
    """(peak FLOP/s used for MFU, its source, the measured matmul FLOP/s)."""
    size = plan.matmul_size
    dtype = torch.bfloat16 if plan.device == "cuda" else torch.float32
    a, b = (torch.randn(size, size, device=plan.device, dtype=dtype) for _ in range(2))
    a @ b
    seconds = statistics.median(generate.timed(lambda: [a @ b for _ in range(10)], plan.device) / 10 for _ in range(3))
    measured = 2 * size**3 / seconds
    if plan.device == "cuda":
        name = torch.cuda.get_device_name()
        flops, source = datasheet_peak(name) or (measured, f"not in the lookup; measured {size}^3 bf16 matmul")
        return flops, f"{name}: {source}", measured
    return measured, f"CPU: measured {size}^3 float32 matmul", measured


def datasheet_peak(device_name: str) -> tuple[float, str] | None:
    """(dense bf16 FLOP/s, source) of the first ``PEAK_BF16`` key in the device name, or None."""
    return next((value for key, value in PEAK_BF16.items() if key in device_name), None)


def train_step_seconds(algorithm: str, policy, reference, optimizer, input_ids, plan) -> float:
    """Median seconds of one optimizer step (``plan.mfu_steps`` after ``plan.mfu_warmup``): SFT = token-mean
    NLL of every position; DPO = sigmoid loss, beta 0.1, rows (2i, 2i + 1) a (chosen, rejected) pair."""
    scored = input_ids.shape[1] - 1

    def step() -> None:
        logp = memory.logprobs(policy, input_ids, scored)  # [rows, T - 1]
        if algorithm == "sft":
            loss = -masked_mean(logp, torch.ones_like(logp))
        else:
            with torch.no_grad():
                ref = memory.logprobs(reference, input_ids, scored).sum(1)  # [rows]
            logp = logp.sum(1)
            loss, _ = dpo_loss(logp[0::2], logp[1::2], ref[0::2], ref[1::2], beta=0.1)
        loss.backward()
        optim.optimizer_step(policy.parameters(), optimizer, None, 1.0)

    for _ in range(plan.mfu_warmup):
        step()
    return statistics.median(generate.timed(step, plan.device) for _ in range(plan.mfu_steps))


def training_flops(algorithm: str, parameters: int, tokens: int) -> int:
    """Model FLOPs of one step: 2 N per token forward, 4 N backward (6 N D); DPO adds the reference's forward."""
    return (6 if algorithm == "sft" else 6 + 2) * parameters * tokens


def mfu_part(plan, table: Table) -> None:
    peak, source, measured = peak_flops(plan)
    table.add("mfu", "peak dense FLOP/s used", peak / 1e12, "TFLOP/s", source)
    table.add("mfu", "measured matmul FLOP/s", measured / 1e12, "TFLOP/s", f"{plan.matmul_size}^3")
    torch.manual_seed(0)
    config = Qwen2Config(**MFU_SHAPES[plan.mfu_shape], max_position_embeddings=4096, attn_implementation="sdpa")
    policy = memory.build(Qwen2ForCausalLM, config, plan.mfu_variant, plan.device)
    parameters = models.parameter_counts(policy)[1]
    optimizer = optim.build_optimizer(policy, lr=1e-5, kind="adamw")
    input_ids = torch.randint(1, config.vocab_size, (plan.mfu_rows, plan.mfu_tokens), device=plan.device)
    tokens = input_ids.numel()
    for algorithm in ("sft", "dpo"):
        reference = models.frozen_copy(policy) if algorithm == "dpo" else None
        seconds = train_step_seconds(algorithm, policy, reference, optimizer, input_ids, plan)
        flops = training_flops(algorithm, parameters, tokens)
        note = (
            f"{plan.mfu_shape} ({parameters / 1e6:.2f}M params, {plan.mfu_variant}), {plan.mfu_rows} x "
            f"{plan.mfu_tokens} tokens, {seconds:.3f} s/step, {flops / seconds / measured:.0%} of measured matmul"
        )
        table.add("mfu", f"{algorithm.upper()} MFU", flops / seconds / peak, "fraction", note)


# ----------------------------------------------------------------------------------------------------------
# memory.py's rows


def memory_part(plan, table: Table, deadline: float) -> None:
    environment = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "131072",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    extra = ["--device", plan.device, "--seq_len", str(plan.memory_seq_len)]
    unit = "GiB" if plan.device == "cuda" else "GiB RSS"
    for algorithm in memory.ALGORITHMS:
        for variant in memory.VARIANTS:
            for checkpointing in (False, True):
                row = (algorithm, "0.5B", variant, checkpointing)
                if not memory.selected(row, list(plan.memory_rows)):
                    continue
                name = f"memory {algorithm} 0.5B {variant} ckpt {'on' if checkpointing else 'off'}"
                guess = memory.estimate(*row, plan.memory_seq_len) / memory.GIB
                if time.perf_counter() > deadline:
                    table.add("memory", name, None, unit, "skipped: --time_limit reached")
                    continue
                flag = f"{algorithm},0.5B,{variant},{int(checkpointing)}"
                result = memory.subprocess_json(["--row", flag, *extra], environment, time_left(deadline))
                if "error" in result:
                    table.add("memory", name, None, unit, f"error: {result['error'][:100]}")
                    continue
                note = f"estimate {guess:.1f} GiB, fwd+bwd growth {result['backward_growth'] / memory.GIB:.2f} GiB"
                table.add("memory", name, result["peak_bytes"] / memory.GIB, unit, note)


# ----------------------------------------------------------------------------------------------------------


def parse_arguments(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, the same code paths (~1 minute)")
    parser.add_argument("--out", default=None, help="also write the table as JSON to this path")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--time_limit", type=float, default=None, help="seconds; parts that would start later skip")
    parser.add_argument("--threads", type=int, default=None, help="torch threads, here and in the subprocesses")
    parser.add_argument("--smoke_compile", action="store_true", help="with --smoke: also the compiled decode step")
    parser.add_argument("--output_dir", default=None, help="models and runs of the GRPO part (default: a temp dir)")
    args = parser.parse_args(argv)
    args.part_list = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = sorted(set(args.part_list) - set(PARTS))
    if unknown or not args.part_list:
        parser.error(f"--parts: unknown {unknown}; expected a comma-separated subset of {','.join(PARTS)}")
    if args.time_limit is not None and args.time_limit <= 0:
        parser.error(f"--time_limit must be positive seconds, got {args.time_limit}")
    if not args.smoke and not torch.cuda.is_available():
        parser.error(
            f"no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda}: a driver older than "
            "that build also reads as none): this check is for one H100/H200 (--smoke runs it on CPU at tiny shapes)"
        )
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_arguments(argv)
    plan = PLANS["smoke" if args.smoke else "gpu"]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.cuda.get_device_name() if plan.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"gpu_check {'smoke ' if args.smoke else ''}on {device} | torch {torch.__version__} | load {os.getloadavg()}")
    start = time.perf_counter()
    deadline = start + (args.time_limit or plan.time_limit)
    header = {"device": device, "smoke": args.smoke, "torch": torch.__version__, "plan": vars(plan)}
    table = Table(args.out, header)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        output_dir = Path(args.output_dir or scratch).resolve()
        parts = {
            "decode": lambda: decode_part(plan, table, args.smoke_compile),
            "grpo": lambda: grpo_part(plan, table, args.threads, output_dir, deadline),
            "mfu": lambda: mfu_part(plan, table),
            "memory": lambda: memory_part(plan, table, deadline),
        }
        for part in args.part_list:
            if time.perf_counter() > deadline:
                table.add(part, f"{part} (whole part)", None, "", "skipped: --time_limit reached")
                continue
            began = time.perf_counter()
            print(f"[{part}] started at {began - start:.0f} s", flush=True)
            parts[part]()
            if plan.device == "cuda":
                gc.collect()
                torch.cuda.empty_cache()  # the memory rows' and GRPO's subprocesses share the device
            print(f"[{part}] took {time.perf_counter() - began:.1f} s", flush=True)
    table.print()
    print(f"\ntotal {time.perf_counter() - start:.1f} s")
    if args.out:
        table.write(complete=True, seconds=time.perf_counter() - start)
        print(f"table: {args.out}")
    return table.rows


if __name__ == "__main__":
    cli(main)  # bad input: one line, not a traceback
