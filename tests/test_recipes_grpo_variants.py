"""recipes/grpo.py end to end with the policy-gradient variants: CISPO, GSPO's sequence ratio, truncated
importance sampling, the entropy bonus and the pass@k evaluation."""

import math

import pytest
from helpers import load_recipe, tiny_cache  # noqa: F401 (tiny_cache: an autouse fixture)
from test_recipes_online import check_run, read_metrics, run_recipe


def test_grpo_variants_end_to_end(tmp_path):
    output_dir = run_recipe(
        "grpo",
        tmp_path,
        "--max_steps",
        "2",
        "--batch_size",
        "8",
        "--num_generations",
        "4",
        "--loss_type",
        "cispo",
        "--importance_sampling_level",
        "sequence",
        "--tis_cap",
        "2.0",
        "--tis_mode",
        "sequence_mask",
        "--entropy_coef",
        "0.01",
        "--num_generations_eval",
        "4",
    )
    # with an entropy bonus every row takes part, so the loss statistics exist at every step
    train = check_run(output_dir, 2, ("reward", "loss", "entropy", "clip_frac", "tis_weight", "grad_norm"))
    assert all(r["grad_norm"] > 0 for r in train)  # the entropy term alone has a gradient
    evals = [r for r in read_metrics(output_dir) if "eval/pass@1" in r]
    assert [r["step"] for r in evals] == [0, 2]
    for record in evals:  # pass@1 <= pass@2 <= pass@4, all in [0, 1]
        values = [record[f"eval/pass@{k}"] for k in (1, 2, 4)]
        assert 0 <= values[0] <= values[1] <= values[2] <= 1 and all(math.isfinite(v) for v in values)


def test_grpo_variant_flags_are_checked():
    grpo = load_recipe("grpo")
    for flags in (
        {"importance_sampling_level": "row"},
        {"tis_mode": "token"},
        {"tis_cap": 0.0},
        {"entropy_coef": -1.0},
        {"num_generations_eval": -1},
    ):
        try:
            grpo.GRPOConfig(**flags)
        except ValueError:
            continue
        raise AssertionError(f"accepted {flags}")


@pytest.mark.slow
def test_ppo_with_an_entropy_bonus_runs(tmp_path):
    output_dir = run_recipe("ppo", tmp_path, "--max_steps", "2", "--batch_size", "8", "--entropy_coef", "0.01")
    for record in read_metrics(output_dir):
        if "loss/policy" in record:
            assert math.isfinite(record["entropy"]) and record["grad_norm"] > 0
