"""Peak memory of one optimizer step of SFT, DPO, GRPO and PPO at Qwen2.5-0.5B, 1.5B and 7B shapes, in one run.

Rows: algorithm x shape x variant x gradient checkpointing (off, on). Variants:

- ``full_fp32``: every parameter trained, float32 weights, torch AdamW (moments float32);
- ``full_bf16``: every parameter trained, bfloat16 weights, torch AdamW (moments bfloat16: rlcore.models'
  precision policy);
- ``lora``:      bfloat16 frozen base, LoRA r=16 on q,k,v,o,gate,up,down (float32 adapters), AdamW;
- ``qlora``:     nf4 base with double quantisation (compute bfloat16), bfloat16 embeddings, norms and LM
  head, float32 adapters, ``paged_adamw_8bit``.

One step, batch 1 (SFT: one sequence; DPO: one pair; GRPO: a group of 2 completions; PPO: one sequence),
each sequence ``--seq_len`` tokens, half prompt, half completion; no generation (sampling is not part of
the optimizer step). What each step holds, as the recipes do:

- SFT: the policy; loss = token-mean NLL of the completion;
- DPO: the policy and the reference (a frozen copy for full fine-tuning, the adapters switched off with LoRA);
- GRPO: the policy and the reference as in DPO; clipped surrogate + k3 KL (beta 0.04);
- PPO: the policy, the reference (as in DPO), a value model (``ValueModel``: full variants, a second
  backbone trained in full; LoRA variants, a value head on the policy's own trunk, the one-base layout of
  recipes/ppo.py ``--value_on_policy``) and a reward model: for LoRA variants by default a frozen LoRA
  adapter (r=16, the same targets) and score head on the policy's own base, switched on for the scoring pass
  (recipes/ppo.py ``--reward_on_policy``: one base in all); with ``--ppo_reward separate``, and for the full
  variants, a separate frozen sequence classifier of the variant's base dtype (4-bit for qlora).

Log-probs come from the body's hidden states through the chunked LM head (``rlcore.models.token_logprobs``, 256
positions per chunk): no ``[B, T, V]`` logits. Weights are random, built from the meta device (``build``): the
first decoder layer drawn (and quantised for qlora), the others deep copies of it, each in its own storage
(bitsandbytes quantises slowly on CPU: doing it once is what makes a 7B row practical there; memory and step
time do not depend on the values); a qlora model never holds more than one layer in bfloat16, a bf16 model
never a float32 copy.

Each row runs in its own subprocess. On CPU the figure is the subprocess's peak RSS (``ru_maxrss``:
interpreter, libraries, model construction and the step, nothing subtracted), with glibc's mmap threshold fixed
(``MALLOC_MMAP_THRESHOLD_=131072``) so RSS follows live memory. On CUDA it is
``torch.cuda.max_memory_allocated`` over the step, after the models are built. "fwd+bwd growth" is how far the
high-water mark rose from the start of the step to the end of the backward pass (activations, gradients,
LM-head chunks, before the optimizer allocates its state): where checkpointing shows, since the optimizer
step's own peak (state allocated at the first step) often dominates the whole-step figure. "activations" adds
up the storage autograd saves for the backward pass during the step's training forward passes (a
``saved_tensors_hooks`` count, trained weights excluded): the activation memory that gradient checkpointing
cuts, on any device (with checkpointing: each layer's input, which torch saves through the same hooks). "held
after fwd" checks it from outside: the live memory the training forward passes leave behind for the backward
pass (the current RSS on CPU, ``memory_allocated`` on CUDA, after the forward minus before it). Before running
a row the script estimates its peak (``estimate``: weights, gradients, optimizer state, activations, the
LM-head chunks; printed beside every row): rows whose estimate exceeds ``--budget_gib`` print "does not fit",
and rows left out by ``--only`` print "not run"; both with the estimate.

    python benchmarks/memory.py --only 0.5B                # CPU, sequence 512, every 0.5B row
    python benchmarks/memory.py --only dpo:7B:qlora --seq_len 128
    python benchmarks/memory.py --device cuda --budget_gib 130    # every row, on one GPU
    python benchmarks/memory.py --seq_len_7b 128 --json rows.json  # every row on a CPU, where a 7B step at 512 takes 10+ min
    python benchmarks/memory.py --only ppo:0.5B:lora --ppo_reward separate   # LoRA PPO with two bases

``--json PATH`` also writes every row (estimate, status, measured figures in bytes, seconds, the load average
when the row ended) and the command to a JSON file; ``--markdown PATH`` prints such a file as markdown tables (the
peaks by shape, checkpointing off / on, then every row) and runs nothing.

``--logprob_part`` measures instead the log-prob part of a GRPO step at the 0.5B shape (8 completions x 512
tokens, vocabulary 151,936): the naive ``[B, T, V]`` logits path against the chunked LM head.
"""

