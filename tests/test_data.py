"""Data layer: loading, format detection, tokenisation with masks, collation and packing.

With the tiny character-level tokenizer, hand tokenisation is one id per character (``char_ids``);
special ids: <|pad|> 0, <|endoftext|> 1, <|im_start|> 2, <|im_end|> 3.
"""

import json

import datasets
import pytest
import torch

from rlcore import toy
from rlcore.data import (
    collate_left,
    collate_preference,
    collate_right,
    detect_format,
    is_conversational,
    load_eval_rows,
    load_rows,
    pack_sequences,
    tokenize_preference,
    tokenize_prompts,
    tokenize_sft,
    tokenize_unpaired,
)
from rlcore.models import load_policy
from rlcore.toy import TOY_KINDS, tiny_model_dir, tiny_tokenizer, toy_problems

PAD, EOS, IM_START, IM_END = 0, 1, 2, 3


def char_ids(text: str) -> list[int]:
    return [5 + toy.CHARACTERS.index(char) for char in text]


def chat_turn(role: str, content: str) -> list[int]:
    """Hand rendering of one ChatML turn without its trailing newline: <|im_start|>role\\ncontent<|im_end|>."""
    return [IM_START] + char_ids(f"{role}\n{content}") + [IM_END]


ASSISTANT_HEADER = [IM_START] + char_ids("assistant\n")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


# Two rows per format, as a user would write them to a file.
FORMAT_ROWS = {
    "text": ([{"text": "12+3=15"}, {"text": "1+1=2"}], "language_modeling", False),
    "messages": (
        [{"messages": user("12+3=") + assistant("15")}, {"messages": user("1+1=") + assistant("2")}],
        "language_modeling",
        True,
    ),
    "prompt_only": ([{"prompt": "12+3=", "answer": "15"}, {"prompt": "1+1=", "answer": "2"}], "prompt_only", False),
    "prompt_completion": (
        [{"prompt": "12+3=", "completion": "15"}, {"prompt": "1+1=", "completion": "2"}],
        "prompt_completion",
        False,
    ),
    "conversational": (
        [
            {"prompt": user("12+3="), "completion": assistant("15")},
            {"prompt": user("1+1="), "completion": assistant("2")},
        ],
        "prompt_completion",
        True,
    ),
    "preference": (
        [
            {"prompt": "12+3=", "chosen": "15", "rejected": "16", "margin": 0.5},
            {"prompt": "1+1=", "chosen": "2", "rejected": "3", "margin": 1.0},
        ],
        "preference",
        False,
    ),
    "conversational_preference": (
        [
            {"prompt": user("12+3="), "chosen": assistant("15"), "rejected": assistant("16")},
            {"prompt": user("1+1="), "chosen": assistant("2"), "rejected": assistant("3")},
        ],
        "preference",
        True,
    ),
    "preference_implicit": (
        [{"chosen": "12+3=15", "rejected": "12+3=25"}, {"chosen": "1+1=2", "rejected": "1+1=3"}],
        "preference_implicit",
        False,
    ),
    "conversational_implicit": (
        [
            {"chosen": user("12+3=") + assistant("15"), "rejected": user("12+3=") + assistant("16")},
            {"chosen": user("1+1=") + assistant("2"), "rejected": user("1+1=") + assistant("3")},
        ],
        "preference_implicit",
        True,
    ),
    "unpaired": (
        [{"prompt": "12+3=", "completion": "15", "label": True}, {"prompt": "1+1=", "completion": "3", "label": False}],
        "unpaired_preference",
        False,
    ),
}


def chat_prompt(text):
    return chat_turn("user", text) + char_ids("\n") + ASSISTANT_HEADER


def plain_prompt(text):
    return char_ids(text)


