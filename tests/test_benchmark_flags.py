"""Bad flags of the benchmark scripts: one line on stderr naming the flag, exit code 2, no traceback."""

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import load_benchmark

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

CASES = [
    ("generate.py", ["--repeats", "0"], "--repeats must be >= 1"),
    ("logprobs.py", ["--chunk-sizes", "256", "0"], "--chunk-sizes must be >= 1, got [256, 0]"),
]


@pytest.mark.parametrize("script, flags, message", CASES, ids=[f"{c[0]}:{' '.join(c[1])}" for c in CASES])
def test_a_bad_flag_is_one_line(script, flags, message):
    finished = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *flags], capture_output=True, text=True, timeout=120
    )
    errors = [line for line in finished.stderr.splitlines() if ": error: " in line]
    assert finished.returncode == 2, finished.stderr[-2000:]
    assert len(errors) == 1 and "Traceback" not in finished.stderr, finished.stderr[-2000:]
    assert message in errors[0] and errors[0].startswith(script), errors[0]


def test_compare_trl_checks_the_recipe_flags_before_any_run(tmp_path):
    compare_trl = load_benchmark("compare_trl")
    common = ["--models", "tiny", "--accuracy", "none", "--output_dir", str(tmp_path)]
    with pytest.raises(ValueError, match=r"--rlcore_flags for recipes/grpo.py: unrecognized arguments: --packing"):
        compare_trl.main([*common, "--parts", "sft,grpo", "--rlcore_flags", "--packing true"])
    with pytest.raises(ValueError, match=r"--rlcore_flags for recipes/sft.py: --packing and --padding_free"):
        compare_trl.main([*common, "--parts", "sft", "--rlcore_flags", "--packing true --padding_free true"])
    assert not any(tmp_path.iterdir())  # nothing built, nothing run
