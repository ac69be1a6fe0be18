"""Reward plumbing: loading reward functions, weighted combination with None, reward-model scoring."""

import math

import pytest
import torch
from helpers import lora_reward_model_dir, tiny_cache  # noqa: F401 (tiny_cache: an autouse fixture)

from rlcore.lora import LoRALinear, adapter_names, load_adapter, lora_parameters, prepare_model
from rlcore.models import load_policy, load_reward_model, load_tokenizer, sequence_scores
from rlcore.rewards import (
    AdapterRewardScorer,
    RewardModelScorer,
    RewardScorer,
    build_reward_scorer,
    load_reward_function,
)
from rlcore.toy import accuracy_reward, digit_reward, format_reward


def constant(value):
    def reward(prompts, completions, **kwargs):
        return [value] * len(completions)

    return reward


def only_even_rows(prompts, completions, **kwargs):
    """2.0 on even rows, None (does not apply) on odd rows."""
    return [2.0 if row % 2 == 0 else None for row in range(len(completions))]


def score(scorer, completions, **columns):
    prompts = ["1+1="] * len(completions)
    return scorer(prompts, completions, [[5]] * len(completions), columns)


# ---------------------------------------------------------------- loading reward functions


def test_load_builtin_module_and_file_functions(tmp_path):
    assert load_reward_function("accuracy") == ("accuracy", accuracy_reward)
    assert load_reward_function(" format ") == ("format", format_reward)
    assert load_reward_function("digits") == ("digits", digit_reward)
    assert load_reward_function("rlcore.toy:format_reward") == ("format_reward", format_reward)
    path = tmp_path / "my_rewards.py"
    path.write_text(
        "def length_penalty(prompts, completions, **kwargs):\n    return [-len(c) / 10 for c in completions]\n"
    )
    name, function = load_reward_function(f"{path}:length_penalty")
    assert name == "length_penalty" and function(prompts=["p"], completions=["abcd"]) == [-0.4]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("accuracyy", "unknown reward function 'accuracyy'"),
        ("rlcore.toy:no_such_function", "has no callable 'no_such_function'"),
        ("missing_file.py:f", "does not exist"),
    ],
)
def test_load_reward_function_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        load_reward_function(spec)


# ---------------------------------------------------------------- weighted combination


def test_weighted_sum_skips_none_by_hand():
    # rows 0..3; sources: a = 1.0 everywhere (weight 0.5), b = 2.0 on even rows, None on odd rows (weight 3)
    # row 0: 0.5 * 1 + 3 * 2 = 6.5; row 1: 0.5 * 1 = 0.5 (b does not apply); rows 2, 3 repeat rows 0, 1.
    scorer = RewardScorer([("a", constant(1.0)), ("b", only_even_rows)], weights=[0.5, 3.0])
    rewards, per_source = score(scorer, ["x"] * 4)
    torch.testing.assert_close(rewards, torch.tensor([6.5, 0.5, 6.5, 0.5]))
    assert per_source.shape == (4, 2) and per_source[1, 1].isnan() and per_source[0, 1] == 2.0
    # b's statistics use only the rows it scored: mean 2, std 0; a: mean 1, std 0.
    stats = scorer.stats(per_source)
    assert stats["rewards/b/mean"] == 2.0 and stats["rewards/b/std"] == 0.0 and stats["rewards/a/mean"] == 1.0


def test_toy_rewards_through_the_scorer():
    # accuracy: "2" is right for 1+1, "3" wrong, "x" wrong; format: digits only -> 1, 1, 0.
    scorer = build_reward_scorer("accuracy,format", None, "1.0,0.25", policy_tokenizer=None)
    rewards, per_source = score(scorer, ["2", "3", "x"], answer=["2", "2", "2"])
    torch.testing.assert_close(per_source, torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([1.25, 0.25, 0.0]))
    # std over 3 rows with Bessel: accuracy (1, 0, 0): mean 1/3, var = (4/9 + 1/9 + 1/9) / 2 = 1/3
    assert math.isclose(scorer.stats(per_source)["rewards/accuracy/std"].item(), math.sqrt(1 / 3), rel_tol=1e-6)