# The first row of each format, tokenised by hand.
EXPECTED_FIRST_ROW = {
    "text": {"input_ids": char_ids("12+3=15") + [EOS], "completion_mask": [0] + [1] * 7},
    "messages": {
        "input_ids": chat_prompt("12+3=") + char_ids("15") + [IM_END] + char_ids("\n"),
        "completion_mask": [0] * len(chat_prompt("12+3=")) + [1, 1, 1, 0],
    },
    "prompt_only": {"prompt": "12+3=", "answer": "15", "prompt_ids": plain_prompt("12+3=")},
    "prompt_completion": {"input_ids": char_ids("12+3=15") + [EOS], "completion_mask": [0] * 5 + [1, 1, 1]},
    "conversational": {
        "input_ids": chat_prompt("12+3=") + char_ids("15") + [IM_END],
        "completion_mask": [0] * len(chat_prompt("12+3=")) + [1, 1, 1],
    },
    "preference": {
        "prompt_ids": char_ids("12+3="),
        "chosen_ids": char_ids("15") + [EOS],
        "rejected_ids": char_ids("16") + [EOS],
        "margin": 0.5,
    },
    "conversational_preference": {
        "prompt_ids": chat_prompt("12+3="),
        "chosen_ids": char_ids("15") + [IM_END],
        "rejected_ids": char_ids("16") + [IM_END],
    },
    # the common prefix of "12+3=15" and "12+3=25" is "12+3="
    "preference_implicit": {
        "prompt_ids": char_ids("12+3="),
        "chosen_ids": char_ids("15") + [EOS],
        "rejected_ids": char_ids("25") + [EOS],
    },
    # the common prefix of the two message lists is the user turn
    "conversational_implicit": {
        "prompt_ids": chat_prompt("12+3="),
        "chosen_ids": char_ids("15") + [IM_END],
        "rejected_ids": char_ids("16") + [IM_END],
    },
    "unpaired": {"prompt_ids": char_ids("12+3="), "completion_ids": char_ids("15") + [EOS], "label": True},
}


def tokenize_any(rows, tokenizer, **kwargs):
    found = detect_format(rows)
    if found in ("language_modeling", "prompt_completion"):
        return tokenize_sft(rows, tokenizer, **kwargs)
    if found.startswith("preference"):
        return tokenize_preference(rows, tokenizer, **kwargs)
    if found == "unpaired_preference":
        return tokenize_unpaired(rows, tokenizer, **kwargs)
    return tokenize_prompts(rows, tokenizer, **kwargs)


def write_rows(rows, path):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


@pytest.mark.parametrize("extension", [".jsonl", ".parquet"])
@pytest.mark.parametrize("name", FORMAT_ROWS)
def test_every_format_from_files_matches_hand_tokenisation(name, extension, tokenizer, tmp_path):
    rows, expected_format, conversational = FORMAT_ROWS[name]
    dataset = load_rows(write_rows(rows, tmp_path / f"{name}{extension}"))
    assert detect_format(dataset) == expected_format and is_conversational(dataset) == conversational
    tokenized = tokenize_any(dataset, tokenizer)
    assert len(tokenized) == 2
    assert tokenized[0] == EXPECTED_FIRST_ROW[name]


@pytest.mark.parametrize("kind", TOY_KINDS)
def test_every_toy_kind_tokenises(kind, tokenizer):
    rows = load_rows(f"toy:{kind}", n=4)
    tokenized = tokenize_any(rows, tokenizer)
    assert len(tokenized) == 4
    end = IM_END if is_conversational(rows) else EOS
    for (a, b), row in zip(toy_problems("train", n=4), tokenized):
        all_ids = sum((ids for name, ids in row.items() if name.endswith("_ids")), [])
        assert f"{a}+{b}=" in tokenizer.decode(all_ids)
        for name in ("chosen_ids", "rejected_ids", "completion_ids"):
            assert name not in row or row[name][-1] == end  # every response ends with its stop token
        if "input_ids" in row:  # the trained span ends with the stop token
            last_trained = max(index for index, bit in enumerate(row["completion_mask"]) if bit)
            assert row["input_ids"][last_trained] == end