import argparse
import contextlib
import copy
import functools
import itertools
import json
import os
import resource
import subprocess
import sys
import time

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification, Qwen2Model

from rlcore import (
    chunked_logprobs,
    dpo_loss,
    gather_logprobs,
    kl_estimate,
    lora,
    masked_mean,
    models,
    optim,
    policy_loss,
    value_loss,
)
from rlcore.rewards import PolicyRewardModel
from rlcore.run import cli

ALGORITHMS = ("sft", "dpo", "grpo", "ppo")
VARIANTS = ("full_fp32", "full_bf16", "lora", "qlora")
LORA_R = 16
GIB = 2**30
SHAPES = {
    "0.5B": dict(
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "1.5B": dict(
        hidden_size=1536,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        intermediate_size=8960,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "7B": dict(
        hidden_size=3584,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        intermediate_size=18944,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
}


# ----------------------------------------------------------------------------------------------------------
# models with random weights, one layer at a time


def _fill_(module: nn.Module) -> None:
    """Random weights in place: matrices N(0, 0.02), norm scales 1, biases 0."""
    with torch.no_grad():
        for parameter in module.parameters(recurse=False):
            if parameter.ndim >= 2:
                parameter.normal_(std=0.02)
            elif "norm" in type(module).__name__.lower():
                parameter.fill_(1.0)
            else:
                parameter.zero_()


def build(model_class, config: Qwen2Config, variant: str, device: str) -> nn.Module:
    """``model_class(config)`` with random weights in the variant's storage, never holding a full-precision copy
    it does not need: built on the meta device; the first decoder layer materialised (and quantised to nf4 for
    qlora), every other layer a deep copy of it (its own storage: the same bytes as distinct layers, and the
    same time per step, which does not depend on the values); then the rest (embeddings, final norm, heads)."""
    dtype = torch.float32 if variant == "full_fp32" else torch.bfloat16
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = model_class(config)
    finally:
        torch.set_default_dtype(default_dtype)
    body = model if isinstance(model, Qwen2Model) else model.model
    tied = getattr(config, "tie_word_embeddings", False) and hasattr(model, "lm_head")
    first = body.layers[0].to_empty(device=device)
    for module in first.modules():
        _fill_(module)
    if variant == "qlora":
        lora.quantize_4bit(first, double_quant=True, compute_dtype=torch.bfloat16)
    for index in range(1, len(body.layers)):  # copies: bitsandbytes quantises slowly on CPU
        body.layers[index] = copy.deepcopy(first)
        body.layers[index].self_attn.layer_idx = index
    rest = [m for m in model.modules() if not any(_inside(m, layer) for layer in body.layers)]
    rest = [m for m in rest if not (tied and m is model.lm_head)]  # the tied head is the embedding
    for module in rest:
        for name, parameter in list(module.named_parameters(recurse=False)):
            if parameter.is_meta:
                value = torch.empty(parameter.shape, dtype=dtype, device=device)
                setattr(module, name, nn.Parameter(value, requires_grad=parameter.requires_grad))
        _fill_(module)
    if tied:
        model.lm_head.weight = body.embed_tokens.weight
    with torch.device(device):  # its buffers are computed in __init__, not stored
        body.rotary_emb = type(body.rotary_emb)(config)
    return model.train()


def _inside(module: nn.Module, layer: nn.Module) -> bool:
    return any(module is m for m in layer.modules())


# ----------------------------------------------------------------------------------------------------------
# one step of each algorithm


def logprobs(model, input_ids, last):
    attention_mask = torch.ones_like(input_ids)
    return models.token_logprobs(model, input_ids, attention_mask, last)[0]  # [B, last]


def run_row(
    algorithm: str, shape: str, variant: str, checkpointing: bool, seq_len: int, device: str, ppo_reward: str
) -> dict:
    torch.manual_seed(0)
    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=4096, attn_implementation="sdpa", num_labels=1)
    config.pad_token_id = 0
    full = variant.startswith("full")
    policy = build(Qwen2ForCausalLM, config, variant, device)
    if not full:
        lora.prepare_model(policy, lora_r=LORA_R, lora_alpha=2 * LORA_R)
    reference = models.frozen_copy(policy) if full and algorithm != "sft" else None
    trained: list[nn.Module] = [policy]
    value_model = value_head = reward_model = None
    if algorithm == "ppo" and (full or ppo_reward == "separate"):
        reward_model = build(Qwen2ForSequenceClassification, config, variant, device).eval().requires_grad_(False)
    elif algorithm == "ppo":  # the reward model's adapter and score head on the policy's base
        lora.apply_lora(policy, r=LORA_R, alpha=2 * LORA_R, adapter_name="reward")
        for parameter in lora.lora_parameters(policy, "reward"):  # frozen, as AdapterRewardScorer keeps it
            parameter.requires_grad_(False)
        score = nn.Linear(config.hidden_size, 1, bias=False, device=device).requires_grad_(False)
        reward_model = PolicyRewardModel(policy, score)
    if algorithm == "ppo":
        if full:
            value_model = models.ValueModel(build(Qwen2Model, config, variant, device), config.hidden_size).to(device)
            trained.append(value_model)
        else:
            value_head = nn.Linear(config.hidden_size, 1, device=device)
            trained.append(value_head)
    if checkpointing:
        for module in (policy, value_model):
            if module is not None:
                models.enable_gradient_checkpointing(module)
    kind = "paged_adamw_8bit" if variant == "qlora" else "adamw"
    optimizer = optim.build_optimizer(nn.ModuleList(trained), lr=1e-5, kind=kind)
    trainable, total = models.parameter_counts(*trained, *(m for m in (reference, reward_model) if m is not None))

    rows = {"sft": 1, "dpo": 2, "grpo": 2, "ppo": 1}[algorithm]
    completion = seq_len // 2
    input_ids = torch.randint(1, config.vocab_size, (rows, seq_len), generator=torch.Generator().manual_seed(0))
    input_ids = input_ids.to(device)
    mask = torch.ones(rows, completion, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = _high_water(device)
    start = time.perf_counter()
    if algorithm != "sft":
        with lora.reference_context(policy, reference) as ref_model:
            ref_logp = logprobs(ref_model, input_ids, completion)  # [rows, T]
    parameter_storage = {p.untyped_storage().data_ptr() for m in trained for p in m.parameters()}
    saved_storage: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:  # what autograd keeps for the backward pass, weights excluded
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storage:
            saved_storage[storage.data_ptr()] = storage.nbytes()
        return tensor

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
    live_before = _live(device)
    hooks.__enter__()
    if algorithm == "sft":
        loss = -masked_mean(logprobs(policy, input_ids, completion), mask)
    elif algorithm == "dpo":
        logp = (logprobs(policy, input_ids, completion) * mask).sum(1)  # [2]
        ref = (ref_logp * mask).sum(1)
        loss, _ = dpo_loss(logp[:1], logp[1:], ref[:1], ref[1:], beta=0.1)
    elif algorithm == "grpo":
        logp = logprobs(policy, input_ids, completion)
        advantages = torch.tensor([[1.0], [-1.0]], device=device).expand(2, completion)
        loss, _ = policy_loss(logp, logp.detach(), advantages, mask)
        loss = loss + 0.04 * masked_mean(kl_estimate(logp, ref_logp, kind="k3"), mask)
    else:  # ppo: score with the reward model, values, then the clipped policy and value losses
        on_policy = isinstance(reward_model, PolicyRewardModel)
        with torch.no_grad(), lora.use_adapter(policy, "reward") if on_policy else contextlib.nullcontext():
            score = models.sequence_scores(reward_model, input_ids, torch.ones_like(input_ids))  # [1]
        if full:
            logp = logprobs(policy, input_ids, completion)
            values = models.completion_values(value_model, input_ids, torch.ones_like(input_ids), completion)
        else:
            logp, _, values = models.token_logprobs_and_values(
                policy, value_head, input_ids, torch.ones_like(input_ids), completion
            )
        returns = score.float().expand(1, completion)
        pg_loss, _ = policy_loss(logp, logp.detach(), returns - values.detach(), mask)
        vf_loss, _ = value_loss(values, values.detach(), returns, mask)
        loss = pg_loss + 0.1 * vf_loss
    hooks.__exit__(None, None, None)
    forward_held = _live(device) - live_before  # what the training forward leaves alive for the backward pass
    loss.backward()
    backward_growth = _high_water(device) - before  # forward + backward: activations, gradients, LM-head chunks
    optim.optimizer_step([p for m in trained for p in m.parameters()], optimizer, None, 1.0)
    seconds = time.perf_counter() - start
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {
        "peak_bytes": peak,
        "backward_growth": backward_growth,
        "saved_activations": sum(saved_storage.values()),
        "forward_held": forward_held,
        "trainable": trainable,
        "total": total,
        "seconds": seconds,
        "loss": loss.item(),
    }


def _live(device: str) -> int:
    """Bytes in use now: ``memory_allocated`` on CUDA, the current RSS on CPU (``/proc/self/statm``)."""
    if device == "cuda":
        return torch.cuda.memory_allocated()
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _high_water(device: str) -> int:
    """Bytes: ``max_memory_allocated`` on CUDA, the peak RSS so far on CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------------------------------------
# the estimate


@functools.cache
def parameter_split(shape: str) -> dict[str, int]:
    """Parameter counts of the shape, from a meta-device model: decoder-layer matrices, the rest, LoRA."""
    config = Qwen2Config(**SHAPES[shape])
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    linear = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear) and "layers" in n)
    total = sum(p.numel() for p in model.parameters())
    adapters = sum(LORA_R * (m.in_features + m.out_features) for n, m in model.named_modules() if n.endswith("proj"))
    head = 0 if config.tie_word_embeddings else model.lm_head.weight.numel()
    return {"linear": linear, "rest": total - linear, "adapters": adapters, "total": total, "head": head}


def estimate(
    algorithm: str, shape: str, variant: str, checkpointing: bool, seq_len: int, ppo_reward: str = "adapter"
) -> int:
    """Bytes: weights of every model held + gradients + optimizer state + saved activations + LM-head chunks.

    Activations per layer and token, as autograd saves them (inputs of every matmul, the attention output
    and log-sum-exp, SwiGLU's gate, up and product, the norms' inputs): about (10 H + 4 I) values in the
    compute dtype, plus LoRA's float32 copies of its inputs (6 H + I); with checkpointing only each layer's
    input (H) is kept, plus one layer recomputed at a time. The process itself (Python, torch,
    transformers) adds about 0.5 GiB on CPU.
    """
    split, shapes = parameter_split(shape), SHAPES[shape]
    hidden, inter, layers, vocab = (
        shapes["hidden_size"],
        shapes["intermediate_size"],
        shapes["num_hidden_layers"],
        shapes["vocab_size"],
    )
    full = variant.startswith("full")
    weight_bytes = 4 if variant == "full_fp32" else 2
    if variant == "qlora":  # nf4 + double-quantised constants for the layers' matrices, bf16 for the rest
        base = split["linear"] * (0.5 + 1 / 64 + 4 / (64 * 256)) + split["rest"] * 2
    else:
        base = split["total"] * weight_bytes
    ppo_bases = 2 if ppo_reward == "separate" else 1  # LoRA: the reward model apart, or as an adapter
    copies = {"sft": 1, "dpo": 2, "grpo": 2, "ppo": 4}[algorithm] if full else (ppo_bases if algorithm == "ppo" else 1)
    weights = base * copies - (2 * split["head"] * weight_bytes if full and algorithm == "ppo" else 0)
    if full:
        trainable = split["total"] * (2 if algorithm == "ppo" else 1)
        gradients_and_state = trainable * weight_bytes * 3  # gradient + two AdamW moments, in the weights' dtype
    else:
        trainable = split["adapters"] + (hidden + 1 if algorithm == "ppo" else 0)
        gradients_and_state = trainable * 4 * (1 + (0.5 if variant == "qlora" else 2))
        weights += split["adapters"] * 4 * (2 if algorithm == "ppo" and ppo_reward != "separate" else 1)
    rows = {"sft": 1, "dpo": 2, "grpo": 2, "ppo": 1}[algorithm] * (2 if full and algorithm == "ppo" else 1)
    act_bytes = weight_bytes if full else 2
    per_layer = seq_len * ((10 * hidden + 4 * inter) * act_bytes + (0 if full else (6 * hidden + inter) * 4))
    if checkpointing:
        activations = rows * (layers * seq_len * hidden * act_bytes + per_layer)
    else:
        activations = rows * layers * per_layer
    lm_head_chunks = 3 * models.LM_HEAD_CHUNK * vocab * 4
    process = 0.5 * GIB
    return int(weights + gradients_and_state + activations + lm_head_chunks + process)


# ----------------------------------------------------------------------------------------------------------
# the log-prob part alone


def logprob_part(mode: str, device: str) -> dict:
    """Peak of the log-prob part of a GRPO step: 8 completions x 512 tokens from [8, 512, 896] hidden states
    and a [151936, 896] LM head; naive = full logits + gather_logprobs, chunked = chunked_logprobs."""
    torch.manual_seed(0)
    vocab, hidden_size, rows, length = 151936, 896, 8, 512
    weight = (torch.randn(vocab, hidden_size, device=device) * 0.02).requires_grad_()
    hidden = torch.randn(rows, length, hidden_size, device=device).requires_grad_()
    tokens = torch.randint(0, vocab, (rows, length), device=device)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    if mode == "naive":
        logp = gather_logprobs(hidden @ weight.T, tokens)  # [8, 512, V] logits kept for the backward pass
    else:
        logp = chunked_logprobs(hidden, weight, tokens, chunk_size=models.LM_HEAD_CHUNK)
    logp.sum().backward()
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "part_bytes": peak - baseline}


# ----------------------------------------------------------------------------------------------------------


def selected(row: tuple, only: list[str] | None) -> bool:
    """``--only`` terms: a shape, an algorithm, a variant, "gc"/"nogc", or ``alg:shape:variant`` (any part ``*``)."""
    if not only:
        return True
    algorithm, shape, variant, checkpointing = row
    words = {algorithm, shape, variant, "gc" if checkpointing else "nogc"}
    for term in only:
        parts = term.split(":")
        if all(part == "*" or part in words for part in parts):
            return True
    return False


def subprocess_json(arguments: list[str], environment: dict, timeout: float = 3600) -> dict:
    try:
        result = subprocess.run(
            [sys.executable, __file__, *arguments], capture_output=True, text=True, env=environment, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--seq_len_7b", type=int, help="the 7B rows' sequence length (default: --seq_len)")
    parser.add_argument("--only", nargs="*", help="run only these rows (see `selected`); the others print estimates")
    parser.add_argument("--budget_gib", type=float, default=20.0, help="rows estimated above this do not run")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--logprob_part", action="store_true")
    parser.add_argument(
        "--ppo_reward", default="adapter", choices=["adapter", "separate"], help="LoRA PPO's reward model"
    )
    parser.add_argument("--json", help="also write every row (estimates, measurements) to this JSON file")
    parser.add_argument("--markdown", metavar="JSON", help="print the tables of a --json file as markdown, run nothing")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # one row in this process: alg,shape,variant,gc
    parser.add_argument("--part", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if error := check_only(args.only):
        parser.error(error)
    if args.markdown:
        print(markdown_tables(args.markdown))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.row:
        algorithm, shape, variant, checkpointing = args.row.split(",")
        row = run_row(algorithm, shape, variant, checkpointing == "1", args.seq_len, args.device, args.ppo_reward)
        print(json.dumps(row))
        return
    if args.part:
        print(json.dumps(logprob_part(args.part, args.device)))
        return
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    extra = ["--device", args.device, "--ppo_reward", args.ppo_reward] + (
        ["--threads", str(args.threads)] if args.threads else []
    )
    measure = "peak RSS" if args.device == "cpu" else "max_memory_allocated"
    if args.logprob_part:
        results = {mode: subprocess_json(["--part", mode, *extra], environment) for mode in ("naive", "chunked")}
        naive, chunked = results["naive"]["part_bytes"], results["chunked"]["part_bytes"]
        print(f"GRPO log-prob part, 8 x 512 tokens, V=151936, H=896, float32, {args.device} ({measure} growth)")
        print(
            f"naive [B, T, V] logits: {naive / GIB:.2f} GiB; chunked LM head ({models.LM_HEAD_CHUNK} positions): "
            f"{chunked / GIB:.2f} GiB; ratio {chunked / naive:.3f}"
        )
        return
    header = (
        f"One optimizer step, batch 1, sequence {args.seq_len}"
        + (f" (7B rows: {args.seq_len_7b})" if args.seq_len_7b else "")
        + f", device {args.device} ({measure}; "
        f"MALLOC_MMAP_THRESHOLD_=131072), LoRA r={LORA_R}, LoRA PPO's reward model: {args.ppo_reward}, "
        f"torch {torch.__version__}"
    )
    print(header)
    print(f"load average at start: {os.getloadavg()[0]:.1f}", flush=True)
    columns = f"{'algorithm':<9} {'shape':<5} {'variant':<10} {'ckpt':<4} {'params':>8} {'trainable':>10}"
    columns += f" {'estimate':>9} {'measured':>19} {'fwd+bwd growth':>15} {'held after fwd':>15}"
    print(f"{columns} {'activations':>12} {'step s':>7}")
    records = []
    for row in itertools.product(ALGORITHMS, SHAPES, VARIANTS, (False, True)):
        record = measure_row(row, args, extra, environment)
        records.append(record)
        print(row_line(record), flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"command": " ".join(sys.argv), "header": header, "rows": records}, out, indent=1)


def check_only(only: list[str] | None) -> str | None:
    """The first ``--only`` term naming no algorithm, shape, variant or gc/nogc, as an error line; else None."""
    known = {*ALGORITHMS, *SHAPES, *VARIANTS, "gc", "nogc", "*"}
    for term in only or []:
        unknown = [part for part in term.split(":") if part not in known]
        if unknown:
            return f"--only {term!r}: {unknown[0]!r} is not one of {sorted(known - {'*'})} or '*'"
    return None


def measure_row(row: tuple, args: argparse.Namespace, extra: list[str], environment: dict) -> dict:
    """The row's estimate, and its measurement (in a subprocess) if it is selected and fits the budget."""
    algorithm, shape, variant, checkpointing = row
    record = {"algorithm": algorithm, "shape": shape, "variant": variant, "checkpointing": checkpointing}
    seq_len = args.seq_len_7b if shape == "7B" and args.seq_len_7b else args.seq_len
    record |= {"seq_len": seq_len, "estimate_bytes": estimate(*row, seq_len, args.ppo_reward)}
    if record["estimate_bytes"] > args.budget_gib * GIB:
        return record | {"status": "does not fit"}
    if not selected(row, args.only):
        return record | {"status": "not run"}
    row_flags = ["--row", f"{algorithm},{shape},{variant},{int(checkpointing)}", "--seq_len", str(seq_len)]
    result = subprocess_json([*row_flags, *extra], environment)
    return (
        record | {"status": "error" if "error" in result else "measured", "load_average": os.getloadavg()[0]} | result
    )


def row_line(record: dict) -> str:
    line = f"{record['algorithm']:<9} {record['shape']:<5} {record['variant']:<10} "
    line += f"{'on' if record['checkpointing'] else 'off':<4} {parameter_split(record['shape'])['total'] / 1e9:>7.2f}B "
    guess = f"{record['estimate_bytes'] / GIB:>8.1f}G"
    if record["status"] == "error":
        return f"{line}{'':>10} {guess}  error: {record['error'][:80]}"
    if record["status"] != "measured":
        return f"{line}{'':>10} {guess} {record['status']:>19}"
    figures = [record[key] / GIB for key in ("peak_bytes", "backward_growth", "forward_held", "saved_activations")]
    return (
        f"{line}{record['trainable'] / 1e6:>9.1f}M {guess} {figures[0]:>18.2f}G {figures[1]:>14.2f}G "
        f"{figures[2]:>14.2f}G {figures[3]:>11.3f}G {record['seconds']:>7.1f}"
    )


ALGORITHM_NAMES = {"sft": "SFT", "dpo": "DPO", "grpo": "GRPO (group of 2)", "ppo": "PPO"}
VARIANT_NAMES = {"full_fp32": "full float32", "full_bf16": "full bfloat16", "lora": "LoRA", "qlora": "QLoRA"}


def _peak_cell(record: dict) -> str:
    """A row's peak in GiB, or why there is none, with its estimate."""
    if record["status"] == "measured":
        return f"{record['peak_bytes'] / GIB:.2f}"
    return f"{record['status']} (est. {record['estimate_bytes'] / GIB:.1f})"


def markdown_tables(path: str) -> str:
    """The rows of a ``--json`` file as two markdown tables: peaks by shape (checkpointing off / on), then every row."""
    with open(path) as file:
        saved = json.load(file)
    rows = {(r["algorithm"], r["shape"], r["variant"], r["checkpointing"]): r for r in saved["rows"]}
    lines = [f"`{saved['command']}`", "", saved["header"], ""]
    sequence = {shape: rows["sft", shape, "lora", False]["seq_len"] for shape in SHAPES}
    lines += ["| step | variant | " + " | ".join(f"{s}, seq {sequence[s]}: off / on" for s in SHAPES) + " |"]
    lines += ["| --- | --- |" + " --- |" * len(SHAPES)]
    for algorithm, variant in itertools.product(ALGORITHMS, VARIANTS):
        cells = [
            " / ".join(_peak_cell(rows[algorithm, shape, variant, gc]) for gc in (False, True)) for shape in SHAPES
        ]
        lines.append(f"| {ALGORITHM_NAMES[algorithm]} | {VARIANT_NAMES[variant]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| step | shape | variant | ckpt | trainable | estimate | peak | fwd+bwd growth | activations | step s |",
    ]
    lines += ["| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (algorithm, shape, variant, gc), record in rows.items():
        start = f"| {ALGORITHM_NAMES[algorithm]} | {shape} | {VARIANT_NAMES[variant]} | {'on' if gc else 'off'} |"
        if record["status"] != "measured":
            lines.append(f"{start} | {record['estimate_bytes'] / GIB:.1f} GiB | {record['status']} | | | |")
            continue
        figures = (record[key] / GIB for key in ("peak_bytes", "backward_growth", "saved_activations"))
        lines.append(
            f"{start} {record['trainable'] / 1e6:.1f}M | {record['estimate_bytes'] / GIB:.1f} GiB | "
            + " | ".join(f"{value:.3f} GiB" for value in figures)
            + f" | {record['seconds']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    cli(main)  # bad input: one line, not a traceback
