"""Peak memory of one DPO training step: full fine-tuning vs LoRA vs QLoRA, in one run.

The step is what a DPO recipe does: reference forward on chosen + rejected (no gradients), policy forward,
per-sequence log-probs of the completion tokens, ``rlcore.dpo_loss``, backward, ``AdamW`` step. The model is
Qwen2.5-0.5B-shaped (hidden 896, 24 layers, 14 query / 2 key-value heads, MLP 4864, vocab 151936, tied
embeddings; 494M parameters) with random weights, in float32 for every variant:

- ``full``:  every parameter trained; the reference is a second, frozen copy of the model;
- ``lora``:  ``prepare_model(lora_r=16)`` on the default projections; the reference is the same model with
  the adapters off (``reference_context``), so no second copy;
- ``qlora``: ``prepare_model(lora_r=16, load_in_4bit=True)``: the projections stored in nf4, the
  embeddings (tied with the LM head) and norms in float32.

Each variant runs in its own subprocess so that the peaks do not mix. On CPU the figure is the process's
peak resident set size over its whole life (``resource.getrusage(...).ru_maxrss``: interpreter, model
construction in float32, quantisation, the step), nothing subtracted. glibc's malloc raises its mmap
threshold (up to 32 MiB) each time a large block is freed, after which freed blocks stay in its heap and
RSS counts memory the program no longer uses; so each subprocess runs with the threshold fixed at 128 KiB
(``MALLOC_MMAP_THRESHOLD_=131072``) and RSS follows live memory (``--malloc_defaults`` to keep glibc's
behaviour). On CUDA the figure is ``torch.cuda.max_memory_allocated`` from the end of setup (weights,
adapters already resident) through the step.

Run from the repository root with rlcore installed (``pip install -e .``); full fine-tuning of 0.5B in
float32 with AdamW needs about 11 GB of RAM:

    python benchmarks/memory.py                       # CPU, 2 pairs x 64 tokens
    python benchmarks/memory.py --device cuda --pairs 8 --seq_len 512
"""

import argparse
import copy
import json
import os
import resource
import subprocess
import sys

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from rlcore import dpo_loss, gather_logprobs, masked_sum
from rlcore.lora import lora_parameters, prepare_model, reference_context

VARIANTS = ("full", "lora", "qlora")
LORA_R = 16

QWEN25_05B_SHAPE = dict(
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
)


def sequence_logps(model: torch.nn.Module, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token) over the completion tokens of each row: [2P, T] -> [2P]."""
    logits = model(input_ids).logits[:, :-1]  # [2P, T-1, V]: position t predicts token t+1
    token_logps = gather_logprobs(logits, input_ids[:, 1:])  # [2P, T-1]
    return masked_sum(token_logps, completion_mask[:, 1:], dim=-1)  # [2P]


def dpo_step(model, ref_model, optimizer, input_ids, completion_mask) -> torch.Tensor:
    """One DPO step on P pairs stacked as [chosen rows; rejected rows]; returns the loss."""
    pairs = input_ids.shape[0] // 2
    with reference_context(model, ref_model) as reference:
        ref_logps = sequence_logps(reference, input_ids, completion_mask)  # [2P]
    logps = sequence_logps(model, input_ids, completion_mask)  # [2P]
    loss, _ = dpo_loss(logps[:pairs], logps[pairs:], ref_logps[:pairs], ref_logps[pairs:], beta=0.1)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def run_variant(variant: str, device: str, pairs: int, seq_len: int) -> dict:
    """Build the model for ``variant`` on ``device``, run one DPO step, return its peak memory in bytes."""
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B_SHAPE)).train()
    ref_model = None
    if variant == "full":
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    else:
        prepare_model(model, lora_r=LORA_R, lora_alpha=2 * LORA_R, load_in_4bit=variant == "qlora")
        optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-4)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, QWEN25_05B_SHAPE["vocab_size"], (2 * pairs, seq_len), generator=generator).to(device)
    completion_mask = torch.zeros_like(input_ids)  # [2P, T]: the second half of each row is the completion
    completion_mask[:, seq_len // 2 :] = 1

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    loss = dpo_step(model, ref_model, optimizer, input_ids, completion_mask)
    if device == "cuda":
        peak_bytes = torch.cuda.max_memory_allocated()
    else:
        peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"variant": variant, "peak_bytes": peak_bytes, "trainable": trainable, "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--malloc_defaults", action="store_true", help="keep glibc's dynamic mmap threshold")
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant in this process (used internally)")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.device, args.pairs, args.seq_len)))
        return

    environment = dict(os.environ) if args.malloc_defaults else {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    results = []
    for variant in VARIANTS:
        command = [
            sys.executable,
            __file__,
            "--variant",
            variant,
            "--device",
            args.device,
            "--pairs",
            str(args.pairs),
            "--seq_len",
            str(args.seq_len),
        ]
        output = subprocess.run(command, check=True, capture_output=True, text=True, env=environment).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))

    measure = "peak RSS (ru_maxrss)" if args.device == "cpu" else "max_memory_allocated during the step"
    malloc = "glibc defaults" if args.malloc_defaults else "MALLOC_MMAP_THRESHOLD_=131072"
    print(
        f"One DPO step, Qwen2.5-0.5B shape, float32, {args.pairs} pairs x {args.seq_len} tokens, "
        f"device {args.device} ({malloc}), LoRA r={LORA_R} on q,k,v,o,gate,up,down; torch {torch.__version__}"
    )
    print(f"{'variant':<8} {'trainable params':>17} {measure:>38} {'ratio to full':>14} {'loss':>8}")
    full_peak = results[0]["peak_bytes"]
    for result in results:
        print(
            f"{result['variant']:<8} {result['trainable'] / 1e6:>16.1f}M {result['peak_bytes'] / 2**30:>34.2f} GiB "
            f"{result['peak_bytes'] / full_peak:>14.2f} {result['loss']:>8.4f}"
        )


if __name__ == "__main__":
    main()