def test_load_rows_sources(tmp_path):
    assert load_rows("toy", n=3).column_names == ["prompt", "completion"]
    assert len(load_rows("toy:preference", split="test")) == toy.TEST_SIZE
    rows = [
        {"prompt": "1+1=", "completion": "2"},
        {"prompt": "2+2=", "completion": "4"},
        {"prompt": "3+3=", "completion": "6"},
    ]
    expected = datasets.Dataset.from_list(rows)
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    expected.to_csv(str(tmp_path / "rows.csv"), index=False)
    expected.save_to_disk(str(tmp_path / "saved"))
    files_dir = tmp_path / "files"
    files_dir.mkdir()
    write_rows(rows, files_dir / "train.jsonl")
    for source in ("rows.json", "saved", "files"):
        assert load_rows(str(tmp_path / source)).to_list() == rows, source
    as_text = datasets.Features({"prompt": datasets.Value("string"), "completion": datasets.Value("string")})
    assert load_rows(str(tmp_path / "rows.csv"), features=as_text).to_list() == rows  # CSV infers types otherwise
    with pytest.raises(ValueError, match="got int: 2 .a CSV column of numbers is read as numbers: pass features="):
        tokenize_sft(load_rows(str(tmp_path / "rows.csv")), tiny_tokenizer())
    assert load_rows(str(tmp_path / "rows.json"), n=2).to_list() == rows[:2]
    assert len(load_rows(str(tmp_path / "rows.json"), n=10)) == 3
    (tmp_path / "rows.txt").write_text("1+1=2")
    with pytest.raises(ValueError, match="expected a file ending in .json, .jsonl, .parquet, .csv"):
        load_rows(str(tmp_path / "rows.txt"))


def test_assistant_mask_matches_the_template_generation_markers(tokenizer):
    conversation = [
        {"role": "system", "content": "add"},
        *user("1+2="),
        *assistant("3"),
        *user("4+5="),
        *assistant("9"),
    ]
    tokenized = tokenize_sft(datasets.Dataset.from_list([{"messages": conversation}]), tokenizer)[0]
    reference = tokenizer.apply_chat_template(conversation, return_dict=True, return_assistant_tokens_mask=True)
    assert tokenized["input_ids"] == reference["input_ids"]
    assert tokenized["completion_mask"] == reference["assistant_masks"]
    assert sum(tokenized["completion_mask"]) == 4  # "3<|im_end|>" and "9<|im_end|>"


def test_completion_only_false_trains_on_every_token_but_the_first(tokenizer):
    rows = datasets.Dataset.from_list(FORMAT_ROWS["prompt_completion"][0])
    assert tokenize_sft(rows, tokenizer, completion_only=False)[0]["completion_mask"] == [0] + [1] * 7


# ---------------------------------------------------------------- truncation


def test_truncation_drop_and_keep_start(tokenizer, capsys):
    rows = datasets.Dataset.from_list(
        [{"prompt": "1+1=", "completion": "2"}, {"prompt": "12+3=", "completion": "1500"}]
    )
    dropped = tokenize_sft(rows, tokenizer, max_length=8)  # row 1 is 5 + 5 = 10 tokens
    assert dropped["input_ids"] == [char_ids("1+1=2") + [EOS]]
    assert (
        "tokenize_sft: 1 of 2 rows longer than max_length=8 (truncation='drop': 0 truncated, 1 dropped)"
        in capsys.readouterr().out
    )
    truncated = tokenize_sft(rows, tokenizer, max_length=8, truncation="keep_start")
    assert truncated[1] == {"input_ids": char_ids("12+3=150"), "completion_mask": [0] * 5 + [1] * 3}  # no EOS left
    assert "1 truncated, 0 dropped" in capsys.readouterr().out
    # A prompt that alone fills max_length is dropped even when truncating.
    assert len(tokenize_sft(rows, tokenizer, max_length=5, truncation="keep_start")) == 1
    with pytest.raises(ValueError, match="every row is longer than max_length=4"):
        tokenize_sft(rows, tokenizer, max_length=4)
    with pytest.raises(ValueError, match="truncation must be one of"):
        tokenize_sft(rows, tokenizer, truncation="left")


