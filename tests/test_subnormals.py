"""benchmarks/subnormals.py: it names the operation that makes subnormal floats, times the matrix products
that receive them both ways on the same inputs, and runs a recipe step end to end."""

import pytest
import torch
from helpers import load_benchmark

from rlcore import runtime


@pytest.fixture(scope="module")
def subnormals():
    return load_benchmark("subnormals")


@pytest.fixture
def exact_arithmetic():
    runtime.flush_denormals(False)
    yield
    runtime.flush_denormals(True)  # what every recipe run in this process sets


def test_watch_names_the_maker_and_times_the_receiver(subnormals, exact_arithmetic):
    small, ones = torch.full((8, 16), 1e-20), torch.ones(16, 4)
    watch = subnormals.Watch(repeats=2)
    with watch:
        tiny = small * small  # 1e-40 < 2**-126 = 1.18e-38: 128 subnormals made here
        torch.mm(tiny, ones)  # received here: timed both ways
        torch.mm(small, ones)  # 1e-20 is normal: not timed
    assert dict(watch.sources) == {"aten::mul.Tensor": 128}  # mm's outputs (1.6e-39) come from subnormal inputs
    assert list(watch.products) == [("aten::mm", (8, 16), (16, 4))]
    record = watch.products[("aten::mm", (8, 16), (16, 4))]
    assert record["subnormals"] == [128] and len(record["exact"]) == len(record["flushed"]) == 2
    assert subnormals.count_subnormals(torch.tensor([0.0, 1e-39, -1e-39, 2e-38])) == 2


def test_a_recipe_step_end_to_end(subnormals, exact_arithmetic, tmp_path, capsys):
    argv = ["--part", "sft", "--warmup", "1", "--steps", "1", "--output_dir", str(tmp_path)]
    subnormals.main(argv)
    out = capsys.readouterr().out
    assert "sft, tiny: subnormal values made per step" in out and "exact vs flushed" in out
