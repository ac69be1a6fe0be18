"""benchmarks/profile_decode.py: its split of a decode step, its bounds, and that it leaves rlcore as it found it."""

import re

import torch
from helpers import load_benchmark

import rlcore.rollout as rollout
from rlcore.decode import LlamaDecodeStep

profile_decode = load_benchmark("profile_decode")


def test_the_steps_matmuls_are_split_into_linear_layers_and_attention():
    # the eager CPU step multiplies its Linear layers with mm/addmm and attends with two torch.matmul calls
    assert profile_decode.category("aten::mm") == profile_decode.category("aten::addmm") == "Linear matmuls"
    assert profile_decode.category("aten::matmul") == "attention over the cache"
    assert profile_decode.category("aten::scaled_dot_product_attention") == "attention over the cache"
    assert profile_decode.category("aten::copy_") == "cache writes"
    assert profile_decode.category("aten::rms_norm") == "small ops"


def test_a_tiny_run_prints_every_bound_and_gives_back_what_it_patched(capsys):
    patched = (rollout._prefill, rollout.sample_tokens, rollout._native_step_call, rollout._model_step)
    prefill, threads = LlamaDecodeStep.prefill, torch.get_num_threads()
    profile_decode.main(["--models", "tiny", "--batch-size", "4", "--new-tokens", "4", "--bounds", "--threads", "1"])
    out = capsys.readouterr().out
    for row in ("Linear matmuls", "attention over the cache", "one read of the filled KV cache", "90% of the bound"):
        assert row in out, out
    bound = re.search(r"Linear layers \(nn.Linear: the bound\)\s+(\d+)\s+100% of the bound", out)
    allowed = re.search(r"90% of the bound allows\s+(\d+)\s+111% of the bound", out)
    assert bound and allowed and int(bound[1]) > 0, out
    assert abs(int(allowed[1]) - int(bound[1]) / 0.9) <= 1.5, out  # the target's step time (both rounded)
    assert (rollout._prefill, rollout.sample_tokens, rollout._native_step_call, rollout._model_step) == patched
    assert LlamaDecodeStep.prefill is prefill and torch.get_num_threads() == threads
