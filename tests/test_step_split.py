"""benchmarks/step_split.py: its stand-ins compute what the shortcuts they replace compute, and a recipe's
steps alternate between the two, each phase timed."""

import pytest
import torch
from helpers import load_benchmark


@pytest.fixture(scope="module")
def step_split():
    return load_benchmark("step_split")


def test_the_transposed_view_multiplies_as_the_copy(step_split):
    owner, name, stand_in = step_split.SHORTCUTS["transposed_weights"]
    weight, x = torch.randn(5, 3), torch.randn(2, 3)
    copy, view = getattr(owner, name)(weight), stand_in(getattr(owner, name))(weight)
    assert torch.equal(copy, view) and view.data_ptr() == weight.data_ptr()  # the same values, no copy
    torch.testing.assert_close(x @ view, torch.nn.functional.linear(x, weight))


def test_steps_alternate_phases_are_timed_and_functions_given_back(step_split, tmp_path, capsys):
    """Steps alternate between the code as it is and without the shortcut, each phase timed; afterwards every
    function the run clocked or switched is the original again (tests and notebooks go on)."""
    watched = step_split.PHASES + [step_split.SHORTCUTS["transposed_weights"]]
    before = [getattr(owner, name) for owner, name, *_ in watched]
    argv = ["--part", "sft", "--steps", "10", "--off", "transposed_weights", "--output_dir", str(tmp_path)]
    table = step_split.main(argv)
    assert table["step"] > 0 and table["optimizer step"] > 0 and table["backward"] > 0
    out = capsys.readouterr().out
    assert "steps alternate with --off transposed_weights" in out and "ratio" in out
    assert [getattr(owner, name) for owner, name, *_ in watched] == before
