"""The embedded default: toy task data, rewards, tiny tokenizer and tiny model."""

import os

import huggingface_hub
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from rlcore import toy
from rlcore.toy import (
    TOY_KINDS,
    accuracy_reward,
    digit_reward,
    extract_answer,
    format_reward,
    tiny_config,
    tiny_model,
    tiny_model_dir,
    tiny_tokenizer,
    toy_dataset,
    toy_problems,
    wrong_answers,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model_dir(str(tmp_path_factory.mktemp("rlcore-cache")))


def char_ids(text: str) -> list[int]:
    """Hand tokenisation: characters are ids 5.. in the order "\\n", then ASCII 32..126."""
    return [5 + toy.CHARACTERS.index(char) for char in text]


# ---------------------------------------------------------------- task


def test_train_and_test_are_disjoint_and_test_is_fixed():
    test_pairs = toy_problems("test")
    assert len(test_pairs) == toy.TEST_SIZE == len(set(test_pairs))
    assert toy_problems("test", seed=123) == test_pairs  # the held-out set does not move with the seed
    for seed in (0, 1):
        train_pairs = toy_problems("train", seed=seed)
        assert len(train_pairs) == toy.DEFAULT_TRAIN_SIZE == len(set(train_pairs))
        assert not set(train_pairs) & set(test_pairs)
    assert toy_problems("train", seed=0) != toy_problems("train", seed=1)
    assert toy_problems("train", n=50, seed=3) == toy_problems("train", n=50, seed=3)


def test_small_operand_range_uses_every_remaining_pair():
    # max_operand=9: 100 pairs, a fifth (20) held out, so exactly the other 80 train pairs exist.
    test_pairs = set(toy_problems("test", max_operand=9))
    train_pairs = set(toy_problems("train", max_operand=9))
    assert len(test_pairs) == 20 and len(train_pairs) == 80
    assert test_pairs | train_pairs == {(a, b) for a in range(10) for b in range(10)}
    with pytest.raises(ValueError, match="only 80 distinct train pairs"):
        toy_problems("train", n=81, max_operand=9)
    with pytest.raises(ValueError, match="split must be"):
        toy_problems("validation")


EXPECTED_COLUMNS = {
    "language_modeling": ["text"],
    "prompt_completion": ["prompt", "completion"],
    "conversational": ["prompt", "completion"],
    "conversational_lm": ["messages"],
    "preference": ["prompt", "chosen", "rejected"],
    "preference_implicit": ["chosen", "rejected"],
    "unpaired": ["prompt", "completion", "label"],
    "prompt_only": ["prompt", "answer"],
    "conversational_prompt_only": ["prompt", "answer"],
    "conversational_preference": ["prompt", "chosen", "rejected"],
}


@pytest.mark.parametrize("kind", TOY_KINDS)
def test_every_kind_has_trl_columns_and_correct_answers(kind):
    rows = toy_dataset(kind, n=20, seed=5)
    assert rows.column_names == EXPECTED_COLUMNS[kind]
    for (a, b), row in zip(toy_problems("train", n=20, seed=5), rows):
        prompt, answer = f"{a}+{b}=", str(a + b)
        user, reply = [{"role": "user", "content": prompt}], [{"role": "assistant", "content": answer}]
        expected = {
            "language_modeling": {"text": prompt + answer},
            "prompt_completion": {"prompt": prompt, "completion": answer},
            "conversational": {"prompt": user, "completion": reply},
            "conversational_lm": {"messages": user + reply},
            "prompt_only": {"prompt": prompt, "answer": answer},
            "conversational_prompt_only": {"prompt": user, "answer": answer},
        }.get(kind)
        if expected is not None:
            assert row == expected
        elif kind in ("preference", "conversational_preference", "preference_implicit"):
            chosen, rejected = (
                (row["chosen"], row["rejected"])
                if kind != "conversational_preference"
                else (row["chosen"][0]["content"], row["rejected"][0]["content"])
            )
            start = prompt if kind == "preference_implicit" else ""
            assert chosen == start + answer
            assert rejected.startswith(start) and int(rejected[len(start) :]) in wrong_answers(a, b)
        else:  # unpaired: even rows correct, odd rows a wrong answer
            assert row["label"] == (row["completion"] == answer)


def test_unpaired_labels_are_balanced():
    labels = toy_dataset("unpaired", n=100)["label"]
    assert sum(labels) == 50


def test_wrong_answers_by_hand():
    # 37 + 85 = 122. Off by 1/10/100: 121, 123, 112, 132, 22, 222. Carry dropped column-wise:
    # 3+8=11 -> 1, 7+5=12 -> 2, so "12". One digit changed: 022 is not a number form, so e.g. 922, 102, 129.
    answers = wrong_answers(37, 85)
    for expected in (121, 123, 112, 132, 22, 222, 12, 922, 102, 129):
        assert expected in answers
    assert 122 not in answers and min(answers) >= 0
    assert 0 not in wrong_answers(0, 0) and 1 in wrong_answers(0, 0)


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown toy kind 'chat'"):
        toy_dataset("chat")


# ---------------------------------------------------------------- rewards


def test_extract_answer_by_hand():
    assert extract_answer("122") == "122"
    assert extract_answer(" 122\n") == "122"  # surrounding whitespace ignored
    assert extract_answer("122<|endoftext|>junk") == "122"  # cut at the stop string
    assert extract_answer("122<|im_end|>") == "122"
    assert extract_answer("12 2") is None
    assert extract_answer("122abc") is None
    assert extract_answer("-5") is None
    assert extract_answer("") is None
    assert extract_answer([{"role": "assistant", "content": "7"}]) == "7"


def test_accuracy_and_format_rewards_by_hand():
    prompts = ["37+85="] * 5
    completions = ["122", "121", "122<|endoftext|>", [{"role": "assistant", "content": "0122"}], "one hundred"]
    answers = ["122"] * 5
    assert accuracy_reward(prompts, completions, answers) == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert format_reward(prompts, completions) == [1.0, 1.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="2 completions but 1 values in 'answer'"):
        accuracy_reward(["a", "b"], ["1", "2"], ["1"])
    with pytest.raises(TypeError, match="a completion must be a str"):
        format_reward(["a"], [3])


def test_digit_reward_by_hand():
    # Reference 122, digits compared from the right over max(len(answer), len(reference)) positions:
    #   "122" 3/3; "132" 1_2 right, tens wrong: 2/3; "22" units and tens right, hundreds missing: 2/3;
    #   "1122" its last three are 122, the fourth has no partner: 3/4; "221" only the tens match: 1/3;
    #   "0122" is the integer 122: 1; "999" 0/3; "12x" and "" are not integers: 0.
    prompts = ["37+85="] * 9
    completions = ["122", "132", "22", "1122", "221", [{"role": "assistant", "content": "0122"}], "999", "12x", ""]
    rewards = digit_reward(prompts, completions, ["122"] * 9)
    assert rewards == [1.0, 2 / 3, 2 / 3, 3 / 4, 1 / 3, 1.0, 0.0, 0.0, 0.0]
    # reference 7: "7" 1, "17" units right, tens extra: 1/2, "8" 0; reference 1000, answer "100": units 0 = 0,
    # tens 0 = 0, hundreds 1 != 0, thousands missing: 2/4
    assert digit_reward(["p"] * 4, ["7", "17", "8", "100"], ["7", "7", "7", "1000"]) == [1.0, 0.5, 0.0, 0.5]
    # an exact answer always scores 1, exactly where accuracy does
    assert [r == 1.0 for r in rewards] == [a == 1.0 for a in accuracy_reward(prompts, completions, ["122"] * 9)]
    with pytest.raises(ValueError, match="2 completions but 1 values in 'answer'"):
        digit_reward(["a", "b"], ["1", "2"], ["1"])
    with pytest.raises(ValueError, match="the reference of row 0"):
        digit_reward(["a"], ["1"], ["x"])


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_is_one_token_per_character():
    tokenizer = tiny_tokenizer()
    printable = "".join(toy.CHARACTERS)
    assert tokenizer(printable)["input_ids"] == list(range(5, 101))
    assert tokenizer("37+85=122")["input_ids"] == char_ids("37+85=122")
    assert tokenizer.decode(tokenizer("a b\nc")["input_ids"]) == "a b\nc"
    assert tokenizer("é")["input_ids"] == [tokenizer.unk_token_id] == [4]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [2, 3]
    assert tokenizer("1<|im_end|>")["input_ids"] == [char_ids("1")[0], 3]  # special tokens are matched whole
    assert len(tokenizer) == 101


def test_chat_template_and_generation_mask():
    tokenizer = tiny_tokenizer()
    messages = [
        {"role": "system", "content": "add"},
        {"role": "user", "content": "1+2="},
        {"role": "assistant", "content": "3"},
    ]
    text = "<|im_start|>system\nadd<|im_end|>\n<|im_start|>user\n1+2=<|im_end|>\n<|im_start|>assistant\n3<|im_end|>\n"
    assert tokenizer.apply_chat_template(messages, tokenize=False) == text
    prompt_text = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt_text == text[: text.index("3<|im_end|>")]
    encoded = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    # The generation markers cover the reply "3" and its <|im_end|>, not the newline after it.
    masked = [token for token, bit in zip(encoded["input_ids"], encoded["assistant_masks"]) if bit]
    assert masked == char_ids("3") + [3]
    with pytest.raises(Exception, match="unknown role tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


# ---------------------------------------------------------------- model


def test_tiny_model_config_and_seeded_init():
    model = tiny_model()
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32
    # Embedding 101*128 (tied with the LM head) + 4 layers of [q 128*128, k 128*64, v 128*64, o 128*128,
    # MLP 3*128*512, two norms 2*128] + final norm 128.
    per_layer = 128 * 128 + 2 * 128 * 64 + 128 * 128 + 3 * 128 * 512 + 2 * 128
    assert sum(p.numel() for p in model.parameters()) == 101 * 128 + 4 * per_layer + 128 == 997_120
    state = torch.get_rng_state()
    again = tiny_model()
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))
    assert not torch.equal(model.model.embed_tokens.weight, tiny_model(seed=1).model.embed_tokens.weight)
    assert model.generation_config.eos_token_id == [1, 3]