def test_prompt_truncation_keeps_the_end(tokenizer, capsys):
    rows = datasets.Dataset.from_list([{"prompt": "123+456=", "answer": "579"}, {"prompt": "1+1=", "answer": "2"}])
    truncated = tokenize_prompts(rows, tokenizer, max_length=5, truncation="keep_end")
    assert truncated["prompt_ids"] == [char_ids("+456="), char_ids("1+1=")] and truncated["answer"] == ["579", "2"]
    assert tokenize_prompts(rows, tokenizer, max_length=5, truncation="keep_start")["prompt_ids"][0] == char_ids(
        "123+4"
    )
    assert tokenize_prompts(rows, tokenizer, max_length=5)["answer"] == ["2"]
    assert capsys.readouterr().out.count("tokenize_prompts: 1 of 2 rows") == 3


def test_preference_truncation_applies_to_both_responses(tokenizer):
    rows = datasets.Dataset.from_list([{"prompt": "1+1=", "chosen": "2", "rejected": "2222"}])
    assert len(tokenize_preference(rows, tokenizer, max_length=7, truncation="keep_start")) == 1
    row = tokenize_preference(rows, tokenizer, max_length=7, truncation="keep_start")[0]
    assert row["chosen_ids"] == char_ids("2") + [EOS] and row["rejected_ids"] == char_ids("222")
    # keep_end: both responses whole (the longer, "2222" + EOS, is 5 tokens), the prompt cut to its last 2 tokens
    row = tokenize_preference(rows, tokenizer, max_length=7, truncation="keep_end")[0]
    assert row["prompt_ids"] == char_ids("1=") and row["rejected_ids"] == char_ids("2222") + [EOS]


def test_keep_end_cuts_the_prompt_from_the_left_and_text_keeps_its_end(tokenizer, capsys):
    rows = datasets.Dataset.from_list([{"prompt": "12+3=", "completion": "1500"}])
    # 5 prompt + 5 completion tokens (1500 + EOS) into 8: the prompt keeps its last 3 tokens
    row = tokenize_sft(rows, tokenizer, max_length=8, truncation="keep_end")[0]
    assert row == {"input_ids": char_ids("+3=1500") + [EOS], "completion_mask": [0] * 3 + [1] * 5}
    assert "(truncation='keep_end': 1 truncated, 0 dropped)" in capsys.readouterr().out
    # a completion that alone fills max_length leaves no prompt token: dropped
    with pytest.raises(ValueError, match="every row is longer than max_length=5"):
        tokenize_sft(rows, tokenizer, max_length=5, truncation="keep_end")
    text = datasets.Dataset.from_list([{"text": "1+1=2"}])  # 6 tokens with EOS: the last 4 kept, all trained but 0
    assert tokenize_sft(text, tokenizer, max_length=4, truncation="keep_end")[0] == {
        "input_ids": char_ids("1=2") + [EOS],
        "completion_mask": [0, 1, 1, 1],
    }


# ---------------------------------------------------------------- bad input


def test_missing_columns_name_the_columns_formats_and_row(tokenizer):
    rows = datasets.Dataset.from_list([{"question": "1+1=", "response": "2"}])
    with pytest.raises(ValueError) as error:
        tokenize_sft(rows, tokenizer)
    message = str(error.value)
    assert "tokenize_sft: missing columns: found columns ['question', 'response']" in message
    assert "language_modeling (text); prompt_completion (prompt, completion)" in message
    assert "first offending row 0: {'question': '1+1=', 'response': '2'}" in message
    with pytest.raises(ValueError, match="unknown dataset format: found columns"):
        detect_format(rows)
    with pytest.raises(ValueError, match="tokenize_preference: got a prompt_completion dataset"):
        tokenize_preference(datasets.Dataset.from_list(FORMAT_ROWS["prompt_completion"][0]), tokenizer)


