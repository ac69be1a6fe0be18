"""Training forward + backward with prefix sharing and padding-free batches against the padded batch, side by side.

Each case builds one synthetic micro-batch (random tokens, seeded; lengths drawn uniformly from the ranges
below) and times ``loss.backward()`` of the summed completion log-probs through the recipes' own functions:

    grpo   rlcore.models.token_logprobs on a rollout (left-padded prompts, G completions each, EOS + padding):
           padded [P*G rows]  vs  --prefix_sharing (share_prompts=True: P rows [prompt, c_1, ..., c_G])
    dpo    rlcore.models.pair_logprobs on a collate_preference batch of B pairs:
           padded [2B rows]  vs  prefix_sharing [B rows]  vs  padding_free  vs  both
    sft    rlcore.models.position_logprobs on right-padded rows [B, T-1] (as recipes/sft.py)  vs
           padding_free (rlcore.models.packed_batch(padding_free=True) + packed_logprobs)

Padding-free rows hold up to two widths of the padded batch with sdpa/eager (dense attention;
rlcore.models.packed_batch, PACKED_ROW_WIDTHS), one row with flash_attention_2. Cases: ``toy`` lengths are those of the embedded task (prompts of 8-14 tokens, answers of 2-8); ``long``
has prompts of 96-128 tokens with shorter completions (8-32), where sharing pays. The attention
implementation is chosen as the recipes choose it (``rlcore.runtime.prefer_eager_attention`` on the longest
padded row: eager on CPU up to 128 tokens, sdpa beyond). Time is the median of ``--repeats`` steps after
one warm-up, the paths of a case interleaved; ratios are against the padded path of the same case.

    python benchmarks/prefix_sharing.py --threads 1                          # tiny and 20m, CPU
    python benchmarks/prefix_sharing.py --models 20m --device cuda --repeats 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rlcore import data, models, packing, runtime, toy  # noqa: E402
from rlcore.run import cli

MODEL_SHAPES = {  # overrides of rlcore.toy.tiny_config (as benchmarks/compare_trl.py)
    "tiny": {},
    "20m": dict(
        hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4
    ),
}
# name -> (kind, rows: prompts P / pairs B / rows B, G, prompt length range, completion length range)
CASES = {
    "grpo toy G8": ("grpo", 16, 8, (8, 14), (2, 8)),
    "grpo long G8": ("grpo", 2, 8, (96, 128), (8, 32)),
    "dpo toy": ("dpo", 32, 2, (8, 14), (2, 8)),
    "dpo long": ("dpo", 8, 2, (96, 128), (8, 32)),
    "sft toy": ("sft", 32, 1, (8, 14), (2, 8)),
    "sft ragged": ("sft", 8, 1, (8, 32), (8, 224)),
}


def _lengths(generator, count: int, bounds: tuple[int, int]) -> list[int]:
    return torch.randint(bounds[0], bounds[1] + 1, (count,), generator=generator).tolist()


def _tokens(generator, length: int) -> list[int]:
    return torch.randint(5, toy.tiny_config().vocab_size, (length,), generator=generator).tolist()


def grpo_batch(generator, prompts: int, group: int, prompt_range, completion_range):
    """Left-padded prompts, each repeated G times, then right-padded completions ending in EOS (id 1)."""
    prompt_ids = data.collate_left([_tokens(generator, n) for n in _lengths(generator, prompts, prompt_range)], 0)
    prompt_ids = {k: v.repeat_interleave(group, 0) for k, v in prompt_ids.items()}
    completions = [_tokens(generator, n - 1) + [1] for n in _lengths(generator, prompts * group, completion_range)]
    completion = data.collate_right(completions, None, 0)
    sequences = torch.cat([prompt_ids["prompt_ids"], completion["input_ids"]], 1)
    attention_mask = torch.cat([prompt_ids["prompt_mask"], completion["attention_mask"]], 1)
    return sequences, attention_mask, completion["attention_mask"]


def make_step(kind: str, batch, path: str, model, device):
    """A function running one forward + backward of ``path`` on ``batch``."""
    if kind == "grpo":
        sequences, attention_mask, mask = (t.to(device) for t in batch)

        def step():
            logp, _ = models.token_logprobs(
                model, sequences, attention_mask, mask.shape[1], share_prompts=path == "prefix_sharing"
            )
            (logp * mask).sum().backward()

    elif kind == "dpo":
        batch = {k: v.to(device) for k, v in batch.items()}
        options = {"shared_prefix": "prefix_sharing" in path, "padding_free": "padding_free" in path}

        def step():
            models.pair_logprobs(model, batch, models.LM_HEAD_CHUNK, **options)[0].sum().backward()

    else:
        if path == "padding_free":
            scored = batch["completion_mask"] * (torch.arange(batch["input_ids"].shape[1]) > 0)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            packed = models.packed_batch(model, ids, mask, scored.to(device), padding_free=True)

            def step():
                models.packed_logprobs(model, packed)[0].sum().backward()

        else:
            loss_mask = batch["completion_mask"][:, 1:].bool()
            inputs = {k: v[:, :-1].to(device) for k, v in batch.items() if k != "completion_mask"}
            positions, targets = loss_mask.nonzero().to(device), batch["input_ids"][:, 1:][loss_mask].to(device)

            def step():
                models.position_logprobs(model, **inputs, positions=positions, targets=targets)[0].sum().backward()

    return step


def build_batch(kind: str, generator, rows: int, group: int, prompt_range, completion_range):
    if kind == "grpo":
        return grpo_batch(generator, rows, group, prompt_range, completion_range)
    prompts = [_tokens(generator, n) for n in _lengths(generator, rows, prompt_range)]
    if kind == "dpo":
        chosen, rejected = (
            [_tokens(generator, n - 1) + [1] for n in _lengths(generator, rows, completion_range)] for _ in range(2)
        )
        return data.collate_preference(prompts, chosen, rejected, 0)
    answers = [_tokens(generator, n - 1) + [1] for n in _lengths(generator, rows, completion_range)]
    sequences = [p + a for p, a in zip(prompts, answers)]
    return data.collate_right(sequences, [[0] * len(p) + [1] * len(a) for p, a in zip(prompts, answers)], 0)


PATHS = {
    "grpo": ("padded", "prefix_sharing"),
    "dpo": ("padded", "prefix_sharing", "padding_free", "prefix_sharing+padding_free"),
    "sft": ("padded", "padding_free"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "20m"], choices=list(MODEL_SHAPES))
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {device}, threads {torch.get_num_threads()}, repeats {args.repeats}")
    print("| model | case | attention | path | tokens fed | ms / step | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for model_name in args.models:
        for case in args.cases:
            kind, rows, group, prompt_range, completion_range = CASES[case]
            batch = build_batch(kind, torch.Generator().manual_seed(0), rows, group, prompt_range, completion_range)
            model = toy.tiny_model(**MODEL_SHAPES[model_name]).to(device).train()
            padded = batch[0] if kind == "grpo" else batch["input_ids"]
            attention = runtime.prefer_eager_attention(model, device, padded.shape[1])
            steps = {path: make_step(kind, batch, path, model, device) for path in PATHS[kind]}
            times: dict[str, list[float]] = {path: [] for path in steps}
            for repeat in range(args.repeats + 1):
                for path, step in steps.items():
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    step()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    if repeat:  # the first round warms up
                        times[path].append(time.perf_counter() - start)
                    model.zero_grad(set_to_none=True)
            base = statistics.median(times["padded"])
            for path in steps:
                median = statistics.median(times[path])
                fed = _fed_tokens(kind, batch, path, model)
                print(
                    f"| {model_name} | {case} | {attention} | {path} | {fed} | {1e3 * median:.1f} | {median / base:.2f} |"
                )


def _fed_tokens(kind: str, batch, path: str, model) -> str:
    """Tokens the forward computes, as rows x columns."""
    if kind == "grpo":
        sequences, attention_mask, mask = batch
        if path == "padded":
            return f"{sequences.shape[0]}x{sequences.shape[1]}"
        prompt_mask = attention_mask.clone()
        prompt_mask[:, -mask.shape[1] :] = 0
        groups = packing.prompt_groups(sequences, prompt_mask)
        packed = packing.pack_batch(sequences, attention_mask, attention_mask - prompt_mask, groups, prompt_mask)
        return "x".join(map(str, packed.input_ids.shape))
    if path == "padded":
        return "x".join(map(str, batch["input_ids"].shape))
    score = batch["completion_mask"] * (torch.arange(batch["input_ids"].shape[1]) > 0)
    shared = "prefix_sharing" in path
    rows = len(batch["input_ids"])
    groups = torch.arange(rows) % (rows // 2) if shared else None
    prompt_mask = batch["attention_mask"] * (1 - batch["completion_mask"]) if shared else None
    packed = models.packed_batch(
        model, batch["input_ids"], batch["attention_mask"], score, groups, prompt_mask, "padding_free" in path
    )
    return "x".join(map(str, packed.input_ids.shape))


if __name__ == "__main__":
    cli(main)  # bad input: one line, not a traceback