def test_tiny_config_scales_to_a_benchmark_model():
    config = tiny_config(
        hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert config.vocab_size == 101 and 15e6 < sum(p.numel() for p in model.parameters()) < 25e6


def test_tiny_model_dir_saves_and_reloads_identically(tiny_dir):
    assert os.path.basename(tiny_dir) == "tiny-v1"
    assert not [name for name in os.listdir(os.path.dirname(tiny_dir)) if "building" in name]  # no leftovers
    mtime = os.path.getmtime(tiny_dir)
    assert tiny_model_dir(os.path.dirname(tiny_dir)) == tiny_dir and os.path.getmtime(tiny_dir) == mtime  # reused
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert tokenizer("1 2\n")["input_ids"] == char_ids("1 2\n")
    assert tokenizer.chat_template == toy.CHAT_TEMPLATE
    input_ids = torch.tensor([char_ids("37+85=122")])
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, tiny_model()(input_ids).logits)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("RLCORE_CACHE", str(tmp_path / "explicit"))
    assert toy.default_cache_dir() == str(tmp_path / "explicit")
    monkeypatch.delenv("RLCORE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert tiny_model_dir() == str(tmp_path / ".cache" / "rlcore" / "tiny-v1")
    assert os.path.isfile(tmp_path / ".cache" / "rlcore" / "tiny-v1" / "model.safetensors")


def test_tiny_model_loads_with_the_hub_offline(tiny_dir, monkeypatch):
    # What HF_HUB_OFFLINE=1 sets at import time; any hub request would now raise.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert huggingface_hub.constants.is_offline_mode()
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    input_ids = torch.tensor([tokenizer("37+85=122")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, tiny_model()(input_ids).logits)