def test_empty_and_missing_values_name_the_row(tokenizer, tmp_path):
    rows = datasets.Dataset.from_list([{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2=", "completion": ""}])
    with pytest.raises(ValueError, match="row 1: field 'completion' is empty"):
        tokenize_sft(rows, tokenizer)
    path = tmp_path / "gaps.jsonl"
    path.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "2+2="}\n')
    with pytest.raises(ValueError, match=r"row 1: field 'completion' is missing \(None\)"):
        tokenize_sft(load_rows(str(path)), tokenizer)
    conversation = datasets.Dataset.from_list([{"prompt": user("1+1="), "completion": assistant("")}])
    with pytest.raises(ValueError, match="row 0: field 'completion' is empty"):
        tokenize_sft(conversation, tokenizer)


def test_non_string_content_names_row_field_and_type(tokenizer):
    rows = datasets.Dataset.from_dict({"prompt": ["1+1=", "2+2="], "completion": [2, 4]})
    with pytest.raises(ValueError, match="row 0: field 'completion' must be a string, got int: 2"):
        tokenize_sft(rows, tokenizer)
    messages = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": 7}]}])
    with pytest.raises(ValueError, match="row 0: field 'messages', message 0: content must be a string, got int: 7"):
        tokenize_sft(messages, tokenizer)
    labels = datasets.Dataset.from_list([{"prompt": "1+1=", "completion": "2", "label": 1}])
    with pytest.raises(ValueError, match="row 0: field 'label' must be a bool, got int: 1"):
        tokenize_unpaired(labels, tokenizer)


def test_unknown_role_names_row_role_and_allowed_roles(tokenizer):
    rows = datasets.Dataset.from_list(
        [
            {"messages": user("1+1=") + assistant("2")},
            {"messages": user("1+1=") + [{"role": "tool", "content": "2"}]},
        ]
    )
    with pytest.raises(
        ValueError,
        match="row 1: field 'messages', message 1: role 'tool' is not one the chat template knows; allowed roles: system, user, assistant",
    ):
        tokenize_sft(rows, tokenizer)


def test_identical_implicit_pair_is_rejected(tokenizer):
    rows = datasets.Dataset.from_list([{"chosen": "1+1=2", "rejected": "1+1=2"}])
    with pytest.raises(ValueError, match="row 0: chosen and rejected are identical"):
        tokenize_preference(rows, tokenizer)


# ---------------------------------------------------------------- collation and packing


def test_collate_right_by_hand():
    batch = collate_right([[5, 6, 7], [8]], [[0, 1, 1], [1]], pad_id=PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["completion_mask"].tolist() == [[0, 1, 1], [1, 0, 0]]
    assert collate_right([[5, 6]], None, pad_id=PAD)["completion_mask"].tolist() == [[1, 1]]
    with pytest.raises(ValueError, match="each as long as its sequence"):
        collate_right([[5, 6]], [[1]], pad_id=PAD)
    with pytest.raises(ValueError, match=r"seqs\[1\] is empty"):
        collate_right([[5], []], None, pad_id=PAD)


def test_collate_left_by_hand():
    batch = collate_left([[5, 6, 7], [8]], pad_id=PAD)
    assert batch["prompt_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["prompt_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_collate_preference_stacks_chosen_then_rejected():
    batch = collate_preference([[5, 6], [7]], [[8], [9, 10]], [[11, 12], [13]], pad_id=PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 8, 0], [7, 9, 10, 0], [5, 6, 11, 12], [7, 13, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 0], [0, 1, 1, 0], [0, 0, 1, 1], [0, 1, 0, 0]]
    with pytest.raises(ValueError, match="batch sizes differ"):
        collate_preference([[5]], [[6]], [[7], [8]], pad_id=PAD)


def test_pack_sequences_by_hand():
    rows = [
        {"input_ids": [10, 11, 12], "completion_mask": [0, 1, 1]},
        {"input_ids": [20, 21], "completion_mask": [1, 1]},
        {"input_ids": [30, 31, 32, 33], "completion_mask": [0, 0, 1, 1]},
    ]
    # First-fit decreasing into bins of 5: row 2 (4 tokens) opens bin 0, row 0 (3) opens bin 1, row 1 (2)
    # fits in bin 1. Each sample's first token leaves the completion mask; padding restarts positions.
    packed = pack_sequences(rows, max_length=5, pad_id=PAD)
    assert packed["input_ids"].tolist() == [[30, 31, 32, 33, 0], [10, 11, 12, 20, 21]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert packed["completion_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 0, 1]]
    assert packed["sample_index"].tolist() == [[2, 2, 2, 2, -1], [0, 0, 0, 1, 1]]
    with pytest.raises(ValueError, match="row 0 has 3 tokens; every row must have 1..max_length=2"):
        pack_sequences(rows, max_length=2)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model_dir(str(tmp_path_factory.mktemp("rlcore-cache")))


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_samples_stay_apart(attn_implementation, tiny_dir, tokenizer):
    model, _ = load_policy(tiny_dir, attn_implementation=attn_implementation)
    texts = ["37+85=122", "1+1=2", "999+1=1000"]
    rows = [{"input_ids": char_ids(text), "completion_mask": [1] * len(text)} for text in texts]
    packed = pack_sequences(rows, max_length=32, pad_id=PAD)
    assert packed["input_ids"].shape == (1, 32)
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[
            0
        ]  # [32, V]
        for index, text in enumerate(texts):
            alone = model(input_ids=torch.tensor([char_ids(text)])).logits[0]  # [len, V]
            torch.testing.assert_close(logits[packed["sample_index"][0] == index], alone, atol=1e-5, rtol=1e-5)
        # The pitfall the docstring warns about: with the cache on, the later samples see the earlier ones.
        leaky = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=True).logits[0]
    assert not torch.allclose(leaky, logits, atol=1e-3)


def test_sliced_splits_of_every_local_source(tmp_path):
    """``NAME[a:b]`` and ``NAME[a%:b%]`` give the same rows whatever holds them, sliced exactly once:
    rows 100..199, and the second half (50% of 300 = 150) for the percent slice."""
    rows = datasets.Dataset.from_list([{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(300)])
    rows.to_json(str(tmp_path / "rows.jsonl"))
    (tmp_path / "files").mkdir()
    rows.to_json(str(tmp_path / "files" / "train.jsonl"))
    rows.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": rows}).save_to_disk(str(tmp_path / "saved_dict"))
    for source in ("rows.jsonl", "files", "saved", "saved_dict"):
        path = str(tmp_path / source)
        assert load_rows(path, "train[100:200]")["prompt"] == [f"p{i}" for i in range(100, 200)], source
        assert load_rows(path, "train[50%:]")["prompt"] == [f"p{i}" for i in range(150, 300)], source
    assert len(load_rows("toy:prompt_only", "test[:4]")) == 4


def test_held_out_rows_are_never_the_training_rows(tmp_path, capsys):
    rows = datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}] * 4)
    rows.to_json(str(tmp_path / "train.jsonl"))
    rows.save_to_disk(str(tmp_path / "saved"))
    accepted = ("prompt_completion",)
    for source in ("train.jsonl", "saved"):  # one split each: nothing to evaluate on, and it says so
        assert load_eval_rows(str(tmp_path / source), None, "test", None, accepted) is None
        assert "no evaluation" in capsys.readouterr().out
        with pytest.raises(ValueError, match="holds one split, 'train'"):
            load_rows(str(tmp_path / source), "test")
    # an --eval_dataset file is read whole; another source must have the split asked for
    assert len(load_eval_rows("toy:prompt_completion", str(tmp_path / "train.jsonl"), "test", None, accepted)) == 4
    with pytest.raises(ValueError, match="split must be"):
        load_eval_rows("toy:prompt_completion", "toy:prompt_completion", "validation", None, accepted)
