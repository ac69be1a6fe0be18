"""rlcore.runtime: the attention choice for short rows on CPU, and that it leaves the model's outputs unchanged."""

from __future__ import annotations

import pytest
import torch

from rlcore.runtime import CPU_EAGER_ATTENTION_MAX_TOKENS, prefer_eager_attention
from rlcore.toy import tiny_model

CPU = torch.device("cpu")


def _sdpa_model():
    model = tiny_model()
    model.set_attn_implementation("sdpa")
    return model


def test_short_rows_on_cpu_switch_to_eager_attention():
    assert prefer_eager_attention(_sdpa_model(), CPU, longest_sequence=13) == "eager"
    assert prefer_eager_attention(_sdpa_model(), CPU, CPU_EAGER_ATTENTION_MAX_TOKENS) == "eager"


def test_long_rows_and_cuda_keep_sdpa():
    assert prefer_eager_attention(_sdpa_model(), CPU, CPU_EAGER_ATTENTION_MAX_TOKENS + 1) == "sdpa"
    model = _sdpa_model()  # stays on the CPU: only the target device's type is read
    assert prefer_eager_attention(model, torch.device("cuda"), longest_sequence=13) == "sdpa"


def test_bad_length_is_rejected():
    with pytest.raises(ValueError, match="longest_sequence"):
        prefer_eager_attention(_sdpa_model(), CPU, longest_sequence=0)


def test_eager_attention_gives_the_same_logits_and_gradients():
    """Right-padded rows (row 1 has 3 pad positions): logits at real tokens and weight gradients agree."""
    input_ids = torch.randint(10, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones(2, 9, dtype=torch.long)
    attention_mask[1, 6:] = 0
    results = []
    for switch in (False, True):
        model = _sdpa_model()
        if switch:
            assert prefer_eager_attention(model, CPU, longest_sequence=9) == "eager"
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # [2, 9, V]
        logits = logits[attention_mask.bool()]  # [15, V]: real tokens only
        logits.logsumexp(-1).sum().backward()
        results.append((logits.detach(), model.model.layers[0].self_attn.q_proj.weight.grad))
    (sdpa_logits, sdpa_grad), (eager_logits, eager_grad) = results
    torch.testing.assert_close(eager_logits, sdpa_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eager_grad, sdpa_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("flush", [True, False])
def test_setup_computes_subnormal_floats_as_zero_unless_told_not_to(flush):
    """1e-39 is a float32 subnormal (below 2**-126 = 1.18e-38): kept exactly, or computed as 0 when flushed."""
    from rlcore import runtime
    from rlcore.config import TrainConfig, parse_config

    config = parse_config(TrainConfig, ["--device", "cpu", "--flush_denormal", str(flush).lower()])
    try:
        runtime.setup(config)
        product = (torch.full((4,), 1e-39) * 1.0).tolist()
        assert product == ([0.0] * 4 if flush else pytest.approx([1e-39] * 4, rel=1e-6))
        assert (torch.full((4,), 2e-38) * 1.0).tolist() == pytest.approx([2e-38] * 4, rel=1e-6)  # normal: kept
    finally:
        runtime.flush_denormals(True)  # what every recipe run in this process sets