def test_scorer_rejects_bad_rewards_and_inputs():
    with pytest.raises(ValueError, match="every reward source returned None for completion 1"):
        score(RewardScorer([("b", only_even_rows)]), ["x", "y"])
    with pytest.raises(ValueError, match="must return a list of 2 floats or None"):
        score(RewardScorer([("short", lambda prompts, completions, **kw: [1.0])]), ["x", "y"])
    with pytest.raises(ValueError, match="returned nan for completion 0"):
        score(RewardScorer([("nan", constant(math.nan))]), ["x"])
    with pytest.raises(ValueError, match="returned 'good' for completion 0"):
        score(RewardScorer([("text", constant("good"))]), ["x"])
    with pytest.raises(ValueError, match="column 'answer' has 1 values for 2 completions"):
        score(RewardScorer([("a", constant(1.0))]), ["x", "y"], answer=["2"])
    with pytest.raises(ValueError, match="2 reward weights for 1 reward sources"):
        RewardScorer([("a", constant(1.0))], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="no reward source"):
        build_reward_scorer("", None, None, policy_tokenizer=None)
    with pytest.raises(ValueError, match="--reward_weights must be comma-separated numbers"):
        build_reward_scorer("accuracy", None, "1,two", policy_tokenizer=None)


# ---------------------------------------------------------------- reward model


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model, tokenizer = load_reward_model("tiny")
    torch.nn.init.normal_(model.score.weight)  # a fresh head is random too; make the scores clearly non-zero
    directory = tmp_path_factory.mktemp("reward-model")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def test_reward_model_scores_ignore_padding(reward_model_dir):
    tokenizer = load_tokenizer("tiny")
    scorer = RewardModelScorer(reward_model_dir, tokenizer, batch_size=1)  # batch 1: exercise the batching loop
    # Row 0 "1+1=2<eos>" with a left-padded prompt; row 1 "12+3=15<eos>" with a right-padded completion.
    prompts, completions = ["1+1=", "12+3="], ["2", "15"]
    rows = [
        tokenizer(p)["input_ids"] + tokenizer(c)["input_ids"] + [tokenizer.eos_token_id]
        for p, c in zip(prompts, completions)
    ]
    sequences = torch.tensor([[0] + rows[0] + [0], rows[1]])  # [2, 9]: 0 = pad
    attention_mask = torch.tensor([[0] + [1] * 6 + [0], [1] * 8])
    scores = scorer(sequences, attention_mask)
    expected = torch.stack(
        [
            sequence_scores(scorer.model, torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long))[0]
            for row in rows
        ]
    )
    torch.testing.assert_close(scores, expected.detach(), atol=1e-5, rtol=1e-5)
    combined = RewardScorer([], scorer, weights=[2.0])
    rewards, per_source = combined(prompts, completions, [[5], [5]], {}, sequences, attention_mask)
    torch.testing.assert_close(rewards, 2 * expected.detach(), atol=1e-5, rtol=1e-5)
    assert combined.names == ["reward_model"] and per_source.shape == (2, 1)
    with pytest.raises(ValueError, match="needs the token sequences"):
        combined(prompts, completions, [[5], [5]], {})


