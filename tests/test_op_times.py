"""benchmarks/op_times.py: it counts a product's FLOPs as derived by hand, times every operation where it runs,
and tabulates a recipe's steps (and TRL's, where TRL is installed)."""

import pytest
import torch
from helpers import load_benchmark


@pytest.fixture(scope="module")
def op_times():
    return load_benchmark("op_times")


def test_a_linear_layer_costs_six_m_k_n(op_times):
    """y = x W^T + b with x [M, K], W [N, K]: the forward is one addmm (M N dot products of length K: 2 M K N
    FLOPs); the backward is dx = dy W ([M, N] @ [N, K]: 2 M N K) and dW = dy^T x ([N, M] @ [M, K]: 2 N M K); the
    bias's gradient is a sum, not a product. M, K, N = 3, 4, 5: 3 * 120 = 360."""
    layer, x = torch.nn.Linear(4, 5), torch.randn(3, 4, requires_grad=True)
    watch = op_times.Watch()
    with watch:
        layer(x).sum().backward()
    products = {name: record for name, record in watch.ops.items() if record[2]}
    assert sum(record[2] for record in products.values()) == 360
    assert products["aten::addmm"][:1] == [1] and products["aten::addmm"][2] == 120
    assert products["aten::mm"][0] == 2 and products["aten::mm"][2] == 240
    assert all(record[1] >= 0 for record in watch.ops.values())


def test_batched_products_count_every_matrix(op_times):
    # [B, M, K] @ [B, K, N] = B products of 2 M K N: 2 * 2 * 3 * 4 * 5 = 240; elementwise operations: 0
    assert op_times.product_flops("aten::bmm", (torch.ones(2, 3, 4), torch.ones(2, 4, 5))) == 240
    assert op_times.product_flops("aten::addmm", (torch.ones(5), torch.ones(3, 4), torch.ones(4, 5))) == 120
    assert op_times.product_flops("aten::mul", (torch.ones(3, 4), torch.ones(3, 4))) == 0


def test_rlcore_steps_tabulated(op_times, tmp_path, capsys):
    """The SFT step as compared, then with --padding_free (the same rows end to end): the table is printed and
    the padding-free steps multiply fewer FLOPs (the toy's rows differ in length by a few tokens; some batches
    pad none, so three steps are watched)."""
    argv = ["--part", "sft", "--frameworks", "rlcore", "--warmup", "1", "--steps", "3", "--output_dir", str(tmp_path)]
    padded = op_times.main(argv)["rlcore"]
    assert padded["ops"]["aten::mm"][2] > 0 and padded["process_s"] > 0
    out = capsys.readouterr().out
    assert "sft, tiny: per optimizer step, mean of 3 watched steps" in out and "Linear products (mm, addmm)" in out
    padding_free = op_times.main([*argv, "--rlcore_flags", "--padding_free true"])["rlcore"]
    assert 0 < op_times._totals(padding_free, op_times._MM)[1] < op_times._totals(padded, op_times._MM)[1]


def test_rlcore_feeds_trl_fewer_products(op_times, tmp_path, capsys):
    """On the toy SFT batch rlcore's step multiplies fewer tokens than TRL's (no column of the last token, the
    last layer at the scored positions only): its Linear-product FLOPs are below TRL's."""
    pytest.importorskip("trl")
    argv = ["--part", "sft", "--warmup", "1", "--steps", "1", "--output_dir", str(tmp_path)]
    results = op_times.main(argv)
    flops = {name: op_times._totals(result, op_times._MM)[1] for name, result in results.items()}
    assert 0 < flops["rlcore"] < flops["trl"]
    assert "Linear-product FLOPs per step, rlcore / trl" in capsys.readouterr().out


def test_bad_flags_name_themselves(op_times):
    with pytest.raises(ValueError, match="--frameworks"):
        op_times.main(["--frameworks", "rlcore,deepspeed"])
    with pytest.raises(ValueError, match="--steps"):
        op_times.main(["--steps", "0"])
