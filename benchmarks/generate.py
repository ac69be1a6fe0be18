"""Completion tokens per second: rlcore.rollout.generate against transformers' model.generate.

Both sample (temperature 1, no top-k/top-p) the same number of tokens from the same left-padded ragged
prompts: EOS is switched off for both (``eos_token_ids=[]`` here, ``generation_config.eos_token_id = None``
there), so every row runs to ``--new-tokens``. Runs alternate between the two (``--repeats`` times, after
one warm-up run each) and the table reports medians, so a neighbour's load on a shared machine hits both
alike. tokens/s = batch * new_tokens / wall time of the whole call (prefill included).

CPU (the default; random-weight models, nothing downloaded):

    python benchmarks/generate.py                      # tiny (~1M) and 20m (~19M) models, batch 1 16 64
    python benchmarks/generate.py --models tiny --batch-sizes 64 --repeats 5
    python benchmarks/generate.py --threads 1 --clock process   # steadier when others share the cores
    python benchmarks/generate.py --forward-step   # also rlcore through the model's forward, not the native step
    python benchmarks/generate.py --linear-floor   # also the bounds set by the model's matmuls alone
    python benchmarks/generate.py --compile        # also generate(compile=True): the native step compiled
    python benchmarks/generate.py --compile-static # also the model's forward compiled over the static cache

"rlcore" is the default ``generate``: on CPU, the native decode step (rlcore.decode) for these Llama models.
The bounds: "linear layers only" times the model's ``nn.Linear`` layers on ``[batch, in]`` inputs, once per
decode step; "linear + prefill" adds them once over the prompts (``[batch * prompt_len, in]``), which
every contender also runs. Each prints the share of it that each rlcore contender reaches.

GPU (a Qwen2.5-0.5B-shaped model with random bf16 weights; reports eager and compiled decoding, compile
warm-up timed apart, and batch-1 decode bandwidth utilisation):

    python benchmarks/generate.py --device cuda --models qwen2.5-0.5b-shaped --compile

Bandwidth utilisation = (bytes read per decode step: every weight once + the live KV cache) / step time,
divided by the bandwidth of a large device-to-device copy measured in the same run (reads + writes).
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from rlcore import decode
from rlcore.rollout import generate, release_static_caches
from rlcore.run import cli
from rlcore.toy import tiny_model


def build_model(name: str, device: str) -> torch.nn.Module:
    if name == "tiny":
        model = tiny_model()
    elif name == "20m":
        model = tiny_model(
            hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4
        )
    elif name == "qwen2.5-0.5b-shaped":  # Qwen/Qwen2.5-0.5B's config.json, random weights
        config = Qwen2Config(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            dtype="bfloat16",
        )
        torch.manual_seed(0)
        with torch.device(device):  # built on the device: no float32 copy on the host
            model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    else:
        raise ValueError(f"unknown model {name!r}")
    model.generation_config.eos_token_id = None  # every row runs to max_new_tokens in model.generate too
    model.generation_config.pad_token_id = 0
    return model.to(device).eval()


def ragged_prompts(batch: int, prompt_len: int, vocab_size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of lengths spread over [prompt_len / 2, prompt_len]."""
    generator = torch.Generator().manual_seed(batch)
    ids = torch.randint(5, vocab_size, (batch, prompt_len), generator=generator)
    lengths = torch.randint(prompt_len // 2, prompt_len + 1, (batch,), generator=generator)
    mask = (torch.arange(prompt_len) >= prompt_len - lengths[:, None]).long()  # [B, P]
    return ids.masked_fill(mask == 0, 0).to(device), mask.to(device)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def timed(fn, device: str, clock: str = "wall") -> float:
    now = CLOCKS[clock]
    synchronize(device)
    start = now()
    fn()
    synchronize(device)
    return now() - start


def contenders(model, ids, mask, new_tokens: int, args) -> dict:
    def hf():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0
        )
        assert out.shape[1] == ids.shape[1] + new_tokens, "model.generate stopped early"

    def rlcore(static_cache: bool, compile: bool, native_step: bool | None = None):
        def run():
            rollout = generate(
                model,
                ids,
                mask,
                max_new_tokens=new_tokens,
                eos_token_ids=[],
                pad_token_id=0,
                temperature=1.0,
                static_cache=static_cache,
                compile=compile,
                native_step=native_step,
            )
            assert rollout.completion_ids.shape[1] == new_tokens

        return run

    runs = {"model.generate": hf, "rlcore": rlcore(args.device == "cuda", False)}
    if args.forward_step:
        runs["rlcore model fwd"] = rlcore(args.device == "cuda", False, native_step=False)
    if args.compile:  # CUDA: the static cache and CUDA graphs; CPU: the native step compiled (inductor C++)
        runs["rlcore compiled"] = rlcore(args.device == "cuda", True)
    if args.compile_static:
        runs["rlcore static+comp"] = rlcore(True, True)
    return runs


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a 1 GiB device-to-device copy (counting the read and the write)."""
    source = torch.empty(2**28, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    seconds = statistics.median(timed(lambda: target.copy_(source), device) for _ in range(5))
    return 2 * source.numel() * source.element_size() / seconds


def linear_floor(
    model, batch: int, device: str, repeats: int, clock: str = "wall", prompt_len: int = 0, layout: str = "linear"
) -> float:
    """Seconds of the model's ``nn.Linear`` layers alone: per decode step, on ``[batch, in]`` inputs; or,
    with ``prompt_len``, for the prefill of ``batch`` prompts of that length (every layer on
    ``[batch * prompt_len, in]``, the LM head on ``[batch, in]``: rlcore's prefill keeps the last position's
    logits only).

    ``layout="linear"`` calls the layers (``x W^T`` against the ``[out, in]`` weight, as every transformers
    forward does): ``batch / floor`` is the "linear layers only" row's tokens per second over the decode
    steps, and ``batch * new_tokens / (prefill floor + new_tokens * floor)`` the "linear + prefill" row's over
    the whole call. It is a reference, not a hard floor: ``layout="copy"`` multiplies against contiguous
    ``[in, out]`` copies of the weights, as rlcore's native step does on CPU (``rlcore.decode._operand``),
    which MKL runs faster at these row counts (``benchmarks/profile_decode.py --bounds``).
    """
    head = model.get_output_embeddings()
    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    rows = [batch if prompt_len == 0 or linear is head else batch * prompt_len for linear in linears]
    inputs = [
        torch.randn(n, linear.in_features, device=device, dtype=linear.weight.dtype) for n, linear in zip(rows, linears)
    ]
    calls = 20 if prompt_len == 0 else 2
    if layout == "copy":
        linears = [
            partial(decode._linear, weight_t=decode._operand(linear.weight), bias=linear.bias) for linear in linears
        ]

    def several_steps():
        for _ in range(calls):
            for linear, x in zip(linears, inputs):
                linear(x)

    with torch.no_grad():
        several_steps()  # warm-up
        return statistics.median(timed(several_steps, device, clock) / calls for _ in range(repeats))


def bytes_per_step(model, prompt_len: int, new_tokens: int) -> float:
    """Weights read once per decode step plus the average live KV cache of one row."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_per_token = (
        2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * next(model.parameters()).element_size()
    )
    return weights + kv_per_token * (prompt_len + new_tokens / 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", nargs="+", default=["tiny", "20m"], choices=["tiny", "20m", "qwen2.5-0.5b-shaped"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time generate(compile=True): on CUDA the static cache with CUDA graphs, on CPU the native step compiled",
    )
    parser.add_argument(
        "--compile-static",
        action="store_true",
        help="also time the model's forward compiled over the static cache (generate(static_cache=True, compile=True))",
    )
    parser.add_argument(
        "--forward-step",
        action="store_true",
        help="also time rlcore decoding through the model's forward (native_step=False)",
    )
    parser.add_argument(
        "--linear-floor",
        action="store_true",
        help="also print the bound set by the model's matmuls alone (its Linear layers at the batch size)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument(
        "--clock",
        default="wall",
        choices=list(CLOCKS),
        help="wall time, or this process's CPU time (steadier on a shared machine; meaningful with --threads 1)",
    )
    args = parser.parse_args()
    lowest = {"--batch-sizes": (args.batch_sizes, 1), "--prompt-len": ([args.prompt_len], 2)}
    lowest |= {"--new-tokens": ([args.new_tokens], 1), "--repeats": ([args.repeats], 1)}
    for flag, (values, bound) in lowest.items():
        if min(values) < bound:
            parser.error(
                f"{flag} must be >= {bound}, got {values}" + (" (prompts are 1/2 to 1 times it)" if bound > 1 else "")
            )
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"device={args.device} threads={torch.get_num_threads()} clock={args.clock} torch={torch.__version__} "
        f"prompt_len={args.prompt_len} new_tokens={args.new_tokens} repeats={args.repeats} (medians)"
    )
    bandwidth = copy_bandwidth(args.device) if args.device == "cuda" else None
    header = f"{'model':<22}{'batch':>6}  {'contender':<18}{'tokens/s':>10}{'vs generate':>13}"
    print(header + ("  bandwidth use" if bandwidth else ""))
    for name in args.models:
        model = build_model(name, args.device)
        for batch in args.batch_sizes:
            ids, mask = ragged_prompts(batch, args.prompt_len, model.config.vocab_size, args.device)
            runs = contenders(model, ids, mask, args.new_tokens, args)
            warmup = {label: timed(run, args.device) for label, run in runs.items()}  # compiles here
            seconds = {label: [] for label in runs}
            for _ in range(args.repeats):
                for label, run in runs.items():
                    seconds[label].append(timed(run, args.device, args.clock))
            baseline = statistics.median(seconds["model.generate"])
            for label, times in seconds.items():
                median = statistics.median(times)
                line = f"{name:<22}{batch:>6}  {label:<18}{batch * args.new_tokens / median:>10.0f}{baseline / median:>12.2f}x"
                if bandwidth and batch == 1:
                    step_seconds = median / args.new_tokens
                    line += (
                        f"  {bytes_per_step(model, args.prompt_len, args.new_tokens) / step_seconds / bandwidth:>6.1%}"
                    )
                if "comp" in label:
                    line += f"  (warm-up incl. compile {warmup[label]:.1f}s)"
                print(line, flush=True)
            if args.linear_floor:
                floor = linear_floor(model, batch, args.device, args.repeats, args.clock)
                prefill = linear_floor(model, batch, args.device, args.repeats, args.clock, args.prompt_len)
                bounds = {
                    "linear layers only": floor * args.new_tokens,
                    "linear + prefill": prefill + floor * args.new_tokens,
                }
                for label, bound in bounds.items():
                    shares = ", ".join(
                        f"{run} {bound / statistics.median(times):.0%}"
                        for run, times in seconds.items()
                        if "rlcore" in run
                    )
                    print(
                        f"{name:<22}{batch:>6}  {label:<18}{batch * args.new_tokens / bound:>10.0f}"
                        f"{baseline / bound:>12.2f}x  (of it: {shares})",
                        flush=True,
                    )
        release_static_caches()


if __name__ == "__main__":
    cli(main)  # bad input: one line, not a traceback