def test_reward_model_with_another_vocabulary_reads_text(reward_model_dir):
    """The fast path (the policy's ids) only with the same vocabulary; else the text is re-tokenised
    (tests/test_real_data.py checks those scores against a reward model with its own tokenizer)."""
    assert RewardModelScorer(reward_model_dir, load_tokenizer("tiny")).same_vocabulary
    other = load_tokenizer("tiny")
    other.add_tokens(["<|tool|>"])
    scorer = RewardModelScorer(reward_model_dir, other)
    assert not scorer.same_vocabulary
    rewards, _ = RewardScorer([], scorer)(["1+1="], ["2"], [[5 + 18, other.eos_token_id]], {})  # no token tensors
    tokens = scorer.tokenizer("1+1=2")["input_ids"] + [scorer.tokenizer.eos_token_id]
    expected = sequence_scores(scorer.model, torch.tensor([tokens]), torch.ones(1, len(tokens), dtype=torch.long))
    torch.testing.assert_close(rewards, expected.detach(), atol=1e-5, rtol=1e-5)


def test_an_unimportable_reward_module_is_one_clear_error():
    with pytest.raises(ValueError, match="cannot import 'no_such_package.rewards'"):
        load_reward_function("no_such_package.rewards:correct")


# ---------------------------------------------------------------- the reward model as an adapter on the policy


def test_reward_adapter_on_the_policy_scores_as_the_separate_reward_model(tmp_path):
    """The same base + adapter + score head, as a separate model and switched on over the LoRA policy."""
    reward_dir = lora_reward_model_dir(tmp_path / "rm")
    tokenizer = load_tokenizer("tiny")
    policy, _ = load_policy("tiny")
    policy = prepare_model(policy, lora_r=2, lora_targets="q_proj,k_proj")  # other targets than the reward's
    with torch.no_grad():
        for parameter in lora_parameters(policy)[1::2]:
            parameter.normal_(std=0.5)  # a trained policy: its adapters must not leak into the reward
    sequences = torch.randint(5, 100, (5, 11), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(sequences)
    attention_mask[0, :4] = attention_mask[1, :2] = attention_mask[3, -3:] = 0  # left-padded, right-padded rows

    policy.train()
    on_policy = AdapterRewardScorer(str(reward_dir), tokenizer, batch_size=2)
    with pytest.raises(ValueError, match="attach"):
        on_policy(sequences, attention_mask)
    on_policy.attach(policy)
    assert adapter_names(policy) == ["default", "reward"]
    assert not any(p.requires_grad for p in lora_parameters(policy, "reward"))
    scores = on_policy(sequences, attention_mask)  # [5]
    separate_scorer = RewardModelScorer(str(reward_dir), tokenizer)  # the merged model of the directory
    merged = separate_scorer(sequences, attention_mask)
    separate, _ = load_reward_model("tiny")
    separate_scorer.model = load_adapter(separate, str(reward_dir / "adapter")).eval()  # base + adapter + head
    expected = separate_scorer(sequences, attention_mask)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores, merged, rtol=1e-5, atol=1e-5)
    assert scores.std() > 0.01  # the adapter and head are random: the scores differ between rows
    assert all(layer.active == "default" for layer in policy.modules() if isinstance(layer, LoRALinear))
    assert policy.training  # scored in eval mode, then put back


def test_reward_adapter_refuses_another_base_a_full_policy_and_a_directory_without_adapter(tmp_path):
    reward_dir = lora_reward_model_dir(tmp_path / "rm")
    tokenizer = load_tokenizer("tiny")
    with pytest.raises(ValueError, match="no adapter_config.json in it or in its adapter/ subdirectory"):
        AdapterRewardScorer(str(tmp_path), tokenizer)
    full_policy, _ = load_policy("tiny")
    with pytest.raises(ValueError, match="needs a LoRA policy"):
        AdapterRewardScorer(str(reward_dir), tokenizer).attach(prepare_model(full_policy, lora_r=0))
    other_base = tmp_path / "other"
    for part in load_policy("tiny"):  # the same weights in another checkpoint: the name is what is checked
        part.save_pretrained(other_base)
    policy = prepare_model(load_policy(str(other_base))[0], lora_r=2)
    with pytest.raises(ValueError, match=r"was trained on '.*tiny.*', the policy starts from '.*other'"):
        AdapterRewardScorer(str(reward_dir), tokenizer).attach(policy)
